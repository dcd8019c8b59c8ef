"""BDM with the **stock** sd-webui-controlnet extension on SD1.5's architecture (issue 21 §4): what users
run. The stock extension builds every SD1 ControlNet with SD1.5's block layout, so this uses random fp16
files of exactly that layout (tests/webui/models.py `make_sd15_world`, built once into the WebUI's models
folders): an SD1.5-architecture checkpoint, an SD1.5 ControlNet, a BDM branch for that UNet. The WebUI
runs with no support shim: the harness's tiny-controlnet-patch and the test-support extension are
disabled in its settings. 64×64, a few steps on a CPU."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.host_util import hint, mean_diff, same, stop_server
from tests.webui.conftest import BASE, DEFAULT_OPTS, start_server
from tests.webui.models import SD15_BDM, SD15_CHECKPOINT, SD15_CONTROLNET, make_sd15_world

SHIMS = ["tiny-controlnet-patch", "bdm-test-support"]
PROMPT = "红色的圆形，蓝色的背景"


@pytest.fixture(scope="module")
def stock(webui):
    make_sd15_world(webui.dir)
    settings = Path("/tmp/bdm-webui-stock-config.json")
    config = json.loads((webui.dir / "config.json").read_text())
    config.update(disabled_extensions=SHIMS, sd_model_checkpoint=f"{SD15_CHECKPOINT}.safetensors")
    settings.write_text(json.dumps(config))
    log = Path("/tmp/bdm-webui-stock.log")
    server = start_server(webui.dir, ["--ckpt", f"models/Stable-diffusion/{SD15_CHECKPOINT}.safetensors"],
                          log_path=log, settings_file=settings, skip_install=True)
    try:
        yield server
    finally:
        stop_server(server)
        shutil.copyfile(log, "/tmp/bdm-webui-stock.last.log")


def _generate(server, scripts=None, **kw):
    server.post("/sdapi/v1/options", DEFAULT_OPTS)
    payload = dict(BASE, steps=3, batch_size=1, **kw)
    if scripts:
        payload["alwayson_scripts"] = scripts
    return server.post("/sdapi/v1/txt2img", payload)


def test_bdm_and_the_stock_controlnet_on_sd15(stock):
    text = stock.log.read_text(errors="replace")
    assert "tiny-controlnet-patch" not in text and "bdm-test-support" not in text, "a support shim is active"
    current = stock.get("/sdapi/v1/options")["sd_model_checkpoint"]
    assert current.startswith(SD15_CHECKPOINT), current
    title = next(m for m in stock.get("/controlnet/model_list")["model_list"] if m.split(" [")[0] == SD15_CONTROLNET)
    unit = {"enabled": True, "module": "none", "model": title, "weight": 1.0, "image": hint(4, False),
            "resize_mode": "Just Resize", "control_mode": "Balanced", "processor_res": 64, "pixel_perfect": False}
    controlnet = {"controlnet": {"args": [unit]}}

    def with_bdm(strength):
        return {"BDM": {"args": [True, SD15_BDM, strength, PROMPT, ""]}}

    plain = _generate(stock)
    cn = _generate(stock, controlnet)
    assert len(cn["images"]) == 2, "ControlNet did not run: no control map came back (it failed to load?)"
    assert "ControlNet 0" in json.loads(cn["info"])["infotexts"][0]
    assert mean_diff(cn, plain, 1) > 0.5, "the ControlNet had no effect"
    alone = _generate(stock, with_bdm(1.0))
    both = _generate(stock, {**controlnet, **with_bdm(1.0)})
    assert len(both["images"]) == 2 and "BDM prompt" in json.loads(both["info"])["infotexts"][0]
    assert mean_diff(alone, plain, 1) > 0.5, "BDM had no effect"
    assert mean_diff(both, cn, 1) > 0.5, "BDM had no effect together with ControlNet"
    assert mean_diff(both, alone, 1) > 0.5, "ControlNet had no effect together with BDM"
    zero = _generate(stock, {**controlnet, **with_bdm(0.0)})
    assert same(zero, cn), "BDM at strength 0 with ControlNet differs from ControlNet alone"
    assert same(_generate(stock, controlnet), cn) and same(_generate(stock), plain)  # nothing left behind
    text = stock.log.read_text(errors="replace")
    assert "Recognizing Control Model failed" not in text and "Error running" not in text, text[-3000:]
