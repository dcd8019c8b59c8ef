"""Architectures of the toy world: a tiny SD1.x (LDM VAE, LDM UNet, CLIP text tower with the real BPE
tokenizer), the tiny Chinese text tower (real BERT Chinese vocabulary), the judge, a LoRA wrapper and
the diffusion training helpers every latent-space stage shares."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.lora import LoraLayer
from ..unet import UNetConfig, UNetModel
from ..vae import VAEConfig

CLIP_HIDDEN = 32
VAE_CONFIG = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                       resolution=64, attn_resolutions=(), scale_factor=1.0)
UNET_CONFIG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                         num_heads=2, context_dim=CLIP_HIDDEN)
CLIP_CONFIG = dict(vocab_size=49408, hidden_size=CLIP_HIDDEN, intermediate_size=4 * CLIP_HIDDEN,
                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                   projection_dim=CLIP_HIDDEN)


def english_encoder():
    from ..text.clip import EnglishTextEncoder, text_config
    from transformers import CLIPTextModel
    model = CLIPTextModel(text_config(**CLIP_CONFIG))
    return EnglishTextEncoder(model)


def english_ids(encoder, captions: list[str]) -> torch.Tensor:
    """[N, 77] token ids exactly as `EnglishTextEncoder.encode` builds them (one chunk per caption)."""
    rows = []
    for caption in captions:
        chunks, _ = encoder.tokenize_line(caption)
        assert len(chunks) == 1, caption
        rows.append(chunks[0].tokens)
    return torch.tensor(rows)


def english_hidden(encoder, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states of token ids, with gradients (what `encode` computes for weight-1 prompts)."""
    return encoder.transformer(input_ids=ids).last_hidden_state


# -- LoRA ------------------------------------------------------------------------------------------

class LoraLinear(nn.Module):
    """A frozen Linear/1×1-Conv plus a trainable `LoraLayer` (kohya's parametrisation, in the shapes its
    files hold): what the toy LoRA stage trains."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.alpha = base, alpha
        fan_in, fan_out = base.weight.shape[1], base.weight.shape[0]
        down, up = torch.randn(rank, fan_in) / math.sqrt(fan_in), torch.zeros(fan_out, rank)
        if isinstance(base, nn.Conv2d):
            down, up = down[..., None, None], up[..., None, None]
        self.down, self.up = nn.Parameter(down), nn.Parameter(up)

    @property
    def layer(self) -> LoraLayer:
        return LoraLayer(self.down, self.up, self.alpha)

    def forward(self, x):
        delta = self.layer.delta(self.base.weight)
        return self.base(x) + (F.linear(x, delta) if isinstance(self.base, nn.Linear) else F.conv2d(x, delta))


LORA_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def add_loras(unet: UNetModel, rank: int, alpha: float) -> dict[str, LoraLinear]:
    """Wrap every transformer projection of the UNet (kohya's default UNet targets)."""
    out = {}
    for name, module in list(unet.named_modules()):
        if any(name.endswith(leaf) for leaf in LORA_LEAVES) and isinstance(module, (nn.Linear, nn.Conv2d)):
            parent_name, _, leaf = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            wrapped = LoraLinear(module, rank, alpha)
            setattr(parent, leaf, wrapped)
            out[name] = wrapped
    return out


# -- the judge ---------------------------------------------------------------------------------------

HEADS = {"colour": 4, "shape": 4, "position": 9, "size": 2, "background": 2, "drawing": 2}


class Judge(nn.Module):
    """Small CNN with one head per attribute; trained on ground-truth images, used only to evaluate.

    Reads a 32×32 average-pooled copy (cheap, and blind to the decoder's pixel-level noise). Besides the
    flattened 4×4 map (where things are), the heads see global max/mean pools of the 32×32 features
    (what colour, is there an outline), which makes colour easy to learn."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(w, w, 3, padding=1), nn.GELU())  # 32×32
        self.features = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.GELU(),  # 16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GELU(),  # 8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GELU())  # 4
        self.body = nn.Sequential(nn.Linear(2 * w * 16 + 2 * w, 256), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        local = self.stem(images)
        pooled = torch.cat([local.amax((2, 3)), local.mean((2, 3))], dim=1)
        h = self.body(torch.cat([self.features(local).flatten(1), pooled], dim=1))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        outs: dict[str, list] = {k: [] for k in HEADS}
        for i in range(0, images.shape[0], batch):
            logits = self(images[i:i + batch])
            for k, v in logits.items():
                outs[k].append(v.argmax(-1))
        return {k: torch.cat(v) for k, v in outs.items()}


class ImageTower(nn.Module):
    """The toy Chinese CLIP's image tower (only for contrastive pretraining of the text tower)."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, stride=2), nn.GELU(), nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2),
            nn.GELU(), nn.Flatten(), nn.Linear(2 * w * 16, dim))

    def forward(self, x):
        return self.net(x)


def frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)
