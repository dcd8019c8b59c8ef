"""Loading BDM models for the WebUI (kept in memory, LRU) and checking them against the loaded UNet.

Every failure becomes one `BdmError` whose message names the model, the file (relative to its models
folder) and the reason; the session decides whether it stops the generation or becomes a warning.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from ..formats.files import FormatError
from .errors import BdmError
from .models import ModelEntry


def unet_refusal(unet, *, is_sdxl=False, is_sd2=False, is_sd3=False, custom_unet=False,
                 family: str | None = None) -> str | None:
    """Why BDM cannot run on this WebUI model (None: it can). `unet` is the ldm-layout `diffusion_model`;
    `family`: the name of a model family that is not SD1.x (a host's own families, e.g. Forge's Flux)."""
    if family:
        return f"the loaded checkpoint is {family}; BDM needs an SD1.x checkpoint"
    if custom_unet:
        return "a replacement UNet (TensorRT-style, modules.sd_unet) is active; its blocks cannot be hooked"
    if is_sdxl:
        return "the loaded checkpoint is SDXL; BDM needs an SD1.x checkpoint"
    if is_sd2:
        return "the loaded checkpoint is SD2.x; BDM needs an SD1.x checkpoint"
    if is_sd3:
        return "the loaded checkpoint is SD3; BDM needs an SD1.x checkpoint"
    if unet is None or not hasattr(unet, "input_blocks") or not hasattr(unet, "output_blocks"):
        return "the loaded model has no LDM UNet (input_blocks/output_blocks) to hook"
    in_ch = getattr(unet, "in_channels", None)
    if in_ch is None:
        try:
            in_ch = unet.input_blocks[0][0].in_channels
        except (AttributeError, IndexError, TypeError):
            in_ch = 4
    if in_ch != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(in_ch, f"a {in_ch}-channel")
        return f"the loaded checkpoint is {kind} model ({in_ch} input channels); BDM needs a plain SD1.x model"
    return None


def bridge_refusal(bridge, unet) -> str | None:
    """Why this branch does not fit this UNet (None: it fits)."""
    cfg = bridge.config.unet
    ucfg = getattr(unet, "config", None)  # our UNetModel keeps its config; ldm's has the attributes
    mc = getattr(unet, "model_channels", getattr(ucfg, "model_channels", None))
    mult = getattr(unet, "channel_mult", getattr(ucfg, "channel_mult", None))
    if mc is not None and mc != cfg.model_channels:
        return (f"the BDM branch was made for a UNet with model_channels {cfg.model_channels}, the loaded "
                f"checkpoint has {mc}")
    if mult is not None and tuple(mult) != tuple(cfg.channel_mult):
        return (f"the BDM branch was made for channel_mult {tuple(cfg.channel_mult)}, the loaded checkpoint "
                f"has {tuple(mult)}")
    if len(unet.input_blocks) != len(bridge.skip_channels):
        return (f"the BDM branch has {len(bridge.skip_channels)} skips, the loaded UNet "
                f"{len(unet.input_blocks)} input blocks")
    return None


class ModelManager:
    """Loaded branches (with their Chinese encoders), at most `size` kept."""

    def __init__(self, size: int = 1):
        self.size = max(1, int(size))
        self._loaded: OrderedDict = OrderedDict()  # key -> (entry, bridge)

    def loaded(self) -> list[tuple[ModelEntry, object]]:
        """The models in memory, least recently used first."""
        return list(self._loaded.values())

    def clear(self) -> None:
        self._loaded.clear()

    def resize(self, size: int) -> None:
        self.size = max(1, int(size))
        while len(self._loaded) > self.size:
            self._loaded.popitem(last=False)

    @staticmethod
    def _key(entry: ModelEntry):
        try:
            st = os.stat(entry.weights_file)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        return (str(entry.path), stamp, str(entry.chinese_clip))

    def load(self, entry: ModelEntry):
        """The branch of `entry` with its Chinese encoder (cached). Raises BdmError naming the model,
        its file (as users see it) and what is wrong."""
        key = self._key(entry)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key][1]
        from ..load import load_bridge
        where = f"the BDM model '{entry.name}' ({entry.where})"
        try:
            if entry.kind == "diffusers":
                if entry.chinese_clip is None:
                    raise FormatError("an official diffusers BDM folder needs its Chinese CLIP folder: put it in "
                                      f"{entry.path / 'chinese_clip'} or set it in Settings → BDM")
                bridge = load_bridge(entry.path, entry.chinese_clip)
            else:
                bridge = load_bridge(entry.path)
        except (FormatError, FileNotFoundError, ValueError, KeyError, OSError, RuntimeError) as e:
            raise BdmError(entry.hide_paths(f"cannot load {where}: {e}")) from e
        if bridge.is_controlnet:
            raise BdmError(f"{where} is a ControlNet (it has a hint encoder), not a BDM branch")
        if bridge.text_encoder is None:
            raise BdmError(f"{where} has no Chinese text encoder")
        bridge.requires_grad_(False).eval()
        self._loaded[key] = (entry, bridge)
        while len(self._loaded) > self.size:
            self._loaded.popitem(last=False)
        return bridge
