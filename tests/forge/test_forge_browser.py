"""What a person meets in Forge's gradio-4 page, in a real headless Chromium (Debian packages chromium
and chromium-driver; `pip install selenium`) — the same as in AUTOMATIC1111
(tests/webui/test_webui_browser.py): the Chinese boxes under the English prompts and BDM's controls
beside them, above the image canvas, in txt2img and img2img; the model chosen from the start; typing
Chinese switches BDM on; the token counter turns red and a cut prompt is reported under the image;
Ctrl+Enter in a Chinese box generates with BDM; a failure shows Forge's error box, "continue without BDM"
a highlighted warning under the image; without any BDM model, the box says where to put one. Screenshots (forge-*.png) go to
$BDM_SCREENSHOTS (docs/screenshots/ to refresh the docs' pictures). The checks are shared with the A1111 suite (tests/host_checks.py)."""
from __future__ import annotations

import pytest

from bdm.webui.session import FAILURE_CHOICES, STOP
from tests.forge.conftest import BASE, TOY
from tests.host_checks import (check_failure_and_continue_in_the_page, check_no_models_hint, check_prompt_area,
                               check_typing_counter_and_generation)
from tests.host_util import Page, chromium, screenshot_dir
from tests.webui.models import WRONG_MODEL

SHOTS = screenshot_dir()
PREFIX = "forge-"
PROMPT = "[红色的圆形:蓝色的三角形:0.5]"  # with prompt editing
NEGATIVE = "模糊"


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
    check_prompt_area(page)
    check_typing_counter_and_generation(page, title, TOY, PROMPT, NEGATIVE)


def test_a_failure_shows_the_error_and_continue_shows_a_warning(forge, browser):
    """(No notification in the corner in Forge: it generates on its own thread, outside gradio's request,
    where gr.Warning cannot reach the page; the warning under the image is highlighted.)"""
    _prepare(forge)
    check_failure_and_continue_in_the_page(Page(browser, forge.url, SHOTS, PREFIX), forge, WRONG_MODEL,
                                           notification=False)


def test_no_model_installed_says_where_to_get_one(bare_forge, browser):
    check_no_models_hint(Page(browser, bare_forge.url, SHOTS, PREFIX))
