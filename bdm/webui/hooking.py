"""One generation with BDM inside the WebUI's sampling loop, without importing the WebUI.

The script calls, per generation: `BdmRun(...)`; per sampling pass `ensure_attached(unet)`; per
`CFGDenoiser.forward` call (from `on_cfg_denoiser`) `begin_call(x_in, counts, inner_model)`; and
`close()` when the generation ends or fails. In between:
- a forward pre-hook on the denoiser's inner model (k-diffusion's `CompVisDenoiser`, or
  `CompVisTimestepsDenoiser`) finds the rows `[a, b)` of `x_in` its call covers (`CallRows.locate`:
  data-pointer offset of the view, or the next rows in order) and a forward hook clears them;
- `bdm.attach` on the UNet asks, per UNet call, for the strength and the Chinese context of those rows:
  positive prompt for cond rows (every AND-subprompt of an image), negative prompt for uncond rows, each
  at the denoiser's step of the current pass (prompt editing; the hires pass has its own schedules).
A UNet call that happens outside a known inner call (another extension calling the UNet directly)
gets nothing from the branch (strength 0), with one warning.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence, Union

from torch import nn

from ..inject import Attachment, attach
from .context import ContextBank
from .layout import CallRows, RowRole, row_roles

Prompt = Union[str, Sequence[Sequence]]  # a Chinese prompt, or its schedule [[end_at_step, text], ...]
_ALWAYS_CALL = "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters


class BdmRunError(RuntimeError):
    """Raised from inside sampling to stop a generation whose BDM settings cannot be applied."""


class BdmRun:
    """The branch of one generation: attachment, inner-model hooks and the row → context lookup."""

    def __init__(self, bridge, bank: ContextBank | None, positive: Sequence[Prompt], negative: Sequence[Prompt],
                 strength: float = 1.0, log: Callable[[str], None] = print, error: str | None = None,
                 hires: tuple[Sequence[Prompt], Sequence[Prompt]] | None = None):
        """`positive`/`negative`: per image, the prompt or its schedule in the first pass; `hires`: the
        same pair for the hires pass (its schedules count its own steps)."""
        self.bridge, self.bank, self.strength, self.log = bridge, bank, float(strength), log
        self.error = error  # set: stop the generation with this message at the first denoiser call
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
        self.unet_calls = 0  # UNet calls the branch ran in (diagnostics, tests)
        self.rows_seen: list[list[RowRole]] = []  # roles of the rows of each such call (tests)
        self.record_rows = False
        # called with the running count after the branch ran in a UNet call (test faults, diagnostics)
        self.on_unet_call: Callable[[int], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def ensure_attached(self, unet: nn.Module) -> None:
        """Attach the branch to `unet` (the current pass's UNet), moving it off any previous UNet."""
        if self.bridge is None:
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
    def begin_call(self, x_in, counts: Sequence[int], inner_model: nn.Module | None = None,
                   uncond_blocks: int = 1, step: int = 0, hires: bool = False) -> None:
        """A `CFGDenoiser.forward` call is about to run its inner model on row slices of `x_in`, at the
        denoiser's step `step` (the step the WebUI picks the English conds at) of the first or hires pass."""
        self.step, self.hires = int(step), bool(hires)
        roles = row_roles(counts, uncond_blocks)
        if len(roles) != x_in.shape[0]:
            self._warn("layout", f"BDM: unexpected CFG batch of {x_in.shape[0]} rows for cond rows "
                       f"{list(counts)}; this step runs without the branch")
            self._call = None
        else:
            self._call = CallRows(roles, x_in)
        if inner_model is not None:
            self.hook_inner(inner_model)

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
            raise BdmRunError(self.error)
        self._rows = None
        if self._call is None:
            return None
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        try:
            self._rows = self._call.locate(x)
        except (ValueError, AttributeError) as e:
            self._warn("locate", f"{e}; that call runs without the branch")
        return None

    def _after_inner(self, module, args, output):
        self._rows = None

    # -- asked by bdm.attach per UNet call -------------------------------------------------------
    def _current(self, x) -> tuple[int, int] | None:
        rows = self._rows
        if rows is None or rows[1] - rows[0] != x.shape[0] or self._call is None:
            self._warn("outside", "BDM: a UNet call outside the CFG denoiser's known rows ran without "
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
        if self.record_rows:
            self.rows_seen.append(list(roles))
        if self.on_unet_call is not None:
            self.on_unet_call(self.unet_calls)
        return self.bank.rows([self.prompt_index(r) for r in roles], self.step)

    def prompt_index(self, role: RowRole) -> int:
        """Slot in the bank of the Chinese prompt of a row in the current pass: positive for cond rows
        (all AND subprompts of the image), negative for uncond rows; per-image lists wrap around."""
        tables = self.tables.get(self.hires)
        if tables is None:
            self._warn("hires", "BDM: no Chinese prompt schedule was prepared for the hires pass; it uses "
                       "the first pass's")
            tables = self.tables[False]
        g = self.image_offset + role.image
        table = tables[0] if role.is_cond else tables[1]
        return table[g % len(table)]

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log(message)
