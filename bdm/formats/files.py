"""Reading and writing weight files safely, with errors that say which file, what was expected and
what was found. Never unpickles: safetensors, or `torch.load(weights_only=True)` for legacy files."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class FormatError(ValueError):
    """A weights file or folder is not what it was expected to be."""


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: the file is empty (0 bytes)")
    return path


def read_state_dict(path: str | os.PathLike, keep=None) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of a legacy pickle file loaded with weights_only.

    `keep(key) -> bool` reads only some tensors (e.g. the text tower of a CLIP file whose vision
    tower would cost gigabytes)."""
    path = _existing_file(path)
    keep = keep or (lambda key: True)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep(k)}  # noqa: SIM118 (not a dict)
        except Exception as e:  # safetensors raises its own error types for truncation/garbage
            raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if path.suffix in PICKLE_SUFFIXES:
        data = read_pickle(path)
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise FormatError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor) and keep(k)}
    raise FormatError(f"{path}: unknown weights file type {path.suffix!r} "
                      f"(expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)})")


def read_pickle(path: str | os.PathLike):
    """A legacy `.pt`/`.ckpt`/`.bin` file's content through `torch.load(weights_only=True)`: tensors,
    numbers, strings and containers only, never code; memory-mapped where torch and the file allow."""
    path = _existing_file(path)
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except (TypeError, RuntimeError):  # torch < 2.1, or a legacy (non-zip) pickle
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise FormatError(f"{path}: cannot be read safely (only plain tensors are accepted from "
                          f"pickle files; convert it to .safetensors): {e}") from e


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other file types or none)."""
    path = _existing_file(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a `.safetensors` file, from its header only (nothing is allocated)."""
    path = _existing_file(path)
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:
        raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from e


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def materialize(factory):
    """`factory()` built on the meta device and given empty CPU storage: skips random initialisation,
    which costs seconds for SD-size models, when weights are about to be loaded anyway."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device="cpu")


def check_shapes(expected: dict, found: dict, source: str, what: str = "weights", prefix: str = "") -> None:
    """The tensors `found` (name → shape) are exactly those `expected`, with the same shapes; the error
    names the file, the key (with `prefix`, as the file spells it), expected vs found."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {prefix + missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {prefix + unexpected[0]!r})")
        raise FormatError(f"{source}: the {what} do not match the expected architecture: " + "; ".join(parts))
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise FormatError(f"{source}: {what} key {prefix + k!r} has shape {tuple(found[k])}, "
                              f"expected {tuple(shape)}")


def load_checked(module: nn.Module, state_dict: dict, source: str, what: str = "weights") -> nn.Module:
    """`module.load_state_dict(strict)` with an error naming the file, the key, expected vs found."""
    check_shapes({k: v.shape for k, v in module.state_dict().items()}, {k: v.shape for k, v in state_dict.items()},
                 source, what)
    module.load_state_dict(state_dict, strict=True)
    return module


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def short_hash(path: str | os.PathLike) -> str:
    """The WebUI's short model hash: the first 10 hex digits of the file's sha256."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]
