"""`torchrun --nproc_per_node 2 -m bdm.train` on CPU (gloo) trains and matches one process with the same
global batch (same samples, same per-sample noise; only the gradient all-reduce order differs)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.train_util import shared_backbone, write_colour_set
from tests.util import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (conftest.py)


@pytest.mark.slow
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


def _map_split_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import json
    import os

    import torch.distributed as dist

    from bdm.train.distributed import Dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        read = []

        def square(x):
            read.append(x)
            return None if x == 4 else x * x  # None: an unreadable image's size
        result = Dist(rank, world).map_split(square, list(range(11)))
        with open(f"{out_dir}/{rank}.json", "w") as f:
            json.dump({"result": result, "read": read}, f)
    finally:
        dist.destroy_process_group()


def test_map_split_reads_each_item_once_and_gives_every_rank_the_whole_list(tmp_path):
    """What --aspect-buckets uses to read the image headers once in all, not once per rank."""
    import json

    import torch.multiprocessing as mp
    mp.spawn(_map_split_worker, args=(2, 29633, str(tmp_path)), nprocs=2, join=True)
    runs = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    expected = [None if x == 4 else x * x for x in range(11)]
    assert runs[0]["result"] == runs[1]["result"] == expected
    assert runs[0]["read"] == [0, 2, 4, 6, 8, 10] and runs[1]["read"] == [1, 3, 5, 7, 9]
