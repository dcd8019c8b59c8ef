"""A listed dataset, map-style: samples indexed by `(epoch, index[, bucket size])`, a bad one replaced
by the next good one; and the endless, seeded, rank-sharded epoch order it is read in."""
from __future__ import annotations

import random

import torch

from .images import open_rgb, transform
from .listings import Item
from .samples import MAX_REPLACEMENTS, BadSample, sample_seed


class ImageTextDataset(torch.utils.data.Dataset):
    """Indexed by `(epoch, index)` (what `EpochSampler` yields) or `(epoch, index, (width, height))` (what
    `BucketBatchSampler` yields); a bad sample is replaced by the next good one in index order, brought to
    the same size, and reported in the sample's `skipped`."""

    def __init__(self, items: list[Item], resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.items, self.resolution = items, resolution
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed

    def __len__(self):
        return len(self.items)

    def load(self, epoch: int, index: int, size=None) -> dict:
        item = self.items[index]
        rng = random.Random(sample_seed(self.seed, epoch, index, 1))
        image = transform(open_rgb(item.image, item.image), size or self.resolution, self.center_crop,
                          self.random_flip, rng)
        return {"image": image, "text": item.text, "key": index}

    def fits(self, index: int, size) -> bool:
        """Whether sample `index` can stand in a batch of `size` (any image can be brought to any size)."""
        return True

    def __getitem__(self, pos) -> dict:
        epoch, index, size = pos if len(pos) == 3 else (*pos, None)
        skipped = []
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            if not self.fits(i, size):
                continue
            try:
                sample = self.load(epoch, i, size)
            except BadSample as e:
                skipped.append((e.reason, str(e)))
                if len(skipped) == MAX_REPLACEMENTS:
                    break
                continue
            sample["epoch"], sample["skipped"] = epoch, skipped
            return sample
        raise RuntimeError(f"{MAX_REPLACEMENTS} unreadable images in a row (last: {skipped[-1][1]}); "
                           "is the data folder right?")


class EpochSampler(torch.utils.data.Sampler):
    """An endless stream of `(epoch, index)`: epoch e is a permutation seeded by (seed, e), padded to a
    multiple of the world size; rank r takes every world-th element. Starts after `start` elements of
    this rank's stream (the data position of a resumed run)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.start, self.shuffle = n, seed, rank, world, start, shuffle
        self.per_rank = -(-n // world)

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            if self.shuffle:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    sample_seed(self.seed, epoch, 0, 7))).tolist()
            else:
                order = list(range(self.n))
            order += order[: self.per_rank * self.world - self.n]
            for index in order[self.rank::self.world][offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0

    def __len__(self):  # endless; a length only for DataLoader's bookkeeping
        return 2**62
