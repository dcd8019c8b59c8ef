"""`python -m bdm.bench [step]`: one denoising step (one CFG pair per image), side by side in one run.

Variants, interleaved per repeat, medians reported, same weights everywhere:
- backbone: the SD1.x UNet alone on the CFG pair;
- ours: backbone + BDM branch, its residuals passed to the UNet's forward (`bdm.generate`'s way);
- shared: the same, with the backbone's encoder half computed once per CFG pair (equal English prompts);
- hooks: backbone + BDM branch through `bdm.attach` (the WebUI's way, for UNets the project does not own);
- official: diffusers' `UNet2DConditionModel` + `ControlNetModel` residuals, the hint encoder skipped as
  the official `ControlNetModelBDM` does.
Peak memory per variant: CUDA's allocator statistics on a GPU; on a CPU the process's peak resident
memory (VmHWM, reset through /proc/self/clear_refs before each measurement). On a CPU each variant's
process CPU seconds are measured too (`CPU RATIOS`): other programs on the machine stretch wall time but
hardly the CPU time a step needs, so on a shared machine those ratios are the steadier ones (with
`--threads 1` no thread ever waits for another). With `--processes N` the whole measurement runs in N fresh
processes one after another, each printing its own lines, and the last lines give the median of their
ratios.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..bridge import Bridge, BridgeConfig
from ..formats.diffusers_names import diffusers_unet2d_config, diffusers_unet_config, ldm_to_diffusers
from ..formats.files import materialize
from ..inject import attach
from ..unet import SD15, SMALL, UNetModel

CONFIGS = {"sd15": (SD15, 1024), "small": (SMALL, 96)}  # (backbone, Chinese hidden size)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_(module: nn.Module, seed: int) -> nn.Module:
    """Small random weights: timing and memory do not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


