"""Prompt editing and alternation in the headless generator: the branch reads, at each model evaluation,
the text the WebUI would schedule for that step; AND is refused before anything loads."""
from __future__ import annotations

import pytest
import torch

import bdm
from bdm import generate, pipeline
from bdm.cli import run
from bdm.formats.checkpoint import load_checkpoint
from bdm.pipeline import Pipeline, Request
from bdm.text.prompt_schedule import PromptSyntaxError


RED, BLUE = "红色的圆形", "蓝色的方形"


@pytest.fixture(scope="module")
def pipe(world):
    return Pipeline(load_checkpoint(world["ckpt"]), bdm.load_bridge(world["bdm"]))


def _request(prompt: str, **kw) -> Request:
    return Request(**{**dict(prompt=prompt, negative_prompt="", steps=4, width=64, height=64, seed=3,
                             cfg_scale=2.0), **kw})


def contexts_per_call(pipe, request):
    """(latents, the Chinese context rows the branch received at each model evaluation)."""
    seen = []
    handle = pipe.bridge.register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
    try:
        latents = pipe.latents(request)
    finally:
        handle.remove()
    return latents, seen


def _enc(pipe, *texts):
    return pipe.bridge.text_encoder.encode(list(texts)).to(pipe.dtype)


def test_prompt_editing_switches_the_context_at_the_webuis_step(pipe):
    latents, seen = contexts_per_call(pipe, _request(f"[{RED}:{BLUE}:0.5]"))
    red, blue = _enc(pipe, RED, ""), _enc(pipe, BLUE, "")
    # 4 steps: [[2, RED], [4, BLUE]]; evaluation i (0-based) uses the first entry whose end ≥ i
    assert len(seen) == 4
    assert [torch.equal(c, red) for c in seen] == [True, True, True, False]
    assert torch.equal(seen[3], blue)
    alone_red, _ = contexts_per_call(pipe, _request(RED))
    alone_blue, _ = contexts_per_call(pipe, _request(BLUE))
    assert not torch.allclose(latents, alone_red) and not torch.allclose(latents, alone_blue)


def test_scheduled_image_equals_explicit_per_step_contexts(pipe, monkeypatch):
    scheduled = pipe.latents(_request(f"[{RED}:{BLUE}:0.5]", sampler="DPM++ 2M", batch_size=2))
    red, blue = _enc(pipe, RED, RED, "", ""), _enc(pipe, BLUE, BLUE, "", "")
    monkeypatch.setattr(pipeline, "chinese_contexts", lambda encoder, request: lambda step: red if step <= 2 else blue)
    explicit = pipe.latents(_request("ignored", sampler="DPM++ 2M", batch_size=2))
    assert torch.equal(scheduled, explicit)


def test_alternation_and_negative_schedule(pipe):
    _, seen = contexts_per_call(pipe, _request(f"[{RED}|{BLUE}]", negative_prompt="[模糊::1]"))
    # 4 steps: [[1,RED],[2,BLUE],[3,RED],[4,BLUE]] → evaluations 0..3 read RED RED BLUE RED;
    # the negative [[1,模糊],[4,""]] → 模糊 for evaluations 0 and 1, then ""
    want = [_enc(pipe, RED, "模糊"), _enc(pipe, RED, "模糊"), _enc(pipe, BLUE, ""), _enc(pipe, RED, "")]
    assert all(torch.equal(a, b) for a, b in zip(seen, want)) and len(seen) == 4


def test_and_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(PromptSyntaxError, match="AND is not supported"):
        _request("红色 AND 蓝色").check()
    out = tmp_path / "out.png"
    assert run(generate.main, ["-o", str(out), "--prompt", "红色 AND 蓝色", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "AND is not supported in the Chinese prompt" in err and "[A|B]" in err
    assert not out.exists()
