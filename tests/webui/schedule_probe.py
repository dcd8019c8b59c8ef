"""A test-only WebUI script that records which Chinese context the BDM branch received at each sampling
step, written by the integration tests into `A1111_DIR/extensions/bdm-test-support/scripts/` (never part
of the BDM extension). It reads only the extension's public state: the branch of the generation's run
(`session.run_for(p).bridge` of scripts/bdm_script.py), watched with a forward pre-hook.

Routes (127.0.0.1 test servers only):
- `POST /bdm-test/schedule/reset`, `GET /bdm-test/schedule/calls`: per branch call, the pass (hires or
  not), the denoiser's step (`CFGDenoiser.step`, the step the WebUI picks English prompts at) and a
  sha256 of each row's Chinese context;
- `POST /bdm-test/schedule/encode {"texts": [...], "chunks": k}`: the same digest of each text encoded
  alone by the Chinese encoder of the last generation's branch (k chunks), as the extension encodes
  each prompt;
- `POST /bdm-test/schedule/parse {"prompts": [...], "steps": n, "hires_steps": m}`: the WebUI's own
  `prompt_parser` schedules (the expectations).
"""
from __future__ import annotations

from pathlib import Path

SCRIPT = '''"""Test-only (written by the BDM integration tests, tests/webui/schedule_probe.py): which Chinese context
the BDM branch received at each sampling step."""
import hashlib
import weakref

import torch
from modules import prompt_parser, script_callbacks, scripts

state = {"calls": [], "now": None, "bridge": None}
hooked = weakref.WeakSet()


def digest(t) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def on_bridge_call(module, args):
    if state["now"] is not None:
        hires, step = state["now"]
        state["calls"].append({"hires": hires, "step": step, "rows": [digest(r) for r in args[2]]})


def bdm_session():
    for data in scripts.scripts_data:
        if data.script_class.__name__ == "BdmScript":
            return data.module.session
    raise RuntimeError("the BDM extension's script is not loaded")


def on_cfg_denoiser(params):
    d = params.denoiser
    state["now"] = (bool(getattr(d.p, "is_hr_pass", False)), int(d.step))
    bridge = getattr(bdm_session().run_for(d.p), "bridge", None)
    if bridge is not None:
        state["bridge"] = bridge  # the branch of this generation
        if bridge not in hooked:
            bridge.register_forward_pre_hook(on_bridge_call)
            hooked.add(bridge)


def on_app_started(demo, app):
    from fastapi import Body

    @app.post("/bdm-test/schedule/reset")
    def reset():
        state["calls"].clear()
        state["now"] = None
        return {"ok": True}

    @app.get("/bdm-test/schedule/calls")
    def calls():
        return {"calls": state["calls"]}

    @app.post("/bdm-test/schedule/encode")
    def encode(body: dict = Body(...)):
        encoder = state["bridge"].text_encoder
        return {t: digest(encoder.encode([t], min_chunks=int(body.get("chunks", 1)))[0]) for t in body["texts"]}

    @app.post("/bdm-test/schedule/parse")
    def parse(body: dict = Body(...)):
        return prompt_parser.get_learned_conditioning_prompt_schedules(
            body["prompts"], int(body["steps"]), body.get("hires_steps"))


script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="bdm-test-schedule-probe")
script_callbacks.on_app_started(on_app_started, name="bdm-test-schedule-probe")
'''


def write(a1111: Path) -> Path:
    out = Path(a1111) / "extensions" / "bdm-test-support" / "scripts" / "bdm_test_schedule_probe.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(SCRIPT, encoding="utf-8")
    return out
