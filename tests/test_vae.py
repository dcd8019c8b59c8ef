"""`bdm.vae.AutoencoderKL` against two peers: diffusers' `AutoencoderKL` (weights renamed by our own
LDM→diffusers mapping, cross-checked against diffusers' converter) and the original `ldm` package
(`ldm.models.autoencoder.AutoencoderKL`, imported with a stub for its `pytorch_lightning` base class,
loading our state dict strictly)."""
from __future__ import annotations

import re
import sys
import types

import pytest
import torch
from torch import nn

from bdm.vae import (
    SD1,
    AutoencoderKL,
    VAEConfig,
    config_from_state_dict,
    load_vae,
    vae_state_dict,
)

from .util import oracle

SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
TOL = 1e-4


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-default norms and biases, so a swapped norm1/norm2 or a missing bias cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def ldm_to_diffusers(sd: dict, cfg: VAEConfig) -> dict:
    """Our own LDM→diffusers key mapping (decoder levels are reversed; attention 1×1 convs → Linear)."""
    n = len(cfg.ch_mult)
    out = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
                   lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                   lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.", k)
        k = k.replace(".mid.block_1.", ".mid_block.resnets.0.").replace(".mid.block_2.", ".mid_block.resnets.1.")
        k = k.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        attn = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", k)
        if attn:
            part = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
            k = f"{attn[1]}.mid_block.attentions.0.{part[attn[2]]}.{attn[3]}"
            if attn[2] != "norm" and value.ndim == 4:
                value = value[:, :, 0, 0]
        out[k] = value
    return out


def diffusers_vae(cfg: VAEConfig, sd: dict):
    from diffusers import AutoencoderKL as DiffusersVAE
    n = len(cfg.ch_mult)
    with torch.device("meta"):  # skip random init: every tensor is assigned below
        model = DiffusersVAE(in_channels=cfg.in_channels, out_channels=cfg.out_ch,
                             down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
                             layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
                             norm_num_groups=32, sample_size=cfg.resolution, scaling_factor=cfg.scale_factor)
    model.load_state_dict(ldm_to_diffusers(sd, cfg), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def ldm_autoencoder_class():
    """`ldm.models.autoencoder.AutoencoderKL` with `pytorch_lightning.LightningModule` stubbed as
    `nn.Module` (it is only the training base class); sys.modules is restored afterwards."""
    oracle("ldm.modules.diffusionmodules.model")
    saved = {k: sys.modules.get(k) for k in ("pytorch_lightning", "ldm.models.autoencoder")}
    stub = types.ModuleType("pytorch_lightning")
    stub.LightningModule = nn.Module
    sys.modules["pytorch_lightning"] = stub
    sys.modules.pop("ldm.models.autoencoder", None)
    try:
        from ldm.models.autoencoder import AutoencoderKL as LdmAutoencoderKL
        yield LdmAutoencoderKL
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def ldm_vae(cls, cfg: VAEConfig, sd: dict):
    ddconfig = dict(double_z=cfg.double_z, z_channels=cfg.z_channels, resolution=cfg.resolution,
                    in_channels=cfg.in_channels, out_ch=cfg.out_ch, ch=cfg.ch, ch_mult=list(cfg.ch_mult),
                    num_res_blocks=cfg.num_res_blocks, attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)
    with torch.device("meta"):
        model = cls(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=cfg.embed_dim)
    del model.loss  # SD checkpoints carry no loss weights
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def images(cfg: VAEConfig, size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module", params=["small", "sd1"])
def case(request):
    cfg, size = (SMALL, 32) if request.param == "small" else (SD1, 64)
    torch.manual_seed(0)
    ours = randomize(AutoencoderKL(cfg), seed=1)
    return cfg, size, ours, {k: v.clone() for k, v in ours.state_dict().items()}


@torch.no_grad()
def test_matches_diffusers(case):
    cfg, size, ours, sd = case
    ref = diffusers_vae(cfg, sd)
    x = images(cfg, size)
    z = ours.encode(x)
    z_ref = ref.encode(x).latent_dist.mean * ref.config.scaling_factor
    assert z.shape == (2, cfg.embed_dim, size // cfg.downscale, size // cfg.downscale)
    assert (z - z_ref).abs().max() <= TOL
    dec, dec_ref = ours.decode(z), ref.decode(z / ref.config.scaling_factor).sample
    assert dec.shape == x.shape
    assert (dec - dec_ref).abs().max() <= TOL


def test_our_key_mapping_agrees_with_diffusers_converter(case):
    cfg, _, _, sd = case
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()},
                                        {"down_block_types": ("DownEncoderBlock2D",) * len(cfg.ch_mult),
                                         "up_block_types": ("UpDecoderBlock2D",) * len(cfg.ch_mult),
                                         "layers_per_block": cfg.num_res_blocks})
    ours = ldm_to_diffusers(sd, cfg)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours)