class SkippedHint(nn.Module):
    """Stands in for diffusers' `controlnet_cond_embedding`, which ControlNetModelBDM never runs."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, cond):
        return cond.new_zeros(cond.shape[0], self.channels, cond.shape[2] // 8, cond.shape[3] // 8)


PROC_STATUS = Path("/proc/self/status")


class PeakMemory:
    """Peak memory of a block of work, in MiB (NaN on a CPU without Linux's /proc: Windows, macOS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = float("nan")

    def __enter__(self):
        if self.device.type == "cpu" and not PROC_STATUS.is_file():
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:  # hand freed heap memory back first, or reusing it would not show as new residency
            import ctypes
            import gc
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._rss("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        elif PROC_STATUS.is_file():
            self.peak = (self._rss("VmHWM") - self.base) / 2 ** 20

    @staticmethod
    def _rss(field: str) -> int:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")


def build(config: str, device: torch.device, dtype: torch.dtype):
    import diffusers
    cfg, cn_dim = CONFIGS[config]
    unet = random_(materialize(lambda: UNetModel(cfg)), 0)
    bridge = random_(materialize(lambda: Bridge(BridgeConfig(cfg.with_context_dim(cn_dim)))), 1)
    with torch.device("meta"):
        peer_unet = diffusers.UNet2DConditionModel(**diffusers_unet2d_config(cfg))
        peer_cn = diffusers.ControlNetModel(**diffusers_unet_config(cfg.with_context_dim(cn_dim)))
    peer_unet.load_state_dict(ldm_to_diffusers(unet.state_dict(), cfg), assign=True)
    branch_sd = ldm_to_diffusers(bridge.state_dict(), cfg.with_context_dim(cn_dim), decoder=False, controlnet=True)
    peer_cn.controlnet_cond_embedding = SkippedHint(cfg.model_channels)
    peer_cn.load_state_dict(branch_sd, strict=False, assign=True)
    models = [unet, bridge, peer_unet, peer_cn]
    for m in models:
        m.to(device, dtype).eval().requires_grad_(False)
    return cfg, cn_dim, models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdm.bench", description=__doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--width", type=int, default=256, help="image width in pixels (latents are /8)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="images per step (each a CFG pair)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the measurement in N fresh processes and report the median of their ratios")
    args = parser.parse_args(argv)
    if args.processes > 1:
        return across_processes(argv if argv is not None else sys.argv[1:], args.processes)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, cn_dim, (unet, bridge, peer_unet, peer_cn) = build(args.config, device, dtype)
    rows = 2 * args.batch
    # a CFG pair: the same latents twice, as the sampler's denoiser builds it
    x = torch.randn(args.batch, cfg.in_channels, args.height // 8, args.width // 8, device=device,
                    dtype=dtype).repeat(2, 1, 1, 1)
    t = torch.full((rows,), 500, device=device)
    en = torch.randn(1, 77, cfg.context_dim, device=device, dtype=dtype).expand(rows, -1, -1).contiguous()
    cn = torch.randn(rows, 52, cn_dim, device=device, dtype=dtype)
    hint = torch.empty(rows, 3, args.height, args.width, device=device, dtype=dtype)

    def backbone():
        return unet(x, t, context=en)

    def ours():
        return unet(x, t, en, residuals=bridge(x, t, cn))

    def shared():
        return unet(x, t, en, residuals=bridge(x, t, cn), encoder_copies=2)

    def hooks():
        with attach(unet, bridge, cn):
            return unet(x, t, context=en)

    def official():
        down, mid = peer_cn(x, t, encoder_hidden_states=cn, controlnet_cond=hint, return_dict=False)
        return peer_unet(x, t, encoder_hidden_states=en, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    variants = {"backbone": backbone, "ours": ours, "shared": shared, "hooks": hooks, "official": official}
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    peaks = {}
    with torch.no_grad():
        outputs = {name: fn() for name, fn in variants.items()}  # warm-up, and a correctness check
        for name, fn in variants.items():
            with PeakMemory(device) as peak:
                fn()
            peaks[name] = peak.peak
        for _ in range(args.repeats):
            for name, fn in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    scale = outputs["official"].float().abs().max().item()
    print(f"config {args.config}, {args.width}x{args.height}, {args.batch} image(s) = {rows} UNet rows, "
          f"{args.device} {args.dtype}, {args.repeats} interleaved repeats, {torch.get_num_threads()} CPU thread(s)")
    for name in ("ours", "shared", "hooks"):
        diff = (outputs[name].float() - outputs["official"].float()).abs().max().item()
        print(f"  max |ε_{name} − ε_official| = {diff:.2e} (|ε| ≤ {scale:.2e})")
    med = {name: statistics.median(v) for name, v in times.items()}
    cpu = {name: statistics.median(v) for name, v in cpu_times.items()}
    for name in variants:
        line = f"{name:>9}: {med[name] * 1000:9.1f} ms/step (median)   peak {peaks[name]:8.1f} MiB"
        print(line + (f"   CPU {cpu[name] * 1000:9.1f} ms/step" if device.type == "cpu" else ""))
    print("RATIOS " + format_ratios(med))
    if device.type == "cpu":
        print("CPU RATIOS " + format_ratios(cpu))
    return 0


def format_ratios(med: dict[str, float]) -> str:
    ratios = {"ours/backbone": med["ours"] / med["backbone"], "shared/backbone": med["shared"] / med["backbone"],
              "hooks/ours": med["hooks"] / med["ours"], "ours/official": med["ours"] / med["official"],
              "shared/official": med["shared"] / med["official"]}
    return " ".join(f"{k}={v:.2f}" for k, v in ratios.items())


def across_processes(argv: list[str], processes: int) -> int:
    """The bench in `processes` fresh processes, one after another (`argv` as given, its `--processes`
    overridden by a last `--processes 1`); their output, then the median ratios."""
    runs: dict[str, list[dict[str, float]]] = {"RATIOS": [], "CPU RATIOS": []}
    for i in range(processes):
        out = subprocess.run([sys.executable, "-m", "bdm.bench", "step", *argv, "--processes", "1"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout + out.stderr, file=sys.stderr)
            return out.returncode
        print(f"-- process {i + 1} of {processes}\n{out.stdout.rstrip()}", flush=True)
        for line in out.stdout.splitlines():
            for kind in runs:
                if line.startswith(kind + " "):
                    runs[kind].append({k: float(v) for k, v in re.findall(r"(\S+)=([\d.]+)", line)})
    for kind, found in runs.items():
        if found:
            print(f"MEDIAN of {processes} processes: {kind} "
                  + " ".join(f"{k}={statistics.median(r[k] for r in found):.2f}" for k in found[0]))
    return 0
