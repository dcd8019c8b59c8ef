"""One generation with BDM inside the WebUI's sampling loop, without importing the WebUI.

The script calls, per generation: `BdmRun(...)`; per sampling pass `ensure_attached(unet)`; per
`CFGDenoiser.forward` call (from `on_cfg_denoiser`) `denoiser_call(...)`; and `close()` when the
generation ends or fails. In between:
- a forward pre-hook on the denoiser's inner model (k-diffusion's `CompVisDenoiser`, or
  `CompVisTimestepsDenoiser`) finds the rows `[a, b)` of `x_in` its call covers (`CallRows.locate`:
  data-pointer offset of the view, or the next rows in order) and a forward hook clears them;
- `bdm.attach` on the UNet asks, per UNet call, for the strength and the Chinese context of those rows:
  positive prompt for cond rows (every AND-subprompt of an image), negative prompt for uncond rows, each
  at the denoiser's step of the current pass (prompt editing; the hires pass has its own schedules).
A UNet call that happens outside a known inner call (another extension calling the UNet directly)
gets nothing from the branch (strength 0), with one warning.

Forge (`bdm_forge/`) skips the hooks: its sampler says each UNet call's row roles itself, and the
branch's link in Forge's control chain asks `contexts(roles)`; the run's step, pass, errors and
per-image prompts are the same.

A run that must stop its generation (`BdmRun.failed(message)`, or `fail(message)` when a later pass
cannot take the branch) raises `BdmError` from the inner model's pre-hook: the WebUI catches
exceptions of scripts and callbacks and carries on, but an exception inside sampling ends the
generation and reaches the user (the UI's error box; the API's error response). In Forge the
branch's link raises it the same way, inside sampling.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence, Union

from torch import nn

from ..inject import Attachment, attach
from .context import ContextBank
from .errors import BdmError
from .layout import CallRows, RowRole, cfg_rows
from .manager import bridge_refusal

Prompt = Union[str, Sequence[Sequence]]  # a Chinese prompt, or its schedule [[end_at_step, text], ...]
_ALWAYS_CALL = "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters


class BdmRun:
    """The branch of one generation: attachment, inner-model hooks and the row → context lookup."""

    def __init__(self, bridge, bank: ContextBank | None, positive: Sequence[Prompt], negative: Sequence[Prompt],
                 strength: float = 1.0, log: Callable[[str], None] = print,
                 hires: tuple[Sequence[Prompt], Sequence[Prompt]] | None = None):
        """`positive`/`negative`: per image, the prompt or its schedule in the first pass; `hires`: the
        same pair for the hires pass (its schedules count its own steps)."""
        self.bridge, self.bank, self.strength, self.log = bridge, bank, float(strength), log
        self.error: BdmError | None = None  # set: stop the generation at the next denoiser call
        self.stop_on_failure = True  # a pass that cannot take the branch stops the generation (else warns)
        self.tables: dict[bool, tuple[list[int], list[int]]] = {}  # hires pass? -> (positive, negative) slots
        if bank is not None:
            for is_hires, pair in ((False, (positive, negative)), (True, hires)):
                if pair is not None:
                    self.tables[is_hires] = tuple([bank.slot(p) for p in prompts] or [0] for prompts in pair)
        self.image_offset = 0  # global index of image 0 of the current batch (p.iteration * batch_size)
        self.step = 0  # the denoiser's step in the current pass (the WebUI's CFGDenoiser.step)
        self.hires = False  # the current pass is the hires pass
        self.attachment: Attachment | None = None
        self._inner: dict[int, tuple[nn.Module, list]] = {}
        self._call: CallRows | None = None
        self._rows: tuple[int, int] | None = None
        self._warned: set[str] = set()
        self.unet_calls = 0  # UNet calls the branch ran in
        self.entry = None  # the ModelEntry of the branch (set by the session)
        self.infotext: dict = {}  # its fields for the image parameters

    @classmethod
    def failed(cls, error: BdmError) -> "BdmRun":
        """A run that only stops its generation with `error`."""
        run = cls(None, None, [], [])
        run.error = error
        return run

    def fail(self, error: BdmError) -> None:
        """Stop the generation at the next denoiser call (the branch is taken off the UNet now)."""
        self.error = error
        self.detach_unet()

    # -- lifecycle -------------------------------------------------------------------------------
    def ensure_attached(self, unet: nn.Module) -> None:
        """Attach the branch to `unet` (the current pass's UNet), moving it off any previous UNet."""
        if self.bridge is None or self.error is not None:
            return
        a = self.attachment
        if a is not None and a.unet is unet and a.attached:
            return
        self.detach_unet()
        self.attachment = attach(unet, self.bridge, self._context, self._strength)

    def detach_unet(self) -> None:
        if self.attachment is not None:
            self.attachment.detach()
            self.attachment = None

    def close(self) -> None:
        """Remove every hook this run added; safe to call twice."""
        self.detach_unet()
        for module, handles in self._inner.values():
            for h in handles:
                h.remove()
        self._inner.clear()
        self._call = None
        self._rows = None

    @property
    def attached(self) -> bool:
        return self.attachment is not None and self.attachment.attached

    # -- per denoiser call -----------------------------------------------------------------------
    def denoiser_call(self, x_in, n_cond: int, n_uncond: int, conds_batch=None, inner_model: nn.Module | None = None,
                      unet: nn.Module | None = None, refusal: str | None = None, step: int = 0,
                      hires: bool = False) -> None:
        """A `CFGDenoiser.forward` call is about to run its inner model on row slices of `x_in`
        (`n_cond` cond rows, `n_uncond` uncond rows of text; `conds_batch`: the WebUI's AND-subprompt
        lists per image) with `unet`, at the denoiser's step `step` (the step the WebUI picks the English
        conds at) of the first or hires pass. `refusal`: why this pass's model cannot take BDM (None: it
        can). A pass that cannot take the branch stops the generation, or (`stop_on_failure` False) runs
        without it, with a warning."""
        self.step, self.hires = int(step), bool(hires)
        if inner_model is not None:
            self.hook_inner(inner_model)
        if self.error is not None or self.bridge is None:
            return
        refusal = refusal or (bridge_refusal(self.bridge, unet) if unet is not None else None)
        if refusal:
            self.pass_refused(refusal)
            return
        if unet is not None:
            self.ensure_attached(unet)
        try:
            roles = cfg_rows(int(x_in.shape[0]), n_cond, n_uncond, conds_batch)
        except ValueError as e:
            self.warn("layout", f"{e}; this step runs without the branch")
            self._call = None
            return
        self._call = CallRows(roles, x_in)

    def pass_refused(self, reason: str) -> None:
        """This sampling pass cannot take the branch (`reason`: why): stop the generation, or
        (`stop_on_failure` False) run the pass without the branch, with a warning."""
        message = f"BDM is not applied to this pass: {reason}"
        if self.stop_on_failure:
            self.fail(BdmError(message, 409))
            return
        self.warn("refused", message)
        self.detach_unet()
        self._call = None

    def hook_inner(self, module: nn.Module) -> None:
        entry = self._inner.get(id(module))
        if entry is not None and entry[0] is module:
            return
        extra = {"always_call": True} if _ALWAYS_CALL else {}
        handles = [module.register_forward_pre_hook(self._before_inner, with_kwargs=True),
                   module.register_forward_hook(self._after_inner, **extra)]
        self._inner[id(module)] = (module, handles)

    def _before_inner(self, module, args, kwargs):
        if self.error is not None:
            raise self.error
        self._rows = None
        if self._call is None:
            return None
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        try:
            self._rows = self._call.locate(x)
        except (ValueError, AttributeError) as e:
            self.warn("locate", f"{e}; that call runs without the branch")
        return None

    def _after_inner(self, module, args, output):
        self._rows = None

    # -- asked by bdm.attach per UNet call -------------------------------------------------------
    def _current(self, x) -> tuple[int, int] | None:
        rows = self._rows
        if rows is None or rows[1] - rows[0] != x.shape[0] or self._call is None:
            self.warn("outside", "BDM: a UNet call outside the CFG denoiser's known rows ran without "
                      "the branch")
            return None
        return rows

    def _strength(self, x, t, en_context):
        return self.strength if self._current(x) is not None else 0.0

    def _context(self, x, t, en_context):
        a, b = self._current(x)
        return self.contexts(self._call.roles_for(a, b))

    def contexts(self, roles: Sequence[RowRole]):
        """The Chinese contexts of one UNet call's rows (counted as a call the branch ran in); every
        host's injection asks here."""
        self.unet_calls += 1
        return self.bank.rows([self.prompt_index(r) for r in roles], self.step)

    def prompt_index(self, role: RowRole) -> int:
        """Slot in the bank of the Chinese prompt of a row in the current pass: positive for cond rows
        (all AND subprompts of the image), negative for uncond rows; per-image lists wrap around."""
        tables = self.tables.get(self.hires)
        if tables is None:
            self.warn("hires", "BDM: no Chinese prompt schedule was prepared for the hires pass; it uses "
                       "the first pass's")
            tables = self.tables[False]
        g = self.image_offset + role.image
        table = tables[0] if role.is_cond else tables[1]
        return table[g % len(table)]

    def warn(self, key: str, message: str) -> None:
        """Tell the user once per run and `key` (through the `log` the script gave)."""
        if key not in self._warned:
            self._warned.add(key)
            self.log(message)
