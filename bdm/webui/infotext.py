"""BDM's fields in the image parameters ("infotext"), and reading them back.

Written through `p.extra_generation_params` (values may be per-image lists); the WebUI joins them as
`Key: value` and JSON-quotes values holding `,` `:` or a newline (`infotext_utils.quote`), and its parser
JSON-unquotes any value that starts and ends with `"`. A value the quoting would not protect — one that
starts and ends with `"`, or has leading/trailing spaces — is JSON-quoted here first, so every prompt
comes back exactly.
"""
from __future__ import annotations

import json

from .api_args import BdmArgs, to_positional

MODEL, HASH, PROMPT, NEGATIVE, STRENGTH = ("BDM model", "BDM model hash", "BDM prompt", "BDM negative prompt",
                                           "BDM strength")
FIELDS = (MODEL, HASH, PROMPT, NEGATIVE, STRENGTH)


def protect(value: str) -> str:
    """`value` as it must be handed to the WebUI so that its quote/unquote round trip returns it."""
    s = str(value)
    if "," in s or ":" in s or "\n" in s:
        return s  # the WebUI quotes these itself
    if (len(s) >= 2 and s[0] == '"' and s[-1] == '"') or s != s.strip():
        return json.dumps(s, ensure_ascii=False)
    return s


def _per_image(values: list[str]):
    values = [protect(v) for v in values]
    return values[0] if len(set(values)) == 1 else values


def infotext_params(model_name: str, model_hash: str | None, positive: list[str], negative: list[str],
                    strength: float) -> dict:
    """The fields for `p.extra_generation_params` (per-image lists where prompts differ by image; empty
    negative prompts are left out)."""
    out = {MODEL: protect(model_name)}
    if model_hash:
        out[HASH] = model_hash
    out[PROMPT] = _per_image(positive)
    if any(negative):
        out[NEGATIVE] = _per_image(negative)
    out[STRENGTH] = float(strength)
    return out


def model_query(params: dict) -> str:
    """What to look the model up by: `name [hash]` when both are known."""
    name, h = params.get(MODEL, ""), params.get(HASH, "")
    return f"{name} [{h}]" if name and h else (name or h or "")


def params_to_args(params: dict) -> BdmArgs | None:
    """The script arguments an infotext describes (None: it has no BDM fields)."""
    if not any(k in params for k in (MODEL, PROMPT, STRENGTH)):
        return None
    try:
        strength = float(params.get(STRENGTH, 1.0))
    except (TypeError, ValueError):
        strength = 1.0
    return BdmArgs(enabled=True, model=model_query(params), strength=strength,
                   prompt=str(params.get(PROMPT, "")), negative_prompt=str(params.get(NEGATIVE, "")))


def params_to_positional(params: dict) -> list | None:
    a = params_to_args(params)
    return None if a is None else to_positional(a)
