"""The project's single-file BDM format: one `.safetensors` with the branch and its Chinese encoder.

Layout:
- `bridge.*` — the branch in LDM/ControlNet naming (`input_blocks.*`, `zero_convs.*`, …);
- `text_encoder.*` — the Chinese CLIP text tower in Hugging Face naming (`embeddings.*`, `encoder.*`);
- metadata (all strings): `format` = "bdm", `format_version`, `base_family` = "sd1",
  `bridge_config` and `text_encoder_config` (JSON), plus free-form `bdm.*` notes (training run, …).
Everything needed to rebuild both modules is inside; no code is ever unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..bridge import Bridge, BridgeConfig
from .checks import check_module_shapes, check_text_config, check_unet_config
from .files import (FormatError, load_checked, read_metadata, read_shapes, read_state_dict, save_safetensors,
                    strip_prefix)

FORMAT = "bdm"
FORMAT_VERSION = 1
BRIDGE_PREFIX = "bridge."
TEXT_PREFIX = "text_encoder."


def save_bdm(path: str | os.PathLike, bridge: Bridge, text_encoder=None, notes: dict | None = None,
             dtype: torch.dtype | None = None) -> Path:
    """Write a BDM file atomically (temp file + rename). `notes` go to the metadata as `bdm.<key>`.

    `dtype` is the branch's storage precision; the Chinese encoder is always stored in fp32: the official
    inference runs it in fp32, and fp16 rounding alone moves its embeddings by ~4e-3."""
    tensors = {BRIDGE_PREFIX + k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
               for k, v in bridge.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "base_family": "sd1",
                "bridge_config": json.dumps(bridge.config.to_dict())}
    if text_encoder is not None:
        tensors.update({TEXT_PREFIX + k: v.float() if v.is_floating_point() else v
                        for k, v in text_encoder.text_state_dict().items()})
        metadata["text_encoder_config"] = json.dumps(text_encoder.config_dict())
    for key, value in (notes or {}).items():
        metadata[f"bdm.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return save_safetensors(path, tensors, metadata)


def is_bdm_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix == ".safetensors" and read_metadata(path).get("format") == FORMAT


def _explain_not_bdm(path: Path, keys) -> str:
    if any(k.startswith("control_model.") for k in keys):
        return f"{path}: this is a ControlNet (control_model.* keys), not a BDM file"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return f"{path}: this is a Stable Diffusion checkpoint, not a BDM file"
    if any(k.startswith("lora_") for k in keys):
        return f"{path}: this is a LoRA, not a BDM file"
    return (f"{path}: not a BDM file (expected metadata format=bdm with bridge.* and text_encoder.* "
            "tensors; convert official releases with `python -m bdm.convert`)")


def read_bdm_header(path: str | os.PathLike) -> tuple[dict, dict[str, tuple]]:
    """Metadata and tensor shapes of a BDM file (its header only), after checking it is one of a version
    we can read."""
    path = Path(path)
    if path.suffix != ".safetensors":  # a BDM file is always one; say what this one is
        raise FormatError(_explain_not_bdm(path, read_state_dict(path).keys()))
    meta = read_metadata(path)
    shapes = read_shapes(path)
    if meta.get("format") != FORMAT:
        raise FormatError(_explain_not_bdm(path, shapes))
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise FormatError(f"{path}: metadata format_version is {meta.get('format_version')!r}, not a number") from None
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: BDM format version {version} is newer than this program reads "
                          f"({FORMAT_VERSION}); update the extension")
    if meta.get("base_family") != "sd1":
        raise FormatError(f"{path}: made for base family {meta.get('base_family')!r}; only 'sd1' is supported")
    return meta, shapes


def read_bdm(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a BDM file (checked as `read_bdm_header` does)."""
    meta, _ = read_bdm_header(path)
    return meta, read_state_dict(path)


def _json_metadata(path, meta: dict, key: str):
    try:
        return json.loads(meta[key])
    except KeyError:
        raise FormatError(f"{path}: no {key} metadata") from None
    except ValueError as e:
        raise FormatError(f"{path}: metadata {key} is not valid JSON: {e}") from e


def load_bdm(path: str | os.PathLike, with_text_encoder: bool = True) -> Bridge:
    """The branch of a BDM file, with its Chinese encoder as `bridge.text_encoder` (or None).

    Both configs are checked against the tensor shapes of the file's header before anything is built
    (`checks`); the branch is built on the meta device, compared, then given memory and loaded."""
    meta, shapes = read_bdm_header(path)
    bridge_shapes = strip_prefix(shapes, BRIDGE_PREFIX)
    raw = _json_metadata(path, meta, "bridge_config")
    try:
        config = BridgeConfig.from_dict(raw)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise FormatError(f"{path}: unreadable bridge_config metadata: {type(e).__name__}: {e}") from e
    check_unet_config(config.unet, len(bridge_shapes), str(path), "bridge_config['unet']")
    hint = config.hint_channels
    if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint < 1):
        raise FormatError(f"{path}: bridge_config['hint_channels'] must be null or an integer ≥ 1, found {hint!r}")
    with torch.device("meta"):
        bridge = Bridge(config)
    check_module_shapes(bridge, bridge_shapes, str(path), "branch weights (bridge.*)", BRIDGE_PREFIX)
    text_config = None
    if with_text_encoder:
        if "text_encoder_config" not in meta:
            raise FormatError(f"{path}: this BDM file holds no Chinese text encoder (no text_encoder_config); "
                              "give one with --chinese-clip DIR")
        text_config = _json_metadata(path, meta, "text_encoder_config")
        check_text_config(text_config, strip_prefix(shapes, TEXT_PREFIX), str(path))
    tensors = read_state_dict(path)
    bridge = bridge.to_empty(device="cpu")
    load_checked(bridge, strip_prefix(tensors, BRIDGE_PREFIX), str(path), "branch weights (bridge.*)")
    text_encoder = None
    if with_text_encoder:
        from ..text.chinese import ChineseTextEncoder
        text_encoder = ChineseTextEncoder.from_config(text_config)
        text_encoder.load_weights(strip_prefix(tensors, TEXT_PREFIX), f"{path} (text_encoder.*)")
    bridge.set_text_encoder(text_encoder)
    bridge.meta = {k: v for k, v in meta.items() if k.startswith("bdm.")}
    return bridge.eval()
