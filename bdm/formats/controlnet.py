"""ControlNets in the LDM single-file format (`control_model.*` keys), loaded as a `Bridge`.

A ControlNet is a bridge branch with a hint encoder (`input_hint_block`) and the backbone's own
context size, so the same class, the same injection and the same hooks serve both.
"""
from __future__ import annotations

import json
import os

from ..bridge import Bridge, BridgeConfig
from ..unet import UNetConfig
from .checkpoint import infer_unet_config
from .files import (FormatError, load_checked, materialize, read_metadata, read_state_dict,
                    save_safetensors, strip_prefix)

PREFIX = "control_model."
CONFIG_KEY = "bdm.unet_config"  # our own files record the architecture; others are read from shapes


def load_controlnet(path: str | os.PathLike, config: UNetConfig | None = None) -> Bridge:
    """An LDM-format ControlNet file (`control_model.*`, or the same keys without the prefix)."""
    tensors = read_state_dict(path)
    recorded = read_metadata(path).get(CONFIG_KEY)
    if config is None and recorded:
        config = UNetConfig.from_dict(json.loads(recorded))
    sd = strip_prefix(tensors, PREFIX) or tensors
    hint = sd.get("input_hint_block.0.weight")
    if hint is None or "zero_convs.0.0.weight" not in sd:
        raise FormatError(f"{path}: not an LDM ControlNet (expected control_model.input_hint_block.* and "
                          "control_model.zero_convs.* keys)")
    unet_cfg = config or infer_unet_config(sd, str(path))
    bridge = materialize(lambda: Bridge(BridgeConfig(unet_cfg, hint.shape[1])))
    load_checked(bridge, sd, str(path), "ControlNet weights (control_model.*)")
    return bridge.eval()


def save_controlnet(path, bridge: Bridge, metadata: dict | None = None):
    """Write a branch with a hint encoder as an LDM ControlNet file, as the WebUI's extension reads it."""
    if not bridge.is_controlnet:
        raise ValueError("only a branch with a hint encoder can be saved as a ControlNet")
    metadata = {**(metadata or {}), CONFIG_KEY: json.dumps(bridge.config.unet.to_dict())}
    return save_safetensors(path, {PREFIX + k: v for k, v in bridge.state_dict().items()}, metadata)
