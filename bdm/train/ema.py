"""Exponential moving average of the branch's weights (fp32, on the training device)."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point()}

    def current_decay(self) -> float:
        """The configured decay, lowered early on ((1+n)/(10+n)) so the average follows the start."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def meta(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ValueError(f"checkpoint EMA lacks {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(tensors[k])
        self.updates = int(meta["updates"])

    def copy_to(self, model: nn.Module) -> nn.Module:
        sd = model.state_dict()
        model.load_state_dict({k: self.shadow.get(k, v).to(v.dtype) for k, v in sd.items()})
        return model
