"""A1111-style attention syntax: ``(word)``, ``[word]``, ``(word:1.3)``, ``BREAK``.

Both text towers (English CLIP for the backbone, Chinese CLIP for the bridge branch)
accept the same prompt syntax the Stable Diffusion WebUI users already know, so the
semantics here follow AUTOMATIC1111's ``modules/prompt_parser.py::parse_prompt_attention``
exactly (re-implemented, not copied):

* ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1;
* ``(x:1.3)`` multiplies it by 1.3 (whitespace allowed around the number);
* nesting multiplies; brackets still open at the end are closed there;
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; a lone ``\\`` vanishes;
* a ``)`` / ``]`` / ``:`` without a matching opener is literal text;
* ``BREAK`` (a whole word, surrounding whitespace eaten) becomes its own ``("BREAK", -1)``
  entry.  As in A1111 the marker sits in the result list while enclosing brackets are
  applied, so a ``BREAK`` *inside* brackets gets a scaled weight (e.g. -1.1) and is then
  no longer a chunk break for consumers that test ``weight == -1``;
* neighbouring pieces with equal weight are merged; no pieces at all gives ``[("", 1.0)]``.

One deliberate difference: A1111 raises ``ValueError`` on a malformed number such as
``(x:1.2.3)``; here the ``:1.2.3)`` is kept as literal text so a typo never breaks generation.
"""

from __future__ import annotations

import re

__all__ = ["BREAK_WEIGHT", "parse_prompt_attention"]

BREAK_WEIGHT = -1.0
_ROUND = 1.1
_SQUARE = 1 / 1.1

# One alternative per lexical element, tried in this order (the order matters:
# escapes before the lone backslash, the ":<number>)" closer before a plain ":").
_LEXER = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\])             # \( \) \[ \] \\  -> literal char
  | (?P<backslash>\\)                    # lone backslash -> dropped
  | (?P<open_round>\()
  | (?P<open_square>\[)
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)     # ":1.3)" closes a round bracket with a weight
  | (?P<close_round>\))
  | (?P<close_square>\])
  | (?P<text>[^\\()\[\]:]+)
  | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(piece, weight)`` pairs following A1111's emphasis rules.

    >>> parse_prompt_attention('an (important) word')
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # mutable [text, weight] while brackets are applied
    round_starts: list[int] = []
    square_starts: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK.split(chunk)):
            if i:
                pieces.append(["BREAK", BREAK_WEIGHT])
            pieces.append([part, 1.0])

    for m in _LEXER.finditer(text):
        kind = m.lastgroup
        if kind == "escape":
            pieces.append([m.group(0)[1], 1.0])
        elif kind == "backslash":
            pieces.append(["", 1.0])
        elif kind == "open_round":
            round_starts.append(len(pieces))
        elif kind == "open_square":
            square_starts.append(len(pieces))
        elif m.group("weight") is not None and round_starts and _is_float(m.group("weight")):
            scale_from(round_starts.pop(), float(m.group("weight")))
        elif kind == "close_round" and round_starts:
            scale_from(round_starts.pop(), _ROUND)
        elif kind == "close_square" and square_starts:
            scale_from(square_starts.pop(), _SQUARE)
        else:  # plain text, or a closer / ":" / weight without a matching opener
            add_text(m.group(0))

    for start in round_starts:
        scale_from(start, _ROUND)
    for start in square_starts:
        scale_from(start, _SQUARE)

    if not pieces:
        return [("", 1.0)]

    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True
