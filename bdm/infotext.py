"""The WebUI's "parameters" text (infotext): written into PNGs by `generate`, read by PNG Info.

Format (A1111 `processing.create_infotext` / `infotext_utils.parse_generation_parameters`):
the prompt, an optional `Negative prompt: …` line, then one line of `Key: value` pairs joined by
", ", where a value containing `,`, `:` or a newline is JSON-quoted.
"""
from __future__ import annotations

import json
import re

# A1111's own pattern for one "Key: value" pair of the last line.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

def quote(value) -> str:
    """A1111's quoting, plus values it would not bring back intact (surrounding quotes or spaces)."""
    text = str(value)
    fragile = text != text.strip() or (len(text) >= 2 and text[0] == text[-1] == '"')
    if "," not in text and "\n" not in text and ":" not in text and not fragile:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    return f"{prompt}{negative}\n{line}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """`(prompt, negative prompt, {key: value})` — values as strings, unquoted."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # as A1111: a last line with few pairs is part of the prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {key.strip(): unquote(value.strip()) for key, value in _PARAM.findall(last)}
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), params
