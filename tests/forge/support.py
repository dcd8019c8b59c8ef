"""Test-only pieces written into FORGE_DIR by the Forge suite (never part of the extension):
- `extensions/bdm-forge-test-support/`: an extension with diagnostics routes over the BDM extension's
  state and one-shot faults inside the branch (below), and the model families of the tiny SD2 and SDXL
  checkpoints (tests/forge/foreign.py builds those);
- `models/Stable-diffusion/bdm-test-toy-inpainting.safetensors`: the toy checkpoint with a 9-channel
  input (an SD1 inpainting model, which BDM must refuse).

Routes of the support extension:
- `GET /bdm-test/state`: open runs, loaded branches, live `Bridge` / `BranchControl` objects, the branch
  patchers and Forge's loaded models, the branch's device and dtype, the process RSS, and what the last
  BDM run saw (branch calls, row roles of its first calls);
- `POST /bdm-test/arm {"action": "raise"|"interrupt", "at_call": k}`: the next BDM generation raises
  inside its k-th branch call, or interrupts there (one shot).
It reads only the BDM extension's public state (`session` of scripts/bdm_script.py: `run_for`,
`open_runs`, the model manager's `loaded()`, `BdmRun.unet_calls`) and watches the branch with forward
hooks, like the A1111 suite's probe (tests/webui/support/bdm_test_probe.py).
"""
from __future__ import annotations

from pathlib import Path

NAME = "bdm-forge-test-support"
INPAINTING = "bdm-test-toy-inpainting"

SCRIPT = '''"""Test-only (written by BDM's Forge suite, tests/forge/support.py): diagnostics and faults."""
import gc
import sys

from fastapi import Body

import os

from huggingface_guess import model_list

from modules import script_callbacks, scripts, shared

# the tiny SD2 / SDXL test checkpoints' families (shapes from tests/forge/foreign.py)
FAMILIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "families")
HEADS = {"num_heads": -1, "num_head_channels": 16}


class BdmTestSD2(model_list.SD20):
    huggingface_repo = os.path.join(FAMILIES, "sd2")
    unet_config = {"model_channels": 32, "context_dim": 32, "channel_mult": [1, 2], "use_linear_in_transformer": True,
                   "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = HEADS


class BdmTestSDXL(model_list.SDXL):
    huggingface_repo = os.path.join(FAMILIES, "sdxl")
    unet_config = {"model_channels": 32, "context_dim": 64, "channel_mult": [1, 2], "use_linear_in_transformer": True,
                   "adm_in_channels": 32 + 6 * 256, "use_temporal_attention": False}
    unet_extra_config = HEADS


model_list.models[:] = [m for m in model_list.models if not m.__name__.startswith("BdmTest")]
model_list.models[0:0] = [BdmTestSD2, BdmTestSDXL]

LAST = {}
ARMED = {}
STARTED = [0]
HANDLES = []
WATCHED = [None]


def bdm_session():
    for data in scripts.scripts_data:
        if data.script_class.__name__ == "BdmScript":
            return data.module.session
    raise RuntimeError("the BDM script is not loaded")


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def digest(module):
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def branch_link(run):
    """BDM's link of the current UNet patcher (Forge's control chain) for `run`."""
    for c in shared.sd_model.forge_objects.unet.list_controlnets():
        if getattr(c, "run", None) is run:
            return c
    return None


def watch(run):
    """Forward hooks on the run's branch (a public nn.Module): count its calls, note the row roles Forge
    gave them (`cond_or_uncond` of the branch's link), fire an armed fault."""
    from bdm.webui.layout import chunked_row_roles
    for h in HANDLES:
        h.remove()
    HANDLES.clear()
    fault = dict(ARMED)
    ARMED.clear()
    LAST.clear()
    LAST.update({"unet_calls": 0, "roles": [], "fault": fault or None})
    STARTED[0] += 1  # last: a poll that sees the new count sees the new run

    def after_branch(module, args, output):
        n = run.unet_calls
        LAST["unet_calls"] = n
        if len(LAST["roles"]) < 4:
            chunks = branch_link(run).transformer_options["cond_or_uncond"]
            LAST["roles"].append([f"{r.role}{r.image}" for r in chunked_row_roles(chunks, args[0].shape[0])])
        if fault and n == fault["at_call"]:
            LAST["fired"] = fault["action"]
            if fault["action"] == "raise":
                raise RuntimeError(f"BDM test fault at branch call {n}")
            shared.state.interrupt()
    HANDLES.append(run.bridge.register_forward_hook(after_branch))


class Support(scripts.Script):
    def title(self):
        return "BDM test support"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        run = bdm_session().run_for(p)
        if run is not None and run.bridge is not None and WATCHED[0] is not run:  # once per run (hires: twice)
            WATCHED[0] = run
            watch(run)


def routes(demo, app):
    @app.get("/bdm-test/state")
    def state():
        from backend import memory_management
        from backend.patcher.base import ModelPatcher
        from bdm.bridge import Bridge
        session = bdm_session()
        started = STARTED[0]
        gc.collect()
        objects = gc.get_objects()
        link = sys.modules["bdm_forge.branch"].BranchControl
        return {"runs": session.open_runs(), "manager": len(session.manager.loaded()),
                "bridge_objects": sum(isinstance(o, Bridge) for o in objects),
                "controls": sum(isinstance(o, link) for o in objects),
                "patchers": sum(isinstance(o, ModelPatcher) and isinstance(o.model, Bridge) for o in objects),
                "loaded_models": [type(x.model.model).__name__ for x in memory_management.current_loaded_models],
                "branches": [{"name": e.name, "device": str(next(b.parameters()).device),
                              "dtype": str(next(b.parameters()).dtype), "digest": digest(b)}
                             for e, b in session.manager.loaded()],
                "rss_mb": rss_mb(), "last": dict(LAST), "started": started}

    @app.post("/bdm-test/arm")
    def arm(body: dict = Body(...)):
        ARMED.clear()
        ARMED.update({"action": body.get("action", "raise"), "at_call": int(body.get("at_call", 1))})
        return ARMED


script_callbacks.on_app_started(routes)
'''


