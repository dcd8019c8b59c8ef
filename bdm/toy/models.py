"""Architectures of the toy world: a tiny SD1.x (LDM VAE, LDM UNet, CLIP text tower with the real BPE
tokenizer), the tiny Chinese text tower (real BERT Chinese vocabulary), the judge, a LoRA wrapper and
the diffusion training helpers every latent-space stage shares."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..train.model import NoiseSchedule
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


# -- diffusion ---------------------------------------------------------------------------------------

class Schedule(NoiseSchedule):
    """SD1's training schedule (the one `bdm.train` uses), drawing timesteps and noise from a generator."""

    def noisy(self, z0: torch.Tensor, generator: torch.Generator, t_max: int | None = None):
        """z0 noised at timesteps drawn from [0, t_max) (default: the whole schedule)."""
        t = torch.randint(0, t_max or self.num_timesteps, (z0.shape[0],), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        return self.add_noise(z0, noise, t), t, noise


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
        self.n = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> nn.Module:
        module.load_state_dict({k: v for k, v in self.shadow.items()})
        return module


def cosine_lr(step: int, total: int, warmup: int = 100, low: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * p))


# -- LoRA ------------------------------------------------------------------------------------------

class LoraLinear(nn.Module):
    """A frozen Linear/1×1-Conv plus a trainable low-rank delta (kohya's parametrisation)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        if isinstance(base, nn.Linear):
            fan_in, fan_out = base.in_features, base.out_features
        else:
            fan_in, fan_out = base.in_channels, base.out_channels
        self.down = nn.Parameter(torch.randn(rank, fan_in) / math.sqrt(fan_in))
        self.up = nn.Parameter(torch.zeros(fan_out, rank))

    def forward(self, x):
        y = self.base(x)
        scale = self.alpha / self.rank
        if isinstance(self.base, nn.Linear):
            return y + scale * F.linear(F.linear(x, self.down), self.up)
        w = (self.up @ self.down)[..., None, None]
        return y + scale * F.conv2d(x, w)


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


def lora_state_dict(unet_config: UNetConfig, loras: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """kohya/A1111 keys: `lora_unet_<diffusers module path with _>` + lora_down/lora_up/alpha."""
    from ..formats.diffusers_names import _block_prefixes, ldm_to_diffusers_key
    prefixes = _block_prefixes(unet_config, decoder=True, controlnet=False)
    tensors = {}
    for name, lora in loras.items():
        diffusers = ldm_to_diffusers_key(name + ".weight", prefixes)[: -len(".weight")]
        base = "lora_unet_" + diffusers.replace(".", "_")
        down, up = lora.down.detach().float(), lora.up.detach().float()
        if isinstance(lora.base, nn.Conv2d):
            down, up = down[..., None, None], up[..., None, None]
        tensors[base + ".lora_down.weight"] = down.contiguous()
        tensors[base + ".lora_up.weight"] = up.contiguous()
        tensors[base + ".alpha"] = torch.tensor(float(lora.alpha))
    return tensors


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
