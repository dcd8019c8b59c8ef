"""`python -m bdm.bench webui`: seconds per denoising step inside a running AUTOMATIC1111 WebUI or Forge,
for plain SD, BDM, a same-size ControlNet (the ControlNet extension; Forge's built-in one), and BDM +
ControlNet.

Each request's wall time includes fixed costs (HTTP, text encoding, VAE decode, hooks set-up); they
cancel in the difference of two step counts: per step = (t(steps_hi) − t(steps_lo)) / (hi − lo). The
four modes are interleaved within every repeat (so a slow moment of a shared machine hits all modes),
and the medians over repeats are reported. The last line is
`RATIOS bdm/plain=X controlnet/plain=Y both/plain=Z`. When the bench starts the server itself (Linux), it
also reads the server process's CPU time per request (/proc): `CPU RATIOS …`, the same quotients of CPU
seconds per step, which other jobs on a shared machine disturb far less than wall time.

Usage:
  python -m bdm.bench webui --url http://127.0.0.1:7860 --bdm-model NAME --controlnet-model TITLE
  python -m bdm.bench webui --a1111 /path/to/stable-diffusion-webui   # starts one itself (CPU, offline)
  python -m bdm.bench webui --forge /path/to/stable-diffusion-webui-forge   # the same with Forge
With `--a1111` the WebUI is started with run.sh's flags (`--skip-prepare-environment --skip-install
--use-cpu all --no-half --precision full --api`; Forge: `--always-cpu --all-in-fp32` for the CPU), the
checkpoint given by `--ckpt` (default the test harnesses' tiny-sd1), and stopped at the end; a BDM model
for that checkpoint is made if none is named. The WebUI must have this project in `extensions/` (and,
in A1111, sd-webui-controlnet installed).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODES = ("plain", "bdm", "controlnet", "both")


def _post(url: str, path: str, payload: dict, timeout: float = 1800) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def _get(url: str, path: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(url + path, timeout=timeout) as r:
        return json.load(r)


def _hint_png(size: int) -> str:
    import numpy as np
    from PIL import Image
    a = np.zeros((size, size, 3), np.uint8)
    a[size // 8: size // 2, size // 8: size // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def controlnet_module(url: str) -> str:
    """The "no preprocessor" module as the server spells it (A1111's extension: "none", Forge: "None")."""
    modules = _get(url, "/controlnet/module_list")["module_list"]
    return next((m for m in modules if m.lower() == "none"), "none")


def payload(mode: str, steps: int, args) -> dict:
    p = {"prompt": "", "negative_prompt": "", "width": args.size, "height": args.size, "steps": steps,
         "sampler_name": "Euler", "scheduler": "Automatic", "cfg_scale": 7, "seed": 1,
         "batch_size": args.batch, "n_iter": 1, "alwayson_scripts": {}}
    if mode in ("bdm", "both"):
        p["alwayson_scripts"]["BDM"] = {"args": [{"enabled": True, "prompt": "红色的圆形", "model": args.bdm_model}]}
    if mode in ("controlnet", "both"):
        p["alwayson_scripts"]["controlnet"] = {"args": [{
            "enabled": True, "module": args.controlnet_module, "model": args.controlnet_model, "weight": 1.0,
            "image": _hint_png(args.size), "resize_mode": "Just Resize", "processor_res": args.size}]}
    return p


def check(url: str, args) -> None:
    """One request per mode: BDM must be applied (its fields in the infotext, no error), ControlNet
    must have run (its control map comes back)."""
    for mode in MODES:
        r = _post(url, "/sdapi/v1/txt2img", payload(mode, 2, args))
        info = json.loads(r["info"])
        text = info["infotexts"][0]
        if mode in ("bdm", "both") and ("BDM prompt" not in text or "BDM error" in info["extra_generation_params"]):
            raise SystemExit(f"BDM was not applied in mode {mode}: {info['extra_generation_params']}")
        if mode in ("controlnet", "both") and len(r["images"]) <= args.batch:
            raise SystemExit(f"ControlNet did not run in mode {mode} (model {args.controlnet_model!r})")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads) from /proc; None where unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def measure(url: str, args, pid: int | None = None) -> tuple[dict, dict | None]:
    """Median seconds per step per mode: wall time, and the server's CPU time when `pid` is known."""
    lo, hi = args.steps
    per_step: dict[str, list[float]] = {m: [] for m in MODES}
    cpu_per_step: dict[str, list[float]] = {m: [] for m in MODES}
    have_cpu = cpu_seconds(pid) is not None
    for rep in range(args.repeats):
        times, cpu = {}, {}
        for mode in MODES:
            for steps in (lo, hi):
                c, t = cpu_seconds(pid), time.perf_counter()
                _post(url, "/sdapi/v1/txt2img", payload(mode, steps, args))
                times[mode, steps] = time.perf_counter() - t
                if have_cpu:
                    cpu[mode, steps] = cpu_seconds(pid) - c
        for mode in MODES:
            per_step[mode].append((times[mode, hi] - times[mode, lo]) / (hi - lo))
            if have_cpu:
                cpu_per_step[mode].append((cpu[mode, hi] - cpu[mode, lo]) / (hi - lo))
        if not args.quiet:
            print(f"repeat {rep + 1}/{args.repeats}: " +
                  ", ".join(f"{m} {per_step[m][-1] * 1000:.1f} ms/step" for m in MODES), flush=True)
    wall = {m: statistics.median(v) for m, v in per_step.items()}
    return wall, ({m: statistics.median(v) for m, v in cpu_per_step.items()} if have_cpu else None)


