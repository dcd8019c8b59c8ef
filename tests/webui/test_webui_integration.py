"""BDM inside a real AUTOMATIC1111 WebUI (see conftest.py; needs A1111_DIR)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.webui.conftest import BASE, pixels
from tests.webui.models import TEST_MODEL, WRONG_MODEL

PROMPT = "红色的圆形，蓝色的背景"
OBJ = {"enabled": True, "prompt": PROMPT, "negative_prompt": "模糊", "model": TEST_MODEL, "strength": 1.0}
POSITIONAL = [True, TEST_MODEL, 1.0, PROMPT, "模糊"]


def bdm(args):
    return {"alwayson_scripts": {"BDM": {"args": args}}}


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


def info(r) -> dict:
    return json.loads(r["info"])


@pytest.fixture(scope="module")
def on(webui):
    return webui.txt2img(**BASE, **bdm(POSITIONAL))


def test_installer_ran_cleanly(webui):
    out = webui.installer_output
    assert "exit code 0" in out and "Error running install.py" not in out, out
    assert "Installing" not in out, f"install.py installed something into a complete venv:\n{out}"


def test_models_route(webui):
    models = webui.get("/bdm/models")
    names = {m["name"]: m for m in models["models"]}
    assert TEST_MODEL in names and names[TEST_MODEL]["kind"] == "bdm"
    assert names[TEST_MODEL]["title"] == f"{TEST_MODEL} [{names[TEST_MODEL]['hash']}]"
    assert len(names[TEST_MODEL]["hash"]) == 10
    assert names[TEST_MODEL]["file"] == f"models/bdm/{TEST_MODEL}.safetensors"
    assert WRONG_MODEL in names  # listed; refused with a clear message when used
    assert models["folders"] == ["models/bdm"]
    assert str(webui.dir) not in json.dumps(models) and "/root" not in json.dumps(models)  # no server paths


def test_script_is_registered_for_both_tabs(webui):
    scripts = webui.get("/sdapi/v1/scripts")
    assert "bdm" in scripts["txt2img"] and "bdm" in scripts["img2img"]
    infos = [s for s in webui.get("/sdapi/v1/script-info") if s["name"] == "bdm"]
    assert len(infos) == 2 and all(s["is_alwayson"] for s in infos)
    assert [a["label"] for a in infos[0]["args"]] == ["启用 BDM / Enable BDM", "BDM 模型 / BDM model", "强度 / Strength",
                                                           "中文提示词 / Chinese prompt",
                                                           "中文反向提示词 / Chinese negative prompt"]


def test_bdm_on_differs_from_off(webui, on):
    assert len(on["images"]) == 2
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(pixels(on), pixels(webui.baseline))]
    assert min(diffs) > 0.5, diffs


def test_infotext_has_bdm_fields(webui, on):
    text = info(on)["infotexts"][0]
    h = next(m["hash"] for m in webui.get("/bdm/models")["models"] if m["name"] == TEST_MODEL)
    for field in (f"BDM model: {TEST_MODEL}", f"BDM model hash: {h}", f"BDM prompt: {PROMPT}",
                  "BDM negative prompt: 模糊", "BDM strength: 1.0"):
        assert field in text, text


def test_png_info_parses_the_fields_back(webui, on):
    params = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + on["images"][0]})["parameters"]
    assert params["BDM model"] == TEST_MODEL and params["BDM prompt"] == PROMPT
    assert params["BDM negative prompt"] == "模糊" and float(params["BDM strength"]) == 1.0
    # a prompt the quoting must protect
    tricky = '"引号", (红色:1.2)\n第二行'
    r = webui.txt2img(**dict(BASE, batch_size=1), **bdm([True, TEST_MODEL, 0.5, tricky, ""]))
    params = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + r["images"][0]})["parameters"]
    assert params["BDM prompt"] == tricky and "BDM negative prompt" not in params


def test_api_infotext_restores_the_script_args(webui, on):
    """The API's `infotext` field fills the script's args from a parameters text (like pasting)."""
    text = info(on)["infotexts"][0]
    r = webui.txt2img(**dict(BASE, infotext=f"\n{text}"))
    assert same(r, on)


def test_json_object_and_positional_args_give_the_same_image(webui, on):
    assert same(webui.txt2img(**BASE, **bdm([OBJ])), on)  # "args": [{...}]
    full = {k: v for k, v in OBJ.items() if k != "enabled"}  # enabled by default in an object
    r = webui.txt2img(**BASE, **bdm([dict(full, model=f"{TEST_MODEL}.safetensors")]))
    assert same(r, on)


def test_next_request_without_bdm_is_bit_identical(webui, on):
    after = webui.txt2img(**BASE)
    assert same(after, webui.baseline)
    after = webui.txt2img(**BASE, **bdm([False, TEST_MODEL, 1.0, PROMPT, ""]))  # present but off
    assert same(after, webui.baseline)
    assert "BDM" not in info(after)["infotexts"][0]


def test_batch_cond_uncond_off_and_and_prompts(webui):
    """AND prompts with batch_cond_uncond off (UNet calls of B rows crossing cond/uncond) give the
    same image as one big call: every row gets its own Chinese context in both layouts."""
    payload = dict(BASE, prompt="a AND b :0.5", **bdm(POSITIONAL))
    one_call = webui.txt2img(**payload)
    webui.post("/sdapi/v1/options", {"batch_cond_uncond": False})
    try:
        chunks = webui.post("/sdapi/v1/txt2img", payload)
    finally:
        webui.post("/sdapi/v1/options", {"batch_cond_uncond": True})
    for a, b in zip(pixels(one_call), pixels(chunks)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_hires_img2img_and_ngms_run_with_bdm(webui):
    r = webui.txt2img(**BASE, enable_hr=True, hr_scale=2, hr_second_pass_steps=2, hr_upscaler="Latent",
                      denoising_strength=0.7, **bdm(POSITIONAL))
    assert len(r["images"]) == 2 and "BDM prompt" in info(r)["infotexts"][0]
    r = webui.txt2img(**BASE, s_min_uncond=100, **bdm(POSITIONAL))
    assert "NGMS" in info(r)["infotexts"][0] and "BDM prompt" in info(r)["infotexts"][0]
    i2i = dict(BASE, init_images=[webui.baseline["images"][0]], denoising_strength=0.6)
    off = webui.post("/sdapi/v1/img2img", i2i)
    with_bdm = webui.post("/sdapi/v1/img2img", dict(i2i, **bdm([OBJ])))
    assert not same(off, with_bdm) and "BDM prompt" in info(with_bdm)["infotexts"][0]
    assert "BDM: a UNet call outside" not in webui.log.read_text()


def test_toy_model_gives_the_requested_colour(webui):
    toy = webui.dir / "models" / "bdm" / "bdm-toy.safetensors"
    if not toy.is_file():
        pytest.skip(f"{toy} is absent: the trained toy model is written by "
                    "`python -m bdm.toy export-webui A1111_DIR` (not built yet)")
    from tests.webui.compat import ToyJudge
    ckpt = "bdm-toy-sd1"
    webui.post("/sdapi/v1/options", {"sd_model_checkpoint": ckpt})
    try:
        r = webui.txt2img(**dict(BASE, steps=20, batch_size=4, **bdm([{"model": "bdm-toy", "prompt": "红色的圆形"}])))
    finally:
        webui.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
    verdict = ToyJudge()(r, 4)
    assert sum(c == "red" for c in verdict["colour"]) >= 3, verdict
