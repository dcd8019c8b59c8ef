"""What a person meets in the real WebUI, in a real headless Chromium (Debian packages chromium and
chromium-driver; `pip install selenium`): the Chinese boxes and BDM's controls in the prompt area of
txt2img and img2img, above the image canvas; the model chosen from the start; typing Chinese switches
BDM on; the token counter turns red and a cut prompt is reported under the image; generating shows the
image and the BDM fields; a failure shows the WebUI's error box, "continue without BDM" a visible
warning; without any BDM model, the box says where to put one. Screenshots go to docs/screenshots/."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from bdm.webui.session import CONTINUE, FAILURE_CHOICES, STOP
from tests.host_util import chromium_paths
from tests.webui.conftest import BASE, DEFAULT_OPTS
from tests.webui.models import TEST_MODEL, WRONG_MODEL

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PROMPT = "车水马龙的街道，[红色:蓝色:0.5]的灯笼"  # with prompt editing: red lanterns, blue from halfway
NEGATIVE = "模糊，低质量"
LONG = "红色的圆形" * 60  # 300 tokens: more than the 250 the encoder takes


def wait_for(condition, timeout=120.0, every=0.5, what="condition", seen=None):
    """`condition()` once true; `seen()` says what was there instead when it never is."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f"; found {seen()!r}" if seen else ""))


@pytest.fixture(scope="module")
def browser():
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
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='bdm-chromium-')}", "--window-size=1280,1400",
                 "--lang=zh-CN"):
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        yield d
    finally:
        d.quit()


class Page:
    """The WebUI in the browser, with the few moves a user makes."""

    def __init__(self, d, url):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.d, self.By, self.Keys = d, By, Keys
        d.get(url)
        wait_for(lambda: self.css("#bdm_txt2img_cn_prompt_container.bdm-placed"), what="the UI, with the boxes placed")
        time.sleep(2)  # the load events (the model dropdown's value) and the token counters

    def css(self, selector):
        return self.d.find_elements(self.By.CSS_SELECTOR, selector)

    def one(self, selector):
        return self.d.find_element(self.By.CSS_SELECTOR, selector)

    def y(self, elem_id):
        r = self.d.find_element(self.By.ID, elem_id).rect
        return r["y"], r["y"] + r["height"]

    def type(self, selector, text, clear=True):
        box = self.one(selector)
        if clear:
            box.click()
            box.send_keys(self.Keys.CONTROL, "a")
            box.send_keys(self.Keys.DELETE)
        box.send_keys(text)
        return box

    def small_settings(self, tab="txt2img"):
        for elem, value in ((f"{tab}_width", "64"), (f"{tab}_height", "64"), (f"{tab}_steps", "4")):
            self.type(f"#{elem} input[type=number]", value).send_keys(self.Keys.TAB)

    def enabled(self, tab="txt2img"):
        return self.one(f"#bdm_{tab}_enabled input[type=checkbox]")

    def choose_model(self, title):
        box = self.type("#bdm_txt2img_model input", title)
        time.sleep(0.5)
        box.send_keys(self.Keys.ENTER)
        box.send_keys(self.Keys.TAB)

    def generate(self):
        """Ctrl+Enter in the Chinese box; returns when the new result (image or error) is shown: the
        WebUI shows its Interrupt button while it generates, and then the new log under the image."""
        from selenium.webdriver.common.action_chains import ActionChains
        log = lambda: self.one("#html_log_txt2img").get_attribute("innerHTML")  # noqa: E731
        busy = lambda: self.one("#txt2img_interrupt").is_displayed()  # noqa: E731
        before = log()
        self.one("#bdm_txt2img_cn_prompt textarea").click()
        ActionChains(self.d).key_down(self.Keys.CONTROL).send_keys(self.Keys.ENTER).key_up(self.Keys.CONTROL).perform()
        wait_for(busy, 30, 0.05, what="the generation to start")
        wait_for(lambda: not busy() and log() != before and "Time taken" in self.one("#html_log_txt2img").text,
                 timeout=300, what="the generation to end")
        time.sleep(1)

    def shot(self, name):
        from PIL import Image
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        self.d.execute_script("window.scrollTo(0, 0)")
        self.d.save_screenshot(str(path))
        Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)  # a small PNG for docs/
        return path


def _prepare(webui):
    webui.post("/sdapi/v1/options", dict(DEFAULT_OPTS, bdm_on_failure=FAILURE_CHOICES[STOP], bdm_default_model="None"))
    # the last model used decides what the dropdown shows on load
    webui.txt2img(**dict(BASE, batch_size=1, steps=1), alwayson_scripts={"BDM": {"args": [True, TEST_MODEL, 1.0, "红", ""]}})
    return next(m["title"] for m in webui.get("/bdm/models")["models"] if m["name"] == TEST_MODEL)


def test_the_chinese_prompt_in_the_webui(webui, browser):
    title = _prepare(webui)
    page = Page(browser, webui.url)
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
    page = Page(browser, webui.url)
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
    page = Page(browser, bare_webui.url)
    hint = page.one("#bdm_txt2img_no_models").text
    for part in ("models/bdm", "qihoo360/BDM1.0", "OFA-Sys/chinese-clip-vit-huge-patch14", "python -m bdm.convert"):
        assert part in hint, hint
    assert page.y("bdm_txt2img_no_models")[1] < page.y("txt2img_gallery")[1]
    page.shot("no-models.png")
