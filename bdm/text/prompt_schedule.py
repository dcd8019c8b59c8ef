"""Prompt editing and alternation for headless use: ``[a:b:0.5]``, ``[a:b:10]``, ``[a::5]``, ``[a|b]``, and
the ``AND`` split, with the results of the WebUI's ``modules/prompt_parser.py`` (A1111 v1.10.1).

Inside the WebUI the extension calls the WebUI's own parser; this module is for `python -m bdm.generate`,
where the WebUI (and its `lark` dependency) is absent. It has the same two functions with the same
arguments and results, so code that takes "a parser" accepts either:

* `get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None,
  use_old_scheduling=False)` → per prompt ``[[end_at_step, text], ...]``;
* `get_multicond_prompt_list(prompts)` → ``(indexes, flat_texts, text_index)`` of the ``AND`` split.

`schedule_prompts` gives the schedules of the Chinese prompts of one sampling pass with either parser,
refusing ``AND`` (`AND_REFUSED`). `text_index_at(schedule, step)` is the WebUI's rule for which entry a
sampling step uses (`reconstruct_cond_batch`). tests/fixtures/prompt_schedules.json holds schedules
recorded from the real parser; tests/test_text_prompt_schedule.py compares this module with it (and with
the live parser when `A1111_DIR` is set).

The rules (re-implemented from the WebUI's grammar, not copied). Inside brackets the syntax is strict:
brackets must pair up, a ``:`` may appear once in ``(x:y)`` and once or twice in ``[x:y:N]``/``[y:N]``
(where the part after the last ``:`` is a number, spaces allowed around it), ``|`` only directly inside an
alternation ``[x|y|…]``. A group that breaks these rules is plain text — at the top level only; a ``|``
outside any alternation, or a backslash that escapes nothing, makes the whole prompt plain text (no
schedule at all). A number with a ``.`` is a fraction of the steps, without one a step count; in the
second (hires) pass fractions count from 1.0 and step counts from the first pass's steps.

Where the WebUI's grammar is ambiguous — a valid group beside stray top-level brackets or colons, e.g.
``[a:b:1]]`` or ``:[a:b:1]:`` — the WebUI's own result differs between processes (lark's choice depends
on Python's string hash seed); this module always takes the group.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Sequence, Union

__all__ = ["AND_REFUSED", "WEIGHT_REFUSED", "PassSchedules", "PromptSyntaxError",
           "get_learned_conditioning_prompt_schedules", "get_multicond_prompt_list", "schedule_prompts",
           "text_index_at"]

# lark's common.SIGNED_NUMBER: an optional sign, then an integer, a decimal or either with an exponent
_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))"
                     r"\s*")
_AND = re.compile(r"\bAND\b")
# "text" or "text : weight" (the weight of one AND-subprompt), surrounding whitespace dropped
_SUBPROMPT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)


@dataclass
class _Scheduled:
    """``[before:after:when]``; `before` None when written ``[after:when]``."""

    before: list | None
    after: list
    when: str
    at: int = 0  # the step it switches after, set per schedule


@dataclass
class _Alternate:
    options: list


_Items = list  # of str (verbatim text) | _Scheduled | _Alternate | list (a group kept verbatim)
Schedule = list  # [[end_at_step, text], ...]


class _Invalid(Exception):
    pass


def _group(text: str, i: int) -> tuple[Union[_Items, _Scheduled, _Alternate], int]:
    """The bracket group opening at ``text[i]`` in the strict syntax: (node, index past its closer).
    Raises _Invalid when the group does not follow the rules."""
    close = ")" if text[i] == "(" else "]"
    segments: list[_Items] = [[]]
    separators: list[str] = []
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            segments[-1].append(text[j:j + 2])
            j += 2
        elif c in "([":
            node, j = _group(text, j)
            segments[-1].append(node)
        elif c in ")]":
            if c != close:
                raise _Invalid
            return _interpret(text[i], segments, separators), j + 1
        elif c in ":|":
            separators.append(c)
            segments.append([])
            j += 1
        else:
            segments[-1].append(c)
            j += 1
    raise _Invalid  # never closed


def _interpret(opener: str, segments: list[_Items], separators: list[str]):
    if opener == "(":
        if separators not in ([], [":"]):
            raise _Invalid
        return ["(", segments[0], *([":", segments[1]] if separators else []), ")"]
    if not separators:
        return ["[", segments[0], "]"]
    if set(separators) == {"|"}:
        return _Alternate(segments)
    if set(separators) == {":"} and len(separators) <= 2:
        last = segments[-1]
        number = _NUMBER.fullmatch("".join(last)) if all(isinstance(x, str) for x in last) else None
        if number is not None:
            return _Scheduled(segments[0] if len(segments) == 3 else None, segments[-2], number.group(1))
    raise _Invalid


def _parse(prompt: str) -> _Items | None:
    """The prompt as items, or None where the WebUI's grammar rejects it (then it has no schedule)."""
    if _dangling_backslash(prompt):
        return None
    items: _Items = []
    j = 0
    try:
        while j < len(prompt):
            c = prompt[j]
            if c == "\\":
                items.append(prompt[j:j + 2])
                j += 2
            elif c in "([":
                try:
                    node, j = _group(prompt, j)
                    items.append(node)
                except _Invalid:  # at the top level a bracket that opens no valid group is text
                    items.append(c)
                    j += 1
            elif c == "|":
                return None
            else:
                items.append(c)
                j += 1
    except RecursionError:
        return None
    return items


