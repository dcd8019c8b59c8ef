"""A1111 "Original" emphasis, shared by the English and the Chinese encoder: every token's vector is
multiplied by its prompt weight, then the sequence is rescaled to its old mean."""
from __future__ import annotations

import torch


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`z` [..., tokens, hidden] weighted by `weights` [..., tokens], mean kept per sequence.

    Unweighted prompts come back bit for bit; a sequence whose mean is exactly 0 (possible with
    untrained layer norms) keeps the plain multiplication instead of dividing by zero.
    """
    if bool((weights == 1.0).all()):
        return z
    zf = z.float()
    before = zf.mean(dim=(-2, -1), keepdim=True)
    zf = zf * weights.to(zf.device, zf.dtype).unsqueeze(-1)
    after = zf.mean(dim=(-2, -1), keepdim=True)
    safe = torch.where(after == 0, torch.ones_like(after), after)
    zf = zf * torch.where(after == 0, torch.ones_like(after), before / safe)
    return zf.to(z.dtype)