# -- starting a WebUI ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_bdm(a1111: Path, ckpt: Path, name: str = "bench-bdm") -> str:
    """A BDM model for `ckpt` (branch copied from its UNet, small random zero convs, tiny encoder): the
    branch is what is timed, its weights do not matter."""
    out = a1111 / "models" / "bdm" / f"{name}.safetensors"
    if out.is_file() and out.stat().st_mtime >= ckpt.stat().st_mtime:
        return name
    import torch

    import bdm
    from bdm.formats import bdm_file, checkpoint
    from bdm.text.chinese import ChineseTextEncoder
    unet = checkpoint.load_unet(ckpt)
    enc = ChineseTextEncoder.tiny(seed=0)
    bridge = bdm.from_backbone(unet, 64)  # the tiny encoder's hidden size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in [z[0] for z in bridge.zero_convs] + [bridge.middle_block_out[0]]:
            conv.weight.copy_(0.1 * torch.randn(conv.weight.shape, generator=g))
    bdm_file.save_bdm(out, bridge, enc)
    return name


def start(root: Path, ckpt: str, log: Path, forge: bool = False):
    """A WebUI (A1111, or Forge with `forge`) on the CPU, offline, API only, on a free port."""
    port = _free_port()
    python = root.parent / "venv" / "bin" / "python"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    cpu = ["--use-cpu", "all"]
    if forge:  # Forge's CPU switch; float32 throughout (the CPU has no fast float16)
        cpu = ["--always-cpu", "--all-in-fp32", "--skip-python-version-check"]
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [str(python) if python.exists() else sys.executable, "launch.py", "--skip-prepare-environment",
           "--skip-install", "--skip-torch-cuda-test", "--skip-version-check", *cpu, "--no-half",
           "--precision", "full", "--api", "--nowebui", "--server-name", "127.0.0.1", "--port", str(port),
           "--ckpt", ckpt]
    f = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the WebUI exited with {proc.returncode}; see {log}")
        try:  # the ControlNet routes come with the last start-up step: then every script has its args
            _get(url, "/controlnet/model_list", timeout=10)
            return proc, url
        except OSError:
            time.sleep(2)
    stop(proc)
    raise SystemExit(f"the WebUI did not answer within 300 s; see {log}")


def stop(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bdm.bench webui", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running WebUI (with --api); else --a1111 or --forge starts one")
    ap.add_argument("--a1111", default=os.environ.get("A1111_DIR"), help="WebUI folder (default $A1111_DIR)")
    ap.add_argument("--forge", help="a Forge folder to start instead of an A1111 WebUI")
    ap.add_argument("--ckpt", default="models/Stable-diffusion/tiny-sd1.safetensors",
                    help="checkpoint for a started WebUI (relative to its folder)")
    ap.add_argument("--bdm-model", default=None, help="BDM model name (default: made for the checkpoint)")
    ap.add_argument("--controlnet-model", default=None,
                    help="ControlNet model title (default: the first the extension lists)")
    ap.add_argument("--steps", type=int, nargs=2, default=(4, 16), metavar=("LO", "HI"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--log", default="/tmp/bdm-bench-webui.log")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    proc = None
    url = args.url.rstrip("/") if args.url else None
    if url is None:
        if not (args.forge or args.a1111):
            ap.error("give --url of a running WebUI, --a1111 (or set A1111_DIR) or --forge")
        root = Path(args.forge or args.a1111).resolve()
        if args.bdm_model is None:
            args.bdm_model = _make_bdm(root, root / args.ckpt)
        proc, url = start(root, args.ckpt, Path(args.log), forge=bool(args.forge))
    try:
        if args.bdm_model is None:
            models = _get(url, "/bdm/models")["models"]
            if not models:
                raise SystemExit("no BDM model installed (models/bdm/); give --bdm-model")
            args.bdm_model = models[0]["name"]
        if args.controlnet_model is None:
            cn = [m for m in _get(url, "/controlnet/model_list")["model_list"] if m != "None"]
            if not cn:
                raise SystemExit("the ControlNet extension lists no model; give --controlnet-model")
            args.controlnet_model = cn[0]
        args.controlnet_module = controlnet_module(url)
        check(url, args)
        for mode in MODES:  # warm-up
            _post(url, "/sdapi/v1/txt2img", payload(mode, args.steps[0], args))
        med, cpu = measure(url, args, proc.pid if proc is not None else None)
    finally:
        if proc is not None:
            stop(proc)
    print(f"WebUI {url}: {args.size}x{args.size}, batch {args.batch}, Euler, steps {args.steps[0]} vs "
          f"{args.steps[1]}, {args.repeats} interleaved repeats, medians; BDM model {args.bdm_model}, "
          f"ControlNet {args.controlnet_model}")
    for mode in MODES:
        print(f"  {mode:<10} {med[mode] * 1000:8.2f} ms/step   x{med[mode] / med['plain']:.3f}")
    if cpu is not None:
        print("server CPU seconds per step: " + ", ".join(f"{m} {cpu[m] * 1000:.2f} ms" for m in MODES))
        print("CPU " + ratios(cpu))
    print(ratios(med))
    return 0


def ratios(per_step: dict) -> str:
    return ("RATIOS " + " ".join(f"{m}/plain={per_step[m] / per_step['plain']:.3f}" for m in ("bdm", "controlnet", "both")))
