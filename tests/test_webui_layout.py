"""The batch-row → Chinese-context mapping against the CFG-denoiser layouts recorded from a real WebUI
v1.10.1 (tests/fixtures/webui_layouts/*.json), and the hooking of one generation (`BdmRun`)."""
from __future__ import annotations

import pytest
import torch

import bdm
from bdm.unet import UNetModel
from bdm.webui.context import ContextBank, EncodingCache
from bdm.webui.errors import BdmError
from bdm.webui.hooking import BdmRun
from bdm.webui.layout import (CallRows, RowRole, cfg_rows, chunked_row_roles, cond_counts, row_offset, row_roles,
                              rows_of)
from tests.layout_util import FIXTURES, TINY, KDiffusionLikeInner, recorded_calls, tiny_parts
from tests.util import build_random

CACHE = EncodingCache(256)


def _recorded_role(r: dict) -> RowRole:
    return RowRole(r["role"], r["image"], r.get("subprompt", 0))


def test_all_26_fixtures_present():
    assert len(FIXTURES) == 26


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_row_roles_match_every_recorded_unet_call(path):
    """For every recorded UNet call: the rows our tracker assigns it (data-pointer offset where the
    call's x is a view, and the in-order cursor alone) and their roles are exactly the recorded ones."""
    doc, calls = recorded_calls(path)
    assert calls
    for call in calls:
        recorded = [_recorded_role(r) for r in call["row_roles"]]
        assert [r["row"] for r in call["row_roles"]] == list(range(call["x_in_rows"]))
        counts = cond_counts(call["conds_list"], call["N_c"], call["B"])
        roles = row_roles(counts)
        assert roles == recorded
        # without conds_list (even split from N_c and B): the same, since API batches share one prompt
        assert row_roles(cond_counts(None, call["N_c"], call["B"])) == recorded
        cursor = CallRows(roles)  # no base tensor: the in-order cursor only
        located = [cursor.locate(rows=inner["rows"]) for inner in call["inner_calls"]]
        for inner, (a, b) in zip(call["inner_calls"], located):
            assert inner["row_offset"] == a and b - a == inner["rows"]
        for unet in call["unet_calls"]:
            a, b = located[unet["inner_call_index"]]
            assert b - a == unet["rows"]
            assert roles[a:b] == recorded[a:b]
        if call["uncond_skipped"]:
            assert located == [(0, call["N_c"])]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_cfg_rows_from_what_on_cfg_denoiser_sees(path):
    """`cfg_rows` from the row counts `on_cfg_denoiser` has (x_in, text_cond, text_uncond) and the
    AND-subprompt lists: the recorded roles of every call; without the lists, too."""
    _, calls = recorded_calls(path)
    for call in calls:
        recorded = [_recorded_role(r) for r in call["row_roles"]]
        n_cond, n_uncond = call["text_cond_shape"][0], call["text_uncond_shape"][0]
        assert cfg_rows(call["x_in_rows"], n_cond, n_uncond, call["conds_list"]) == recorded
        assert cfg_rows(call["x_in_rows"], n_cond, n_uncond) == recorded


def test_row_offset_of_views():
    x_in = torch.randn(6, 4, 8, 8)
    assert row_offset(x_in, x_in) == 0
    assert row_offset(x_in[2:4], x_in) == 2
    assert row_offset(x_in[:-2], x_in) == 0
    assert row_offset(x_in[-2:], x_in) == 4
    assert row_offset(x_in[2:4] * 1.0, x_in) is None  # a new tensor (k-diffusion's x * c_in)
    assert row_offset(x_in[:, :2], x_in) is None  # not a row slice
    rows = CallRows(row_roles([2, 2]), x_in)  # 6 rows
    assert rows.locate(x_in[2:4]) == (2, 4)  # pointer wins over the cursor
    assert rows.locate(x_in[0:2].clone()) == (4, 6)  # no view: cursor continues after the last call
    with pytest.raises(ValueError):
        rows.locate(rows=1)


def test_edit_model_layout():
    roles = row_roles([1, 2], uncond_blocks=2)
    assert roles == [RowRole("cond", 0, 0), RowRole("cond", 1, 0), RowRole("cond", 1, 1),
                     RowRole("uncond", 0), RowRole("uncond", 1), RowRole("uncond", 0), RowRole("uncond", 1)]
    with pytest.raises(ValueError):
        cond_counts(None, 3, 2)
    # an instruct-pix2pix x_in: [cond…, x, x] — the rows after the cond rows carry uncond text twice
    assert cfg_rows(7, 3, 2, [[0], [1, 2]]) == roles
    assert cfg_rows(4, 2, 2) == row_roles([1, 1])
    with pytest.raises(ValueError, match="unexpected CFG batch of 5 rows"):
        cfg_rows(5, 2, 2)


def test_rows_of_sdxl_dict_conds():
    assert rows_of(torch.zeros(3, 77, 8)) == 3
    assert rows_of({"crossattn": torch.zeros(2, 77, 8), "vector": torch.zeros(2, 5)}) == 2


