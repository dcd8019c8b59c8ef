"""The Stable Diffusion 1.x UNet in the original LDM ("openaimodel") layout.

Parameter names are exactly those of `ldm.modules.diffusionmodules.openaimodel.UNetModel`, so a
single-file checkpoint's `model.diffusion_model.*` tensors load without renaming, and the encoder
half (`time_embed`, `input_blocks`, `middle_block`) is built by the same function for the UNet and for
the bridge branch (`bdm.bridge`). Config-driven: `UNetConfig` holds what the LDM `.yaml` holds.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of an LDM `unet_config.params` block (SD1.x names and defaults)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(sorted(self.attention_resolutions)))

    @classmethod
    def from_dict(cls, params: dict) -> "UNetConfig":
        """Read an LDM `unet_config.params` dict (or our own `to_dict`), ignoring runtime-only keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def with_context_dim(self, context_dim: int) -> "UNetConfig":
        return replace(self, context_dim=context_dim)

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, head dim) at a given width, as LDM computes them."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


# A branch's output: one residual per skip (input block order) and one for the middle block.
Residuals = tuple[Sequence[torch.Tensor], torch.Tensor]

SD15 = UNetConfig()
# Small but complete: two levels, attention at both, every block type present. For tests and benches.
SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                   num_heads=2, context_dim=64)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (LDM order; diffusers' `flip_sin_to_cos=True`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = x.shape[0], self.heads
        q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[-1] * h))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        if type(self.proj) is not nn.Linear:  # wrapped (e.g. a LoRA in training): call it as it is
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)
        # The two halves of `proj` as two matmuls (the same dot products as chunking one output):
        # contiguous halves make the product and the GELU, forward and backward, faster than strided views.
        w, b = self.proj.weight, self.proj.bias
        n = w.shape[0] // 2
        return F.linear(x, w[:n], b[:n]) * F.gelu(F.linear(x, w[n:], b[n:]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        # contiguous, as the original does: a channels-last view here spreads through every later layer
        # and makes GroupNorm several times slower on CPU
        h = h.transpose(1, 2).reshape(b, -1, height, width).contiguous()
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A block: each layer gets what it needs (time embedding, text context, or just x)."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _block_layers(cfg: UNetConfig, ch_in: int, ch_out: int, ds: int) -> list[nn.Module]:
    layers: list[nn.Module] = [ResBlock(ch_in, cfg.model_channels * 4, ch_out)]
    if ds in cfg.attention_resolutions:
        heads, dim_head = cfg.heads_for(ch_out)
        layers.append(SpatialTransformer(ch_out, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                         cfg.use_linear_in_transformer))
    return layers


def build_encoder(module: nn.Module, cfg: UNetConfig) -> list[int]:
    """Give `module` the encoder half (`time_embed`, `input_blocks`, `middle_block`) of `cfg`.

    Shared by the UNet and the bridge branch, so both have the same names and shapes.
    Returns the channel count of every skip (one per input block).
    """
    mc = cfg.model_channels
    module.time_embed = nn.Sequential(nn.Linear(mc, mc * 4), nn.SiLU(), nn.Linear(mc * 4, mc * 4))
    blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
    skip_channels, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            blocks.append(TimestepEmbedSequential(*_block_layers(cfg, ch, mult * mc, ds)))
            ch = mult * mc
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    module.input_blocks = nn.ModuleList(blocks)
    heads, dim_head = cfg.heads_for(ch)
    module.middle_block = TimestepEmbedSequential(
        ResBlock(ch, mc * 4, ch),
        SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                           cfg.use_linear_in_transformer),
        ResBlock(ch, mc * 4, ch))
    return skip_channels


def run_block(block, use_checkpoint: bool, *args, reentrant: bool = False):
    """Call a block, through activation checkpointing when training asks for it (`reentrant`: its
    inputs are kept with save_for_backward, like any activation)."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=reentrant)
    return block(*args)


def time_embedding(module: nn.Module, timesteps: torch.Tensor, batch: int, dtype: torch.dtype,
                   channels: int) -> torch.Tensor:
    """`module.time_embed` applied to per-row timesteps (a scalar is broadcast to the batch)."""
    t = torch.as_tensor(timesteps, device=module.time_embed[0].weight.device)
    if t.ndim == 0:
        t = t[None]
    t = t.expand(batch)
    return module.time_embed(timestep_embedding(t, channels).to(dtype))


class UNetModel(nn.Module):
    """SD1.x UNet with LDM parameter names; `forward(x, timesteps, context)` like the original."""

    def __init__(self, config: UNetConfig = SD15):
        super().__init__()
        self.config = config
        cfg, mc = config, config.model_channels
        skip_channels = build_encoder(self, cfg)
        self.skip_channels = list(skip_channels)
        ch, ds = cfg.channel_mult[-1] * mc, 2 ** (len(cfg.channel_mult) - 1)
        out_blocks = []
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = _block_layers(cfg, ch + skip_channels.pop(), mc * mult, ds)
                ch = mc * mult
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                out_blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(out_blocks)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def forward(self, x, timesteps=None, context=None, *, residuals: Residuals | None = None,
                encoder_copies: int = 1, checkpoint_decoder: Collection[int] = (), **kwargs):
        """ε for `x` at `timesteps` under text `context`.

        `residuals`: a branch's `(down, mid)` (BDM's or a ControlNet's, strength applied; several branches'
        summed): `mid` is added to `middle_block`'s output and `down[i]` to the skip entering
        `output_blocks[n-1-i]` — diffusers' `down_block_additional_residuals`. (`bdm.attach` does the same
        with hooks, for UNets the project does not own.)

        `encoder_copies=n` promises that the batch is n equal copies as far as the middle block goes
        (same x, timesteps and context in rows i, i+B, …): CFG rows whose English prompts are equal.
        The input blocks and the middle block then run once per copy, which is exactly the work a branch
        does not change (its residuals enter after the middle block and at the skips).

        `checkpoint_decoder`: indices of output blocks that keep no activations and are recomputed in
        backward (training a branch: with frozen weights and latents that need no gradient, the encoder
        half records nothing for backward anyway, and the decoder only what carries the loss to the
        residuals).
        """
        emb = time_embedding(self, timesteps, x.shape[0], x.dtype, self.config.model_channels)
        down, mid = residuals if residuals is not None else ((None,) * len(self.input_blocks), None)
        if len(down) != len(self.input_blocks):
            raise ValueError(f"{len(down)} skip residuals for a UNet with {len(self.input_blocks)} input blocks")
        rows = x.shape[0] // encoder_copies
        h, emb_in, ctx_in = x[:rows], emb[:rows], context[:rows] if context is not None else None
        skips = []
        for block in self.input_blocks:
            h = block(h, emb_in, ctx_in)
            skips.append(h)
        h = with_residual(self.middle_block(h, emb_in, ctx_in), mid, encoder_copies)
        for j, block in enumerate(self.output_blocks):
            skip = with_residual(skips.pop(), down[len(down) - 1 - j], encoder_copies)
            h = run_block(_decoder_step, j in checkpoint_decoder, block, h, skip, emb, context, reentrant=True)
        return self.out(h)


def with_residual(shared: torch.Tensor, residual: torch.Tensor | None, copies: int) -> torch.Tensor:
    """`shared` (the rows of one copy) for all `copies`, plus `residual` (all rows) if there is one."""
    if residual is None:
        return shared if copies == 1 else shared.repeat(copies, 1, 1, 1)
    residual = residual.to(shared.dtype)
    if copies == 1:
        return shared + residual
    return (shared.unsqueeze(0) + residual.unflatten(0, (copies, -1))).flatten(0, 1)


def _decoder_step(block: nn.Module, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor,
                  context: torch.Tensor | None) -> torch.Tensor:
    return block(torch.cat([h, skip], dim=1), emb, context)
