"""Images as training wants them: any file PIL reads, as 8-bit RGB (CMYK, RGBA, palette, 16-bit and
grey converted), resized to cover a size, cropped and maybe flipped, in [-1, 1]."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from .samples import BadSample


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
            if Path(source).stat().st_size == 0:
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
