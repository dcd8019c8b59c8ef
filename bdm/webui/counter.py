"""The token counter of the Chinese boxes: `used/capacity` in 50-token chunks, like the WebUI's counter
for the English prompt, marked when the prompt is longer than the encoder takes (it is then cut)."""
from __future__ import annotations

import html

from ..text.chinese import token_count

OVER = "bdm-over"


def counter_html(text: str) -> str:
    used, capacity = token_count(text or "")
    if used <= capacity:
        return f"<span class='gr-box gr-text-input'>{used}/{capacity}</span>"
    title = html.escape(f"Too many tokens: the BDM Chinese encoder takes {capacity}; the last {used - capacity} "
                        f"are cut off / 超出长度：只使用前 {capacity} 个 token", quote=True)
    return f"<span class='gr-box gr-text-input {OVER}' title='{title}'>{used}/{capacity}</span>"
