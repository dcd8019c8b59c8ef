"""Aspect-ratio bucketing (`--aspect-buckets`): bucket sizes, one size per batch, every image trained
each epoch, ranks split without overlap, exact resume, from images and from a bucketed latent cache."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from bdm.train import data as D
from tests.train_util import config, shared_backbone, write_mixed_set

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (conftest.py)

# the tiny test backbone: VAE downscale 2 × 2 UNet levels → sides are multiples of 4
TINY_BUCKETS = [(12, 20), (16, 16), (20, 12)]


def test_bucket_sizes_and_nearest_bucket():
    sd = D.bucket_sizes(512, 64)
    assert sd == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for w, h in D.bucket_sizes(768, 64, max_ratio=3.0):
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 768 * 768 and max(w / h, h / w) <= 3.0
    assert D.bucket_sizes(16, 4) == TINY_BUCKETS
    assert D.bucket_sizes(64, 64) == [(64, 64)]  # the toy world: one square bucket
    assert sd[D.nearest_bucket((1920, 1080), sd)] == (640, 384)
    assert sd[D.nearest_bucket((600, 800), sd)] == (448, 576)
    assert sd[D.nearest_bucket((300, 3000), sd)] == (384, 640)  # beyond the widest: the widest
    assert sd[D.nearest_bucket(None, sd)] == (512, 512)  # unreadable: replaced when loaded anyway


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_bucket_batches_are_one_size_cover_every_image_and_split_across_ranks():
    bucket_of = [0] * 11 + [1] * 9 + [2] * 1  # the last bucket is smaller than a batch
    world, batch = 2, 4
    sampler = D.BucketBatchSampler(bucket_of, TINY_BUCKETS, batch, seed=3, world=world)
    assert sampler.per_rank == math.ceil((3 + 3 + 1) / world)
    per_rank = [_take(D.BucketBatchSampler(bucket_of, TINY_BUCKETS, batch, 3, rank, world), sampler.per_rank)
                for rank in range(world)]
    seen = Counter()
    for batches in per_rank:
        for b in batches:
            assert len(b) == batch and len({size for _, _, size in b}) == 1
            assert all(TINY_BUCKETS[bucket_of[i]] == size and epoch == 0 for epoch, i, size in b)
            seen.update(i for _, i, _ in b)
    assert set(seen) == set(range(len(bucket_of)))  # every image, including the lone one, in epoch 0
    # the ranks' batches are disjoint slices of one epoch list (the last one pads with the first batch)
    epoch = sampler.epoch_batches(0)
    assert per_rank[0] == epoch[0::world] and per_rank[1] == epoch[1::world]
    assert len(epoch) == world * sampler.per_rank
    # another epoch, another order
    assert sampler.epoch_batches(1) != epoch
    # resuming after k batches gives exactly the rest of the stream, across the epoch boundary
    full = _take(D.BucketBatchSampler(bucket_of, TINY_BUCKETS, batch, 3, 1, world), 3 * sampler.per_rank)
    for k in (1, sampler.per_rank, sampler.per_rank + 2):
        again = _take(D.BucketBatchSampler(bucket_of, TINY_BUCKETS, batch, 3, 1, world, start=k), 4)
        assert again == full[k:k + 4]


def test_training_with_buckets_from_images_and_from_a_bucketed_cache(tmp_path, tmp_path_factory):
    from bdm.train import Trainer
    ckpt = shared_backbone(tmp_path_factory)
    data = write_mixed_set(tmp_path / "data", bad=True)
    trainer = Trainer(config(tmp_path / "a", ckpt, data, resolution=16, batch_size=2, max_steps=4,
                             aspect_buckets=True)).prepare()
    assert trainer.buckets == TINY_BUCKETS
    assert Counter(trainer.bucket_of) == {0: 4, 1: 5, 2: 4}  # portrait, square (+ the unreadable one), landscape
    it = iter(trainer.loader)
    shapes = {tuple(next(it)["image"].shape) for _ in range(12)}
    assert shapes == {(2, 3, 20, 12), (2, 3, 16, 16), (2, 3, 12, 20)}
    result = trainer.run()
    assert result["step"] == 4
    # the cache: one shard series per bucket size, the broken image left out and counted
    t = Trainer(config(tmp_path / "b", ckpt, data, resolution=16, batch_size=2, max_steps=3, aspect_buckets=True,
                       cache_latents=True))
    result = t.run()
    assert result["step"] == 3 and result["skipped"] == {"unreadable image": 1}
    cache = tmp_path / "b" / "out" / "latents"
    assert sorted(p.name for p in cache.glob("latents-*")) == [
        "latents-12x20-00000.safetensors", "latents-16x16-00000.safetensors", "latents-20x12-00000.safetensors"]
    dataset = D.LatentDataset(cache, True, 0)
    assert len(dataset) == 12 and Counter(dataset.bucket_of) == {0: 4, 1: 4, 2: 4}
    landscape = dataset.bucket_of.index(2)
    assert dataset[(0, landscape, (20, 12))]["moments"].shape == (2, 4, 6, 10)
    # a sample stands in only for its own size (a bad cached sample is replaced within its bucket)
    assert not dataset.fits(landscape, (12, 20)) and dataset.fits(landscape, (20, 12))
    # the bucketed cache is itself a dataset, batched by its buckets
    t = Trainer(config(tmp_path / "c", ckpt, cache, resolution=16, batch_size=2, max_steps=2))
    it = iter(t.prepare().loader)
    assert {tuple(next(it)["moments"].shape) for _ in range(8)} == {(2, 2, 4, 10, 6), (2, 2, 4, 8, 8),
                                                                    (2, 2, 4, 6, 10)}
    assert t.run()["step"] == 2


def test_bucketed_resume_equals_uninterrupted(tmp_path, tmp_path_factory):
    from bdm.train import Trainer
    ckpt = shared_backbone(tmp_path_factory)
    data = write_mixed_set(tmp_path / "data")
    opts = dict(resolution=16, batch_size=3, max_steps=5, aspect_buckets=True, random_flip=True, center_crop=False,
                learning_rate=1e-3, caption_dropout=0.5, seed=2)
    full = Trainer(config(tmp_path / "full", ckpt, data, **opts))
    full_result = full.run()
    Trainer(config(tmp_path / "cut", ckpt, data, **{**opts, "max_steps": 3})).run()
    resumed = Trainer(config(tmp_path / "cut", ckpt, data, **opts, resume="latest"))
    result = resumed.run()
    assert result["step"] == 5
    for k, v in full.bridge.state_dict().items():
        assert torch.equal(v, resumed.bridge.state_dict()[k]), k
    assert [h["loss"] for h in full_result["history"][3:]] == [h["loss"] for h in result["history"]]


def test_bucket_options_are_checked(tmp_path, tmp_path_factory):
    import pytest

    from bdm.train import Trainer
    from tests.train_util import write_shards
    ckpt = shared_backbone(tmp_path_factory)
    write_shards(tmp_path / "shards", 1, 2)
    with pytest.raises(ValueError, match="--aspect-buckets works with file/folder datasets"):
        Trainer(config(tmp_path, ckpt, tmp_path / "shards", aspect_buckets=True)).prepare()
    with pytest.raises(ValueError, match="--bucket-max-ratio must be >= 1"):
        config(tmp_path, ckpt, tmp_path / "shards", bucket_max_ratio=0.5).check()
