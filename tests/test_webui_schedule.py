"""Prompt editing in the Chinese prompt inside the WebUI's sampling loop, without a WebUI: the context
bank's per-step rows, and `BdmRun` replaying denoiser calls recorded from a real WebUI v1.10.1
(tests/fixtures/webui_layouts: their denoiser steps, hires pass, img2img's shortened pass, Heun's two
calls per step) with scheduled prompts."""
from __future__ import annotations

import pytest
import torch

from bdm.text import prompt_schedule as ps
from bdm.webui.context import ContextBank, EncodingCache
from bdm.webui.hooking import BdmRun
from tests.layout_util import FIXTURES, KDiffusionLikeInner, recorded_calls, tiny_parts

CACHE = EncodingCache(256)
SECOND_ORDER = {"Heun", "DPM++ SDE"}  # the WebUI's samplers whose total_steps is 2 × steps


@pytest.fixture(scope="module")
def parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_parts()
    torch.set_num_threads(threads)


def test_bank_rows_follow_the_schedule_and_share_one_chunk_count(parts):
    _, _, enc = parts
    long = "，".join(["蓝色的正方形在红色的背景上"] * 6)  # > 50 tokens: 2 chunks
    edit = ps.get_learned_conditioning_prompt_schedules([f"[红色的圆形:{long}:0.5]"], 4)[0]
    assert edit == [[2, "红色的圆形"], [4, long]]
    bank = ContextBank(enc, [edit, "模糊", "模糊"], CACHE)
    assert bank.prompts == ["红色的圆形", long, "模糊"] and bank.chunks == 2
    assert len(bank.schedules) == 2 and bank.slot("模糊") == 1 and bank.slot(edit) == 0
    for step, text in [(0, "红色的圆形"), (1, "红色的圆形"), (2, "红色的圆形"), (3, long)]:
        rows = bank.rows([0, 1], step)
        assert torch.equal(rows, enc.encode([text, "模糊"], min_chunks=2)), step  # padded to 2 chunks
    assert bank.text_indices([0, 1, 0], 3) == [1, 2, 1]
    assert bank.text_indices([0], 99) == [0]  # past the last entry: the first, as the WebUI


def _pass_steps(request: dict) -> tuple[int, int | None]:
    """The step counts the WebUI schedules prompts with (`setup_conds`, `calculate_hr_conds`)."""
    factor = 2 if request["sampler_name"] in SECOND_ORDER else 1
    hires = request.get("hr_second_pass_steps") or request["steps"] if request.get("enable_hr") else None
    return factor * request["steps"], (factor * hires if hires else None)


PICKED = [p for p in FIXTURES if p.stem in ("t2i_hires_b2", "i2i_b2", "t2i_heun_b2", "t2i_and_b2", "t2i_b2_n2")]


@pytest.mark.parametrize("path", PICKED, ids=lambda p: p.stem)
def test_bdmrun_gives_each_call_the_text_of_its_step(path, parts):
    unet, bridge, enc = parts
    doc, calls = recorded_calls(path)
    request = doc["request"]
    batch, n_iter = request.get("batch_size", 1), request.get("n_iter", 1)
    positive = ["[红色:蓝色:0.5]", "[绿色|黄色]"] * batch * n_iter
    positive = positive[:batch * n_iter]
    negative = ["[模糊::2]"] * (batch * n_iter)
    steps, hires_steps = _pass_steps(request)
    first = ps.schedule_prompts(positive, negative, steps)
    hires = ps.schedule_prompts(positive, negative, steps, hires_steps) if hires_steps else None
    bank = ContextBank(enc, first.all() + (hires.all() if hires else []), CACHE)
    run = BdmRun(bridge, bank, first.positive, first.negative, log=lambda m: None,
                 hires=(hires.positive, hires.negative) if hires else None)
    asked, roles, seen = [], [], []  # per UNet call: the texts given, the rows' roles
    real_rows, real_index = bank.rows, run.prompt_index
    run.prompt_index = lambda role: (seen.append(role), real_index(role))[1]

    def rows(slots, step=0):
        asked.append([bank.prompts[i] for i in bank.text_indices(slots, step)])
        roles.append(list(seen))
        seen.clear()
        return real_rows(slots, step)

    bank.rows = rows
    image0 = []  # the text of image 0's first cond row, per denoiser call
    try:
        for call in calls:
            inner = KDiffusionLikeInner(unet)
            x_in = torch.randn(call["x_in_rows"], 4, 4, 4)
            run.image_offset = call["iteration"] * batch
            run.denoiser_call(x_in, call["text_cond_shape"][0], call["text_uncond_shape"][0], call["conds_list"],
                              inner, unet, step=call["step"], hires=call["is_hr_pass"])
            before = len(asked)
            with torch.no_grad():
                for ic in call["inner_calls"]:
                    a, n = ic["row_offset"], ic["rows"]
                    inner(x_in[a:a + n], torch.full((n,), 500.0), torch.zeros(n, 77, 64))
            table = hires if call["is_hr_pass"] else first
            for rows, texts in zip(roles[before:], asked[before:]):
                want = []
                for r in rows:
                    g = call["iteration"] * batch + r.image
                    schedule = (table.positive if r.is_cond else table.negative)[g]
                    want.append(schedule[ps.text_index_at(schedule, call["step"])][1])
                assert texts == want
            image0.append(asked[before][0])
    finally:
        run.close()
    # the WebUI's steps, written out: 0-based denoiser calls, text used up to and including its end step
    expected = {
        "t2i_hires_b2": ["红色", "红色", "蓝色", "蓝色", "蓝色"],  # 3 steps: [[1,红] [3,蓝]]; hires 0.5 → 蓝
        "i2i_b2": ["红色", "红色", "红色"],  # 4 steps at strength 0.5: 3 calls of [[2,红] [4,蓝]]
        "t2i_heun_b2": ["红色", "红色", "红色", "红色", "蓝色"],  # 3 steps × 2 calls: [[3,红] [6,蓝]]
    }
    if path.stem in expected:
        assert image0 == expected[path.stem]


def test_hires_pass_without_schedules_warns_and_uses_the_first(parts):
    unet, bridge, enc = parts
    logs = []
    first = ps.schedule_prompts(["[红色:蓝色:0.5]"], [""], 4)
    bank = ContextBank(enc, first.all())
    run = BdmRun(bridge, bank, first.positive, first.negative, log=logs.append)
    inner = KDiffusionLikeInner(unet)
    x_in = torch.randn(2, 4, 4, 4)
    run.denoiser_call(x_in, 1, 1, None, inner, unet, step=3, hires=True)
    with torch.no_grad():
        inner(x_in, torch.full((2,), 500.0), torch.zeros(2, 77, 64))
    run.close()
    assert run.unet_calls == 1 and any("hires pass" in m for m in logs)
