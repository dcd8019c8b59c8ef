"""The script's arguments, as the WebUI hands them to the script (from the UI or from the API).

The API is the WebUI's own: `alwayson_scripts: {"BDM": {"args": [...]}}`, positional in the order of
`ARG_NAMES`: `[enabled, model, strength, prompt, negative_prompt]` (missing trailing entries take the
UI's defaults). The first entry may instead be one JSON object with keys of `ARG_NAMES` (`{"args":
[{"prompt": "…"}]}`; omitted keys take their defaults, `enabled` defaults to true). `prompt` /
`negative_prompt` may be a list of per-image prompts (image `i` of the whole job takes entry `i % len`).

Values are checked strictly, since an API client's mistake must not pass as a result: `enabled` is a
JSON boolean, `strength` a JSON number from 0 to 2 (not `true`, not `"0.5"`), `model` a string,
prompts strings; an unknown key is an error. Every message says what was expected and what came.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import BdmError

ARG_NAMES = ("enabled", "model", "strength", "prompt", "negative_prompt")
STRENGTH_RANGE = (0.0, 2.0)


class ArgsError(BdmError, ValueError):
    """The script's arguments cannot be understood; the message says which and why."""

    def __init__(self, message: str):
        super().__init__(message, 422)


@dataclass(frozen=True)
class BdmArgs:
    enabled: bool = False
    model: str = ""  # "" or "None": the default (settings, else the last used, else the first found)
    strength: float = 1.0
    prompt: str | tuple[str, ...] = ""
    negative_prompt: str | tuple[str, ...] = ""

    @property
    def has_chinese_text(self) -> bool:
        """Some Chinese prompt or negative prompt is not empty."""
        texts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        texts += [self.negative_prompt] if isinstance(self.negative_prompt, str) else list(self.negative_prompt)
        return any(t.strip() for t in texts)

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
    if isinstance(value, bool):
        return value
    raise ArgsError(f"BDM argument '{name}' must be true or false (a JSON boolean), got {value!r}")


def strength_value(value, name: str = "strength") -> float:
    """A strength from 0 to 2: an int or float (a JSON number), never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgsError(f"BDM argument '{name}' must be a number from {STRENGTH_RANGE[0]:g} to "
                        f"{STRENGTH_RANGE[1]:g} (a JSON number), got {value!r}")
    v = float(value)
    lo, hi = STRENGTH_RANGE
    if not lo <= v <= hi:
        raise ArgsError(f"BDM argument '{name}' must be from {lo:g} to {hi:g}, got {value!r}")
    return v


def _text(value, name: str):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ArgsError(f"BDM argument '{name}' must be a string (or a non-empty list of strings, one per "
                    f"image), got {value!r}")


def _model(value) -> str:
    if not isinstance(value, str):
        raise ArgsError(f"BDM argument 'model' must be a string (a model name, 'name [hash]', or '' for "
                        f"the default), got {value!r}")
    return value.strip()


def from_dict(d: dict) -> BdmArgs:
    """Keys of `ARG_NAMES`; unknown keys are an error (a typo must not pass). `enabled` defaults to
    true: an object sent to the script means "use BDM" unless it says otherwise."""
    unknown = [k for k in d if k not in ARG_NAMES]
    if unknown:
        raise ArgsError(f"unknown BDM argument {unknown[0]!r}; the known ones are: {', '.join(ARG_NAMES)}")
    values = {"enabled": True, **d}
    return replace(BdmArgs(), **_checked(values))


def _checked(values: dict) -> dict:
    out = {}
    for name, value in values.items():
        if value is None:  # the UI's dropdown without a choice; the API's null: the default
            continue
        if name == "enabled":
            out[name] = _bool(value, name)
        elif name == "strength":
            out[name] = strength_value(value, name)
        elif name == "model":
            out[name] = _model(value)
        else:
            out[name] = _text(value, name)
    return out


def parse_script_args(args) -> BdmArgs:
    """`BdmArgs` from what the WebUI passes to the script (`*args`), from the UI or the API."""
    args = list(args or ())
    if args and isinstance(args[0], dict):
        # one JSON object; the WebUI fills the other positions with the UI defaults: ignore them
        return from_dict(args[0])
    if len(args) > len(ARG_NAMES):
        raise ArgsError(f"the BDM script takes {len(ARG_NAMES)} arguments ({', '.join(ARG_NAMES)}), "
                        f"got {len(args)}")
    return replace(BdmArgs(), **_checked(dict(zip(ARG_NAMES, args))))


def to_positional(a: BdmArgs) -> list:
    return [a.enabled, a.model, a.strength, a.first_prompt, a.first_negative_prompt]
