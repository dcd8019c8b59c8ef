"""What a person meets in the real WebUI, in a real headless Chromium (Debian packages chromium and
chromium-driver; `pip install selenium`): the Chinese boxes and BDM's controls in the prompt area of
txt2img and img2img, above the image canvas; the model chosen from the start; typing Chinese switches
BDM on; the token counter turns red and a cut prompt is reported under the image; generating shows the
image and the BDM fields; a failure shows the WebUI's error box, "continue without BDM" a visible
warning; without any BDM model, the box says where to put one. Screenshots go to
$BDM_SCREENSHOTS (docs/screenshots/ to refresh the docs' pictures). The
checks are shared with the Forge suite (tests/host_checks.py)."""
from __future__ import annotations

import pytest

from bdm.webui.session import FAILURE_CHOICES, STOP
from tests.host_checks import (check_failure_and_continue_in_the_page, check_no_models_hint, check_prompt_area,
                               check_typing_counter_and_generation)
from tests.host_util import Page, chromium, screenshot_dir
from tests.webui.conftest import BASE, DEFAULT_OPTS
from tests.webui.models import TEST_MODEL, WRONG_MODEL

SHOTS = screenshot_dir()
PROMPT = "车水马龙的街道，[红色:蓝色:0.5]的灯笼"  # with prompt editing: red lanterns, blue from halfway
NEGATIVE = "模糊，低质量"


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
    check_prompt_area(page)
    check_typing_counter_and_generation(page, title, TEST_MODEL, PROMPT, NEGATIVE)


def test_a_failure_shows_the_error_and_continue_shows_a_warning(webui, browser):
    _prepare(webui)
    check_failure_and_continue_in_the_page(Page(browser, webui.url, SHOTS), webui, WRONG_MODEL, notification=True)


def test_no_model_installed_says_where_to_get_one(bare_webui, browser):
    check_no_models_hint(Page(browser, bare_webui.url, SHOTS))
