"""Frozen convolutions that keep nothing for backward but their weight.

Autograd's convolution saves its input whatever needs a gradient, because one backward formula serves
the input's and the weight's gradients. In the frozen backbone decoder only the input's gradient is
wanted (it carries the loss back to the branch's residuals), and that needs the weight alone — so each
saved input (the activation after GroupNorm + SiLU, as large as the block's feature map) is dead weight.
`lean_convolutions` swaps such layers to a class whose backward is `conv2d_input`: same numbers, that
memory freed without recomputing anything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _InputGradOnlyConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.geometry = (x.shape, x.dtype, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.geometry
        grad_x = torch.nn.grad.conv2d_input(shape, weight, grad.to(weight.dtype), stride, padding, dilation, groups)
        return grad_x.to(dtype), None, None, None, None, None, None


class LeanConv2d(nn.Conv2d):
    """`nn.Conv2d` that, with a frozen weight, saves only the weight for backward (state dict unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:  # what autocast would give F.conv2d
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _InputGradOnlyConv.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def autocast_dtype(device_type: str):
    """The dtype autocast casts to on this device type, or None when it is off (torch 2.0 … 2.x APIs)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch ≥ 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def lean_convolutions(module: nn.Module) -> int:
    """Make every frozen, zero-padded `nn.Conv2d` in `module` a `LeanConv2d`; returns how many."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and not m.weight.requires_grad and m.padding_mode == "zeros" \
                and isinstance(m.padding, tuple):
            m.__class__ = LeanConv2d
            n += 1
    return n
