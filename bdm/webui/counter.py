"""The token counter of the Chinese boxes: `used/capacity` in 50-token chunks, like the WebUI's counter
for the English prompt, marked when the prompt is longer than the encoder takes (it is then cut). With
prompt editing or alternation it counts the longest text the prompt becomes at some step, as the WebUI's
counter does for the English prompt."""
from __future__ import annotations

import html

from ..text.chinese import token_count
from ..text.prompt_schedule import get_learned_conditioning_prompt_schedules

OVER = "bdm-over"
STEPS = 150  # every edit written with a step number up to 150 shows up; fractions and alternation at any count


def longest_count(text: str) -> tuple[int, int]:
    """`token_count` of the longest text `text` takes during sampling (the text itself while it does not
    parse yet, e.g. a bracket still open while typing)."""
    try:
        texts = {t for _, t in get_learned_conditioning_prompt_schedules([text], STEPS)[0]} or {text}
    except Exception:  # noqa: BLE001 - half-typed syntax: count what is there
        texts = [text]
    return max(token_count(t) for t in texts)


def counter_html(text: str) -> str:
    used, capacity = longest_count(text or "")
    if used <= capacity:
        return f"<span class='gr-box gr-text-input'>{used}/{capacity}</span>"
    title = html.escape(f"Too many tokens: the BDM Chinese encoder takes {capacity}; the last {used - capacity} "
                        f"are cut off / 超出长度：只使用前 {capacity} 个 token", quote=True)
    return f"<span class='gr-box gr-text-input {OVER}' title='{title}'>{used}/{capacity}</span>"