def test_forge_chunk_roles():
    """Forge's UNet calls: whole batch copies per chunk, `cond_or_uncond` in call order (uncond first at
    CFG > 1, cond only at CFG 1, one cond chunk per AND-subprompt)."""
    U, C = RowRole("uncond", 0), RowRole("cond", 0)
    assert chunked_row_roles([1, 0], 4) == [U, RowRole("uncond", 1), C, RowRole("cond", 1)]
    assert chunked_row_roles([0], 3) == [C, RowRole("cond", 1), RowRole("cond", 2)]
    assert chunked_row_roles([1, 0, 0], 3) == [U, C, RowRole("cond", 0, 1)]
    assert chunked_row_roles([1], 2) == [U, RowRole("uncond", 1)]  # cond and uncond in separate calls
    for chunks, rows in (([1, 0], 3), ([], 2)):
        with pytest.raises(ValueError, match="cannot be split"):
            chunked_row_roles(chunks, rows)


# -- one generation, hooked into a real LDM-layout UNet -------------------------------------------
@pytest.fixture(scope="module")
def parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    yield tiny_parts()
    torch.set_num_threads(threads)


def _prompts(n_images):
    return [f"第{i}张，红色的圆形" for i in range(n_images)], [f"第{i}张的反向" for i in range(n_images)]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_bdmrun_gives_each_unet_call_its_rows_contexts(path, parts):
    """Replays every recorded denoiser call through `BdmRun` (inner calls on row views of x_in, as
    recorded; the UNet gets a new tensor as under k-diffusion): each UNet call's Chinese contexts are
    the positive prompt of its cond rows' images and the negative prompt of its uncond rows' images."""
    unet, bridge, enc = parts
    doc, calls = recorded_calls(path)
    batch, n_iter = doc["request"].get("batch_size", 1), doc["request"].get("n_iter", 1)
    positive, negative = _prompts(batch * n_iter)
    bank = ContextBank(enc, positive + negative, CACHE)
    run = BdmRun(bridge, bank, positive, negative, strength=1.0, log=lambda m: None)
    asked, seen = [], []
    real_rows = bank.rows
    bank.rows = lambda idx, step=0: (asked.append(bank.text_indices(idx, step)), real_rows(idx, step))[1]
    real_index = run.prompt_index
    run.prompt_index = lambda role: (seen.append(role), real_index(role))[1]
    inners = {}
    try:
        for call in calls:
            inner = inners.setdefault(call["pass"], KDiffusionLikeInner(unet))  # a new one per pass
            x_in = torch.randn(call["x_in_rows"], 4, 4, 4)
            run.image_offset = call["iteration"] * batch
            run.denoiser_call(x_in, call["text_cond_shape"][0], call["text_uncond_shape"][0], call["conds_list"],
                              inner, unet)
            with torch.no_grad():
                for ic in call["inner_calls"]:
                    a, n = ic["row_offset"], ic["rows"]
                    inner(x_in[a:a + n], torch.full((n,), 500.0), torch.zeros(n, 77, 64))
            expected = [[_recorded_role(r) for r in call["row_roles"]][ic["row_offset"]:ic["row_offset"] + ic["rows"]]
                        for ic in call["inner_calls"]]
            n = sum(len(rows) for rows in expected)
            got, seen[:] = seen[-n:], []
            assert got == [r for rows in expected for r in rows]
            want_prompts = [[(positive if r.is_cond else negative)[call["iteration"] * batch + r.image] for r in rows]
                            for rows in expected]
            assert [[bank.prompts[i] for i in idx] for idx in asked[-len(expected):]] == want_prompts
    finally:
        run.close()
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert all(not i._forward_pre_hooks and not i._forward_hooks for i in inners.values())


def test_bdmrun_output_equals_explicit_contexts(parts):
    """The residuals a UNet call gets through the row lookup equal those of `bdm.attach` given the
    expected per-row contexts directly (batch_cond_uncond off: chunks of B rows, AND prompts)."""
    unet, bridge, enc = parts
    positive, negative = ["红色的圆形", "蓝色的正方形"], ["", "模糊"]
    bank = ContextBank(enc, positive + negative)
    run = BdmRun(bridge, bank, positive, negative, strength=0.8, log=lambda m: None)
    inner = KDiffusionLikeInner(unet)
    # AND: two cond rows per image
    x_in = torch.randn(6, 4, 8, 8)
    t, en = torch.full((2,), 300.0), torch.randn(2, 77, 64)
    run.denoiser_call(x_in, 4, 2, [[0, 1], [2, 3]], inner, unet)
    with torch.no_grad():
        outs = [inner(x_in[a:a + 2], t, en) for a in (0, 2, 4)]
    run.close()
    ctx = bank.rows([0, 0, 1, 1, 2, 3])  # c0.0 c0.1 c1.0 c1.1 u0 u1
    with torch.no_grad():
        for k, a in enumerate((0, 2, 4)):
            with bdm.attach(unet, bridge, ctx[a:a + 2], 0.8):
                ref = inner(x_in[a:a + 2], t, en)
            assert torch.equal(outs[k], ref)
        plain = inner(x_in[0:2], t, en)
    assert not torch.equal(outs[0], plain)


