"""Finding BDM models in the WebUI's folders, and picking one by what a user or API client typed.

Selectable models:
- project BDM files: `*.safetensors` anywhere under a models folder (validated when loaded, so a wrong
  file shows up and then gives a clear message when chosen);
- official diffusers folders (`config.json` with `_class_name` `ControlNetModelBDM`, i.e. BDM1.0). Their
  Chinese CLIP folder is, in this order: a subfolder `chinese_clip`/`chinese-clip`/`text_encoder` of the
  BDM folder, the only Chinese CLIP folder found under the models folders, or the default given by the
  settings.
A model is named by its file name without extension (folder name for diffusers), shown as
`name [hash]` with the WebUI's short hash (first 10 hex digits of sha256 of the weights file). Where a
user or API client sees a file, it is named relative to its models folder (`models/bdm/x.safetensors`),
never by an absolute path.
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


SOURCES = ("BDM1.0: the Hugging Face repositories qihoo360/BDM1.0 (the branch) and "
           "OFA-Sys/chinese-clip-vit-huge-patch14 (its Chinese text encoder); convert them into one file "
           "with `python -m bdm.convert`")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    kind: str  # "bdm" | "diffusers"
    hash: str | None = None
    chinese_clip: Path | None = None
    shown: str = ""  # the path as users see it: relative to its models folder, e.g. "models/bdm/x.safetensors"

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    @property
    def where(self) -> str:
        return self.shown or self.path.name

    def hide_paths(self, message: str) -> str:
        """`message` with this model's absolute paths replaced by the names users see."""
        clip = self.chinese_clip
        if clip is not None and not str(clip).startswith(str(self.path)):
            message = message.replace(str(clip), clip.name)
        return message.replace(str(self.path), self.where)

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
                    chinese_clip_default: str | os.PathLike | None = None,
                    labels: dict | None = None) -> list[ModelEntry]:
    """All selectable models under `dirs` (missing folders are skipped), sorted by name; duplicate
    paths (the same folder given twice) are listed once. `labels`: how users call a folder (e.g.
    "models/bdm"; default: its own name), for `ModelEntry.shown`."""
    files: list[Path] = []
    diffusers: list[Path] = []
    clips: list[Path] = []
    seen: set[str] = set()
    shown: dict[Path, str] = {}
    for root in dirs:
        if not root:
            continue
        label = (labels or {}).get(root) or (labels or {}).get(str(root)) or Path(root).name
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
                    shown[here] = f"{label}/{here.relative_to(root).as_posix()}"
                elif is_chinese_clip_dir(here):
                    clips.append(here)
                subdirs[:] = []  # a model folder: its files are not models of their own
                continue
            subdirs.sort()
            for n in sorted(names):
                if n.endswith(".safetensors") and not n.startswith("."):
                    files.append(here / n)
                    shown[here / n] = f"{label}/{(here / n).relative_to(root).as_posix()}"
    default = Path(chinese_clip_default) if chinese_clip_default else None
    entries = []
    for f in files:
        entries.append(ModelEntry(f.stem, f, "bdm", hasher(f) if hasher else None, shown=shown[f]))
    for d in diffusers:
        clip = _clip_for(d, clips, default)
        entry = ModelEntry(d.name, d, "diffusers", None, clip)
        entries.append(ModelEntry(d.name, d, "diffusers", hasher(entry.weights_file) if hasher else None, clip,
                                  shown=shown[d]))
    entries.sort(key=lambda e: (e.name.lower(), str(e.path)))
    return entries


def find_model(query: str | None, entries: Sequence[ModelEntry]) -> ModelEntry | None:
    """The entry a user meant: "" / "None" → None; else by title `name [hash]`, file name with or
    without extension, folder name, hash alone, or path; case-insensitive as a last resort. A title
    whose hash belongs to no installed file is refused (the file changed since that title was written),
    unless the hash alone names one (a renamed file). Raises LookupError saying what is installed."""
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
        name = m.group("name")
        same_name = [e for e in entries if name in (e.name, e.path.name)]
        if same_name:
            e = same_name[0]
            raise LookupError(f"the BDM model {e.name!r} installed here has hash {e.hash}, not {h} as asked: "
                              f"{e.where} is a different file (choose it again to use it)")
        q = name
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
    choices = ", ".join(e.title for e in entries) or "none installed"
    raise LookupError(f"no BDM model {query!r} (installed: {choices})")


def pick_model(query: str | None, entries: Sequence[ModelEntry], default: str | None = None,
               last_used: str | None = None) -> ModelEntry:
    """The model a generation uses: the one asked for; without one, the default from the settings;
    without that, the last used (if still installed), else the first found. Raises LookupError."""
    entry = find_model(query, entries)
    if entry is not None:
        return entry
    if default and default not in ("None", "none"):
        try:
            entry = find_model(default, entries)
        except LookupError as e:
            raise LookupError(f"the default BDM model of the settings: {e}") from None
        if entry is not None:
            return entry
    if last_used:
        try:
            entry = find_model(last_used, entries)
        except LookupError:
            entry = None
        if entry is not None:
            return entry
    if entries:
        return entries[0]
    raise LookupError(no_models_message())


def no_models_message(folders: Sequence[str] = ("models/bdm",)) -> str:
    return (f"no BDM model is installed: put a BDM .safetensors file into {' or '.join(folders)} and "
            f"refresh the model list. {SOURCES}.")