@torch.no_grad()
def test_matches_original_ldm(case, ldm_autoencoder_class):
    cfg, size, ours, sd = case
    ref = ldm_vae(ldm_autoencoder_class, cfg, sd)  # strict load: same names, same shapes
    x = images(cfg, size, seed=3)
    posterior = ref.encode(x)
    assert (ours.encode(x) - posterior.mean * cfg.scale_factor).abs().max() <= TOL
    # `sample`: LDM draws from the global RNG, we from a generator with the same seed.
    torch.manual_seed(7)
    ref_draw = posterior.sample()
    draw = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert (draw - ref_draw * cfg.scale_factor).abs().max() <= TOL
    assert (draw - posterior.mean * cfg.scale_factor).abs().max() > 1e-3  # it really is a draw
    z = posterior.mean
    dec, dec_ref = ours.decode(z * cfg.scale_factor), ref.decode(z)
    assert (dec - dec_ref).abs().max() <= TOL


@torch.no_grad()
def test_attention_levels_match_ldm_encoder_decoder():
    """`attn_resolutions` (unused by SD1, which diffusers' VAE cannot express) against LDM directly."""
    oracle("ldm.modules.diffusionmodules.model")
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, resolution=32, attn_resolutions=(16,))
    ours = randomize(AutoencoderKL(cfg), seed=2)
    assert len(ours.encoder.down[1].attn) == 2 and len(ours.decoder.up[1].attn) == 3
    kw = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
    enc, dec = Encoder(**kw).eval(), Decoder(**kw).eval()
    enc.load_state_dict(ours.encoder.state_dict(), strict=True)
    dec.load_state_dict(ours.decoder.state_dict(), strict=True)
    x = images(cfg, 32)
    assert (ours.encoder(x) - enc(x)).abs().max() <= TOL
    z = torch.randn(2, 4, 16, 16)
    assert (ours.decoder(z) - dec(z)).abs().max() <= TOL


def test_load_from_checkpoint_infers_config():
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, resolution=64, attn_resolutions=(32,))
    vae = randomize(AutoencoderKL(cfg), seed=4)
    ckpt = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    ckpt["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    ckpt["first_stage_model.loss.logvar"] = torch.zeros(())
    assert set(vae_state_dict(ckpt)) == set(vae.state_dict())
    assert config_from_state_dict(ckpt, resolution=64) == cfg
    loaded = load_vae(ckpt, config_from_state_dict(ckpt, resolution=64))
    x = images(cfg, 32, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), vae.encode(x))


def test_config_from_ldm_yaml_params():
    params = {"embed_dim": 4, "monitor": "val/rec_loss",
              "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                           "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                           "dropout": 0.0},
              "lossconfig": {"target": "torch.nn.Identity"}}
    assert VAEConfig.from_ldm(params) == SD1
    assert VAEConfig.from_dict(SD1.to_dict()) == SD1
    assert SD1.downscale == 8
