"""Test-only WebUI script (copied into `extensions/bdm-test-support/scripts/` by the BDM integration tests;
never part of the BDM extension): diagnostics and fault injection, reading only the BDM extension's
public state (`session` of scripts/bdm_script.py: its open runs, `BdmRun.unet_calls`, `attached`,
`ensure_attached`, the model manager's `loaded()`).

Routes (127.0.0.1 test servers only):
- `GET /bdm-test/state`: the loaded branches' weight digests (LoRA must never touch them) and how many
  of their modules carry the Lora extension's `network_layer_name`, hooks on the UNet, open BDM runs,
  and what the last BDM run saw (UNet calls with the branch, whether ControlNet's forward was in place
  then and when the branch was attached);
- `POST /bdm-test/arm {"action": "raise"|"interrupt"|"skip", "at_call": k}`: the next BDM generation
  raises inside its k-th UNet call with the branch (from a hook on the middle block, while the branch's
  residuals are set) / interrupts / skips there (one shot);
- `POST /bdm-test/order {"bdm_first": true}`: attach the branch in this script's `process`, which
  metadata.ini orders after BDM's and before ControlNet's, i.e. before ControlNet replaces the UNet's
  forward (by default BDM attaches at the first denoiser call, after ControlNet).
"""
import hashlib

import torch
from modules import script_callbacks, scripts, shared

ACTIONS = ("raise", "interrupt", "skip")
probe = {"armed": None, "bdm_first": False, "last": {}, "started": 0}
_current = {"run": None, "handles": []}


def bdm_session():
    for data in scripts.scripts_data:
        if data.script_class.__name__ == "BdmScript":
            return data.module.session
    raise RuntimeError("the BDM extension's script is not loaded")


def current_unet():
    return getattr(getattr(shared.sd_model, "model", None), "diffusion_model", None)


def digest(module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hook_counts(unet) -> dict:
    if unet is None:
        return {}
    mods = [unet, getattr(unet, "middle_block", None), *list(getattr(unet, "output_blocks", []))]
    return {"forward_pre": sum(len(m._forward_pre_hooks) for m in mods if m is not None),
            "forward": sum(len(m._forward_hooks) for m in mods if m is not None),
            "forward_replaced": "forward" in vars(unet)}


def forward_state(unet) -> str:
    return "replaced forward" if "forward" in vars(unet) else "original forward"


def remove_hooks():
    for h in _current["handles"]:
        h.remove()
    _current["handles"] = []


def middle_hook(run, unet, fault, last):
    seen = {"calls": run.unet_calls}

    def hook(module, args, output):
        n = run.unet_calls
        if n == seen["calls"]:
            return  # the branch did not run in this UNet call
        seen["calls"] = n
        replaced = "forward" in vars(unet)
        if replaced not in last["forward_replaced"]:
            last["forward_replaced"].append(replaced)
        if fault is not None and n >= fault[1] and "fired" not in last:
            last["fired"] = fault[0]
            if fault[0] == "raise":
                raise RuntimeError(f"BDM test fault at UNet call {n}")
            (shared.state.interrupt if fault[0] == "interrupt" else shared.state.skip)()
    return hook


class ProbeScript(scripts.Script):
    def title(self):
        return "BDM test probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        remove_hooks()
        run = bdm_session().run_for(p)
        if run is None or run.bridge is None:
            return  # "last" keeps describing the last generation with BDM
        fault, probe["armed"] = probe["armed"], None
        last = {"forward_replaced": [], "attached_over": [], "fault": fault}
        _current["run"], probe["last"] = run, last
        probe["started"] += 1  # last: a poll that sees the new count sees the new run
        unet = current_unet()
        if probe["bdm_first"]:
            last["attached_over"].append(forward_state(unet))
            run.ensure_attached(unet)
        _current["handles"].append(unet.middle_block.register_forward_hook(middle_hook(run, unet, fault, last)))

    def postprocess(self, p, processed, *args):
        remove_hooks()


def on_cfg_denoiser(params):
    """After BDM's callback (metadata.ini): note the UNet's forward when the branch got attached."""
    run, last = _current["run"], probe["last"]
    if run is not None and run.attached and not last.get("attached_over"):
        last["attached_over"].append(forward_state(run.attachment.unet))


def state() -> dict:
    session = bdm_session()
    started = probe["started"]  # before the run: `process` sets the run, then counts it
    run = _current["run"]
    last = dict(probe["last"], unet_calls=run.unet_calls if run is not None else 0)
    bridges = [{"name": entry.name, "digest": digest(b), "encoder_digest": digest(b.text_encoder),
                "network_named_modules": sum(1 for m in b.modules() if getattr(m, "network_layer_name", None)),
                "dtype": str(next(b.parameters()).dtype), "device": str(next(b.parameters()).device)}
               for entry, b in session.manager.loaded()]
    return {"runs": session.open_runs(), "unet_hooks": hook_counts(current_unet()), "bridges": bridges,
            "last": last, "started": started, "bdm_first": probe["bdm_first"],
            "cache": {"size": len(session.cache), "hits": session.cache.hits, "misses": session.cache.misses}}


def on_app_started(demo, app):
    from fastapi import Body

    app.add_api_route("/bdm-test/state", state, methods=["GET"])

    def arm(body: dict = Body(...)):
        action = body.get("action", "raise")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        probe["armed"] = (action, max(1, int(body.get("at_call", 1))))
        return {"armed": list(probe["armed"])}

    def order(body: dict = Body(...)):
        probe["bdm_first"] = bool(body.get("bdm_first", False))
        return {"bdm_first": probe["bdm_first"]}

    app.add_api_route("/bdm-test/arm", arm, methods=["POST"])
    app.add_api_route("/bdm-test/order", order, methods=["POST"])


script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="bdm-test-probe")
script_callbacks.on_app_started(on_app_started, name="bdm-test-probe")
