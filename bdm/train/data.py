"""Training data: image+caption lists (JSONL, CSV, folder), WebDataset shards, cached latents, and
aspect-ratio buckets for the lists and their caches.

Every random choice about a sample (crop, flip, and later its noise, timestep and caption dropout) is
drawn from a generator seeded by `(seed, epoch, sample key)`, never from a global RNG: the result does
not depend on the number of workers or ranks, and resuming at a data position gives exactly the batches
an uninterrupted run would have had.

Bad data never crashes a run: unreadable/corrupt/zero-byte images and missing captions are skipped
and counted (`skipped` in each batch, summed in the log); CMYK, RGBA, palette, 16-bit and grey images
are converted to 8-bit RGB. An empty dataset or a wrong path is an error before any work.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_INDEX = "latents.json"
MAX_REPLACEMENTS = 64


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
    import hashlib
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


# -- images ----------------------------------------------------------------------------------------

def open_rgb(source, where: str = ""):
    """An 8-bit RGB PIL image from a path or bytes, converting other modes; BadSample if unusable."""
    from PIL import Image, ImageFile
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadSample("empty file", where)
        fp = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise BadSample("empty file", where)
        except OSError:
            raise BadSample("missing file", where) from None
        fp = source
    try:
        with Image.open(fp) as im:
            im.load()
            return to_rgb(im)
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for garbage and truncation
        raise BadSample("unreadable image", f"{where} ({type(e).__name__}: {e})") from None


def to_rgb(im):
    """8-bit RGB from any PIL mode: alpha composited on white, 16-bit/float scaled, CMYK converted."""
    from PIL import Image
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            hi = max(float(arr.max()), 1.0) if arr.max() > 1.0 else 1.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.mode == "RGBA":
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def transform(im, size, center_crop: bool, random_flip: bool, rng: random.Random) -> torch.Tensor:
    """Resize to cover `size` (an int: a square; or (width, height): a bucket), crop it, maybe flip:
    [3, height, width] in [-1, 1]. For a square this resizes the short side to the square's side."""
    from PIL import Image
    tw, th = (size, size) if isinstance(size, int) else size
    w, h = im.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    if center_crop:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    im = im.crop((left, top, left + tw, top + th))
    flip = random_flip and rng.random() < 0.5
    arr = np.asarray(im, dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1) / 127.5 - 1.0


# -- listings --------------------------------------------------------------------------------------

@dataclass
class Item:
    image: str
    text: str


SIDE_WORDS = ("左", "右", "left", "right")


def sided_captions(items: list[Item]) -> int:
    """How many captions name a side: a horizontal flip mirrors the picture, not the words."""
    return sum(any(w in item.text.lower() for w in SIDE_WORDS) for item in items)


def list_items(data: str) -> tuple[list[Item], Counter]:
    """The (image path, caption) list of a JSONL/CSV file or an image+txt folder, and the entries
    skipped while listing (bad lines, missing captions), counted by reason."""
    path = Path(data)
    skipped: Counter = Counter()
    items: list[Item] = []
    if path.is_dir():
        for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                skipped["missing caption"] += 1
                continue
            try:
                text = caption.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                skipped["unreadable caption"] += 1
                continue
            if not text:
                skipped["missing caption"] += 1
                continue
            items.append(Item(str(image), text))
        return items, skipped
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file or folder")
    base = path.parent
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped["bad JSONL line"] += 1
                    continue
                _add(items, skipped, base, row if isinstance(row, dict) else {})
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if not reader.fieldnames or "image" not in reader.fieldnames or "text" not in reader.fieldnames:
                raise ValueError(f"{path}: a CSV needs a header with 'image' and 'text' columns, "
                                 f"found {reader.fieldnames}")
            for row in reader:
                _add(items, skipped, base, row)
    else:
        raise ValueError(f"{path}: unknown data file type {path.suffix!r} (expected .jsonl, .csv, a folder "
                         "of images with .txt captions, WebDataset .tar shards or a latent cache)")
    return items, skipped


def _add(items: list, skipped: Counter, base: Path, row: dict) -> None:
    image, text = row.get("image"), row.get("text")
    if not image:
        skipped["missing image path"] += 1
        return
    if not isinstance(text, str) or not text.strip():
        skipped["missing caption"] += 1
        return
    items.append(Item(str(base / image), text.strip()))


# -- map-style: files ------------------------------------------------------------------------------

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


# -- aspect-ratio buckets --------------------------------------------------------------------------

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


# -- latent cache ----------------------------------------------------------------------------------

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
    from ..formats.files import save_safetensors
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
    from ..formats.files import atomic_write
    atomic_write(folder / CACHE_INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, ensure_ascii=False),
                                                                        encoding="utf-8"))
    return folder, skipped


