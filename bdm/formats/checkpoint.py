"""Single-file SD checkpoints (Civitai style): which family, which UNet architecture, the UNet itself.

The architecture comes from a `.yaml` beside the file (the WebUI's convention, LDM config format) or,
without one, from the state dict's shapes. Only SD1.x-family backbones can carry a BDM branch: SD2
(OpenCLIP, 1024 context), SDXL, inpainting (9 input channels) and instruct-pix2pix (8) are refused
with a message that says what was found.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..unet import UNetConfig, UNetModel
from .files import FormatError, load_checked, materialize, read_state_dict, strip_prefix

UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Family:
    """What kind of SD model a checkpoint holds, read from its keys and shapes."""

    name: str  # "sd1", "sd2", "sdxl", or "unknown"
    in_channels: int = 4
    context_dim: int = 768

    @property
    def variant(self) -> str:
        return {4: "", 9: " inpainting", 8: " instruct-pix2pix"}.get(self.in_channels, f" {self.in_channels}-channel")

    def describe(self) -> str:
        label = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(self.name, "unrecognised")
        return f"{label}{self.variant} (UNet context {self.context_dim})"


def detect_family(state_dict: dict) -> Family:
    keys = state_dict.keys()
    if any(k.startswith("conditioner.") for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in keys:
        return Family("sdxl", context_dim=2048)
    conv_in = state_dict.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    to_k = next((v for k, v in state_dict.items()
                 if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    if conv_in is None or to_k is None:
        return Family("unknown")
    in_channels, context = conv_in.shape[1], to_k.shape[1]
    if any(k.startswith("cond_stage_model.model.") for k in keys) or context == 1024:
        return Family("sd2", in_channels, context)
    return Family("sd1", in_channels, context)


def require_sd1(family: Family, source: str, allow_inpainting: bool = False) -> None:
    """Refuse backbones a BDM branch cannot be bridged onto, saying what was found."""
    if family.name != "sd1":
        raise FormatError(f"{source}: this is an {family.describe()} checkpoint; BDM needs an SD1.x-family "
                          "backbone (LDM UNet with a CLIP ViT-L-style text encoder)")
    if family.in_channels != 4 and not (allow_inpainting and family.in_channels == 9):
        raise FormatError(f"{source}: this is an SD1.x{family.variant} checkpoint "
                          f"({family.in_channels} input channels); BDM needs a plain 4-channel SD1.x UNet")


def read_ldm_yaml(path: str | os.PathLike) -> dict:
    """The LDM config (`model.params`) of a `.yaml` like the WebUI's `v1-inference.yaml`."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FormatError(f"{path}: not valid YAML: {e}") from e
    try:
        return data["model"]["params"]
    except (KeyError, TypeError):
        raise FormatError(f"{path}: not an LDM model config (expected model.params.unet_config)") from None


def unet_config_from_yaml(path: str | os.PathLike) -> UNetConfig:
    params = read_ldm_yaml(path)
    try:
        return UNetConfig.from_dict(params["unet_config"]["params"])
    except (KeyError, TypeError):
        raise FormatError(f"{path}: no model.params.unet_config.params in this config") from None


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(unet_sd: dict, source: str = "checkpoint") -> UNetConfig:
    """An LDM UNet's architecture from the shapes of its weights (`model.diffusion_model.` stripped).

    Shapes cannot tell the number of attention heads: SD1's 8 heads are assumed, or SD2's 64-wide
    heads when the transformers use linear projections. Put a `.yaml` beside other checkpoints.
    """
    keys = list(unet_sd)
    try:
        conv_in = unet_sd["input_blocks.0.0.weight"]
        mc, in_channels = conv_in.shape[0], conv_in.shape[1]
    except KeyError as e:
        raise FormatError(f"{source}: no SD UNet weights found (missing {e.args[0]!r})") from None
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet_sd]
    levels = len(downs) + 1
    num_res = (len(blocks) - 1 - len(downs)) // levels
    mult, attn, idx = [], [], 1
    for level in range(levels):
        mult.append(unet_sd[f"input_blocks.{idx}.0.out_layers.3.weight"].shape[0] // mc)
        if f"input_blocks.{idx}.1.proj_in.weight" in unet_sd:
            attn.append(2 ** level)
        idx += num_res + 1
    to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not to_k:
        raise FormatError(f"{source}: the UNet has no cross-attention; not an SD text-to-image UNet")
    first = to_k[0].split(".transformer_blocks.")[0]
    linear = unet_sd[f"{first}.proj_in.weight"].ndim == 2
    depth = len(_indices(keys, re.escape(first) + r"\.transformer_blocks\.(\d+)\."))
    out = unet_sd.get("out.2.weight")  # absent in a ControlNet, which has no decoder half
    return UNetConfig(in_channels=in_channels, out_channels=in_channels if out is None else out.shape[0], model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=num_res, attention_resolutions=tuple(attn),
                      num_heads=-1 if linear else 8, num_head_channels=64 if linear else -1,
                      context_dim=unet_sd[to_k[0]].shape[1], transformer_depth=depth,
                      use_linear_in_transformer=linear)


def config_path_for(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).with_suffix(".yaml")


def unet_config_for(checkpoint: str | os.PathLike, unet_sd: dict) -> UNetConfig:
    """The `.yaml` beside the checkpoint if there is one, else the architecture read from shapes."""
    yaml_path = config_path_for(checkpoint)
    if yaml_path.is_file():
        return unet_config_from_yaml(yaml_path)
    return infer_unet_config(unet_sd, str(checkpoint))


def load_unet(checkpoint: str | os.PathLike, state_dict: dict | None = None,
              config: UNetConfig | None = None, allow_inpainting: bool = False) -> UNetModel:
    """The SD1.x UNet of a single-file checkpoint, refusing other families with a clear message."""
    sd = read_state_dict(checkpoint) if state_dict is None else state_dict
    require_sd1(detect_family(sd), str(checkpoint), allow_inpainting)
    unet_sd = strip_prefix(sd, UNET_PREFIX)
    cfg = config or unet_config_for(checkpoint, unet_sd)
    unet = materialize(lambda: UNetModel(cfg))
    load_checked(unet, unet_sd, str(checkpoint), "UNet weights (model.diffusion_model.*)")
    return unet.eval().requires_grad_(False)
