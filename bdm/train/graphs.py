"""CUDA graphs of the training step's forward and backward (`torch.cuda.make_graphed_callables`).

Why: at the usual per-GPU batch sizes a fast GPU finishes the UNet's thousands of small kernels
faster than Python can launch them, so a step is bound by the CPU. A CUDA graph records the kernels of
one forward and one backward once and replays them with a single launch each: the same kernels, the
same numbers, a fraction of the CPU time. Static shapes only: each input shape gets its own graph (up
to `max_graphs`; other shapes, e.g. a short last batch, run eagerly). Each graph keeps a private memory
pool the size of one step's activations.

Not used where it cannot work: on CPU, under DistributedDataParallel (its gradient hooks run outside
the graph), with activation checkpointing (`torch.utils.checkpoint` does not replay under
`torch.autograd.grad`).
"""
from __future__ import annotations

import torch
from torch import nn


class _StepLoss(nn.Module):
    """The model's loss under autocast (its cast cache off, as capture requires); the parameters it
    owns are what the graphed backward returns gradients for."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, z_t, t, chinese, noise):
        enabled = self.autocast_dtype is not None
        with torch.autocast("cuda", self.autocast_dtype or torch.float16, enabled=enabled, cache_enabled=False):
            return self.model.loss(z_t, t, chinese, noise)


def graphs_possible(model: nn.Module, device: torch.device, distributed: bool) -> str | None:
    """None when the step can be graphed, else why not (for the log)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if distributed:
        return "not under DistributedDataParallel"
    if getattr(model, "checkpoint_backbone", 0) or getattr(model.bridge, "gradient_checkpointing", False):
        return "not with activation checkpointing"
    return None


class GraphedLoss:
    """`loss = graphed(z_t, t, chinese, noise)`; `loss.backward()` replays the backward graph, and the
    branch's `.grad` fill as in eager mode. Call it outside autocast (it applies `autocast_dtype`)."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None, max_graphs: int = 1):
        self.model, self.autocast_dtype = model, autocast_dtype
        self.eager = _StepLoss(model, autocast_dtype)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, object] = {}

    @staticmethod
    def _key(args) -> tuple:
        return tuple((tuple(a.shape), a.dtype) for a in args)

    def __call__(self, z_t, t, chinese, noise) -> torch.Tensor:
        args = (z_t, t, chinese, noise)
        key = self._key(args)
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) < self.max_graphs:
            sample = tuple(a.detach().clone() for a in args)
            # a wrapper of its own per graph: make_graphed_callables replaces the wrapper's forward
            graphed = torch.cuda.make_graphed_callables(_StepLoss(self.model, self.autocast_dtype), sample,
                                                     allow_unused_input=True)
            self.graphs[key] = graphed
        if graphed is None:
            return self.eager(*args)
        return graphed(*args)
