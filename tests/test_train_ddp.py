"""`torchrun --nproc_per_node 2 -m bdm.train` on CPU (gloo) trains and matches one process with the same
global batch (same samples, same per-sample noise; only the gradient all-reduce order differs)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.test_train_support import one_thread, shared_backbone, write_colour_set  # noqa: F401
from tests.util import REPO


def test_torchrun_two_ranks_match_one_process(tmp_path, tmp_path_factory):
    import bdm
    ckpt = shared_backbone(tmp_path_factory)
    data = write_colour_set(tmp_path / "data", per_colour=2, size=16)
    common = ["--checkpoint", str(ckpt), "--text-encoder", "toy", "--data", str(data), "--resolution", "16",
              "--max-steps", "3", "--num-workers", "0", "--progress", "false", "--device", "cpu",
              "--learning-rate", "1e-3", "--save-dtype", "fp32", "--checkpoint-every", "0", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29617", "-m", "bdm.train", *common, "--batch-size", "2",
                          "--output", str(tmp_path / "two")], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "bdm.train", *common, "--batch-size", "4",
                          "--output", str(tmp_path / "one")], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = bdm.load_bridge(tmp_path / "one" / "bdm.safetensors").state_dict()
    b = bdm.load_bridge(tmp_path / "two" / "bdm.safetensors").state_dict()
    fresh = bdm.Bridge.from_backbone(__import__("bdm.formats.checkpoint", fromlist=["x"]).load_unet(ckpt).float(), 64)
    moved = max((a[k] - fresh.state_dict()[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and worst < 1e-4 * max(1.0, moved) * 10, (moved, worst)
    assert not (tmp_path / "two" / "checkpoints" / ".tmp").exists()
    logs = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert len(logs) == 1  # rank 0 alone writes
