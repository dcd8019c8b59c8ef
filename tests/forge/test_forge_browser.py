"""Forge's gradio-4 page in a real headless Chromium (Debian packages chromium and chromium-driver,
`pip install selenium`): the Chinese boxes sit under the English prompts in both tabs (moved there by
javascript/bdm.js), their counters count, Ctrl+Enter in a Chinese box generates with BDM, and the image's
parameters show the BDM fields. The screenshot goes to docs/screenshot-forge-txt2img.png."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from tests.host_util import chromium_paths

SHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot-forge-txt2img.png"
PROMPT = "红色的圆形"


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def page(forge):
    path, driver = chromium_paths()
    if not path or not driver:
        pytest.skip("headless Chromium is not installed (Debian packages chromium, chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='bdm-chromium-')}", "--window-size=1400,1100",
                 "--lang=zh-CN"):
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        d.get(forge.url)
        wait_for(lambda: d.find_elements("css selector", "#bdm_txt2img_cn_prompt_container.bdm-placed"),
                 what="the UI with the Chinese boxes placed")
        time.sleep(2)
        yield d
    finally:
        d.quit()


def _y(d, elem_id):
    return d.find_element("id", elem_id).rect["y"]


def test_boxes_under_the_english_prompts_in_both_tabs(page):
    for tab in ("img2img", "txt2img"):
        page.execute_script(f"switch_to_{tab}()")
        time.sleep(1)
        y = [_y(page, e) for e in (f"{tab}_prompt", f"bdm_{tab}_cn_prompt", f"{tab}_neg_prompt", f"bdm_{tab}_cn_neg_prompt")]
        assert y == sorted(y) and len(set(y)) == 4, (tab, y)


def test_counter_and_ctrl_enter_generate_with_bdm(forge, page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    def css(selector):
        return page.find_element("css selector", selector)

    for elem, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "8")):
        field = css(f"#{elem} input[type=number]")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(value, Keys.TAB)
    box = css("#bdm_txt2img_cn_prompt textarea")
    box.send_keys(PROMPT)
    counter = lambda: css("#bdm_txt2img_cn_prompt_token_counter").text.strip()  # noqa: E731
    wait_for(lambda: counter() == "5/50", 30, what=f"the counter to show 5/50 (shows {counter()!r})")
    css("#bdm_txt2img_enabled .label-wrap").click()  # opening the panel enables BDM
    # the model dropdown stays at "None": the generation takes the default model from Settings → BDM
    forge.post("/sdapi/v1/options", {"bdm_default_model": "bdm-toy"})
    try:
        box.click()
        ActionChains(page).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
        info = lambda: css("#html_info_txt2img").text  # noqa: E731
        wait_for(lambda: "Steps:" in info(), 300, what="the generation's parameters")
    finally:
        forge.post("/sdapi/v1/options", {"bdm_default_model": "None"})
    assert f"BDM prompt: {PROMPT}" in info() and "BDM model: bdm-toy" in info(), info()
    assert page.find_elements("css selector", "#txt2img_gallery img")
    page.execute_script("window.scrollTo(0, 0)")
    time.sleep(1)
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(SHOT))
    from PIL import Image
    Image.open(SHOT).convert("RGB").quantize(128).save(SHOT, optimize=True)  # a small PNG for docs/
    assert SHOT.stat().st_size > 10_000
