"""The bridge branch: a trainable copy of the backbone's encoder half that reads another text encoder.

BDM's branch is ControlNet without the hint encoder: `time_embed`, `input_blocks`, `middle_block`
(built by the same function as the UNet's, so names and shapes match the backbone) plus one
zero-initialised 1×1 conv per skip (`zero_convs`) and one for the middle (`middle_block_out`). Its
cross-attention reads the Chinese hidden states, so only `attn2.to_k/to_v` differ in shape from the
backbone. A ControlNet is the same module with `hint_channels` set (`input_hint_block`), so one class
loads both. The branch is built from its config and filled by state dict: it never shares modules with
a live backbone, so a host's LoRA patching or offloading of the backbone never touches it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .unet import Residuals, UNetConfig, UNetModel, build_encoder, run_block, time_embedding


@dataclass(frozen=True)
class BridgeConfig:
    """A branch's architecture: the backbone encoder it mirrors (with its own context size), and an
    optional ControlNet hint input."""

    unet: UNetConfig
    hint_channels: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "BridgeConfig":
        return cls(UNetConfig.from_dict(d["unet"]), d.get("hint_channels"))

    def to_dict(self) -> dict:
        return {"unet": self.unet.to_dict(), "hint_channels": self.hint_channels}


def zeroed(conv: nn.Conv2d) -> nn.Conv2d:
    """A conv whose output starts at zero, so a new branch adds nothing until trained."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def hint_block(hint_channels: int, model_channels: int) -> nn.Sequential:
    """ControlNet's hint encoder (image → latent-size features), LDM `input_hint_block` names."""
    widths = [16, 16, 32, 32, 96, 96, 256]
    layers: list[nn.Module] = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for i in range(1, len(widths)):
        stride = 2 if widths[i] != widths[i - 1] else 1
        layers += [nn.Conv2d(widths[i - 1], widths[i], 3, padding=1, stride=stride), nn.SiLU()]
    layers.append(zeroed(nn.Conv2d(widths[-1], model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


class Bridge(nn.Module):
    """Branch network: `forward(x, timesteps, context) -> (down residuals, middle residual)`."""

    def __init__(self, config: BridgeConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        self.skip_channels = build_encoder(self, cfg)
        self.zero_convs = nn.ModuleList(nn.Sequential(zeroed(nn.Conv2d(c, c, 1))) for c in self.skip_channels)
        mid = cfg.channel_mult[-1] * cfg.model_channels
        self.middle_block_out = nn.Sequential(zeroed(nn.Conv2d(mid, mid, 1)))
        self.input_hint_block = (hint_block(config.hint_channels, cfg.model_channels)
                                 if config.hint_channels else None)
        self.gradient_checkpointing = False
        self.meta: dict[str, str] = {}
        self.__dict__["text_encoder"] = None

    def set_text_encoder(self, encoder) -> None:
        """Keep the branch's Chinese encoder beside it, outside the module tree: moving or casting the
        branch to the UNet's device and dtype must not move the encoder, which may stay on the CPU."""
        self.__dict__["text_encoder"] = encoder

    @property
    def in_channels(self) -> int:
        return self.config.unet.in_channels

    @property
    def context_dim(self) -> int:
        return self.config.unet.context_dim

    @property
    def is_controlnet(self) -> bool:
        return self.input_hint_block is not None

    @classmethod
    def from_backbone(cls, unet: UNetModel, context_dim: int | None = None,
                      hint_channels: int | None = None) -> "Bridge":
        """A fresh branch for `unet`: every weight that fits is copied, the rest starts new.

        With a context size other than the backbone's, `attn2.to_k/to_v` cannot be copied and keep
        their fresh initialisation; the zero convs start at zero, so the branch adds nothing yet.
        """
        cfg = unet.config.with_context_dim(context_dim or unet.config.context_dim)
        bridge = cls(BridgeConfig(cfg, hint_channels)).to(next(unet.parameters()).dtype)
        own = bridge.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
        bridge.load_state_dict(copied, strict=False)
        return bridge

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor, hint: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.is_controlnet and hint is None:
            raise ValueError("this branch is a ControlNet: forward() needs a hint image")
        ckpt = self.gradient_checkpointing and self.training
        emb = time_embedding(self, timesteps, x.shape[0], x.dtype, self.config.unet.model_channels)
        guided_hint = self.input_hint_block(hint.to(x.dtype)) if self.is_controlnet else None
        down, h = [], x
        for block, zero in zip(self.input_blocks, self.zero_convs):
            h = run_block(block, ckpt, h, emb, context)
            if guided_hint is not None:
                h, guided_hint = h + guided_hint, None
            down.append(zero(h))
        h = run_block(self.middle_block, ckpt, h, emb, context)
        return down, self.middle_block_out(h)

    def residuals(self, x: torch.Tensor, timesteps, context: torch.Tensor, strength=1.0,
                  hint: torch.Tensor | None = None) -> Residuals | None:
        """The strength-scaled `(down, mid)` for one UNet input `x` (the branch reads its first
        `in_channels`), computed on the branch's device and dtype; None at strength 0 (nothing to add, no
        work). `strength` is a float or one value per row; `context`, `hint` and `strength` may give one
        row for all."""
        weight = next(self.parameters())
        rows = x.shape[0]
        per_row = isinstance(strength, torch.Tensor) and strength.ndim > 0
        if not per_row and float(strength) == 0.0:
            return None
        context = batch_rows(context, rows, "Chinese context")
        if hint is not None:
            hint = batch_rows(hint, rows, "control image").to(weight.device, weight.dtype)
        t = torch.as_tensor(timesteps, device=weight.device)
        down, mid = self(x[:, :self.in_channels].to(weight.device, weight.dtype), t,
                         context.to(weight.device, weight.dtype), hint=hint)
        if per_row:
            strength = batch_rows(strength.reshape(-1), rows, "strength").to(weight.device, weight.dtype)
            strength = strength.view(-1, 1, 1, 1)
        elif float(strength) == 1.0:
            return down, mid
        return [d * strength for d in down], mid * strength


def batch_rows(value: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """`value` for a batch of `rows`: as it is, or its single row for all."""
    if value.shape[0] == rows:
        return value
    if value.shape[0] == 1:
        return value.expand(rows, *value.shape[1:])
    raise ValueError(f"BDM: the {what} has {value.shape[0]} rows but the UNet call has {rows} "
                     "(give one row per batch row, or a single row for all)")


def sum_residuals(sets) -> Residuals | None:
    """Several branches' residuals as one set (None where no branch adds anything)."""
    sets = [s for s in sets if s is not None]
    if not sets:
        return None
    down, mid = sets[0]
    for other_down, other_mid in sets[1:]:
        down = [a + b.to(a.dtype) for a, b in zip(down, other_down)]
        mid = mid + other_mid.to(mid.dtype)
    return down, mid


def from_backbone(unet: UNetModel, context_dim: int | None = None) -> Bridge:
    """A fresh BDM branch for `unet` reading a text encoder of width `context_dim`."""
    return Bridge.from_backbone(unet, context_dim)
