"""`--compile`: the trainer's step through torch.compile trains the same branch as the eager step (the
compiled kernels round differently, so the numbers agree to float tolerance, not bit for bit), also across
aspect-ratio buckets (one compiled graph per batch shape), and leaves the backbone untouched. Resuming
needs nothing of its own: the state on disk is the eager run's."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.train_util import shared_backbone, train, write_mixed_set

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (conftest.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    data = write_mixed_set(tmp / "data")
    # landscape and square pictures only: two buckets, two compiled shapes (each costs a compile of ~1 min)
    rows = [line for line in data.read_text().splitlines()
            if _is_wide_or_square(data.parent / json.loads(line)["image"])]
    data.write_text("\n".join(rows) + "\n")
    return shared_backbone(tmp_path_factory), data


def _is_wide_or_square(path) -> bool:
    with Image.open(path) as im:
        return im.width >= im.height


def _run(tmp, ckpt, data, **kw):
    opts = dict(resolution=16, batch_size=4, max_steps=3, learning_rate=1e-3, seed=3, ema=True, ema_decay=0.9,
                aspect_buckets=True)
    return train(tmp, ckpt, data, **{**opts, **kw})


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_one(setup, tmp_path):
    from torch._dynamo.utils import counters
    ckpt, data = setup
    eager, eager_result = _run(tmp_path / "eager", ckpt, data)
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_result = _run(tmp_path / "compiled", ckpt, data, compile=True)
    # two buckets (20×12, 16×16): a graph per shape, the second shape compiled too
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    losses_e = [h["loss"] for h in eager_result["history"]]
    losses_c = [h["loss"] for h in compiled_result["history"]]
    assert len(losses_c) == 3
    assert losses_c == pytest.approx(losses_e, rel=1e-4)
    for k, v in eager.bridge.state_dict().items():
        torch.testing.assert_close(compiled.bridge.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    from bdm.formats.checkpoint import load_checkpoint
    on_disk = load_checkpoint(ckpt).unet.state_dict()
    assert all(torch.equal(v.float(), on_disk[k].float()) for k, v in compiled.unet.state_dict().items())
