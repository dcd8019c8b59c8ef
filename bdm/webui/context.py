"""Chinese contexts for the batch rows: encoded once per prompt (LRU cache), padded to a common chunk
count, and stacked on the UNet's device so that a UNet call only indexes rows.

All prompts of one generation are padded to the same number of 52-token chunks with the encoding of
the empty chunk `[CLS][SEP][PAD]…` — as the WebUI pads English conds with the empty prompt — so a row's
context never depends on which other rows share its UNet call (`batch_cond_uncond` on or off give the
same image).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import torch


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
    """The encoded Chinese prompts of one generation, as one tensor `[P, 52k, H]` on the UNet's device;
    `rows(indices)` gives the contexts of batch rows by prompt index."""

    def __init__(self, encoder, prompts: Sequence[str], cache: EncodingCache | None = None,
                 model_key: str = "", device=None, dtype=None):
        self.prompts = list(dict.fromkeys(prompts))  # unique, in order
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.chunks = max([1, *(chunk_count(encoder, p) for p in self.prompts)])
        cache = EncodingCache(0) if cache is None else cache
        encoded = [cache.get((model_key, p, self.chunks), lambda p=p: encoder.encode([p], min_chunks=self.chunks))
                   for p in self.prompts]
        self.tensor = torch.cat(encoded, dim=0).to(device=device, dtype=dtype)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.tensor.device)
        return self.tensor.index_select(0, idx)
