"""`python -m bdm.bench train` — one BDM training step, ours vs the peer way, side by side.

Peer: what diffusers' `train_controlnet.py` does — a frozen `UNet2DConditionModel` (in the AMP dtype)
plus a trainable `ControlNetModel` (fp32) whose residuals go in through
`down_block_additional_residuals` / `mid_block_additional_residual`; AdamW; `zero_grad(set_to_none=True)`.
Its hint encoder is replaced by zeros (BDM's branch has none), so both do the same arithmetic.
Ours: `bdm.train.model.BridgeTrainingModel` (backbone encoder half without autograd, only the decoder
half recorded, its frozen convolutions lean, the last N decoder blocks recomputed), fused AdamW where
available, and on CUDA the step's forward and backward replayed as CUDA graphs (`bdm.train.graphs`), as
the trainer does by default; with `--compile` the step goes through `torch.compile` instead (the trainer's
`--compile`). Same weights (`bdm.formats.diffusers_names`), same inputs.

Time: interleaved repeats (ours, peer, ours, peer, …), medians. Memory: on CUDA the peak allocated
memory of a step (for ours with CUDA graphs: plus every byte the graphs' private pools reserve and the
gradients, kept allocated between steps), and beside it the peak reserved memory of one step for each
side after `empty_cache` (whole allocator segments, slack included, as the process holds them); on CPU
the bytes autograd keeps for backward (saved activations, unique storages) plus trainable weights,
gradients and optimizer state — the part of a step's peak that differs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def _configs():
    from ..unet import SD15, SMALL
    return {"small": (SMALL, 64, 77, 64), "sd15": (SD15, 1024, 77, 768)}


class _ZeroHint(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, cond):
        b, _, h, w = cond.shape
        return cond.new_zeros(b, self.channels, h // 8, w // 8)


def build(config: str, device, dtype, checkpoint_backbone: int = 0):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ..bridge import Bridge
    from ..formats.diffusers_names import diffusers_unet2d_config, diffusers_unet_config, ldm_to_diffusers
    from ..train.model import BridgeTrainingModel
    from ..unet import UNetModel
    cfg, cn_dim, en_len, en_dim = _configs()[config]
    torch.manual_seed(0)
    unet = UNetModel(cfg)
    bridge = Bridge.from_backbone(unet, cn_dim)
    with torch.no_grad():  # the zero convs would make every gradient but theirs zero
        for p in list(bridge.zero_convs.parameters()) + list(bridge.middle_block_out.parameters()):
            p.normal_(0, 1e-3)
    peer_unet = UNet2DConditionModel(**diffusers_unet2d_config(cfg))
    peer_unet.load_state_dict(ldm_to_diffusers(unet.state_dict(), cfg), strict=True)
    ccfg = diffusers_unet_config(cfg.with_context_dim(cn_dim))
    ccfg.pop("norm_num_groups", None)
    peer_cn = ControlNetModel(**ccfg, conditioning_embedding_out_channels=(16, 32, 96, 256))
    missing, unexpected = peer_cn.load_state_dict(
        ldm_to_diffusers(bridge.state_dict(), cfg.with_context_dim(cn_dim), decoder=False, controlnet=True),
        strict=False)
    assert not unexpected and all(k.startswith("controlnet_cond_embedding") for k in missing), (missing, unexpected)
    peer_cn.controlnet_cond_embedding = _ZeroHint(cfg.model_channels)
    english = torch.randn(1, en_len, en_dim)
    ours = BridgeTrainingModel(unet.to(device, dtype), bridge.to(device).train(), english.to(device),
                               checkpoint_backbone)
    peer_unet.to(device, dtype).requires_grad_(False).eval()
    peer_cn.to(device).train()
    return ours, (peer_unet, peer_cn), english.to(device), cn_dim


def _optimizer(params, fused: bool):
    if fused:
        try:
            opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
            return opt
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=1e-5)


class SavedBytes:
    """Bytes autograd saves for backward (unique storages) during a forward."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            size = t.untyped_storage().nbytes()
        except Exception:
            return t
        if key not in self.seen:
            self.seen.add(key)
            self.total += size
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def _state_bytes(params, opt) -> int:
    n = sum(p.numel() * p.element_size() * 2 for p in params)  # weights + gradients
    for s in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bdm.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["small", "sd15"], default="small")
    p.add_argument("--width", type=int, default=None, help="pixels (default: 256 small, 512 sd15 on GPU, 256 on CPU)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 small, 2 sd15 (1 on CPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 on CUDA, no on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint both branches")
    p.add_argument("--checkpoint-backbone", type=int, default=0, metavar="N",
                   help="ours: recompute the last N frozen decoder blocks in backward (the trainer's default: 0)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="ours: run the step eagerly on CUDA too (the trainer's --no-cuda-graphs)")
    p.add_argument("--compile", action="store_true",
                   help="ours: torch.compile the step's forward and backward (the trainer's --compile; CUDA graphs off)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cpu = device.type == "cpu"
    mp = a.mixed_precision or ("no" if cpu else "bf16")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    default_px = 256 if (cpu or a.config == "small") else 512
    width, height = a.width or default_px, a.height or default_px
    batch = a.batch_size or (4 if a.config == "small" else (1 if cpu else 2))
    ours, (peer_unet, peer_cn), english, cn_dim = build(a.config, device, dtype, a.checkpoint_backbone)
    if a.gradient_checkpointing:
        ours.bridge.gradient_checkpointing = True
        peer_cn.enable_gradient_checkpointing()
    opt_ours = _optimizer([q for q in ours.bridge.parameters()], fused=True)
    opt_peer = torch.optim.AdamW(peer_cn.parameters(), lr=1e-5)  # diffusers' trainer default
    from ..train.graphs import GraphedStep, graphs_possible
    graphed = (GraphedStep(ours, dtype if mp != "no" else None)
               if a.cuda_graphs and not a.compile and graphs_possible(ours, device, False) is None else None)
    from ..train.model import compiled_loss
    loss_ours = compiled_loss(ours) if a.compile else ours.loss
    g = torch.Generator().manual_seed(0)
    lat = (batch, 4, height // 8, width // 8)
    x = torch.randn(lat, generator=g).to(device)
    noise = torch.randn(lat, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    cn = torch.randn(batch, 52, cn_dim, generator=g).to(device)
    hint = torch.zeros(batch, 3, height, width, device=device)
    en = english.expand(batch, -1, -1)
    one = torch.ones((), device=device)
    autocast = lambda: torch.autocast(device.type, dtype, enabled=mp != "no")

    def step_ours(measure=None):
        if graphed is not None:  # forward and backward in one replay
            loss = graphed(x, t, cn, noise, one)
        else:
            with autocast(), (measure or _null()):
                loss = loss_ours(x, t, cn, noise)
            loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=graphed is None)
        return loss.item()

    def step_peer(measure=None):
        with autocast(), (measure or _null()):
            down, mid = peer_cn(x, t, encoder_hidden_states=cn, controlnet_cond=hint, return_dict=False)
            pred = peer_unet(x.to(dtype), t, encoder_hidden_states=en.to(dtype),
                             down_block_additional_residuals=[d.to(dtype) for d in down],
                             mid_block_additional_residual=mid.to(dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)
        return loss.item()

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - base
        return time.perf_counter() - t0, None

    def kept_between_steps(name) -> int:  # what ours with CUDA graphs holds outside the step's allocations
        return _graphed_extra(ours) if name == "ours" and graphed else 0

    l_ours, l_peer = step_ours(), step_peer()  # also warms up
    for _ in range(a.warmup - 1):
        step_ours(), step_peer()
    times = {"ours": [], "peer": []}
    mems = {"ours": [], "peer": []}
    for _ in range(a.repeats):
        for name, fn in (("ours", step_ours), ("peer", step_peer)):
            dt, mem = timed(fn)
            times[name].append(dt)
            if mem is not None:
                mems[name].append(mem + kept_between_steps(name))
    reserved = {}
    if not cpu:  # what each step adds to the process's CUDA memory, whole segments (closer to nvidia-smi)
        for name, fn in (("ours", step_ours), ("peer", step_peer)):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_reserved(device)  # graph pools stay reserved: they are in the base
            fn()
            torch.cuda.synchronize(device)
            reserved[name] = torch.cuda.max_memory_reserved(device) - base + kept_between_steps(name)
    if cpu:  # bytes autograd keeps + trainable state
        m_ours, m_peer = SavedBytes(), SavedBytes()
        step_ours(m_ours)
        step_peer(m_peer)
        mems["ours"] = [m_ours.total + _state_bytes(list(ours.bridge.parameters()), opt_ours)]
        mems["peer"] = [m_peer.total + _state_bytes(list(peer_cn.parameters()), opt_peer)]
    t_ours, t_peer = statistics.median(times["ours"]), statistics.median(times["peer"])
    mem_ours, mem_peer = max(mems["ours"]), max(mems["peer"])
    what = "peak allocated" if not cpu else "autograd-saved + trainable state"
    print(f"config={a.config} device={device} ({torch.get_num_threads()} threads) {width}x{height} batch={batch} "
          f"mixed_precision={mp} gradient_checkpointing={a.gradient_checkpointing} "
          f"checkpoint_backbone={a.checkpoint_backbone} cuda_graphs={graphed is not None} compile={a.compile} "
          f"repeats={a.repeats}")
    print(f"first-step loss ours={l_ours:.5f} peer={l_peer:.5f} (same weights and inputs)")
    for name, tt, mm in (("ours", t_ours, mem_ours), ("peer", t_peer, mem_peer)):
        print(f"{name:5s} time/step median {tt * 1000:9.1f} ms  [{', '.join(f'{v * 1000:.0f}' for v in times[name])}]  "
              f"memory ({what}) {mm / 2**20:9.1f} MiB")
    if graphed is not None:
        print(f"ours: {len(graphed.graphs)} CUDA graph(s), memory counted above includes "
              f"{_graphed_extra(ours) / 2**20:.1f} MiB of graph pools and gradients kept between steps")
    if reserved:
        print(f"peak reserved (segments whole, after empty_cache; ours with its graph pools): "
              f"ours {reserved['ours'] / 2**20:.1f} MiB, peer {reserved['peer'] / 2**20:.1f} MiB")
    print(f"RATIOS time ours/peer={t_ours / t_peer:.3f} memory ours/peer={mem_ours / mem_peer:.3f}"
          + (f" reserved ours/peer={reserved['ours'] / reserved['peer']:.3f}" if reserved else ""))
    return 0


def _graphed_extra(ours) -> int:
    """What a graphed step holds outside the step's own allocations: every byte the CUDA graphs' private
    pools reserve (the default pool is (0, 0)), and the gradients where they lie outside those pools."""
    pools = [(seg["address"], seg["address"] + seg["total_size"]) for seg in torch.cuda.memory_snapshot()
             if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)]
    grads = [p.grad for p in ours.bridge.parameters() if p.grad is not None]
    outside = [g for g in grads if not any(lo <= g.data_ptr() < hi for lo, hi in pools)]
    return sum(hi - lo for lo, hi in pools) + sum(g.numel() * g.element_size() for g in outside)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
