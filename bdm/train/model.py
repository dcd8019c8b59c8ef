"""The training step's model: frozen backbone + trainable branch, and the paper's loss.

The step is the UNet's own forward with the branch's residuals (`UNetModel.forward(…, residuals=…)`),
so it is what generation computes. It spends no autograd on the part the branch cannot influence: the
backbone is frozen and its inputs (the noisy latents, the constant English "" context) need no
gradient, so its `time_embed`, `input_blocks` and `middle_block` record nothing; only the decoder half
(`output_blocks`, `out`), which the residuals enter, is recorded for the loss's gradient to reach the
branch. The frozen decoder's convolutions keep only their weights for backward (`bdm.train.lean`), which
makes a step's peak memory lower than the peer's at no cost in time; optionally the last N decoder blocks
keep no activations at all and are recomputed in backward (activation checkpointing of the frozen half).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bridge import Bridge
from ..unet import UNetModel
from .lean import lean_convolutions


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the backbone, the VAE and both text encoders."""
    module.eval()
    module.requires_grad_(False)
    return module


class BridgeTrainingModel(nn.Module):
    """What one training step runs; only `bridge` has trainable parameters.

    `english` is the backbone's context, the embedding of "" computed once ([1, 77, H]); it is
    broadcast to every row. `bridge` may be wrapped by DistributedDataParallel (`self.branch`).
    `checkpoint_backbone` = N recomputes the last N frozen decoder blocks in backward (the full-resolution
    ones come last: the most activation memory per unit of recompute). The decoder's convolutions are made
    lean (`bdm.train.lean`): they keep only their weights for backward.
    """

    def __init__(self, unet: UNetModel, bridge: Bridge, english: torch.Tensor, checkpoint_backbone: int = 0):
        super().__init__()
        self.checkpoint_backbone = checkpoint_backbone
        self.unet = freeze(unet)
        lean_convolutions(unet.output_blocks)
        lean_convolutions(unet.out)
        self.bridge = bridge
        self.branch: nn.Module = bridge  # replaced by the DDP wrapper under torchrun
        self.register_buffer("english", english.detach().clone(), persistent=False)

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, chinese: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        z_t = z_t.to(dtype)
        residuals = self.branch(z_t, t, chinese)
        english = self.english.to(dtype).expand(z_t.shape[0], *self.english.shape[1:])
        n = len(self.unet.output_blocks)
        recompute = range(n - min(n, self.checkpoint_backbone), n)
        return self.unet(z_t, t, english, residuals=residuals, checkpoint_decoder=recompute)

    def loss(self, z_t: torch.Tensor, t: torch.Tensor, chinese: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """ε-prediction MSE (mean over every element), computed in fp32."""
        return F.mse_loss(self.eps(z_t, t, chinese).float(), noise.float())


def compiled_loss(model: BridgeTrainingModel):
    """`model.loss` through `torch.compile` (the trainer's and the bench's `--compile`). Static shapes: one
    graph per batch shape (each aspect bucket its own); inductor's dynamic-shape path failed on the second
    bucket ("cannot determine truth value of Relational")."""
    return torch.compile(model.loss, dynamic=False)
