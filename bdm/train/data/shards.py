"""WebDataset shards: `.tar` files of records (`key.jpg` + `key.txt` or `key.json`), named as a
folder, one file, a glob or a brace pattern (`data-{0000..0099}.tar`), read as an endless, seeded,
resumable stream of batches split over ranks and workers."""
from __future__ import annotations

import glob
import json
import random
import tarfile
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from .images import open_rgb, transform
from .samples import BadSample, collate, sample_seed, stable_key


def list_shards(data: str) -> list[str] | None:
    """The .tar shards `data` names (a folder of them, a brace pattern, a glob, one .tar), or None."""
    path = Path(data)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        return shards or None
    if "{" in data or any(c in data for c in "*?["):
        from braceexpand import braceexpand  # a dependency, imported here: the WebUI never needs it
        names = [n for p in braceexpand(data, escape=False)  # no escapes: Windows paths keep their backslashes
                 for n in (sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])]
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


def shard_records(shard: str):
    """(key, {ext: bytes}) per sample of a tar shard, members grouped by their key (name before the
    first dot of the basename). A corrupt tail ends the shard (reported as one bad record)."""
    current, parts = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")  # tar names use "/" everywhere
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
                for key, parts in shard_records(shard):
                    yield shard, key, parts
        else:
            i = 0
            for shard in order:
                for key, parts in shard_records(shard):
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
