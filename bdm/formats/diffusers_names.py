"""LDM ↔ diffusers: parameter names and configs of the UNet and of ControlNet-style branches.

The mapping is derived from the architecture (`UNetConfig`), block by block, so it covers every
SD1.x-family layout, not only SD1.5's. Used to load the official BDM1.0 branch (a diffusers
`ControlNetModelBDM` directory) into our LDM-named `Bridge`, and by the tests that compare against
diffusers' `UNet2DConditionModel` / `ControlNetModel`.
"""
from __future__ import annotations

import torch

from ..unet import UNetConfig

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
HINT_WIDTHS = (16, 32, 96, 256)


def _has_attention(cfg: UNetConfig, level: int) -> bool:
    return 2 ** level in cfg.attention_resolutions


def _block_prefixes(cfg: UNetConfig, decoder: bool, controlnet: bool) -> dict[str, str]:
    """LDM module prefix → diffusers module prefix. Resnet prefixes are marked with a trailing '|'."""
    m = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "input_blocks.0.0": "conv_in"}
    levels, nrb, idx = len(cfg.channel_mult), cfg.num_res_blocks, 1
    for level in range(levels):
        for i in range(nrb):
            m[f"input_blocks.{idx}.0"] = f"down_blocks.{level}.resnets.{i}|"
            if _has_attention(cfg, level):
                m[f"input_blocks.{idx}.1"] = f"down_blocks.{level}.attentions.{i}"
            idx += 1
        if level != levels - 1:
            m[f"input_blocks.{idx}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            idx += 1
    inputs = idx
    m.update({"middle_block.0": "mid_block.resnets.0|", "middle_block.1": "mid_block.attentions.0",
              "middle_block.2": "mid_block.resnets.1|"})
    if decoder:
        idx = 0
        for up, level in enumerate(reversed(range(levels))):
            attn = _has_attention(cfg, level)
            for i in range(nrb + 1):
                m[f"output_blocks.{idx}.0"] = f"up_blocks.{up}.resnets.{i}|"
                if attn:
                    m[f"output_blocks.{idx}.1"] = f"up_blocks.{up}.attentions.{i}"
                if level and i == nrb:
                    m[f"output_blocks.{idx}.{2 if attn else 1}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
                idx += 1
        m.update({"out.0": "conv_norm_out", "out.2": "conv_out"})
    if controlnet:
        for i in range(inputs):
            m[f"zero_convs.{i}.0"] = f"controlnet_down_blocks.{i}"
        m["middle_block_out.0"] = "controlnet_mid_block"
        m["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
        for k in range(6):
            m[f"input_hint_block.{2 * (k + 1)}"] = f"controlnet_cond_embedding.blocks.{k}"
        m["input_hint_block.14"] = "controlnet_cond_embedding.conv_out"
    return m


def ldm_to_diffusers_key(key: str, prefixes: dict[str, str]) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            target, rest = prefixes[prefix], ".".join(parts[cut:])
            if target.endswith("|"):
                target = target[:-1]
                for old, new in _RESNET.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
            return f"{target}.{rest}"
    raise KeyError(f"no diffusers name for LDM key {key!r}")


def key_map(cfg: UNetConfig, ldm_keys, decoder: bool = True, controlnet: bool = False) -> dict[str, str]:
    """{LDM key: diffusers key} for the given LDM parameter names."""
    prefixes = _block_prefixes(cfg, decoder, controlnet)
    return {k: ldm_to_diffusers_key(k, prefixes) for k in ldm_keys}


def ldm_to_diffusers(state_dict: dict, cfg: UNetConfig, decoder: bool = True,
                     controlnet: bool = False) -> dict[str, torch.Tensor]:
    names = key_map(cfg, state_dict, decoder, controlnet)
    return {names[k]: v for k, v in state_dict.items()}


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The `UNet2DConditionModel` / `ControlNetModel` config of the same architecture."""
    levels = range(len(cfg.channel_mult))
    heads = [cfg.heads_for(cfg.model_channels * m)[0] for m in cfg.channel_mult]
    return {
        "in_channels": cfg.in_channels,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if _has_attention(cfg, l) else "DownBlock2D"
                             for l in levels],
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": heads if cfg.num_head_channels != -1 else cfg.num_heads,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": cfg.transformer_depth,
        "norm_num_groups": 32,
    }


def diffusers_unet2d_config(cfg: UNetConfig) -> dict:
    """Config for a full `UNet2DConditionModel` (adds the decoder side)."""
    c = diffusers_unet_config(cfg)
    c["up_block_types"] = [t.replace("Down", "Up") for t in reversed(c["down_block_types"])]
    c["out_channels"] = cfg.out_channels
    return c


def unet_config_from_diffusers(c: dict, source: str = "config.json") -> UNetConfig:
    """Our `UNetConfig` from a diffusers UNet/ControlNet `config.json`."""
    boc = list(c["block_out_channels"])
    mc = boc[0]
    down = list(c["down_block_types"])
    heads = c.get("num_attention_heads") or c.get("attention_head_dim") or 8
    depth = c.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise ValueError(f"{source}: per-level transformer depths {depth} are not SD1.x-family")
        depth = depth[0]
    if isinstance(heads, int):
        num_heads, head_channels = heads, -1
    else:
        dims = {b // h for b, h in zip(boc, heads)}
        if len(dims) != 1:
            raise ValueError(f"{source}: attention heads {heads} match neither a fixed head count "
                             "nor a fixed head width")
        num_heads, head_channels = -1, dims.pop()
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"{source}: down block type {t!r} is not SD1.x-family")
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(b // mc for b in boc), num_res_blocks=c.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** l for l, t in enumerate(down) if t.startswith("CrossAttn")),
        num_heads=num_heads, num_head_channels=head_channels,
        context_dim=c.get("cross_attention_dim", 768), transformer_depth=depth,
        use_linear_in_transformer=bool(c.get("use_linear_projection", False)))
