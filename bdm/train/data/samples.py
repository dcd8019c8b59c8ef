"""What every data source shares: a sample's seeded random choices and stable key, the bad sample
that is skipped and counted, and the batch a loader yields.

Every random choice about a sample (crop, flip, and later its noise, timestep and caption dropout) is
drawn from a generator seeded by `(seed, epoch, sample key)`, never from a global RNG: the result does
not depend on the number of workers or ranks, and resuming at a data position gives exactly the batches
an uninterrupted run would have had.
"""
from __future__ import annotations

import hashlib

import torch

MAX_REPLACEMENTS = 64  # bad samples in a row before a dataset gives up


class BadSample(Exception):
    """One sample that cannot be used; the reason is counted, the run goes on."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(f"{reason}: {where}" if where else reason)
        self.reason = reason


def sample_seed(seed: int, epoch: int, key: int, purpose: int = 0) -> int:
    """A 63-bit seed for one sample's random choices (mixing like splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + key * 0x94D049BB133111EB + purpose) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & (2**63 - 1)


def stable_key(text: str) -> int:
    """A process-independent integer key for a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def collate(samples: list[dict]) -> dict:
    """One batch of samples: images or cached moments stacked, texts, keys, epochs, the skips."""
    out = {"text": [s["text"] for s in samples],
           "key": torch.tensor([s["key"] for s in samples], dtype=torch.long),
           "epoch": torch.tensor([s["epoch"] for s in samples], dtype=torch.long),
           "skipped": [x for s in samples for x in s["skipped"]]}
    for name in ("image", "moments"):
        if name in samples[0]:
            out[name] = torch.stack([s[name] for s in samples])
    return out
