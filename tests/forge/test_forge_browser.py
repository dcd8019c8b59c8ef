"""What a person meets in Forge's gradio-4 page, in a real headless Chromium (Debian packages chromium
and chromium-driver; `pip install selenium`) — the same as in AUTOMATIC1111
(tests/webui/test_webui_browser.py): the Chinese boxes under the English prompts and BDM's controls
beside them, above the image canvas, in txt2img and img2img; the model chosen from the start; typing
Chinese switches BDM on; the token counter turns red and a cut prompt is reported under the image;
Ctrl+Enter in a Chinese box generates with BDM; a failure shows Forge's error box, "continue without BDM"
a highlighted warning under the image; without any BDM model, the box says where to put one. Screenshots go to
docs/screenshots/forge-*.png."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from bdm.webui.session import CONTINUE, FAILURE_CHOICES, STOP
from tests.forge.conftest import BASE, TOY
from tests.host_util import Page, chromium, wait_for
from tests.webui.models import WRONG_MODEL

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PREFIX = "forge-"
PROMPT = "[红色的圆形:蓝色的三角形:0.5]"  # with prompt editing
NEGATIVE = "模糊"
LONG = "红色的圆形" * 60  # 300 tokens: more than the 250 the encoder takes


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def _prepare(forge):
    forge.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP], "bdm_default_model": "None"})
    # the last model used decides what the dropdown shows on load
    forge.txt2img(**dict(BASE, batch_size=1, steps=1), alwayson_scripts={"BDM": {"args": [True, TOY, 1.0, "红", ""]}})
    return next(m["title"] for m in forge.get("/bdm/models")["models"] if m["name"] == TOY)


def test_the_chinese_prompt_in_forge(forge, browser):
    title = _prepare(forge)
    page = Page(browser, forge.url, SHOTS, PREFIX)
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
        if tab == "img2img":
            page.shot("img2img.png")
    # the model is the last one used, not "None"; BDM is off until asked for
    assert page.one("#bdm_txt2img_model input").get_attribute("value") == title
    assert not page.enabled().is_selected()
    page.small_settings()
    # typing Chinese switches BDM on
    page.type("#bdm_txt2img_cn_prompt textarea", LONG)
    wait_for(lambda: page.enabled().is_selected(), 10, what="BDM switched on by typing")

    def counter():  # the span is replaced at each count
        return page.one("#bdm_txt2img_cn_prompt_token_counter span")

    wait_for(lambda: counter().text.strip() == "300/250", 30, what="the counter to show 300/250",
             seen=lambda: counter().get_attribute("outerHTML"))
    assert "bdm-over" in counter().get_attribute("class")
    red, green, blue = [int(float(v)) for v in page.d.execute_script(
        "return getComputedStyle(arguments[0]).color", counter()).split("(")[1].split(")")[0].split(",")[:3]]
    assert red > 150 and green < 80 and blue < 80, (red, green, blue)
    # a cut prompt is reported under the image, like the WebUI's own English warning
    page.generate()
    log = page.one("#html_log_txt2img").text
    assert "Warning: too many input tokens in the BDM Chinese prompt; some (50) have been truncated" in log, log
    # the normal case: Ctrl+Enter in the Chinese box, the image and the BDM fields
    page.type("#bdm_txt2img_cn_prompt textarea", PROMPT)
    page.type("#bdm_txt2img_cn_neg_prompt textarea", NEGATIVE)
    wait_for(lambda: counter().text.strip().endswith("/50"), 30, what="the counter")
    assert "bdm-over" not in counter().get_attribute("class")
    page.generate()
    assert page.css("#txt2img_gallery img"), "no image"
    info = page.one("#html_info_txt2img").text
    for field in (f"BDM model: {TOY}", f'BDM prompt: "{PROMPT}"', f"BDM negative prompt: {NEGATIVE}",
                  "BDM strength: 1"):  # (a value with ":" is quoted)
        assert field in info, info
    assert not page.css("#html_log_txt2img .error")
    page.shot("txt2img.png")


def test_a_failure_shows_the_error_and_continue_shows_a_warning(forge, browser):
    _prepare(forge)
    page = Page(browser, forge.url, SHOTS, PREFIX)
    page.small_settings()
    page.type("#bdm_txt2img_cn_prompt textarea", "红色的圆形")
    wait_for(lambda: page.enabled().is_selected(), 10, what="BDM switched on by typing")
    page.choose_model(WRONG_MODEL)
    assert page.one("#bdm_txt2img_model input").get_attribute("value").startswith(WRONG_MODEL)
    page.generate()
    errors = page.css("#html_log_txt2img .error")
    assert errors, page.one("#html_log_txt2img").text
    text = errors[0].text
    assert text.startswith(f"BdmError: cannot load the BDM model '{WRONG_MODEL}' "
                           f"(models/bdm/{WRONG_MODEL}.safetensors)"), text
    assert "this is a LoRA, not a BDM file" in text
    page.shot("error.png")
    forge.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[CONTINUE]})
    try:
        page.generate()
        comments = page.one("#html_log_txt2img .comments")
        assert f"BDM was not applied: cannot load the BDM model '{WRONG_MODEL}'" in comments.text, comments.text
        assert "bdm-warning" in comments.get_attribute("class")  # highlighted, not a grey line
        # (no corner notification in Forge: it generates on its own thread, outside gradio's request,
        # where gr.Warning cannot reach the page)
        assert page.css("#txt2img_gallery img")
        assert "BDM error:" in page.one("#html_info_txt2img").text
        page.shot("continue-warning.png")
    finally:
        forge.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP]})
    # switched off by hand: the box says its text is not used
    page.enabled().click()
    note = wait_for(lambda: [n for n in page.css("#bdm_txt2img_cn_prompt_container .bdm-off-note") if n.is_displayed()],
                    10, what="the off note")
    assert "BDM is off" in note[0].text


def test_no_model_installed_says_where_to_get_one(bare_forge, browser):
    page = Page(browser, bare_forge.url, SHOTS, PREFIX)
    hint = page.one("#bdm_txt2img_no_models").text
    for part in ("models/bdm", "qihoo360/BDM1.0", "OFA-Sys/chinese-clip-vit-huge-patch14", "python -m bdm.convert"):
        assert part in hint, hint
    assert page.y("bdm_txt2img_no_models")[1] < page.y("txt2img_gallery")[1]
    page.shot("no-models.png")