# -- WebDataset shards -----------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """`data-{0000..0099}.tar` → the 100 names (WebDataset's brace notation), nested left to right."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def list_shards(data: str) -> list[str] | None:
    """The .tar shards `data` names (a folder of them, a brace pattern, a glob, one .tar), or None."""
    path = Path(data)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        return shards or None
    if "{" in data or any(c in data for c in "*?["):
        names = [n for p in expand_braces(data) for n in (sorted(glob.glob(p)) if any(c in p for c in "*?[")
                                                          else [p])]
        missing = [n for n in names if not Path(n).is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no such shard ({len(missing)} of {len(names)} missing)")
        if not names:
            raise FileNotFoundError(f"{data}: no shard matches")
        return names
    if path.suffix == ".tar":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such shard")
        return [str(path)]
    return None


def _records(shard: str):
    """(key, {ext: bytes}) per sample of a tar shard, members grouped by their key (name before the
    first dot of the basename). A corrupt tail ends the shard (reported as one bad record)."""
    current, parts = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{directory}/{stem}" if directory else stem
                if key != current:
                    if current is not None:
                        yield current, parts
                    current, parts = key, {}
                f = tar.extractfile(member)
                parts[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        if current is not None:
            yield current, parts
        yield f"{shard}#corrupt", {"__error__": f"{type(e).__name__}: {e}".encode()}
        return
    if current is not None:
        yield current, parts


def decode_record(shard: str, key: str, parts: dict) -> tuple[object, str]:
    """(PIL RGB image, caption) of one WebDataset record, or BadSample."""
    where = f"{shard}:{key}"
    if "__error__" in parts:
        raise BadSample("corrupt shard", f"{shard} ({parts['__error__'].decode(errors='replace')})")
    image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in parts), None)
    if image is None:
        raise BadSample("missing image", where)
    text = None
    if "txt" in parts:
        text = parts["txt"].decode("utf-8", errors="replace").strip()
    elif "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            text = str(meta.get("caption") or meta.get("text") or "").strip()
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            text = None
    if not text:
        raise BadSample("missing caption", where)
    return open_rgb(image, where), text


class ShardStream(IterableDataset):
    """WebDataset shards as an endless stream of ready batches for one rank.

    The rank's DataLoader workers are "slots" `rank·W + w` of `world·W`: each epoch the shard list is
    shuffled (seeded by epoch) and slot s reads shards s, s+S, …; with fewer shards than slots, every
    slot reads all shards and keeps records s, s+S, … — no sample is read twice in an epoch either way.
    A seeded shuffle buffer mixes records. Each batch carries `(worker, records consumed)`, so a resumed
    run skips exactly the records an uninterrupted one had used, without decoding them.
    """

    def __init__(self, shards: list[str], batch_size: int, resolution: int, center_crop: bool,
                 random_flip: bool, seed: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 1000, start: dict | None = None):
        self.shards, self.batch_size = list(shards), batch_size
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.rank, self.world = seed, rank, world
        self.workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.start = {int(k): v for k, v in (start or {}).items()}

    def slot_records(self, slot: int, slots: int, epoch: int):
        """(epoch-local key, shard, key, parts) for one slot in one epoch, before shuffling."""
        order = list(self.shards)
        random.Random(sample_seed(self.seed, epoch, 0, 11)).shuffle(order)
        if len(order) >= slots:
            for shard in order[slot::slots]:
                for key, parts in _records(shard):
                    yield shard, key, parts
        else:
            i = 0
            for shard in order:
                for key, parts in _records(shard):
                    if i % slots == slot:
                        yield shard, key, parts
                    i += 1

    def records(self, slot: int, slots: int):
        """Endless shuffled records of one slot: (epoch, shard, key, parts)."""
        epoch = 0
        while True:
            rng = random.Random(sample_seed(self.seed, epoch, slot, 13))
            buffer: list = []
            empty = True
            for shard, key, parts in self.slot_records(slot, slots, epoch):
                empty = False
                buffer.append((epoch, shard, key, parts))
                if len(buffer) >= max(1, self.shuffle_buffer):
                    yield buffer.pop(rng.randrange(len(buffer)))
            while buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
            if empty:
                return
            epoch += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        slots = self.world * self.workers
        slot = self.rank * self.workers + worker
        consumed = int(self.start.get(worker, 0))
        stream = self.records(slot, slots)
        for _ in range(consumed):  # resume: skip without decoding
            next(stream)
        batch, skipped = [], []
        for epoch, shard, key, parts in stream:
            consumed += 1
            try:
                image, text = decode_record(shard, key, parts)
            except BadSample as e:
                skipped.append((e.reason, str(e)))
                continue
            rng = random.Random(sample_seed(self.seed, epoch, stable_key(f"{shard}:{key}"), 1))
            batch.append({"image": transform(image, self.resolution, self.center_crop, self.random_flip, rng),
                          "text": text, "key": stable_key(f"{shard}:{key}"), "epoch": epoch,
                          "skipped": []})
            if len(batch) == self.batch_size:
                out = collate(batch)
                out["skipped"] = skipped
                out["position"] = (worker, consumed)
                yield out
                batch, skipped = [], []


def collate(samples: list[dict]) -> dict:
    out = {"text": [s["text"] for s in samples],
           "key": torch.tensor([s["key"] for s in samples], dtype=torch.long),
           "epoch": torch.tensor([s["epoch"] for s in samples], dtype=torch.long),
           "skipped": [x for s in samples for x in s["skipped"]]}
    for name in ("image", "moments"):
        if name in samples[0]:
            out[name] = torch.stack([s[name] for s in samples])
    return out
