"""BDM inside one WebUI process: what is kept between generations (loaded models, encoded prompts, the
last used model) and the run of each generation, from its start to its end or failure.

Host-independent: the script reads the WebUI (settings, the loaded model's family, devices) and passes
plain values in. Failures are `BdmError`s; `Session.stops` says whether one stops the generation (the
default, when BDM is enabled with a Chinese prompt) or only warns (the setting "continue without BDM",
or BDM enabled with both Chinese boxes empty).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..text.prompt_schedule import PromptSyntaxError
from .api_args import BdmArgs
from .context import ContextBank, EncodingCache
from .errors import BdmError
from .hooking import BdmRun
from .infotext import infotext_params
from .manager import ModelManager, bridge_refusal
from .models import ModelEntry, no_models_message, pick_model

STOP, CONTINUE = "stop", "continue"
# The choices of the setting "When BDM … cannot be applied", as the UI shows them.
FAILURE_CHOICES = {STOP: "Stop the generation with the error / 停止生成并显示错误",
                   CONTINUE: "Continue without BDM, with a warning / 不用 BDM 继续（显示警告）"}


def failure_mode(setting: str) -> str:
    """STOP or CONTINUE from the setting's value (its label, or the key itself from an API client)."""
    return CONTINUE if setting in (CONTINUE, FAILURE_CHOICES[CONTINUE]) else STOP


@dataclass(frozen=True)
class Settings:
    """The WebUI settings a run depends on (Settings → BDM)."""

    default_model: str = ""  # "" / "None": the last used, else the first found
    on_error: str = STOP  # STOP or CONTINUE
    encoder_on_cpu: bool = True
    cache_size: int = 64
    models_in_memory: int = 1
    model_folders: tuple[str, ...] = ("models/bdm",)  # as users see them, for messages


class Session:
    """Models and encodings kept between generations, and the open run of each generation (keyed by
    the WebUI's processing object `p`)."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.manager = ModelManager(1)
        self.cache = EncodingCache(64)
        self.last_used: str | None = None  # title of the model of the last generation with BDM
        self._runs: dict[int, tuple[object, BdmRun]] = {}

    # -- runs -----------------------------------------------------------------------------------
    def run_for(self, p) -> BdmRun | None:
        entry = self._runs.get(id(p))
        return entry[1] if entry is not None and entry[0] is p else None

    def open_runs(self) -> int:
        return len(self._runs)

    def end(self, p) -> BdmRun | None:
        """The run of `p`, closed (hooks removed) and forgotten."""
        entry = self._runs.pop(id(p), None)
        if entry is None:
            return None
        entry[1].close()
        return entry[1]

    def close_all(self) -> None:
        """Close every open run: the WebUI runs one generation at a time, so a run still open at the
        start of the next belongs to a generation that failed (no postprocess)."""
        for _, run in list(self._runs.values()):
            run.close()
        self._runs.clear()

    # -- starting -------------------------------------------------------------------------------
    @staticmethod
    def stops(args: BdmArgs, settings: Settings) -> bool:
        """Whether a failure stops the generation (else it only warns)."""
        return settings.on_error == STOP and args.enabled and args.has_chinese_text

    def fail(self, p, error: BdmError) -> BdmRun:
        """Register a run that stops `p`'s generation with `error` at its first denoiser call."""
        run = BdmRun.failed(error)
        self._runs[id(p)] = (p, run)
        return run

    def begin(self, p, args: BdmArgs, entries: Sequence[ModelEntry], unet, refusal: str | None, n_images: int,
              settings: Settings, device=None, dtype=None, log: Callable[[str], None] | None = None,
              schedules: Callable | None = None, place_branch: bool = True) -> BdmRun:
        """Load the model `args` ask for, encode the Chinese prompts of `n_images` images and open the run
        of `p` (not yet attached). `refusal`: why the loaded checkpoint cannot take BDM (None: it can).
        `schedules(positive, negative) -> (first pass, hires pass or None)`: the prompts' schedules
        (prompt editing, alternation; `bdm.text.prompt_schedule.PassSchedules`) as the host's own prompt
        parser makes them; without it every prompt holds for all steps. `place_branch` False: the host's
        memory manager moves and casts the branch itself (Forge); else it goes to `device`/`dtype` here.
        Raises BdmError."""
        if refusal:
            raise BdmError(f"BDM is not applied: {refusal}", 409)
        positive, negative = args.prompts(n_images)
        first = hires = None
        if schedules is not None:
            try:
                first, hires = schedules(positive, negative)
            except PromptSyntaxError as e:
                raise BdmError(str(e), 422) from None
        if not entries:
            raise BdmError(no_models_message(settings.model_folders), 422)
        try:
            entry = pick_model(args.model, entries, settings.default_model, self.last_used)
        except LookupError as e:
            raise BdmError(str(e), 422) from None
        self.manager.resize(settings.models_in_memory)
        bridge = self.manager.load(entry)
        refusal = bridge_refusal(bridge, unet)
        if refusal:
            raise BdmError(f"the BDM model '{entry.name}' ({entry.where}) does not fit the loaded checkpoint: "
                           f"{refusal}", 409)
        if place_branch:
            bridge.to(device, dtype)
        encoder = bridge.text_encoder
        encoder.to("cpu" if settings.encoder_on_cpu else device)
        self.cache.resize(settings.cache_size)
        if first is None:  # every prompt holds for all steps (no hires schedules then either)
            scheduled, texts = (positive, negative), positive + negative
        else:
            scheduled, texts = (first.positive, first.negative), first.all() + (hires.all() if hires else [])
        bank = ContextBank(encoder, texts, self.cache, model_key=f"{entry.path}|{entry.hash}", device=device,
                           dtype=dtype)
        run = BdmRun(bridge, bank, *scheduled, args.strength, log=log or self.log,
                     hires=(hires.positive, hires.negative) if hires else None)
        run.entry = entry
        run.infotext = infotext_params(entry.name, entry.hash, positive, negative, args.strength)
        self.last_used = entry.title
        self._runs[id(p)] = (p, run)
        return run


def truncation_warnings(run: BdmRun) -> list[str]:
    """One line per Chinese prompt longer than the encoder takes, worded like the WebUI's own
    warning for English prompts."""
    out = []
    for prompt in run.bank.prompts:
        used, capacity = run.bridge.text_encoder.token_count(prompt)
        if used > capacity:
            out.append(f"Warning: too many input tokens in the BDM Chinese prompt; some ({used - capacity}) "
                       f"have been truncated (the first {capacity} are used): {prompt[:30]}…")
    return out
