"""Finding BDM models in the WebUI's folders, and picking one by what a user or API client typed.

Selectable models:
- project BDM files: `*.safetensors` anywhere under a models folder (validated when loaded, so a wrong
  file shows up and then gives a clear message when chosen);
- official diffusers folders (`config.json` with `_class_name` `ControlNetModelBDM`, i.e. BDM1.0). Their
  Chinese CLIP folder is, in this order: a subfolder `chinese_clip`/`chinese-clip`/`text_encoder` of the
  BDM folder, the only Chinese CLIP folder found under the models folders, or the default given by the
  settings.
A model is named by its file name without extension (folder name for diffusers), shown as
`name [hash]` with the WebUI's short hash (first 10 hex digits of sha256 of the weights file).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..formats.files import short_hash

BDM_CLASS = "ControlNetModelBDM"
CLIP_SUBDIRS = ("chinese_clip", "chinese-clip", "text_encoder")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{6,64})\]$")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    kind: str  # "bdm" | "diffusers"
    hash: str | None = None
    chinese_clip: Path | None = None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    @property
    def weights_file(self) -> Path:
        if self.kind == "diffusers":
            for name in WEIGHT_FILES:
                if (self.path / name).is_file():
                    return self.path / name
        return self.path


_hash_memo: dict[tuple, str] = {}


def cached_short_hash(path: str | os.PathLike) -> str | None:
    """`short_hash` memoised by (path, size, mtime); None when the file cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        try:
            _hash_memo[key] = short_hash(path)
        except OSError:
            return None
    return _hash_memo[key]


def _config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_chinese_clip_dir(folder: Path) -> bool:
    cfg = _config(folder)
    if not isinstance(cfg, dict):
        return False
    return (cfg.get("model_type") in ("chinese_clip", "chinese_clip_text_model")
            or any("ChineseCLIP" in a for a in cfg.get("architectures") or []))


def is_bdm_diffusers_dir(folder: Path) -> bool:
    cfg = _config(folder)
    return isinstance(cfg, dict) and cfg.get("_class_name") == BDM_CLASS


def _clip_for(folder: Path, found_clips: Sequence[Path], default: Path | None) -> Path | None:
    for sub in CLIP_SUBDIRS:
        if (folder / sub / "config.json").is_file():
            return folder / sub
    if len(found_clips) == 1:
        return found_clips[0]
    return default


def discover_models(dirs: Iterable[str | os.PathLike], hasher: Callable | None = cached_short_hash,
                    chinese_clip_default: str | os.PathLike | None = None) -> list[ModelEntry]:
    """All selectable models under `dirs` (missing folders are skipped), sorted by name; duplicate
    paths (the same folder given twice) are listed once."""
    files: list[Path] = []
    diffusers: list[Path] = []
    clips: list[Path] = []
    seen: set[str] = set()
    for root in dirs:
        if not root:
            continue
        root = Path(root)
        if not root.is_dir():
            continue
        for folder, subdirs, names in os.walk(root, followlinks=True):
            here = Path(folder)
            real = os.path.realpath(here)
            if real in seen:
                subdirs[:] = []
                continue
            seen.add(real)
            if (here / "config.json").is_file() and here != root:
                if is_bdm_diffusers_dir(here):
                    diffusers.append(here)
                elif is_chinese_clip_dir(here):
                    clips.append(here)
                subdirs[:] = []  # a model folder: its files are not models of their own
                continue
            subdirs.sort()
            files += [here / n for n in sorted(names) if n.endswith(".safetensors") and not n.startswith(".")]
    default = Path(chinese_clip_default) if chinese_clip_default else None
    entries = []
    for f in files:
        entries.append(ModelEntry(f.stem, f, "bdm", hasher(f) if hasher else None))
    for d in diffusers:
        clip = _clip_for(d, clips, default)
        entry = ModelEntry(d.name, d, "diffusers", None, clip)
        entries.append(ModelEntry(d.name, d, "diffusers", hasher(entry.weights_file) if hasher else None, clip))
    entries.sort(key=lambda e: (e.name.lower(), str(e.path)))
    return entries


def find_model(query: str | None, entries: Sequence[ModelEntry]) -> ModelEntry | None:
    """The entry a user meant: "" / "None" → None; else by title `name [hash]` (hash wins), file name
    with or without extension, folder name, hash alone, or path; case-insensitive as a last resort.
    Raises LookupError (listing the choices) when nothing matches."""
    if query is None:
        return None
    q = str(query).strip()
    if q in ("", "None", "none"):
        return None
    for e in entries:
        if q == e.title:
            return e
    m = _TITLE.match(q)
    if m:
        h = m.group("hash").lower()
        by_hash = [e for e in entries if e.hash and (e.hash.startswith(h) or h.startswith(e.hash))]
        if by_hash:
            named = [e for e in by_hash if e.name == m.group("name")]
            return (named or by_hash)[0]
        q = m.group("name")
    for key in (lambda e: e.name, lambda e: e.path.name, lambda e: str(e.path)):
        for e in entries:
            if q == key(e):
                return e
    if re.fullmatch(r"[0-9a-fA-F]{8,64}", q):
        for e in entries:
            if e.hash and e.hash.startswith(q.lower()[:10]):
                return e
    ql = q.lower()
    for e in entries:
        if ql in (e.name.lower(), e.path.name.lower()):
            return e
    choices = ", ".join(e.title for e in entries) or "none found"
    raise LookupError(f"BDM: no BDM model {query!r} (available: {choices})")
