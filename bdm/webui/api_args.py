"""The script's arguments: positional (the UI's order) or one JSON object, as API clients send them.

`alwayson_scripts: {"BDM": {"args": [...]}}` — positional, in the order of `ARG_NAMES`:
`[enabled, model, strength, prompt, negative_prompt]`; or `{"args": [{...}]}` / `{"args": {...}}` with
the keys of `ARG_NAMES` (omitted keys take their defaults). `prompt` / `negative_prompt` may also be a
list of per-image prompts (image `i` of the whole job takes entry `i % len`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

ARG_NAMES = ("enabled", "model", "strength", "prompt", "negative_prompt")
ALIASES = {"cn_prompt": "prompt", "chinese_prompt": "prompt", "cn_negative_prompt": "negative_prompt",
           "chinese_negative_prompt": "negative_prompt", "weight": "strength", "enable": "enabled"}
STRENGTH_RANGE = (0.0, 2.0)


class ArgsError(ValueError):
    """The script's arguments cannot be understood; the message says which and why."""


@dataclass(frozen=True)
class BdmArgs:
    enabled: bool = False
    model: str = ""  # "" or "None": the default model from the settings
    strength: float = 1.0
    prompt: str | tuple[str, ...] = ""
    negative_prompt: str | tuple[str, ...] = ""
    extra: dict = field(default_factory=dict, compare=False)

    def prompts(self, n_images: int) -> tuple[list[str], list[str]]:
        """Per-image positive and negative Chinese prompts for `n_images` images."""
        def expand(v):
            v = [v] if isinstance(v, str) else list(v) or [""]
            return [v[i % len(v)] for i in range(max(1, n_images))]
        return expand(self.prompt), expand(self.negative_prompt)

    @property
    def first_prompt(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else (self.prompt[0] if self.prompt else "")

    @property
    def first_negative_prompt(self) -> str:
        n = self.negative_prompt
        return n if isinstance(n, str) else (n[0] if n else "")


def _bool(value, name: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes", "on", "enabled", "enable"):
            return True
        if v in ("false", "0", "no", "off", "disabled", "disable", ""):
            return False
    raise ArgsError(f"BDM: '{name}' must be true or false, got {value!r}")


def _float(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArgsError(f"BDM: '{name}' must be a number, got {value!r}") from None
    lo, hi = STRENGTH_RANGE
    if not lo <= v <= hi:
        raise ArgsError(f"BDM: '{name}' must be between {lo} and {hi}, got {v}")
    return v


def _text(value, name: str):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ArgsError(f"BDM: '{name}' must be a string (or a list of strings, one per image), got {value!r}")


def _model(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ArgsError(f"BDM: 'model' must be a string (file name, 'name [hash]' or 'None'), got {value!r}")
    return value.strip()


def from_dict(d: dict, defaults: BdmArgs | None = None) -> BdmArgs:
    """Keys of `ARG_NAMES` (and a few aliases); unknown keys are an error (typos must not pass)."""
    values = {}
    for key, value in d.items():
        name = ALIASES.get(key, key)
        if name not in ARG_NAMES:
            raise ArgsError(f"BDM: unknown argument {key!r}; known: {', '.join(ARG_NAMES)}")
        values[name] = value
    out = defaults or BdmArgs()
    if "enabled" not in values and defaults is None:
        values["enabled"] = True  # an object sent to the script means "use BDM" unless it says otherwise
    return replace(out, **_checked(values))


def _checked(values: dict) -> dict:
    out = {}
    for name, value in values.items():
        if name == "enabled":
            out[name] = _bool(value, name)
        elif name == "strength":
            out[name] = _float(value, name)
        elif name == "model":
            out[name] = _model(value)
        else:
            out[name] = _text(value, name)
    return out


def parse_script_args(args) -> BdmArgs:
    """`BdmArgs` from what the WebUI passes to the script (`*args`), from the UI or the API."""
    if isinstance(args, dict):
        return from_dict(args)
    args = list(args or ())
    if args and isinstance(args[0], dict):
        # one JSON object; the API fills the other positions with the UI defaults: ignore them
        return from_dict(args[0])
    if len(args) > len(ARG_NAMES):
        args = args[:len(ARG_NAMES)]
    values = {name: value for name, value in zip(ARG_NAMES, args) if value is not None}
    return replace(BdmArgs(), **_checked(values))


def to_positional(a: BdmArgs) -> list:
    return [a.enabled, a.model, a.strength, a.first_prompt, a.first_negative_prompt]
