"""The SD1.x VAE: LDM `AutoencoderKL` with the original parameter names.

The `first_stage_model.*` tensors of a single-file checkpoint load without renaming (strip the prefix),
and `VAEConfig` holds what the LDM `.yaml` holds (`first_stage_config.params.ddconfig` + `embed_dim`,
plus the model's `scale_factor`). `encode` returns latents already multiplied by `scale_factor`, so
the UNet and samplers only ever see scaled latents; `decode` undoes it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    """LDM `ddconfig` fields + `embed_dim` + `scale_factor`, with SD1.x defaults."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = ()
    double_z: bool = True
    scale_factor: float = 0.18215

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))

    @classmethod
    def from_dict(cls, params: dict) -> VAEConfig:
        """Read a flat dict (our `to_dict`, or a `ddconfig` plus `embed_dim`), ignoring unknown keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

    @classmethod
    def from_ldm(cls, first_stage_params: dict, scale_factor: float = 0.18215) -> VAEConfig:
        """Read LDM `first_stage_config.params` (`embed_dim` + nested `ddconfig`)."""
        flat = dict(first_stage_params.get("ddconfig", {}))
        flat["embed_dim"] = first_stage_params.get("embed_dim", flat.get("z_channels", 4))
        flat["scale_factor"] = scale_factor
        return cls.from_dict(flat)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side (8 for SD1)."""
        return 2 ** (len(self.ch_mult) - 1)


SD1 = VAEConfig()


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q/k/v/proj_out are 1×1 convs as in LDM."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(b, 1, c, height * width).transpose(2, 3)
                   for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.transpose(2, 3).reshape(b, c, height, width))


class Downsample(nn.Module):
    """Stride-2 conv after an asymmetric (right/bottom) pad, exactly as LDM does it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(block_in, cfg.ch * mult))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(cfg.ch_mult) - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3,
                                  padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            h = _run_level(down, h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downscale
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        ups = []
        for level in reversed(range(len(cfg.ch_mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level]))
                block_in = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, up)  # LDM indexes `up` by level, lowest resolution last
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            h = _run_level(up, h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _draw(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A posterior sample; noise is drawn on the generator's device so a seed means the same on any device."""
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] ⇄ scaled latents (`mean · scale_factor`), LDM parameter names."""

    def __init__(self, config: VAEConfig = SD1):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z = config.z_channels
        self.quant_conv = nn.Conv2d(2 * z if config.double_z else z,
                                    2 * config.embed_dim if config.double_z else config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, z, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, logvar); logvar clamped to [-30, 20] as LDM does. For training."""
        moments = self.quant_conv(self.encoder(images.to(self.dtype)))
        if not self.config.double_z:
            return moments, torch.full_like(moments, -30.0)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: the posterior mean, or a draw from it with `sample=True` (LDM's default
        for img2img is the draw; the mean is deterministic and what diffusers' `.mode()` gives)."""
        mean, logvar = self.encode_moments(images)
        z = _draw(mean, logvar, generator) if sample else mean
        return z * self.config.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (not clamped) from scaled latents."""
        z = latents.to(self.dtype) / self.config.scale_factor
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """(reconstruction, mean, logvar) like LDM's `AutoencoderKL.forward`, for training losses."""
        mean, logvar = self.encode_moments(images)
        z = _draw(mean, logvar, generator) if sample else mean
        return self.decoder(self.post_quant_conv(z)), mean, logvar


PREFIX = "first_stage_model."


def vae_state_dict(state_dict: dict) -> dict:
    """The VAE's tensors from a full checkpoint (prefix stripped) or a bare VAE file (kept as is);
    LDM training leftovers (`loss.*`, discriminator) are dropped."""
    if any(k.startswith(PREFIX) for k in state_dict):
        state_dict = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    return {k: v for k, v in state_dict.items() if not k.startswith(("loss.", "model_ema."))}


def config_from_state_dict(state_dict: dict, resolution: int = 256,
                           scale_factor: float = 0.18215) -> VAEConfig:
    """Infer the architecture from tensor shapes, so toy and real VAEs load without a yaml."""
    sd = vae_state_dict(state_dict)
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    z_channels = sd["decoder.conv_in.weight"].shape[1]
    attn_res = tuple(resolution // 2 ** i for i in levels
                     if any(k.startswith(f"encoder.down.{i}.attn.") for k in sd))
    return VAEConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                     embed_dim=sd["post_quant_conv.weight"].shape[1],
                     in_channels=sd["encoder.conv_in.weight"].shape[1],
                     out_ch=sd["decoder.conv_out.weight"].shape[0], resolution=resolution,
                     attn_resolutions=attn_res,
                     double_z=sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
                     scale_factor=scale_factor)


def load_vae(state_dict: dict, config: VAEConfig | None = None) -> AutoencoderKL:
    """Build and strictly load a VAE from checkpoint tensors (config inferred when not given)."""
    sd = vae_state_dict(state_dict)
    vae = AutoencoderKL(config or config_from_state_dict(sd))
    vae.load_state_dict(sd, strict=True)
    return vae
