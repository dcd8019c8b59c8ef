"""Validation images: fixed Chinese prompts through backbone + branch, English "" (as trained)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..sampling import EpsDenoiser, sample


@torch.no_grad()
def generate(unet, vae, bridge, chinese: torch.Tensor, uncond: torch.Tensor, english: torch.Tensor,
             latent_size: int, steps: int = 20, cfg_scale: float = 7.5, sampler: str = "DPM++ 2M",
             seed: int = 0, strength: float = 1.0) -> torch.Tensor:
    """Images in [0, 1] ([N, 3, H, W]) for N Chinese contexts `chinese` ([N, L, H]); `uncond` is the
    Chinese "" context ([1, L, H], encoded with them so that it has as many chunks), `english` the
    backbone's "" context ([1, 77, H])."""
    device, dtype = next(unet.parameters()).device, unet.dtype
    n = chinese.shape[0]
    if uncond.shape[1] != chinese.shape[1]:
        raise ValueError(f"the Chinese contexts have {chinese.shape[1]} tokens but the unconditional one "
                         f"{uncond.shape[1]}: encode them together (one call of ChineseTextEncoder.encode)")
    rows = torch.cat([uncond.expand(n, -1, -1), chinese]).to(device, dtype)
    en = english.to(device, dtype)
    eps = EpsDenoiser(lambda x, t: unet(x, t, en.expand(x.shape[0], -1, -1),
                                        residuals=bridge.residuals(x, t, rows, strength))).to(device)

    def denoise(x, sigma):
        out = eps(torch.cat([x, x]), torch.cat([sigma, sigma]))
        un, co = out.chunk(2)
        return un + cfg_scale * (co - un)

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, unet.config.in_channels, latent_size, latent_size), generator=g).to(device, dtype)
    latents = sample(sampler, denoise, noise, steps, sigma_schedule=eps, generator=g)
    images = vae.decode(latents.to(vae.dtype)).float()
    return ((images + 1) / 2).clamp(0, 1).cpu()


def save_grid(images: torch.Tensor, path: Path) -> Path:
    """One PNG row of images (written atomically)."""
    import numpy as np
    from PIL import Image

    from ..formats.files import atomic_write
    grid = torch.cat(list(images), dim=2)
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
