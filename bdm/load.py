"""`load_bridge`: one entry point for every branch format a user may hold."""
from __future__ import annotations

import os
from pathlib import Path

from .bridge import Bridge
from .formats.bdm_file import is_bdm_file, load_bdm
from .formats.files import FormatError
from .formats.official import is_diffusers_dir, load_diffusers_bridge


def load_bridge(path: str | os.PathLike, chinese_clip: str | os.PathLike | None = None) -> Bridge:
    """A BDM file (the project's format), or an official diffusers directory (BDM1.0; give the Hugging
    Face Chinese CLIP directory as `chinese_clip` to get its encoder). The Chinese encoder, when known,
    is `bridge.text_encoder`."""
    path = Path(path)
    if is_diffusers_dir(path):
        return load_diffusers_bridge(path, chinese_clip)
    if path.is_dir():
        raise FormatError(f"{path}: a folder without config.json; expected a BDM .safetensors file or an "
                          "official diffusers BDM folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors" and is_bdm_file(path):
        bridge = load_bdm(path, with_text_encoder=chinese_clip is None)
        if chinese_clip is not None:
            from .formats.official import load_chinese_clip
            bridge.set_text_encoder(load_chinese_clip(chinese_clip, bridge.context_dim))
        return bridge
    return load_bdm(path)  # raises a FormatError saying what the file is instead
