"""Chinese contexts for the batch rows: encoded once per prompt text (LRU cache), padded to a common chunk
count, and stacked on the UNet's device so that a UNet call only indexes rows.

A prompt may change during sampling (prompt editing `[猫:狗:0.5]`, alternation `[红色|蓝色]`): it is then
given as its schedule `[[end_at_step, text], ...]` — what the WebUI's `prompt_parser` (or, headless,
`bdm.text.prompt_schedule`) computes — and `rows(slots, step)` picks each row's text for that step.
Every text of every schedule is encoded once, before sampling.

All texts of one generation are padded to the same number of 52-token chunks with the encoding of
the empty chunk `[CLS][SEP][PAD]…` — as the WebUI pads English conds with the empty prompt — so a row's
context never depends on which other rows share its UNet call (`batch_cond_uncond` on or off give the
same image).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence, Union

import torch

from ..text.prompt_schedule import text_index_at

Schedule = Sequence[Sequence]  # [[end_at_step, text], ...]


class EncodingCache:
    """LRU of encodings keyed by `(model key, prompt, chunks)`; values stay on the CPU."""

    def __init__(self, size: int = 64):
        self.size = max(0, int(size))
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = max(0, int(size))
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
        value = compute().detach().to("cpu")
        with self._lock:
            self.misses += 1
            if self.size:
                self._data[key] = value
                self._data.move_to_end(key)
                while len(self._data) > self.size:
                    self._data.popitem(last=False)
        return value


def chunk_count(encoder, prompt: str) -> int:
    """52-token chunks `prompt` takes in `encoder` (capped at its `max_chunks`)."""
    return min(len(encoder.prompt_chunks(prompt)), encoder.max_chunks)


class ContextBank:
    """The encoded Chinese texts of one generation, as one tensor `[T, 52k, H]` on the UNet's device.

    `prompts` are plain prompts or schedules; each distinct one is a slot (`slot(prompt)`), and
    `rows(slots, step)` gives the contexts of batch rows at sampling step `step`."""

    def __init__(self, encoder, prompts: Sequence[Union[str, Schedule]], cache: EncodingCache | None = None,
                 model_key: str = "", device=None, dtype=None):
        keys = list(dict.fromkeys(_key(p) for p in prompts))  # distinct slots, in order
        self.prompts = list(dict.fromkeys(text for key in keys for _, text in key))  # distinct texts
        text_index = {p: i for i, p in enumerate(self.prompts)}
        self.index = {key: i for i, key in enumerate(keys)}
        self.schedules = [[(end, text_index[text]) for end, text in key] for key in keys]
        self.chunks = max([1, *(chunk_count(encoder, p) for p in self.prompts)])
        cache = EncodingCache(0) if cache is None else cache
        encoded = [cache.get((model_key, p, self.chunks), lambda p=p: encoder.encode([p], min_chunks=self.chunks))
                   for p in self.prompts]
        self.tensor = torch.cat(encoded, dim=0).to(device=device, dtype=dtype)

    def slot(self, prompt: Union[str, Schedule]) -> int:
        return self.index[_key(prompt)]

    def text_indices(self, slots: Sequence[int], step: int = 0) -> list[int]:
        """Index into `prompts` of each slot's text at sampling step `step`."""
        out = []
        for s in slots:
            schedule = self.schedules[s]
            out.append(schedule[text_index_at(schedule, step)][1])
        return out

    def rows(self, slots: Sequence[int], step: int = 0) -> torch.Tensor:
        idx = torch.as_tensor(self.text_indices(slots, step), dtype=torch.long, device=self.tensor.device)
        return self.tensor.index_select(0, idx)


def _key(prompt: Union[str, Schedule]) -> tuple:
    """A prompt or schedule as a hashable schedule; a plain prompt holds for every step."""
    if isinstance(prompt, str):
        return ((0, prompt),)  # one entry: `text_index_at` picks it at every step
    return tuple((int(end), str(text)) for end, text in prompt)