def test_unet_call_outside_inner_call_gets_nothing(parts):
    unet, bridge, enc = parts
    logs = []
    bank = ContextBank(enc, ["红色", ""])
    run = BdmRun(bridge, bank, ["红色"], [""], log=logs.append)
    run.ensure_attached(unet)
    x, t, en = torch.randn(2, 4, 8, 8), torch.full((2,), 10.0), torch.randn(2, 77, 64)
    with torch.no_grad():
        out = unet(x, t, context=en)
        out2 = unet(x, t, context=en)
    run.close()
    with torch.no_grad():
        assert torch.equal(out, unet(x, t, context=en))
        assert torch.equal(out2, out)
    assert len(logs) == 1 and "outside" in logs[0]
    run.close()  # twice is fine


def test_unknown_layout_runs_without_branch(parts):
    unet, bridge, enc = parts
    logs = []
    run = BdmRun(bridge, ContextBank(enc, ["红色", ""]), ["红色"], [""], log=logs.append)
    inner = KDiffusionLikeInner(unet)
    x_in = torch.randn(5, 4, 8, 8)
    run.denoiser_call(x_in, 2, 2, None, inner, unet)  # 5 rows cannot be [c0 c1 u0 u1]
    with torch.no_grad():
        out = inner(x_in, torch.full((5,), 10.0), torch.zeros(5, 77, 64))
    run.close()
    with torch.no_grad():
        assert torch.equal(out, inner(x_in, torch.full((5,), 10.0), torch.zeros(5, 77, 64)))
    assert any("unexpected CFG batch" in m for m in logs)


def test_failed_run_stops_at_first_denoiser_call(parts):
    unet, _, _ = parts
    run = BdmRun.failed(BdmError("no BDM model 'x'", 422))
    inner = KDiffusionLikeInner(unet)
    run.denoiser_call(torch.randn(2, 4, 8, 8), 1, 1, None, inner, unet)
    with pytest.raises(BdmError, match="no BDM model") as e:
        inner(torch.randn(2, 4, 8, 8), torch.full((2,), 1.0), torch.zeros(2, 77, 64))
    assert e.value.status_code == 422
    run.close()
    assert not inner._forward_pre_hooks and not unet._forward_pre_hooks


@pytest.mark.parametrize("stop", [True, False])
def test_refused_pass_stops_or_runs_without_the_branch(parts, stop):
    """A pass whose model cannot take the branch (a hires or refiner checkpoint of another family):
    the generation stops at that pass (default), or it runs without the branch with one warning."""
    unet, bridge, enc = parts
    logs = []
    run = BdmRun(bridge, ContextBank(enc, ["红色", ""]), ["红色"], [""], log=logs.append)
    run.stop_on_failure = stop
    inner = KDiffusionLikeInner(unet)
    x_in, t, en = torch.randn(2, 4, 8, 8), torch.full((2,), 10.0), torch.zeros(2, 77, 64)
    run.denoiser_call(x_in, 1, 1, None, inner, unet)  # first pass: fine
    with torch.no_grad():
        first = inner(x_in, t, en)
    assert run.attached and run.unet_calls == 1
    run.denoiser_call(x_in, 1, 1, None, inner, unet, refusal="the loaded checkpoint is SDXL")
    assert not run.attached
    if stop:
        with pytest.raises(BdmError, match="not applied to this pass: the loaded checkpoint is SDXL"):
            inner(x_in, t, en)
    else:
        with torch.no_grad():
            plain = inner(x_in, t, en)
        assert not torch.equal(plain, first) and run.unet_calls == 1
        assert logs == ["BDM is not applied to this pass: the loaded checkpoint is SDXL"]
    run.close()


def test_reattach_follows_unet_swap(parts):
    unet, bridge, enc = parts
    other = build_random(lambda: UNetModel(TINY), seed=2)
    run = BdmRun(bridge, ContextBank(enc, ["红色", ""]), ["红色"], [""])
    run.ensure_attached(unet)
    run.ensure_attached(other)  # a refiner / checkpoint switch mid-generation
    assert not unet._forward_pre_hooks and other._forward_pre_hooks
    run.close()
    assert not other._forward_pre_hooks


def test_contexts_for_forge_rows(parts):
    """`BdmRun.contexts` (what Forge's control asks per UNet call): negative prompt for uncond rows,
    positive for cond rows, image `image_offset + i` of the job."""
    _, bridge, encoder = parts
    positive, negative = _prompts(4)
    bank = ContextBank(encoder, positive + negative, CACHE)
    run = BdmRun(bridge, bank, positive, negative)
    run.image_offset = 2  # second batch of two images
    got = run.contexts(chunked_row_roles([1, 0], 4))
    want = bank.rows([bank.slot(p) for p in (negative[2], negative[3], positive[2], positive[3])])
    assert torch.equal(got, want) and run.unet_calls == 1