def write_foreign_checkpoints(forge_dir: Path, python: str) -> str:
    """The tiny SD2 and SDXL checkpoints and their family folders, built with Forge's python
    (tests/forge/foreign.py); rebuilt only when foreign.py changed."""
    import subprocess
    from tests.forge import foreign
    script = Path(foreign.__file__)
    outs = [Path(forge_dir) / "models" / "Stable-diffusion" / f"{n}.safetensors" for n in foreign.KINDS.values()]
    if all(o.is_file() and o.stat().st_mtime >= script.stat().st_mtime for o in outs):
        return "up to date"
    r = subprocess.run([python, str(script), str(forge_dir)], cwd=forge_dir, capture_output=True, text=True,
                       timeout=600, env=dict(__import__("os").environ, CUDA_VISIBLE_DEVICES=""))
    if r.returncode:
        return f"foreign checkpoints failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout


def write_support_extension(forge_dir: Path) -> Path:
    ext = Path(forge_dir) / "extensions" / NAME
    (ext / "scripts").mkdir(parents=True, exist_ok=True)
    (ext / "scripts" / "bdm_forge_test_support.py").write_text(SCRIPT, encoding="utf-8")
    return ext


def write_inpainting_checkpoint(forge_dir: Path) -> Path:
    """The toy backbone with 5 more input channels (small random weights): what Forge loads as an SD1
    inpainting model of the toy family."""
    import torch
    from safetensors.torch import load_file, save_file
    sd_dir = Path(forge_dir) / "models" / "Stable-diffusion"
    src, out = sd_dir / "bdm-toy-sd1.safetensors", sd_dir / f"{INPAINTING}.safetensors"
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    sd = load_file(str(src))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = sd[key]
    g = torch.Generator().manual_seed(4)
    sd[key] = torch.cat([w, 0.05 * torch.randn((w.shape[0], 5, *w.shape[2:]), generator=g)], dim=1)
    save_file(sd, str(out))
    return out
