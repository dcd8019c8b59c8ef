"""`python -m bdm.bench train` runs and reports; the memory side is deterministic on CPU (bytes autograd
keeps + trainable state), so recomputing the frozen decoder must show there, and not without it."""
import re

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


def test_bench_train_memory_lower_with_backbone_recompute(capsys):
    _, mem_default = _ratios(capsys)
    _, mem_none = _ratios(capsys, "--checkpoint-backbone", "0")
    assert mem_default < 0.9 < mem_none