def _dangling_backslash(prompt: str) -> bool:
    """A backslash that escapes nothing (at the end, or before a newline), walking escapes pairwise."""
    k = 0
    while k < len(prompt):
        if prompt[k] == "\\":
            if k + 1 >= len(prompt) or prompt[k + 1] == "\n":
                return True
            k += 2
        else:
            k += 1
    return False


def _walk(items):
    for item in items:
        if isinstance(item, _Scheduled):
            yield item
            yield from _walk(item.before or [])
            yield from _walk(item.after)
        elif isinstance(item, _Alternate):
            yield item
            for option in item.options:
                yield from _walk(option)
        elif isinstance(item, list):
            yield from _walk(item)


def _render(items, step: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Scheduled):
            out.append(_render(item.before or [], step) if step <= item.at else _render(item.after, step))
        elif isinstance(item, _Alternate):
            out.append(_render(item.options[(step - 1) % len(item.options)], step))
        else:
            out.append(_render(item, step))
    return "".join(out)


def _schedule(prompt: str, steps: int, int_offset: int, float_offset: float, old: bool) -> Schedule:
    items = _parse(prompt)
    if items is None:
        return [[steps, prompt]]
    ends = {steps}
    for node in _walk(items):
        if isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
            continue
        v = float(node.when)
        if old:
            v = v * steps if v < 1 else v
        elif "." in node.when:
            v = (v - float_offset) * steps
        else:
            v = v - int_offset
        node.at = min(steps, int(v))
        if node.at >= 1:
            ends.add(node.at)
    return [[t, _render(items, t)] for t in sorted(ends)]


def get_learned_conditioning_prompt_schedules(prompts: Sequence[str], base_steps: int, hires_steps: int | None = None,
                                              use_old_scheduling: bool = False) -> list[Schedule]:
    """Per prompt, ``[[end_at_step, text], ...]``: `text` is used up to and including step `end_at_step`.

    First pass: `base_steps`. Hires pass: `hires_steps` steps, with fractions counted from 1.0 and step
    counts from `base_steps` (``use_old_scheduling``: both passes as the first, A1111 before 1.6).

    >>> get_learned_conditioning_prompt_schedules(["a [b:c:0.5]"], 10)
    [[[5, 'a b'], [10, 'a c']]]
    """
    if hires_steps is None or use_old_scheduling:
        steps, int_offset, float_offset = base_steps, 0, 0.0
    else:
        steps, int_offset, float_offset = hires_steps, base_steps, 1.0
    cache = {p: _schedule(p, steps, int_offset, float_offset, use_old_scheduling) for p in set(prompts)}
    return [cache[p] for p in prompts]


