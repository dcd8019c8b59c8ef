"""Shared pieces of the compatibility suites: which models to use (the trained toy models when
`python -m bdm.toy export-webui A1111_DIR` has run, else the synthetic test models), control images,
the toy judge, and request helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tests.host_util import ToyJudge, hint
from tests.webui.conftest import BASE, DEFAULT_OPTS
from tests.webui.models import FT_CHECKPOINT, TEST_MODEL, TEST_MODEL_2, TI_NAME, have_toy


@dataclass
class World:
    toy: bool
    checkpoint: str  # file stem
    ft_checkpoint: str
    bdm: str
    bdm2: str
    lora: str
    trigger: str
    ti: str
    controlnet: str = ""  # the ControlNet extension's model title, filled from /controlnet/model_list
    prompts: list = field(default_factory=list)  # (Chinese prompt, attributes) pairs
    steps: int = 4
    judge: object = None
    lora_weight: float = 1.0  # the random tiny LoRA overflows to NaN at 1.0 even without BDM: 0.8

    @property
    def lora_prompt(self) -> str:
        return f"<lora:{self.lora}:{self.lora_weight:g}> {self.trigger}".strip()

    def bdm_args(self, prompt=None, **kw) -> dict:
        """`alwayson_scripts` for BDM: the WebUI's positional `args` list."""
        args = {"enabled": True, "model": self.bdm, "strength": 1.0,
                "prompt": self.prompts[0][0] if prompt is None else prompt, "negative_prompt": ""}
        args.update(kw)
        return {"BDM": {"args": [args[k] for k in ("enabled", "model", "strength", "prompt", "negative_prompt")]}}


def make_world(a1111: Path) -> World:
    if have_toy(a1111):
        from bdm.toy import domain as D
        prompts = [(D.chinese_caption(D.Spec(c, s, 4, "large"), D.held_out_templates("zh")[0]), {"colour": c, "shape": s})
                   for c, s in (("red", "circle"), ("blue", "triangle"), ("green", "square"), ("yellow", "circle"))]
        return World(True, "bdm-toy-sd1", "bdm-toy-sd1-outline", "bdm-toy", "bdm-toy", "bdm-toy-striped",
                     D.LORA_TRIGGER, "bdm-toy-smallthing", prompts=prompts, steps=12, judge=ToyJudge())
    prompts = [("红色的圆形，蓝色的背景", {}), ("一只黄色的猫", {}), ("绿色的三角形", {}), ("车水马龙的街道", {})]
    return World(False, "tiny-sd1", FT_CHECKPOINT, TEST_MODEL, TEST_MODEL_2, "tinylora", "", TI_NAME,
                 prompts=prompts, lora_weight=0.8)


def controlnet_unit(world: World, position: int, weight: float = 1.0) -> dict:
    return {"enabled": True, "module": "none", "model": world.controlnet, "weight": weight,
            "image": hint(position, world.toy), "resize_mode": "Just Resize", "control_mode": "Balanced",
            "processor_res": 64, "pixel_perfect": False}


def probe_state(webui) -> dict:
    """Diagnostics of the test-only probe extension (tests/webui/support/bdm_test_probe.py)."""
    return webui.get("/bdm-test/state")


def payload(world: World, scripts: dict | None = None, **kw) -> dict:
    p = dict(BASE, steps=world.steps)
    p.update(kw)
    if scripts:
        p["alwayson_scripts"] = scripts
    return p


def generate(webui, world: World, scripts: dict | None = None, route: str = "txt2img", **kw):
    webui.post("/sdapi/v1/options", DEFAULT_OPTS)
    return webui.post(f"/sdapi/v1/{route}", payload(world, scripts, **kw))
