"""The WebUI's prompt language in the Chinese box, inside a real AUTOMATIC1111 WebUI (needs A1111_DIR):
prompt editing and alternation are scheduled per sampling step by the WebUI's own parser in txt2img,
img2img and both hires passes; AND is refused with a visible message.

Which context the branch received at each step is read through the test-only script of
tests/webui/schedule_probe.py (digests of the context rows, compared with each text encoded alone);
the expected text per step comes from the WebUI's `prompt_parser` and its step rule."""
from __future__ import annotations

import json

from bdm.text.prompt_schedule import text_index_at
from tests.host_util import pixels
from tests.webui.conftest import BASE
from tests.webui.models import TEST_MODEL

A, B, NEG = "红色的圆形", "蓝色的方形", "模糊"
ONE = dict(BASE, batch_size=1)


def bdm(prompt: str, negative: str = "") -> dict:
    return {"alwayson_scripts": {"BDM": {"args": [True, TEST_MODEL, 1.0, prompt, negative]}}}


def same(a, b) -> bool:
    return all((x == y).all() for x, y in zip(pixels(a), pixels(b)))


def recorded(webui, endpoint: str, payload: dict):
    """(response, [(hires pass?, denoiser step, [text of each context row]), ...] per branch call)."""
    webui.post("/bdm-test/schedule/reset")
    if endpoint == "txt2img":
        r = webui.txt2img(**payload)
    else:
        r = webui.post(f"/sdapi/v1/{endpoint}", payload)
    calls = webui.get("/bdm-test/schedule/calls")["calls"]
    names = {v: k for k, v in webui.post("/bdm-test/schedule/encode", {"texts": [A, B, NEG, ""]}).items()}
    return r, [(c["hires"], c["step"], [names.get(h, "?") for h in c["rows"]]) for c in calls]


def webui_texts(webui, prompt: str, steps: int, at_steps, hires_steps=None) -> list[str]:
    """The text the WebUI schedules for `prompt` at each of `at_steps` (its parser, its step rule)."""
    schedule = webui.post("/bdm-test/schedule/parse", {"prompts": [prompt], "steps": steps,
                                                       "hires_steps": hires_steps})[0]
    return [schedule[text_index_at(schedule, s)][1] for s in at_steps]


def test_prompt_editing_in_txt2img_follows_the_webui_schedule(webui):
    prompt, negative = f"[{A}:{B}:0.25]", f"[{NEG}::2]"
    edited, calls = recorded(webui, "txt2img", dict(ONE, **bdm(prompt, negative)))
    assert [(h, s) for h, s, _ in calls] == [(False, 0), (False, 1), (False, 2), (False, 3)]
    cond = [rows[0] for _, _, rows in calls]
    uncond = [rows[1] for _, _, rows in calls]
    assert cond == webui_texts(webui, prompt, 4, range(4)) == [A, A, B, B]
    assert uncond == webui_texts(webui, negative, 4, range(4)) == [NEG, NEG, NEG, ""]
    only_a = webui.txt2img(**ONE, **bdm(A, negative))
    only_b = webui.txt2img(**ONE, **bdm(B, negative))
    assert not same(edited, only_a) and not same(edited, only_b)
    assert json.loads(edited["info"])["infotexts"][0].count(prompt) == 1  # the prompt as typed


def test_alternation_in_txt2img(webui):
    prompt = f"[{A}|{B}]"
    alternating, calls = recorded(webui, "txt2img", dict(ONE, **bdm(prompt)))
    assert [rows[0] for _, _, rows in calls] == webui_texts(webui, prompt, 4, range(4)) == [A, A, B, A]
    assert not same(alternating, webui.txt2img(**ONE, **bdm(A)))
    assert not same(alternating, webui.txt2img(**ONE, **bdm(B)))


def test_prompt_editing_in_img2img_counts_the_requested_steps(webui):
    """img2img at denoising 0.5 runs 5 of 8 steps, scheduled over the 8 steps (as the English prompt)."""
    prompt = f"[{A}:{B}:2]"
    i2i = dict(ONE, steps=8, init_images=[webui.baseline["images"][0]], denoising_strength=0.5)
    edited, calls = recorded(webui, "img2img", dict(i2i, **bdm(prompt)))
    assert [s for _, s, _ in calls] == [0, 1, 2, 3, 4]
    assert [rows[0] for _, _, rows in calls] == webui_texts(webui, prompt, 8, range(5)) == [A, A, A, B, B]
    assert not same(edited, webui.post("/sdapi/v1/img2img", dict(i2i, **bdm(A))))


def test_prompt_editing_in_both_hires_passes(webui):
    """The hires pass has its own steps: a step count goes on from the first pass's steps, a fraction
    counts from 1.0 (WebUI ≥ 1.6)."""
    hires = dict(ONE, enable_hr=True, hr_scale=2, hr_second_pass_steps=4, hr_upscaler="Latent",
                 denoising_strength=0.7)
    for prompt, first, second in [(f"[{A}:{B}:6]", [A, A, A, A], [A, A, A, B]),
                                  (f"[{A}:{B}:0.5]", [A, A, A, B], [B, B, B, B])]:
        _, calls = recorded(webui, "txt2img", dict(hires, **bdm(prompt)))
        assert [(h, s) for h, s, _ in calls] == [(False, s) for s in range(4)] + [(True, s) for s in range(4)]
        assert [rows[0] for h, _, rows in calls if not h] == webui_texts(webui, prompt, 4, range(4)) == first
        assert [rows[0] for h, _, rows in calls if h] == webui_texts(webui, prompt, 4, range(4), 4) == second


def test_and_in_the_chinese_prompt_is_refused_visibly(webui):
    webui.post("/bdm-test/schedule/reset")
    status, body = webui.call("POST", "/sdapi/v1/txt2img", dict(ONE, **bdm(f"{A} AND {B}")))
    text = json.dumps(body, ensure_ascii=False) if status == 200 else str(body)
    assert "AND is not supported in the Chinese prompt" in text and "[A|B]" in text, text[:2000]
    assert webui.get("/bdm-test/schedule/calls")["calls"] == [] or status != 200  # the branch did not run
    assert webui.alive()
    r, calls = recorded(webui, "txt2img", dict(ONE, **bdm(A)))  # the next generation is unaffected
    assert calls and all(rows[0] == A for _, _, rows in calls)
