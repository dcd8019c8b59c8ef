"""Kill-and-resume equals an uninterrupted run (CPU, fp32: bit-identical weights); checkpoints are
written atomically (a crash mid-write leaves no half checkpoint) and hold no pickles."""
from __future__ import annotations

import pytest
import torch

from tests.train_util import config, shared_backbone, train, write_colour_set

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (conftest.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return shared_backbone(tmp_path_factory), write_colour_set(tmp / "data", per_colour=2, size=16)


def _run(tmp, ckpt, data, **kw):
    opts = dict(resolution=16, batch_size=3, max_steps=4, ema=True, ema_decay=0.9, caption_dropout=0.5,
                gradient_accumulation=2, lr_schedule="cosine", lr_warmup_steps=2, random_flip=True,
                center_crop=False, learning_rate=1e-3, seed=5)
    return train(tmp, ckpt, data, **{**opts, **kw})


def test_resume_equals_uninterrupted(setup, tmp_path):
    from bdm.formats.files import read_metadata
    from bdm.train.state import STATE_FILE
    ckpt, data = setup
    full, full_result = _run(tmp_path / "full", ckpt, data)
    # "killed" after step 2: a run that stops at its checkpoint, then a new process-like run resumes
    _run(tmp_path / "cut", ckpt, data, max_steps=2, num_workers=1)
    resumed, result = _run(tmp_path / "cut", ckpt, data, resume="latest", num_workers=1)
    assert result["step"] == 4
    for k, v in full.bridge.state_dict().items():
        assert torch.equal(v, resumed.bridge.state_dict()[k]), k
    for k, v in full.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k
    a, b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert [h["loss"] for h in full_result["history"][2:]] == [h["loss"] for h in result["history"]]
    # checkpoints: safetensors + JSON only, and the exported BDM file of each loads directly
    import bdm
    folder = tmp_path / "cut" / "out" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in folder.iterdir()) == ["bdm.safetensors", STATE_FILE]
    assert read_metadata(folder / STATE_FILE)["format"] == "bdm-train-state"
    assert bdm.load_bridge(folder / "bdm.safetensors").meta["bdm.step"] == "2"


def test_a_crash_while_writing_leaves_no_half_checkpoint(setup, tmp_path, monkeypatch):
    from bdm.train import Trainer
    from bdm.train import state as S
    ckpt, data = setup
    trainer = Trainer(config(tmp_path, ckpt, data, resolution=16, max_steps=2, checkpoint_every=1)).prepare()
    root = tmp_path / "out" / "checkpoints"
    real_export = trainer.export

    def dying_export(path, notes=None):
        real_export(path, notes)
        if trainer.step == 2:
            with open(path, "r+b") as f:  # half-written, then the process "dies"
                f.truncate(100)
            raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "export", dying_export)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step-0000001"]  # no step-0000002, no temporary folder left
    assert (root / "latest").read_text().strip() == "step-0000001"
    state, tensors = S.load_checkpoint(S.resolve_resume("latest", tmp_path / "out"))
    assert state["step"] == 1 and "bridge.zero_convs.0.0.weight" in tensors
