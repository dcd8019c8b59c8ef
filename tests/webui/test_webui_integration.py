"""BDM inside a real AUTOMATIC1111 WebUI (see conftest.py; needs A1111_DIR)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.webui.conftest import BASE, chromium_paths, pixels
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
    assert WRONG_MODEL in names  # listed; refused with a clear message when used


def test_script_is_registered_for_both_tabs(webui):
    scripts = webui.get("/sdapi/v1/scripts")
    assert "bdm" in scripts["txt2img"] and "bdm" in scripts["img2img"]
    infos = [s for s in webui.get("/sdapi/v1/script-info") if s["name"] == "bdm"]
    assert len(infos) == 2 and all(s["is_alwayson"] for s in infos)
    assert [a["label"] for a in infos[0]["args"]][1:] == ["BDM 模型 / BDM model", "强度 / Strength",
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
    assert same(webui.txt2img(**BASE, **bdm(OBJ)), on)  # "args": {...}
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


def test_wrong_model_file_gives_a_clear_error_and_serving_continues(webui):
    r = webui.txt2img(**BASE, **bdm([True, WRONG_MODEL, 1.0, PROMPT, ""]))
    error = info(r)["extra_generation_params"].get("BDM error", "")
    assert "wrong-bdm" in error and "not a BDM file" in error, error
    assert same(r, webui.baseline)  # the generation went on without BDM
    r = webui.txt2img(**BASE, **bdm([True, "no-such-model", 1.0, PROMPT, ""]))
    assert "no BDM model 'no-such-model'" in info(r)["extra_generation_params"]["BDM error"]
    r = webui.txt2img(**BASE, **bdm([{"promt": PROMPT}]))
    assert "unknown argument 'promt'" in info(r)["extra_generation_params"]["BDM error"]
    assert webui.alive()
    assert "this is a LoRA, not a BDM file" in webui.log.read_text()  # and in the console
    assert same(webui.txt2img(**BASE), webui.baseline)


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
    with_bdm = webui.post("/sdapi/v1/img2img", dict(i2i, **bdm(OBJ)))
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
        r = webui.txt2img(**dict(BASE, steps=20, batch_size=4, **bdm({"model": "bdm-toy", "prompt": "红色的圆形"})))
    finally:
        webui.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
    verdict = ToyJudge()(r, 4)
    assert sum(c == "red" for c in verdict["colour"]) >= 3, verdict


def test_screenshot_txt2img(webui):
    browser, driver = chromium_paths()
    if not browser or not driver:
        pytest.skip("headless Chromium is not installed (Debian packages chromium, chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
    except ImportError:
        pytest.skip("selenium is not installed")
    import tempfile
    from pathlib import Path
    out = Path(__file__).resolve().parents[2] / "docs" / "screenshot-txt2img.png"
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    profile = tempfile.mkdtemp(prefix="bdm-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,1000", "--lang=zh-CN"):
        opts.add_argument(flag)
    # the model dropdown stays at "None": the generation takes the default model from Settings → BDM
    webui.post("/sdapi/v1/options", {"bdm_default_model": TEST_MODEL})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        d.get(webui.url)
        deadline = time.time() + 120
        while time.time() < deadline and not d.find_elements(By.CSS_SELECTOR, "#bdm_txt2img_cn_prompt textarea"):
            time.sleep(1)
        time.sleep(3)  # onUiLoaded moves the boxes
        y = {k: d.find_element(By.ID, k).rect["y"] for k in
             ("txt2img_prompt", "bdm_txt2img_cn_prompt", "txt2img_neg_prompt", "bdm_txt2img_cn_neg_prompt")}
        assert y["txt2img_prompt"] < y["bdm_txt2img_cn_prompt"] < y["txt2img_neg_prompt"] \
            < y["bdm_txt2img_cn_neg_prompt"], y
        for elem, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "4")):
            field = d.find_element(By.CSS_SELECTOR, f"#{elem} input[type=number]")
            field.clear()
            field.send_keys(value, Keys.TAB)
        d.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea").send_keys("masterpiece, best quality")
        box = d.find_element(By.CSS_SELECTOR, "#bdm_txt2img_cn_prompt textarea")
        box.send_keys("车水马龙的街道，红色的灯笼")
        d.find_element(By.CSS_SELECTOR, "#bdm_txt2img_cn_neg_prompt textarea").send_keys("模糊，低质量")
        d.find_element(By.CSS_SELECTOR, "#bdm_txt2img_enabled .label-wrap").click()  # open = enable
        deadline = time.time() + 30
        counter = d.find_element(By.ID, "bdm_txt2img_cn_prompt_token_counter")
        while time.time() < deadline and counter.text.strip() in ("", "0/50"):
            time.sleep(0.5)
        from bdm.text.chinese import CHUNK_TOKENS
        from bdm.text.tokenizer import BertChineseTokenizer
        n = len(BertChineseTokenizer().encode("车水马龙的街道，红色的灯笼"))
        assert counter.text.strip() == f"{n}/{CHUNK_TOKENS}", counter.text
        from selenium.webdriver.common.action_chains import ActionChains
        box.click()
        ActionChains(d).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()  # generates
        deadline = time.time() + 120
        while time.time() < deadline and not d.find_elements(By.CSS_SELECTOR, "#txt2img_gallery img"):
            time.sleep(1)
        assert d.find_elements(By.CSS_SELECTOR, "#txt2img_gallery img"), "Ctrl+Enter did not generate"
        time.sleep(2)
        d.execute_script("window.scrollTo(0, 0)")
        out.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(out))
        gen_info = d.find_element(By.ID, "html_info_txt2img").text
        assert "BDM prompt: 车水马龙的街道，红色的灯笼" in gen_info, gen_info
    finally:
        d.quit()
        webui.post("/sdapi/v1/options", {"bdm_default_model": "None"})
    assert out.is_file() and out.stat().st_size > 10_000
