"""The official BDM1.0 release and diffusers-format ControlNets.

BDM1.0 (Hugging Face `qihoo360/BDM1.0`) is a diffusers directory of class `ControlNetModelBDM`:
`config.json` + `diffusion_pytorch_model.safetensors` (or a `.bin`, read with `weights_only=True`) with
diffusers' `ControlNetModel` key layout. Its `controlnet_cond_embedding.*` exists but is never run, so
it is dropped. Its Chinese encoder is a separate Hugging Face `ChineseCLIPModel` directory
(OFA-Sys/chinese-clip-vit-huge-patch14). A plain diffusers `ControlNetModel` directory loads the same
way, keeping its hint encoder.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..bridge import Bridge, BridgeConfig
from .checks import check_module_shapes, check_unet_config
from .diffusers_names import key_map, unet_config_from_diffusers
from .files import FormatError, load_checked, read_json, read_state_dict

BDM_CLASS = "ControlNetModelBDM"
CONTROLNET_CLASS = "ControlNetModel"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HINT_PREFIX = "controlnet_cond_embedding."


def is_diffusers_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def _weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no weights file (expected one of {', '.join(WEIGHT_FILES)})")


def load_diffusers_bridge(directory: str | os.PathLike, chinese_clip: str | os.PathLike | None = None) -> Bridge:
    """A branch from a diffusers `ControlNetModelBDM` (BDM1.0) or `ControlNetModel` directory.

    For BDM, `chinese_clip` is the Hugging Face Chinese CLIP directory; it becomes
    `bridge.text_encoder`, and its width must equal the branch's cross-attention context size.
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    config = read_json(config_file)
    cls = config.get("_class_name")
    if cls not in (BDM_CLASS, CONTROLNET_CLASS):
        raise FormatError(f"{config_file}: _class_name is {cls!r}; expected {BDM_CLASS!r} (official BDM) "
                          f"or {CONTROLNET_CLASS!r}")
    try:
        unet_cfg = unet_config_from_diffusers(config, str(config_file))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise FormatError(f"{config_file}: not a usable {cls} config: {type(e).__name__}: {e}") from e
    is_bdm = cls == BDM_CLASS
    hint = None if is_bdm else config.get("conditioning_channels", 3)
    if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint < 1):
        raise FormatError(f"{config_file}: 'conditioning_channels' must be an integer ≥ 1, found {hint!r}")
    weights = _weights_file(directory)
    tensors = read_state_dict(weights)  # bounded by the file; the config is checked against it first
    if is_bdm:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(HINT_PREFIX)}
    check_unet_config(unet_cfg, len(tensors), str(config_file), "config.json")
    with torch.device("meta"):
        bridge = Bridge(BridgeConfig(unet_cfg, hint))
    names = key_map(unet_cfg, bridge.state_dict(), decoder=False, controlnet=True)
    ldm = {ours: tensors[theirs] for ours, theirs in names.items() if theirs in tensors}
    known = set(names.values())
    ldm.update({k: v for k, v in tensors.items() if k not in known})  # reported as unexpected
    check_module_shapes(bridge, {k: tuple(v.shape) for k, v in ldm.items()}, str(weights), f"{cls} weights")
    bridge = bridge.to_empty(device="cpu")
    load_checked(bridge, ldm, str(weights), f"{cls} weights")
    bridge.meta = {"bdm.source": str(directory)}
    if chinese_clip is not None:
        bridge.set_text_encoder(load_chinese_clip(chinese_clip, unet_cfg.context_dim))
    return bridge.eval()


def load_chinese_clip(directory: str | os.PathLike, context_dim: int | None = None):
    """A Hugging Face Chinese CLIP directory as our `ChineseTextEncoder`, checked against the branch."""
    from ..text.chinese import ChineseTextEncoder
    encoder = ChineseTextEncoder.from_hf_dir(directory)
    if context_dim is not None and encoder.hidden_size != context_dim:
        raise FormatError(f"{directory}: the Chinese encoder's hidden size is {encoder.hidden_size}, but "
                          f"the branch's cross-attention expects {context_dim}")
    return encoder