def get_multicond_prompt_list(prompts: Sequence[str]):
    """The ``AND`` split: per prompt ``[(flat index, weight), ...]``, the distinct subprompt texts (a
    trailing ``:weight`` removed) and their indexes."""
    indexes, flat, text_index = [], [], {}
    for prompt in prompts:
        parts = []
        for sub in _AND.split(prompt):
            text, weight = _SUBPROMPT.search(sub).groups()
            if text not in text_index:
                text_index[text] = len(flat)
                flat.append(text)
            parts.append((text_index[text], float(weight) if weight is not None else 1.0))
        indexes.append(parts)
    return indexes, flat, text_index


def text_index_at(schedule: Sequence[Sequence], step: int) -> int:
    """The entry of `schedule` that sampling step `step` (0-based, the denoiser's call count) uses: the
    first whose end step is not below it — and the first entry past the last end, as in the WebUI."""
    for i, entry in enumerate(schedule):
        if step <= entry[0]:
            return i
    return 0


AND_REFUSED = (
    "AND is not supported in the Chinese prompt ({prompt!r}): AND (composable diffusion) gives every "
    "sub-prompt its own batch row, and those rows are made for the English prompt. Use [A|B] (alternate "
    "every step) or [A:B:0.5] (switch halfway), or write AND in the English prompt (each of its sub-prompts "
    "then reads the whole Chinese prompt). / 中文提示词不支持 AND：组合扩散为每个子提示词单独占一个批次行，"
    "这些行由英文提示词决定。请改用 [A|B]（逐步交替）或 [A:B:0.5]（中途切换），或把 AND 写在英文提示词里。")
WEIGHT_REFUSED = (
    "A trailing ':{weight}' in the Chinese prompt ({prompt!r}) is an AND sub-prompt weight (it scales the "
    "guidance of the English rows) and is not supported there; for emphasis write (词:{weight}). / "
    "中文提示词末尾的 “:{weight}” 是 AND 子提示词的权重，中文提示词不支持；强调请写 (词:{weight})。")


class PromptSyntaxError(ValueError):
    """A Chinese prompt uses syntax the branch cannot honour (AND)."""


@dataclass
class PassSchedules:
    """The schedules of one sampling pass: per image, of its positive and of its negative Chinese prompt."""

    positive: list[Schedule]
    negative: list[Schedule]

    def all(self) -> list[Schedule]:
        return self.positive + self.negative


def schedule_prompts(positive: Sequence[str], negative: Sequence[str], steps: int, hires_steps: int | None = None,
                     use_old_scheduling: bool = False, parser=None) -> PassSchedules:
    """Schedules of the Chinese prompts (one per image) in the first pass (`hires_steps` None) or the
    hires pass, treated as the WebUI treats English prompts: the positive prompt through the ``AND`` split
    (AND and a sub-prompt weight raise PromptSyntaxError: see `AND_REFUSED`), the negative
    prompt as it is. `parser`: the WebUI's `modules.prompt_parser`, default this module."""
    parser = parser if parser is not None else sys.modules[__name__]
    indexes, flat, _ = parser.get_multicond_prompt_list(list(positive))
    for prompt, parts in zip(positive, indexes):
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        if len(parts) != 1:
            raise PromptSyntaxError(AND_REFUSED.format(prompt=short))
        if parts[0][1] != 1.0:
            raise PromptSyntaxError(WEIGHT_REFUSED.format(prompt=short, weight=f"{parts[0][1]:g}"))
    texts = [flat[parts[0][0]] for parts in indexes]
    scheduled = parser.get_learned_conditioning_prompt_schedules(texts + list(negative), steps, hires_steps,
                                                                 use_old_scheduling)
    return PassSchedules(scheduled[:len(texts)], scheduled[len(texts):])
