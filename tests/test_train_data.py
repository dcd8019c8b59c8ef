"""Data: every bad-data case is converted or skipped and counted, never a crash; JSONL/CSV/folder
listings; WebDataset shards split across ranks × workers without duplicates, resumable; latent cache."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdm.train import data as D
from tests.train_util import config, shared_backbone, write_colour_set, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (conftest.py)


def _png(mode: str, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        im = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    elif mode == "P":
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.info["transparency"] = 0
    else:
        im = Image.new(mode, size, {"RGBA": (255, 0, 0, 128), "LA": (80, 255), "L": 80, "RGB": (1, 2, 3),
                                    "CMYK": (0, 255, 255, 0)}[mode])
    im.save(buf, format="JPEG" if mode == "CMYK" else "PNG", **({"transparency": 0} if mode == "P" else {}))
    return buf.getvalue()


def bad_folder(folder: Path) -> Path:
    """Good files in odd modes plus every kind of bad file, image+txt folder layout."""
    folder.mkdir(parents=True)
    files = {"cmyk.jpg": _png("CMYK"), "rgba.png": _png("RGBA"), "grey16.png": _png("I;16"),
             "palette.png": _png("P"), "la.png": _png("LA"), "good.png": _png("RGB"),
             "zero.png": b"", "garbage.png": b"not an image at all", "truncated.png": _png("RGB", (64, 64))[:60]}
    for name, content in files.items():
        (folder / name).write_bytes(content)
        (folder / name).with_suffix(".txt").write_text("红色", encoding="utf-8")
    (folder / "nocaption.png").write_bytes(_png("RGB"))
    (folder / "emptycaption.png").write_bytes(_png("RGB"))
    (folder / "emptycaption.txt").write_text("  \n", encoding="utf-8")
    return folder


def test_modes_are_converted_and_bad_files_skipped_and_counted(tmp_path):
    folder = bad_folder(tmp_path / "bad")
    items, skipped = D.list_items(str(folder))
    assert skipped == Counter({"missing caption": 2})
    ds = D.ImageTextDataset(items, 16, True, False, 0)
    names = [Path(i.image).name for i in items]
    reasons = Counter()
    for i, name in enumerate(names):
        sample = ds[(0, i)]
        reasons.update(r for r, _ in sample["skipped"])
        assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.float32
        assert -1 <= sample["image"].min() and sample["image"].max() <= 1
    # each bad file is replaced by the next good one, and reported every time it is met
    assert set(reasons) == {"empty file", "unreadable image"}
    assert reasons["empty file"] >= 1 and reasons["unreadable image"] >= 2  # garbage, truncated
    rgb = lambda name: ds.load(0, names.index(name))["image"][:, 8, 8]
    assert torch.allclose(rgb("cmyk.jpg"), torch.tensor([1.0, -1.0, -1.0]), atol=0.05)  # M+Y = red
    assert torch.allclose(rgb("rgba.png"), torch.tensor([1.0, 0.0, 0.0]), atol=0.02)  # red on white, half alpha
    assert torch.allclose(rgb("grey16.png"), torch.full((3,), 40000 / 65535 * 2 - 1), atol=0.02)
    assert torch.allclose(rgb("palette.png"), torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    with pytest.raises(D.BadSample, match="missing file"):
        D.open_rgb(str(tmp_path / "gone.png"), "gone.png")


def test_jsonl_csv_listings_and_bad_lines(tmp_path):
    data = write_colour_set(tmp_path / "j", per_colour=1, size=8, fmt="jsonl")
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n" + json.dumps({"image": "0000.png"}) + "\n" + json.dumps({"text": "红色"}) + "\n\n")
    items, skipped = D.list_items(str(data))
    assert len(items) == 4 and Path(items[0].image).parent == data.parent  # relative to the file
    assert skipped == Counter({"bad JSONL line": 1, "missing caption": 1, "missing image path": 1})
    items, _ = D.list_items(str(write_colour_set(tmp_path / "c", per_colour=1, size=8, fmt="csv")))
    assert [i.text for i in items] == ["红色", "绿色", "蓝色", "黄色"]
    (tmp_path / "bad.csv").write_text("file,caption\na.png,x\n")
    with pytest.raises(ValueError, match="'image' and 'text' columns"):
        D.list_items(str(tmp_path / "bad.csv"))


def test_training_on_bad_data_runs_and_logs_the_skips(tmp_path, tmp_path_factory):
    from bdm.train import Trainer
    ckpt = shared_backbone(tmp_path_factory)
    folder = bad_folder(tmp_path / "bad")
    trainer = Trainer(config(tmp_path, ckpt, folder, resolution=16, batch_size=4, max_steps=3))
    result = trainer.run()
    assert result["step"] == 3
    assert result["skipped"]["missing caption"] == 2
    assert result["skipped"]["empty file"] >= 1 or result["skipped"]["unreadable image"] >= 1
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped"] == sum(result["skipped"].values())


@pytest.mark.parametrize("n_shards", [5, 2])  # more shards than slots, and fewer (split by record)
def test_webdataset_split_across_ranks_and_workers_without_duplicates(tmp_path, n_shards):
    shards = write_shards(tmp_path, n_shards, 6)
    assert D.list_shards(str(tmp_path)) == shards
    assert D.list_shards(str(tmp_path / "{00000..00001}.tar")) == shards[:2]
    world, workers = 2, 2
    seen = []
    for rank in range(world):
        for worker in range(workers):
            stream = D.ShardStream(shards, 1, 8, True, False, 0, rank, world, workers, shuffle_buffer=4)
            records = stream.slot_records(rank * workers + worker, world * workers, epoch=0)
            seen += [key for _, key, _ in records]
    assert len(seen) == len(set(seen)) == n_shards * 6


def test_webdataset_stream_batches_skips_bad_records_and_resumes(tmp_path):
    shards = write_shards(tmp_path, 2, 6, bad=True)
    stream = D.ShardStream(shards, 2, 8, True, True, 0, shuffle_buffer=3)
    it = iter(stream)
    batches = [next(it) for _ in range(6)]
    assert all(b["image"].shape == (2, 3, 8, 8) for b in batches)
    reasons = Counter(r for b in batches for r, _ in b["skipped"])
    assert reasons["unreadable image"] + reasons["empty file"] >= 2 and reasons["missing caption"] >= 2
    # resume after the 3rd batch: the same 4th..6th batches, without decoding the skipped records
    position = {0: batches[2]["position"][1]}
    it2 = iter(D.ShardStream(shards, 2, 8, True, True, 0, shuffle_buffer=3, start=position))
    for b in batches[3:]:
        again = next(it2)
        assert again["text"] == b["text"] and torch.equal(again["image"], b["image"])


def test_training_from_shards_and_with_cached_latents(tmp_path, tmp_path_factory):
    from bdm.train import Trainer
    ckpt = shared_backbone(tmp_path_factory)
    write_shards(tmp_path / "shards", 2, 4, bad=True)
    result = Trainer(config(tmp_path / "a", ckpt, tmp_path / "shards", resolution=16, batch_size=2,
                            max_steps=2, num_workers=1)).run()
    assert result["step"] == 2
    data = write_colour_set(tmp_path / "data", per_colour=1, size=16)
    (tmp_path / "data" / "0001.png").write_bytes(b"")  # one bad image: left out of the cache
    t = Trainer(config(tmp_path / "b", ckpt, data, resolution=16, batch_size=2, max_steps=2, cache_latents=True))
    result = t.run()
    cache = tmp_path / "b" / "out" / "latents"
    index = json.loads((cache / D.CACHE_INDEX).read_text())
    assert len(index["images"]) == 3 and result["skipped"] == {"empty file": 1}
    assert D.LatentDataset(cache, True, 0).load(0, 0)["moments"].shape == (2, 4, 8, 8)
    # a cache folder is itself a dataset (the "separate step")
    result = Trainer(config(tmp_path / "c", ckpt, cache, resolution=16, batch_size=2, max_steps=1)).run()
    assert result["step"] == 1


@pytest.mark.parametrize("flip", [True, False])
def test_random_flip_warns_when_captions_name_a_side(tmp_path, tmp_path_factory, capsys, flip):
    from bdm.train import Trainer
    ckpt = shared_backbone(tmp_path_factory)
    data = write_colour_set(tmp_path / "data", per_colour=1, size=16)
    lines = data.read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].replace('"text": "', '"text": "左边的')
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    Trainer(config(tmp_path, ckpt, data, resolution=16, random_flip=flip)).prepare()
    err = capsys.readouterr().err
    assert ("1 of 4 captions name a side" in err) == flip, err
