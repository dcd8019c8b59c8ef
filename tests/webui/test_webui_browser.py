"""What a person meets in the real WebUI, in a real headless Chromium (Debian packages chromium and
chromium-driver; `pip install selenium`): the Chinese boxes and BDM's controls in the prompt area of
txt2img and img2img, above the image canvas; the model chosen from the start; typing Chinese switches
BDM on; the token counter turns red and a cut prompt is reported under the image; generating shows the
image and the BDM fields; a failure shows the WebUI's error box, "continue without BDM" a visible
warning; without any BDM model, the box says where to put one. Screenshots go to docs/screenshots/."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from bdm.webui.session import CONTINUE, FAILURE_CHOICES, STOP
from tests.host_util import Page, chromium, wait_for
from tests.webui.conftest import BASE, DEFAULT_OPTS
from tests.webui.models import TEST_MODEL, WRONG_MODEL

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PROMPT = "车水马龙的街道，[红色:蓝色:0.5]的灯笼"  # with prompt editing: red lanterns, blue from halfway
NEGATIVE = "模糊，低质量"
LONG = "红色的圆形" * 60  # 300 tokens: more than the 250 the encoder takes


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def _prepare(webui):
    webui.post("/sdapi/v1/options", dict(DEFAULT_OPTS, bdm_on_failure=FAILURE_CHOICES[STOP], bdm_default_model="None"))
    # the last model used decides what the dropdown shows on load
    webui.txt2img(**dict(BASE, batch_size=1, steps=1), alwayson_scripts={"BDM": {"args": [True, TEST_MODEL, 1.0, "红", ""]}})
    return next(m["title"] for m in webui.get("/bdm/models")["models"] if m["name"] == TEST_MODEL)


def test_the_chinese_prompt_in_the_webui(webui, browser):
    title = _prepare(webui)
    page = Page(browser, webui.url, SHOTS)
    # where things are: Chinese boxes under the English ones, BDM's controls above the image canvas
    for tab, canvas in (("img2img", "img2img_image"), ("txt2img", "txt2img_gallery")):
        page.d.execute_script(f"switch_to_{tab}()")
        time.sleep(1)
        y = {k: page.y(k) for k in (f"{tab}_prompt", f"bdm_{tab}_cn_prompt", f"{tab}_neg_prompt",
                                     f"bdm_{tab}_cn_neg_prompt")}
        assert y[f"{tab}_prompt"][0] < y[f"bdm_{tab}_cn_prompt"][0] < y[f"{tab}_neg_prompt"][0] \
            < y[f"bdm_{tab}_cn_neg_prompt"][0], y
        for elem in (f"bdm_{tab}_enabled", f"bdm_{tab}_model", f"bdm_{tab}_strength"):
            # above the end of the image canvas: reachable without scrolling past it
            assert 0 < page.y(elem)[1] < page.y(canvas)[1], (elem, page.y(elem), canvas, page.y(canvas))
        if tab == "txt2img":  # in the prompt area, not under the generation settings
            assert page.y("bdm_txt2img_strength")[1] < page.y("txt2img_settings")[1]
        else:
            page.shot("img2img.png")
    # the model is the last one used, not "None"; BDM is off until asked for
    assert page.one("#bdm_txt2img_model input").get_attribute("value") == title
    assert not page.enabled().is_selected()
    page.small_settings()
    page.type("#txt2img_prompt textarea", "masterpiece, best quality")
    # typing Chinese switches BDM on
    page.type("#bdm_txt2img_cn_prompt textarea", LONG)
    wait_for(lambda: page.enabled().is_selected(), 10, what="BDM switched on by typing")
    # the counter goes red over the limit (one class attribute, the over-limit class applied)
    def counter():  # the span is replaced at each count
        return page.one("#bdm_txt2img_cn_prompt_token_counter span")

    wait_for(lambda: counter().text.strip() == "300/250", 30, what="the counter to show 300/250",
             seen=lambda: counter().get_attribute("outerHTML"))
    assert "bdm-over" in counter().get_attribute("class")
    red, green, blue = [int(float(v)) for v in page.d.execute_script(
        "return getComputedStyle(arguments[0]).color", counter()).split("(")[1].split(")")[0].split(",")[:3]]
    assert red > 150 and green < 80 and blue < 80, (red, green, blue)
    page.shot("counter-over-limit.png")
    # a cut prompt is reported under the image, like the WebUI's own English warning
    page.generate()
    log = page.one("#html_log_txt2img").text
    assert "Warning: too many input tokens in the BDM Chinese prompt; some (50) have been truncated" in log, log
    # the normal case: image and BDM fields
    page.type("#bdm_txt2img_cn_prompt textarea", PROMPT)
    page.type("#bdm_txt2img_cn_neg_prompt textarea", NEGATIVE)
    wait_for(lambda: counter().text.strip().endswith("/50"), 30, what="the counter")
    assert "bdm-over" not in counter().get_attribute("class")
    page.generate()
    assert page.css("#txt2img_gallery img"), "no image"
    info = page.one("#html_info_txt2img").text
    for field in (f"BDM model: {TEST_MODEL}", f'BDM prompt: "{PROMPT}"', f"BDM negative prompt: {NEGATIVE}",
                  "BDM strength: 1"):  # (the WebUI quotes a value with ":")
        assert field in info, info
    assert not page.css("#html_log_txt2img .error")
    page.shot("txt2img.png")


def test_a_failure_shows_the_error_and_continue_shows_a_warning(webui, browser):
    _prepare(webui)
    page = Page(browser, webui.url, SHOTS)
    page.small_settings()
    page.type("#bdm_txt2img_cn_prompt textarea", PROMPT)
    wait_for(lambda: page.enabled().is_selected(), 10, what="BDM switched on by typing")
    page.choose_model(WRONG_MODEL)
    assert page.one("#bdm_txt2img_model input").get_attribute("value").startswith(WRONG_MODEL)
    page.generate()
    errors = page.css("#html_log_txt2img .error")
    assert errors, page.one("#html_log_txt2img").text
    text = errors[0].text
    assert text.startswith("BdmError: cannot load the BDM model 'wrong-bdm' (models/bdm/wrong-bdm.safetensors)"), text
    assert "this is a LoRA, not a BDM file" in text
    page.shot("error.png")
    webui.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[CONTINUE]})
    try:
        page.generate()
        comments = page.one("#html_log_txt2img .comments")
        assert "BDM was not applied: cannot load the BDM model 'wrong-bdm'" in comments.text, comments.text
        assert "bdm-warning" in comments.get_attribute("class")  # highlighted, not a grey line
        toasts = page.css(".toast-body")
        assert any("BDM was not applied" in t.text for t in toasts), [t.text for t in toasts]
        assert page.css("#txt2img_gallery img")
        assert "BDM error:" in page.one("#html_info_txt2img").text
        page.shot("continue-warning.png")
    finally:
        webui.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP]})
    # switched off by hand: the box says its text is not used
    page.enabled().click()
    note = wait_for(lambda: [n for n in page.css("#bdm_txt2img_cn_prompt_container .bdm-off-note") if n.is_displayed()],
                    10, what="the off note")
    assert "BDM is off" in note[0].text


def test_no_model_installed_says_where_to_get_one(bare_webui, browser):
    page = Page(browser, bare_webui.url, SHOTS)
    hint = page.one("#bdm_txt2img_no_models").text
    for part in ("models/bdm", "qihoo360/BDM1.0", "OFA-Sys/chinese-clip-vit-huge-patch14", "python -m bdm.convert"):
        assert part in hint, hint
    assert page.y("bdm_txt2img_no_models")[1] < page.y("txt2img_gallery")[1]
    page.shot("no-models.png")
