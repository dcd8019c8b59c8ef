"""The latent cache: every image encoded once by the VAE (posterior mean and log-variance, flipped
copies when flips are on) into safetensors shards, one series per bucket size, with a JSON index; and
the dataset that reads it instead of the images."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch

from .files import ImageTextDataset
from .images import open_rgb, transform
from .listings import Item
from .samples import BadSample, sample_seed

CACHE_INDEX = "latents.json"


class LatentDataset(ImageTextDataset):
    """Cached VAE posteriors (mean, logvar; flipped copies when flips are on) instead of images. A cache
    made with aspect-ratio buckets keeps one series of shards per bucket size (`buckets`, `bucket_of`)."""

    def __init__(self, folder: str | Path, random_flip: bool, seed: int):
        self.folder = Path(folder)
        index = json.loads((self.folder / CACHE_INDEX).read_text(encoding="utf-8"))
        self.index = index
        self.items = [Item(image, text) for image, text in zip(index["images"], index["texts"])]
        self.random_flip = random_flip and index.get("flipped", False)
        self.seed, self.shard_size = seed, index["shard_size"]
        self.buckets = [tuple(b) for b in index["buckets"]] if index.get("buckets") else None
        self.bucket_of = index.get("bucket_of")
        self.rows = list(range(len(self.items)))  # each sample's row in its size's shard series
        if self.buckets:
            seen: Counter = Counter()
            for i, bucket in enumerate(self.bucket_of):
                self.rows[i], seen[bucket] = seen[bucket], seen[bucket] + 1
        self._open: dict[str, object] = {}

    def _shard(self, name: str):
        if name not in self._open:
            from safetensors import safe_open
            self._open[name] = safe_open(str(self.folder / name), framework="pt")
        return self._open[name]

    def __getstate__(self):  # safetensors handles do not cross process boundaries
        return {**self.__dict__, "_open": {}}

    def bucket_size(self, index: int) -> tuple[int, int] | None:
        """The (width, height) sample `index` was cached at, in a bucketed cache; else None."""
        return self.buckets[self.bucket_of[index]] if self.buckets else None

    def fits(self, index: int, size) -> bool:
        return size is None or self.buckets is None or self.bucket_size(index) == tuple(size)

    def load(self, epoch: int, index: int, size=None) -> dict:
        rng = random.Random(sample_seed(self.seed, epoch, index, 1))
        flip = self.random_flip and rng.random() < 0.5
        shard, row = divmod(self.rows[index], self.shard_size)
        f = self._shard(shard_name(shard, self.bucket_size(index)))
        suffix = "_flip" if flip else ""
        mean = f.get_slice("mean" + suffix)[row:row + 1][0]
        logvar = f.get_slice("logvar" + suffix)[row:row + 1][0]
        if not torch.isfinite(mean).all():
            raise BadSample("unreadable image", self.items[index].image)
        return {"moments": torch.stack([mean, logvar]).float(), "text": self.items[index].text, "key": index}


def shard_name(shard: int, size: tuple[int, int] | None = None) -> str:
    """A latent cache shard's file name; a bucketed cache has one series per bucket size."""
    if size is None:
        return f"latents-{shard:05d}.safetensors"
    return f"latents-{size[0]}x{size[1]}-{shard:05d}.safetensors"


def is_latent_cache(path: str | Path) -> bool:
    return (Path(path) / CACHE_INDEX).is_file()


def cache_matches(folder: Path, items: list[Item], resolution: int, flip: bool, vae_id: str,
                  buckets: list[tuple[int, int]] | None = None) -> bool:
    if not is_latent_cache(folder):
        return False
    index = json.loads((folder / CACHE_INDEX).read_text(encoding="utf-8"))
    wanted = [list(b) for b in buckets] if buckets else None
    return (index.get("resolution") == resolution and index.get("vae") == vae_id
            and index.get("buckets") == wanted
            and bool(index.get("flipped")) >= flip and index.get("source_images") == [i.image for i in items]
            and index.get("complete", False))


@torch.no_grad()
def build_latent_cache(folder: str | Path, items: list[Item], vae, resolution: int, center_crop: bool,
                       flip: bool, vae_id: str, device, dtype, batch_size: int = 8, shard_size: int = 1024,
                       progress: bool = True, buckets: list[tuple[int, int]] | None = None,
                       bucket_of: list[int] | None = None) -> tuple[Path, Counter]:
    """Encode every image once — at the square `resolution`, or with `buckets` at its bucket's size
    (`bucket_of[i]` for item i), one series of shards per size; bad images are skipped (counted) and
    left out of the cache."""
    from ...formats.files import save_safetensors
    from tqdm import tqdm
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    good: list[Item] = []
    good_buckets: list[int] = []
    series: dict[int, dict] = {}  # bucket → pending images, buffered latents, shard number, rows so far
    rng = random.Random(0)

    def flush_batch(state):
        if not state["pending"]:
            return
        images = torch.stack(state["pending"]).to(device, dtype)
        versions = [("", images)] + ([("_flip", images.flip(-1))] if flip else [])
        for suffix, batch in versions:
            mean, logvar = vae.encode_moments(batch)
            state["buffers"].setdefault("mean" + suffix, []).append(mean.float().cpu())
            state["buffers"].setdefault("logvar" + suffix, []).append(logvar.float().cpu())
        state["pending"].clear()

    def flush_shard(bucket, state, final=False):
        n = sum(t.shape[0] for t in state["buffers"].get("mean", []))
        if n and (n >= shard_size or final):
            tensors = {k: torch.cat(v) for k, v in state["buffers"].items()}
            save_safetensors(folder / shard_name(state["shard"], buckets[bucket] if buckets else None), tensors)
            state["shard"], state["buffers"] = state["shard"] + 1, {}

    for i, item in enumerate(tqdm(items, desc="caching latents", disable=not progress, leave=False)):
        bucket = bucket_of[i] if buckets else 0
        size = buckets[bucket] if buckets else resolution
        try:
            image = transform(open_rgb(item.image, item.image), size, center_crop, False, rng)
        except BadSample as e:
            skipped[e.reason] += 1
            continue
        state = series.setdefault(bucket, {"pending": [], "buffers": {}, "shard": 0, "rows": 0})
        state["pending"].append(image)
        good.append(item)
        good_buckets.append(bucket)
        state["rows"] += 1
        if len(state["pending"]) == batch_size or state["rows"] % shard_size == 0:
            flush_batch(state)
            flush_shard(bucket, state)
    for bucket, state in series.items():
        flush_batch(state)
        flush_shard(bucket, state, final=True)
    index = {"resolution": resolution, "vae": vae_id, "flipped": flip, "shard_size": shard_size,
             "images": [i.image for i in good], "texts": [i.text for i in good],
             "source_images": [i.image for i in items], "skipped": dict(skipped), "complete": True}
    if buckets:
        index.update(buckets=[list(b) for b in buckets], bucket_of=good_buckets)
    from ...formats.files import atomic_write
    atomic_write(folder / CACHE_INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, ensure_ascii=False),
                                                                        encoding="utf-8"))
    return folder, skipped
