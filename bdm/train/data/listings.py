"""Image + caption lists: a JSONL or CSV/TSV file (`image`, `text`; paths relative to the file) or a
folder of images with a `.txt` caption beside each. Bad lines and missing captions are counted, not fatal."""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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
