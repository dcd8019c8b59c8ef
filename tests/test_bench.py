"""`python -m bdm.bench train` runs and reports; the memory side is deterministic on CPU (bytes autograd
keeps + trainable state): the lean frozen convolutions alone keep it below the peer's, recomputing the
frozen decoder lowers it further."""
import re

import pytest

from bdm.bench.train import main


def _ratios(capsys, *extra):
    assert main(["--config", "small", "--width", "64", "--height", "64", "--repeats", "1", *extra]) == 0
    out = capsys.readouterr().out
    m = re.search(r"RATIOS time ours/peer=([\d.]+) memory ours/peer=([\d.]+)", out)
    assert m, out
    assert "first-step loss ours=" in out
    losses = re.search(r"first-step loss ours=([\d.]+) peer=([\d.]+)", out)
    assert abs(float(losses[1]) - float(losses[2])) < 1e-4  # same weights, same inputs, same arithmetic
    return float(m[1]), float(m[2])


@pytest.mark.slow
def test_bench_train_memory_lower_than_the_peer_and_lower_still_with_recompute(capsys):
    _, mem_default = _ratios(capsys)
    _, mem_recompute = _ratios(capsys, "--checkpoint-backbone", "3")
    assert mem_recompute < 0.9 * mem_default and mem_default < 0.97, (mem_default, mem_recompute)


def test_bench_webui_requests_are_what_the_extension_accepts():
    """The WebUI bench's BDM request passes the extension's strict argument check (the WebUI's `args` list)."""
    from types import SimpleNamespace

    from bdm.bench.webui import payload
    from bdm.webui.api_args import parse_script_args
    args = SimpleNamespace(size=64, batch=1, bdm_model="bench-bdm", controlnet_module="none", controlnet_model="cn")
    for mode in ("bdm", "both"):
        a = parse_script_args(payload(mode, 2, args)["alwayson_scripts"]["BDM"]["args"])
        assert a.enabled and a.model == "bench-bdm" and a.prompt == "红色的圆形"
    assert "BDM" not in payload("plain", 2, args)["alwayson_scripts"]


def test_bench_step_agrees_with_the_official_way_and_reports_wall_and_cpu_ratios(capsys):
    from bdm.bench.step import main as step
    assert step(["--config", "small", "--width", "32", "--height", "32", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    diffs = [float(d) for d in re.findall(r"max \|ε_\w+ − ε_official\| = (\S+)", out)]
    assert len(diffs) == 3 and max(diffs) < 1e-4, out  # ours, shared and hooks compute what diffusers computes
    for kind in ("RATIOS", "CPU RATIOS"):
        assert re.search(rf"^{kind} ours/backbone=[\d.]+ shared/backbone=[\d.]+", out, re.M), out


def test_bench_step_across_processes_prints_the_medians(capsys):
    """`--processes N` runs the measurement in N fresh processes (each overriding `--processes` with 1)
    and ends with the median of their ratios."""
    from bdm.bench.step import main as step
    args = ["--config", "small", "--width", "32", "--height", "32", "--repeats", "1", "--threads", "1"]
    assert step([*args, "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("-- process ") == 2 and len(re.findall(r"^RATIOS ", out, re.M)) == 2, out
    for kind in ("RATIOS", "CPU RATIOS"):
        assert re.search(rf"^MEDIAN of 2 processes: {kind} ours/backbone=[\d.]+ shared/backbone=[\d.]+", out, re.M), out
