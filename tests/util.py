"""Test helpers: models in real architectures with random weights, built fast."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


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


def write_shards(folder: Path, n_shards: int, per_shard: int, bad: bool = False) -> list[str]:
    """WebDataset .tar shards of tiny images (png/jpg/webp) with .txt or .json captions; `bad`: an empty
    image and a record without caption per shard."""
    import io
    import json
    import tarfile

    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{k:09d}"
                k += 1
                ext, image = ("webp", None) if i % 3 == 2 else ("jpg" if i % 2 else "png", None)
                buf = io.BytesIO()
                Image.new("RGB", (10, 8), (k % 255, 0, 0)).save(buf, format={"jpg": "JPEG", "png": "PNG",
                                                                              "webp": "WEBP"}[ext])
                members = {f"{key}.{ext}": buf.getvalue()}
                members[f"{key}.txt" if i % 2 else f"{key}.json"] = (
                    f"第{k}".encode() if i % 2 else json.dumps({"caption": f"第{k}"}).encode())
                if bad and i == 1:
                    members[f"{key}.{ext}"] = b""
                if bad and i == 2:
                    members = {f"{key}.{ext}": buf.getvalue()}  # no caption
                for name, content in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        paths.append(str(path))
    return paths
