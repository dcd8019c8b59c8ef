"""Aspect-ratio buckets for listed datasets and their latent caches: the bucket sizes, each image's
bucket (from its header), and batches that keep to one bucket."""
from __future__ import annotations

import math
import random
from collections import Counter

import torch

from .samples import sample_seed


def bucket_sizes(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) training sizes for aspect-ratio bucketing: sides multiples of `multiple`, at most
    `resolution`² pixels (so memory stays that of the square), each as tall as that area allows for its
    width, aspect ratio at most `max_ratio`. Always holds the square (resolution, resolution)."""
    area, sizes = resolution * resolution, {(resolution, resolution)}
    for w in range(multiple, int(resolution * max_ratio) + 1, multiple):
        h = area // w // multiple * multiple
        if h >= multiple and max(w / h, h / w) <= max_ratio:
            sizes.add((w, h))
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int] | None, buckets: list[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is nearest (in log ratio) to an image's; None (unreadable): the
    squarest bucket (the sample is replaced when loaded anyway)."""
    ratio = math.log(size[0] / size[1]) if size and size[0] > 0 and size[1] > 0 else 0.0
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding it; None if unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # bad files are skipped (and counted) when loaded, not here
        return None


class BucketBatchSampler(torch.utils.data.Sampler):
    """An endless stream of batches of `(epoch, index, (width, height))` in which every image has the same
    bucket. Epoch e takes the permutation of `EpochSampler`, splits it by bucket (keeping its order), cuts
    each bucket into batches (a bucket's last batch is filled up with its first images of the epoch, so no
    image waits forever in a bucket smaller than a batch), shuffles the batches (seeded by (seed, e)) and
    pads them to a multiple of the world size; rank r takes every world-th batch. Starts after `start`
    batches of this rank's stream (the data position of a resumed run)."""

    def __init__(self, bucket_of: list[int], buckets: list[tuple[int, int]], batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, start: int = 0):
        self.bucket_of, self.buckets, self.batch_size = list(bucket_of), list(buckets), batch_size
        self.seed, self.rank, self.world, self.start = seed, rank, world, start
        counts = Counter(self.bucket_of)
        total = sum(-(-n // batch_size) for n in counts.values())
        self.per_rank = -(-total // world)  # batches per rank per epoch

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int, tuple[int, int]]]]:
        """Every batch of one epoch, all ranks, in order (rank r's are `[r::world]`)."""
        order = torch.randperm(len(self.bucket_of), generator=torch.Generator().manual_seed(
            sample_seed(self.seed, epoch, 0, 7))).tolist()
        by_bucket: dict[int, list[int]] = {}
        for index in order:
            by_bucket.setdefault(self.bucket_of[index], []).append(index)
        batches = []
        for b in sorted(by_bucket):
            members = by_bucket[b]
            for i in range(0, len(members), self.batch_size):
                chunk = members[i:i + self.batch_size]
                while len(chunk) < self.batch_size:  # fill up with the bucket's first images
                    chunk += members[:self.batch_size - len(chunk)]
                batches.append([(epoch, index, self.buckets[b]) for index in chunk])
        random.Random(sample_seed(self.seed, epoch, 0, 17)).shuffle(batches)
        return batches + batches[: self.per_rank * self.world - len(batches)]

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_batches(epoch)[self.rank::self.world][offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self):  # endless; a length only for DataLoader's bookkeeping
        return 2**62
