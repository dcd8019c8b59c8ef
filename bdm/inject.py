"""Attach a branch to any LDM-layout UNet by module hooks.

Never replaces `forward`: hosts (the WebUI, the ControlNet extension) wrap or swap the UNet's forward,
and block hooks fire whatever forward runs. Per UNet call:
- a pre-hook on the UNet runs the branch on that call's x and timesteps with the rows' Chinese context
  and keeps the residuals for this call only;
- a pre-hook on `output_blocks[j]` adds skip residual `n-1-j` to the skip half (the last C channels)
  of the `cat([h, skip])` tensor it receives;
- a forward hook on `middle_block` adds the middle residual to its output;
- a forward hook on the UNet (also on exceptions where torch allows) drops the residuals, so blocks
  run outside a UNet call (ControlNet's reference pass) get nothing stale.
Several attachments sum; detaching removes the hooks and leaves the UNet exactly as it was. The
project's own `UNetModel` takes residuals as an argument instead (`forward(…, residuals=…)`); the two are
tested equal.
"""
from __future__ import annotations

import inspect
from typing import Callable, Union

import torch
from torch import nn

from .bridge import Bridge
from .unet import Residuals

# A value given once, or computed per UNet call from (x, timesteps, English context) — the WebUI's
# batches change per call, so row contexts are looked up at call time.
PerCall = Union[torch.Tensor, float, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]]

_ALWAYS_CALL = "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters


def _call_inputs(args: tuple, kwargs: dict):
    """(x, timesteps, context) of a UNet call, positional or by keyword (ldm's and the WebUI's ways)."""
    x = args[0] if args else kwargs["x"]
    t = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("t"))
    context = args[2] if len(args) > 2 else kwargs.get("context")
    return x, t, context


class Attachment:
    """One branch hooked into one UNet; a context manager (`with bdm.attach(...)`)."""

    def __init__(self, unet: nn.Module, bridge: Bridge, context: PerCall, strength: PerCall = 1.0,
                 hint: PerCall | None = None):
        self.unet, self.bridge = unet, bridge
        self.context, self.strength, self.hint = context, strength, hint
        self._residuals: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self._handles: list = []

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(self) -> "Attachment":
        if self._handles:
            return self
        unet = self.unet
        if len(unet.input_blocks) != len(self.bridge.skip_channels):
            raise ValueError(f"BDM: the branch has {len(self.bridge.skip_channels)} skips, the UNet "
                             f"{len(unet.input_blocks)} input blocks: they are not the same family")
        extra = {"always_call": True} if _ALWAYS_CALL else {}
        self._handles = [
            unet.register_forward_pre_hook(self._before_unet, with_kwargs=True),
            unet.register_forward_hook(self._after_unet, **extra),
            unet.middle_block.register_forward_hook(self._after_middle),
        ] + [block.register_forward_pre_hook(self._skip_hook(j), with_kwargs=True)
             for j, block in enumerate(unet.output_blocks)]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._residuals = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "Attachment":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- hooks -----------------------------------------------------------------------------------
    def _resolve(self, value: PerCall, x, t, en_context):
        return value(x, t, en_context) if callable(value) else value

    def _before_unet(self, module, args, kwargs):
        x, t, en_context = _call_inputs(args, kwargs)
        self._residuals = self.residuals(x, t, en_context)

    def residuals(self, x: torch.Tensor, t, en_context=None) -> Residuals | None:
        """The branch's strength-scaled `(down, mid)` for one UNet input (None: nothing to add)."""
        strength = self._resolve(self.strength, x, t, en_context)
        if not (isinstance(strength, torch.Tensor) and strength.ndim > 0) and float(strength) == 0.0:
            return None  # strength 0: the backbone alone, and not even the per-call context is looked up
        return self.bridge.residuals(x, t, self._resolve(self.context, x, t, en_context), strength,
                                     self._resolve(self.hint, x, t, en_context))

    def _after_unet(self, module, args, output):
        self._residuals = None

    def _after_middle(self, module, args, output):
        if self._residuals is None:
            return None
        mid = self._residuals[1]
        if output.shape[0] != mid.shape[0]:
            raise RuntimeError(f"BDM: the middle block gave {output.shape[0]} rows, the branch ran on "
                               f"{mid.shape[0]}: with hooks, call the UNet without encoder_copies")
        return output + mid.to(output.dtype)

    def _skip_hook(self, j: int):
        def add_to_skip(module, args, kwargs):
            if self._residuals is None:
                return None
            down = self._residuals[0]
            r = down[len(down) - 1 - j]
            h = args[0] if args else kwargs["x"]
            if h.shape[0] != r.shape[0]:
                raise RuntimeError(f"BDM: output block {j} got {h.shape[0]} rows, the branch ran on "
                                   f"{r.shape[0]}: the UNet was called in an unexpected way")
            c = r.shape[1]
            if torch.is_grad_enabled() and (h.requires_grad or r.requires_grad):
                h = torch.cat([h[:, :-c], h[:, -c:] + r.to(h.dtype)], dim=1)
            else:  # inference: h is the fresh cat([h, skip]) the UNet made for this block alone
                h[:, -c:] += r.to(h.dtype)
                return None
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "x": h}
        return add_to_skip


def attach(unet: nn.Module, bridge: Bridge, context: PerCall, strength: PerCall = 1.0,
           hint: PerCall | None = None) -> Attachment:
    """Hook `bridge` into `unet` now; use as `with attach(...):` or call `.detach()` later.

    `context`: the branch's text context, a tensor with one row per batch row (or one row for all),
    or a function `(x, timesteps, english_context) -> tensor` evaluated per UNet call.
    `strength`: a float, a per-row tensor, or such a function. `hint`: a ControlNet's image.
    """
    return Attachment(unet, bridge, context, strength, hint).attach()
