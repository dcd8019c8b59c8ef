"""Test-only diagnostics for the integration tests, active only when the WebUI runs with the
environment variable `BDM_WEBUI_DEBUG=1` (never in normal use):
- `GET /bdm/debug/state`: the loaded branches' weight digests (LoRA must never touch them), how many of
  their modules carry the Lora extension's `network_layer_name`, hooks left on the UNet, open runs, and
  what the last BDM run saw (UNet calls, whether ControlNet's forward was installed);
- `POST /bdm/debug/arm {"action": "raise"|"interrupt"|"skip", "at_call": k}`: the next BDM generation
  raises inside the branch's hook / interrupts / skips at its k-th UNet call (one shot);
- `POST /bdm/debug/order {"bdm_first": true}`: attach the branch in `before_process`, i.e. before the
  ControlNet extension replaces the UNet's forward in its `process` (default: after it).
WebUI-independent: the script passes the WebUI's objects in.
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

ENV = "BDM_WEBUI_DEBUG"
ACTIONS = ("raise", "interrupt", "skip")


def enabled() -> bool:
    return os.environ.get(ENV, "").strip() not in ("", "0", "false", "False")


class InjectedFault(RuntimeError):
    """Raised on purpose inside the branch's hook (tests of the failure paths)."""


def digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def network_named_modules(module: nn.Module) -> int:
    """Modules that the built-in Lora extension would patch (it acts only on `network_layer_name`)."""
    return sum(1 for m in module.modules() if getattr(m, "network_layer_name", None) is not None)


def hook_counts(unet: nn.Module | None) -> dict:
    """Hooks on the UNet and its blocks (BDM's attachment adds 2 + 1 + len(output_blocks))."""
    if unet is None:
        return {}
    mods = [unet, getattr(unet, "middle_block", None), *list(getattr(unet, "output_blocks", []))]
    return {"forward_pre": sum(len(m._forward_pre_hooks) for m in mods if m is not None),
            "forward": sum(len(m._forward_hooks) for m in mods if m is not None),
            "forward_replaced": "forward" in vars(unet)}


class Faults:
    """One-shot faults armed over HTTP and consumed by the next BDM generation."""

    def __init__(self):
        self.armed: tuple[str, int] | None = None
        self.bdm_first = False
        self.last: dict = {}
        self.started = 0  # BDM runs started (tests wait for the next one)

    def arm(self, action: str, at_call: int = 1) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        self.armed = (action, max(1, int(at_call)))

    def install(self, run, unet_getter, interrupt, skip) -> None:
        """Give `run` an `on_unet_call` that records diagnostics and fires the armed fault."""
        fault, self.armed = self.armed, None
        self.started += 1
        last = self.last = {"unet_calls": 0, "forward_replaced": [], "fault": fault and list(fault),
                            "attached_over": []}

        def on_call(n: int) -> None:
            last["unet_calls"] = n
            unet = unet_getter()
            replaced = bool(unet is not None and "forward" in vars(unet))
            if replaced not in last["forward_replaced"]:
                last["forward_replaced"].append(replaced)
            if fault is not None and n == fault[1]:
                last["fired"] = fault[0]
                if fault[0] == "raise":
                    raise InjectedFault(f"BDM test fault at UNet call {n}")
                (interrupt if fault[0] == "interrupt" else skip)()
        run.on_unet_call = on_call

    def note_attach(self, unet) -> None:
        """Record whether the UNet's forward was already replaced (ControlNet hooked first) when the
        branch attached."""
        self.last.setdefault("attached_over", []).append(
            "replaced forward" if "forward" in vars(unet) else "original forward")
