"""One CUDA graph per batch shape for a training micro-step: forward, loss and backward.

Why: at the usual per-GPU batch sizes a fast GPU finishes the UNet's thousands of small kernels
faster than Python can launch them, so an eager step is bound by the CPU. A CUDA graph records the
kernels of one forward + backward once and replays them with a single launch: the same kernels, the
same numbers, a fraction of the CPU time.

Gradients: see `GraphedStep`. Inputs are copied into static buffers before each replay. Shapes without
a graph yet are captured (up to `max_graphs`, all sharing one memory pool: they never run at the same
time); beyond that they run eagerly.

Memory: a graph keeps its pool for good, so the pool's slack is paid at every step. Left to itself the
caching allocator grows a pool in many small segments and fragments it (docs/training-notes.md has the
figures). So the first capture starts by reserving one segment as large as the warm-up's peak of large
tensors, which later large tensors are carved from; and warm-up and capture run on one stream, so the
cuBLAS workspaces the warm-up creates for that stream serve the capture too instead of being allocated
again inside the pool. Measuring that peak resets the device's peak-memory statistic, so the trainer's
memory readout counts from the first capture.

Not used where it cannot work: on CPU, under DistributedDataParallel (its gradient hooks run outside
the graph), with activation checkpointing (recomputation inside a captured backward).
"""
from __future__ import annotations

import torch
from torch import nn


def graphs_possible(model: nn.Module, device: torch.device, distributed: bool) -> str | None:
    """None when the step can be graphed, else why not (for the log)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if distributed:
        return "not under DistributedDataParallel"
    if getattr(model, "checkpoint_backbone", 0) or getattr(model.bridge, "gradient_checkpointing", False):
        return "not with activation checkpointing"
    return None


class GraphedStep:
    """`loss = step(z_t, t, chinese, noise, grad_factor, accumulate)`: puts ∂(loss · grad_factor)/∂θ into
    the branch's `.grad` (added to it when `accumulate`) and returns the (unscaled) loss. `grad_factor` is
    a 0-dim CUDA tensor (1 / accumulation, times the loss scale under fp16). Call it outside autocast: it
    applies `autocast_dtype` itself.

    The first graph is captured with no `.grad` allocated: autograd hands each computed gradient to
    `.grad` without a copy, so the gradients live in the graph's memory pool and every replay writes them
    afresh (no second copy of the gradients, no zeroing). Graphs captured later (other shapes, or
    accumulating micro-steps) add into those same tensors in place. The gradients must therefore never
    be dropped: zero them with `optimizer.zero_grad(set_to_none=False)`.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None, max_graphs: int = 8,
                 warmup: int = 2):
        self.model, self.autocast_dtype = model, autocast_dtype
        self.max_graphs, self.warmup = max_graphs, warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict[tuple, tuple] = {}
        self.grads: list[torch.Tensor] | None = None  # the static gradients, once a graph has made them
        self.pool = None
        self.stream = torch.cuda.Stream()  # warm-ups and captures, all on this one

    def loss(self, z_t, t, chinese, noise) -> torch.Tensor:
        """The model's loss under autocast (cast cache off: a graph must not keep casts across replays)."""
        enabled = self.autocast_dtype is not None
        with torch.autocast("cuda", self.autocast_dtype or torch.float16, enabled=enabled, cache_enabled=False):
            return self.model.loss(z_t, t, chinese, noise)

    def _capture(self, inputs: tuple, overwrite: bool) -> tuple:
        static = tuple(a.detach().clone() for a in inputs)
        device, side = static[0].device, self.stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (library handles, kernel choices) without touching .grad
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(self.warmup):
                torch.autograd.grad(self.loss(*static[:4]) * static[4], self.params, allow_unused=True)
            stats = torch.cuda.memory_stats(device)
        torch.cuda.current_stream().wait_stream(side)
        large = stats.get("allocated_bytes.large_pool.peak", 0) - stats.get("allocated_bytes.large_pool.current", 0)
        if overwrite:
            for p in self.params:
                p.grad = None
        else:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        before = [p.grad for p in self.params]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            if self.pool is None and large > 0:  # one segment, freed at once: the large tensors below split it
                torch.empty(large, dtype=torch.uint8, device=device)
            loss = self.loss(*static[:4])
            (loss * static[4]).backward()
        self.pool = graph.pool() if self.pool is None else self.pool
        for p in self.params:  # a parameter the loss does not reach still gets a (zero) gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if overwrite:
            self.grads = [p.grad for p in self.params]
        elif any(p.grad is not g for p, g in zip(self.params, before)):
            raise RuntimeError("CUDA graph capture: autograd replaced a .grad tensor instead of accumulating "
                               "into it; train with --no-cuda-graphs")
        return graph, static, loss

    def __call__(self, z_t, t, chinese, noise, grad_factor: torch.Tensor, accumulate: bool = False
                 ) -> torch.Tensor:
        inputs = (z_t, t, chinese, noise, grad_factor.float().reshape(()))
        if self.grads is not None and any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("the branch's .grad tensors were replaced or dropped; with CUDA graphs zero "
                               "them in place (optimizer.zero_grad(set_to_none=False))")
        shape = tuple((tuple(a.shape), a.dtype) for a in inputs)
        room = len(self.graphs) < self.max_graphs
        if not accumulate and ((shape, "write") in self.graphs or (self.grads is None and room)):
            key = (shape, "write")
            if key not in self.graphs:
                self.graphs[key] = self._capture(inputs, overwrite=True)
        else:
            key = (shape, "add")
            if not accumulate:
                with torch.no_grad():
                    for p in self.params:
                        if p.grad is not None:
                            p.grad.zero_()
            if key not in self.graphs and room:
                self.graphs[key] = self._capture(inputs, overwrite=False)
        entry = self.graphs.get(key)
        if entry is None:  # eager; autograd adds into the existing gradients
            loss = self.loss(z_t, t, chinese, noise)
            (loss * inputs[4]).backward()
            return loss.detach()
        graph, static, loss = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return loss.detach().clone()
