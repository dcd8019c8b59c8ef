"""Test helpers: the oracles (peer implementations), models in real architectures with random weights
built fast, and the peers' view of our files."""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CN_DIM = 96  # the Chinese encoder's width in the official-format test branch (1024 in BDM1.0)


def oracle(name: str):
    """Import a peer implementation the tests compare against (diffusers, the original `ldm` of
    stable-diffusion-sdkit, open_clip, transformers' tokenizers …). Missing, the test is skipped — except
    under CI (`CI=true`), which installs every oracle: there a missing or broken one fails the run instead
    of turning the comparisons into skips."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = f"oracle {name} cannot be imported: {type(e).__name__}: {e}"
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail(f"{reason} (CI=true: CI installs every oracle, so this is a broken install)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with scaled random values (zero-initialised layers included), so that
    every path of the network influences the output and comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def build_random(factory, seed: int = 0) -> nn.Module:
    """`factory()` constructed on the meta device, then materialised with random weights — skips the
    slow default initialisation of SD1.5-size models."""
    with torch.device("meta"):
        module = factory()
    return randomize_(module.to_empty(device="cpu"), seed).eval()


def load_assigned(factory, state_dict: dict) -> nn.Module:
    """A peer model built on meta and given `state_dict`'s tensors (strict: every key must match)."""
    with torch.device("meta"):
        module = factory()
    module.load_state_dict(state_dict, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise AssertionError(f"buffer {name} was not materialised")
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tiny_sd_parts(seed: int = 0):
    """UNet (SMALL), VAE and English CLIP of a tiny SD1.x-architecture model with random weights."""
    import transformers

    from bdm.text.clip import EnglishTextEncoder, text_config
    from bdm.unet import SMALL, UNetModel
    from bdm.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(seed)
    unet = randomize_(UNetModel(SMALL), seed).eval()
    with torch.no_grad():
        unet.out[2].weight.mul_(10)  # ε of unit scale, so sampled latents decode to real images
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()  # f = 8, as SD
    text = EnglishTextEncoder(transformers.CLIPTextModel(text_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))).eval()
    return unet, vae, text


def ldm_unet(cfg):
    """The original `ldm` UNet (what the WebUI runs) for a `bdm.UNetConfig`."""
    openaimodel = oracle("ldm.modules.diffusionmodules.openaimodel")
    return openaimodel.UNetModel(
        image_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        model_channels=cfg.model_channels, attention_resolutions=list(cfg.attention_resolutions),
        num_res_blocks=cfg.num_res_blocks, channel_mult=list(cfg.channel_mult), num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels, use_spatial_transformer=True,
        transformer_depth=cfg.transformer_depth, context_dim=cfg.context_dim, legacy=False,
        use_linear_in_transformer=cfg.use_linear_in_transformer)


def make_official_dir(tmp_path, seed=11, context_dim=CN_DIM):
    """A random diffusers ControlNetModel saved as the official BDM1.0 release is laid out."""
    from bdm.formats.diffusers_names import diffusers_unet_config
    from bdm.unet import SMALL
    diffusers = oracle("diffusers")
    cfg = diffusers_unet_config(SMALL.with_context_dim(context_dim))
    peer = randomize_(diffusers.ControlNetModel(**cfg), seed).eval()
    torch.nn.init.zeros_(peer.controlnet_cond_embedding.conv_out.weight)  # BDM never runs the hint path
    torch.nn.init.zeros_(peer.controlnet_cond_embedding.conv_out.bias)
    out = tmp_path / "BDM1.0"
    peer.save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    config["_class_name"] = "ControlNetModelBDM"
    (out / "config.json").write_text(json.dumps(config))
    return out, peer


