"""Shared pieces of the compatibility suites: which models to use (the trained toy models when
`python -m bdm.toy export-webui A1111_DIR` has run, else the synthetic test models), control images,
the toy judge, and request helpers."""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.webui.conftest import BASE, DEFAULT_OPTS, pixels
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


class ToyJudge:
    """The toy world's judge (bdm/toy/models.py `Judge`, weights bdm/toy/weights/bdm-toy-judge.safetensors)."""

    def __init__(self):
        import torch
        from bdm.formats.files import read_state_dict
        from bdm.toy import paths
        from bdm.toy.models import Judge
        self.torch = torch
        self.model = Judge()
        self.model.load_state_dict(read_state_dict(paths.judge_file()))
        self.model.eval()

    def __call__(self, response, n: int | None = None) -> dict:
        """Predicted attribute names per image (the first `n` images: results, not control maps)."""
        from bdm.toy import domain as D
        imgs = pixels(response)[:n]
        x = self.torch.from_numpy(np.stack(imgs)[..., :3]).permute(0, 3, 1, 2).float() / 127.5 - 1
        pred = self.model.predict(x)
        names = {"colour": D.COLOURS, "shape": D.SHAPES, "size": D.SIZES, "background": D.BACKGROUNDS,
                 "drawing": D.DRAWINGS}
        out = {k: [names[k][int(i)] for i in pred[k]] for k in names}
        out["position"] = [int(i) for i in pred["position"]]
        return out


def rate(values, target) -> float:
    return sum(v == target for v in values) / max(1, len(values))


def png_b64(array: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hint(position: int, toy: bool) -> str:
    """A control image: the toy's bounding-box hint for grid cell `position` (white filled box on
    black), drawn the same way for the synthetic ControlNet."""
    if toy:
        from bdm.toy import domain as D
        return png_b64(np.asarray(D.hint_for(position).convert("RGB")))
    a = np.zeros((64, 64, 3), np.uint8)
    r, c = divmod(position, 3)
    a[4 + 20 * r:20 + 20 * r, 4 + 20 * c:20 + 20 * c] = 255
    return png_b64(a)


def controlnet_unit(world: World, position: int, weight: float = 1.0) -> dict:
    return {"enabled": True, "module": "none", "model": world.controlnet, "weight": weight,
            "image": hint(position, world.toy), "resize_mode": "Just Resize", "control_mode": "Balanced",
            "processor_res": 64, "pixel_perfect": False}


def same(a, b, n: int | None = None) -> bool:
    pa, pb = pixels(a)[:n], pixels(b)[:n]
    return len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb))


def max_diff(a, b, n: int | None = None) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(pixels(a)[:n], pixels(b)[:n]))


def mean_diff(a, b, n: int | None = None) -> float:
    return min(float(np.abs(x.astype(int) - y.astype(int)).mean()) for x, y in zip(pixels(a)[:n], pixels(b)[:n]))


def info(r) -> dict:
    return json.loads(r["info"])


def bdm_error(r) -> str:
    return info(r)["extra_generation_params"].get("BDM error", "")


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