def ldm_latent_diffusion(checkpoint: Path):
    """`ldm.models.diffusion.ddpm.LatentDiffusion` instantiated from the checkpoint's `.yaml` as the WebUI
    does (CLIP built from the config folder `version:` names, no weights downloaded), then the file's
    state dict loaded strictly. pytorch_lightning is stubbed (current releases lack
    `utilities.distributed.rank_zero_only`); sys.modules is restored afterwards."""
    oracle("ldm.util")
    oracle("omegaconf")
    oracle("open_clip")  # ldm's encoders module imports it
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from bdm.formats.files import read_state_dict
    names = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.distributed",
             "ldm.models.diffusion.ddpm", "ldm.models.autoencoder")
    saved = {k: sys.modules.get(k) for k in names}
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = nn.Module
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = lambda f: f
    pl.utilities, utilities.distributed = utilities, distributed
    sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
                        "pytorch_lightning.utilities.distributed": distributed})
    sys.modules.pop("ldm.models.diffusion.ddpm", None)
    sys.modules.pop("ldm.models.autoencoder", None)
    original = CLIPTextModel.from_pretrained.__func__
    # the WebUI builds the text model from the folder's config only (weights come from the checkpoint)
    CLIPTextModel.from_pretrained = classmethod(lambda cls, version, **kw: cls(CLIPTextConfig.from_pretrained(version)))
    cwd = os.getcwd()
    try:
        from ldm.util import instantiate_from_config
        config = OmegaConf.load(checkpoint.with_suffix(".yaml"))
        os.chdir(checkpoint.parent)  # a relative `version:` is relative to the checkpoint (export-webui makes it absolute)
        model = instantiate_from_config(config.model)
        sd = read_state_dict(checkpoint)
        own = model.state_dict()
        te = "cond_stage_model.transformer."
        if not any(k.startswith(te + "text_model.") for k in own):
            # transformers ≥ 5 dropped CLIPTextModel's `text_model` level; the WebUI's transformers 4.x and
            # every SD1.x file have it: compare under the files' names
            sd = {te + k[len(te + "text_model."):] if k.startswith(te + "text_model.") else k: v
                  for k, v in sd.items()}
        # buffers LatentDiffusion computes itself (noise schedule) are not in SD files; CLIP's position_ids
        # is in SD1.x files (and ours: the WebUI's transformers 4.30 expects it) but not a saved buffer of
        # newer transformers
        computed = {k for k in own if not k.startswith(("model.", "first_stage_model.", "cond_stage_model."))
                    or k.endswith("position_ids")}
        missing = sorted(set(own) - set(sd) - computed)
        unexpected = sorted(k for k in set(sd) - set(own) if not k.endswith("position_ids"))
        assert any(k.endswith("embeddings.position_ids") for k in sd)
        assert not missing and not unexpected, (missing[:5], unexpected[:5])
        sd = {k: v for k, v in sd.items() if k in own}
        for k, v in sd.items():
            assert own[k].shape == v.shape, k
        model.load_state_dict({**{k: own[k] for k in computed}, **sd}, strict=True)
        return model, config
    finally:
        os.chdir(cwd)
        CLIPTextModel.from_pretrained = classmethod(original)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def check_webui_layout(checkpoint: Path) -> None:
    """A toy checkpoint as the WebUI gets it from `export-webui` (its CLIP folder plus the shipped tokenizer)
    has exactly a WebUI SD1.x checkpoint's layout and the original UNet computes what ours computes."""
    import tempfile

    from bdm.toy.export import export_webui
    with tempfile.TemporaryDirectory() as root:
        export_webui(root, weights=checkpoint.parent, quiet=True)
        check_exported_layout(Path(root) / "models" / "Stable-diffusion" / checkpoint.name)


def check_exported_layout(checkpoint: Path) -> None:
    """The checkpoint has exactly a WebUI SD1.x checkpoint's layout and the original UNet computes what
    ours computes."""
    from bdm.formats.files import read_state_dict
    keys = read_state_dict(checkpoint).keys()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    model, config = ldm_latent_diffusion(checkpoint)
    params = config.model.params
    assert config.model.target == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert params.cond_stage_config.target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert params.first_stage_config.params.embed_dim == 4 and params.channels == 4
    assert params.unet_config.params.context_dim == model.cond_stage_model.transformer.config.hidden_size
    # the WebUI's tokenizer comes from the folder too: the real CLIP BPE vocabulary
    assert len(model.cond_stage_model.tokenizer) == 49408
    # the original UNet computes what ours computes
    from bdm.formats.checkpoint import load_checkpoint
    ours = load_checkpoint(checkpoint)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx = torch.randn(2, 77, ours.text_encoder.hidden_size)
    with torch.no_grad():
        a = model.model.diffusion_model.float()(x, t, context=ctx)
        b = ours.unet(x, t, ctx)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


LORA_LAYERS = {  # kohya names (diffusers spelling for the UNet) → shapes of (down, up)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 32), (32, 4)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": ((4, 256), (64, 4)),
    "lora_unet_up_blocks_1_resnets_0_conv1": ((4, 96, 3, 3), (32, 4, 1, 1)),
    "lora_unet_output_blocks_0_0_emb_layers_1": ((4, 128), (64, 4)),  # an LDM-spelled key
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((4, 64), (64, 4)),
}


def write_lora(path, layers=LORA_LAYERS, seed=0):
    """A kohya LoRA file with random weights for `layers` (name → (down shape, up shape))."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for base, (down, up) in layers.items():
        tensors[f"{base}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
        tensors[f"{base}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
        tensors[f"{base}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


def generator_world(d):
    """A tiny SD1.x checkpoint, BDM file, ControlNet, control image, TI embedding and LoRA in the real formats,
    written into folder `d` (the generator tests' `world` fixture, tests/conftest.py)."""
    import numpy as np
    from PIL import Image

    import bdm
    from bdm.formats.bdm_file import save_bdm
    from bdm.formats.checkpoint import save_checkpoint
    from bdm.formats.controlnet import save_controlnet
    from bdm.formats.embedding import save_embedding
    from bdm.text.chinese import ChineseTextEncoder
    from bdm.unet import SMALL
    unet, vae, text = tiny_sd_parts()
    ckpt = save_checkpoint(d / "tiny-sd1.safetensors", unet, vae, text, "tiny-clip")
    encoder = ChineseTextEncoder.tiny(seed=0)
    branch = randomize_(bdm.from_backbone(unet, encoder.hidden_size), seed=5)
    for conv in list(branch.zero_convs) + [branch.middle_block_out]:
        conv[0].weight.data *= 3
    bdm_path = save_bdm(d / "tiny-bdm.safetensors", branch, encoder)
    control = randomize_(bdm.Bridge(bdm.BridgeConfig(SMALL, hint_channels=3)), seed=6)
    control_path = save_controlnet(d / "tiny-control.safetensors", control)
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[8:40, 16:48] = 255
    Image.fromarray(hint).save(d / "hint.png")
    emb = save_embedding(d / "bigthing.safetensors", torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) * 3)
    return dict(dir=d, ckpt=ckpt, bdm=bdm_path, control=control_path, hint=d / "hint.png",
                lora=write_lora(d / "tinylora.safetensors"), emb=emb)
