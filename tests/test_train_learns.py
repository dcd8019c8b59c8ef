"""The method works end to end on a learnable toy set: colour blocks captioned 红色/绿色/蓝色/黄色 on a
toy "English SD" that learnt them unconditionally (English ""). Trained from cached latents, the loss
falls clearly and the exported BDM file — loaded by `bdm.load_bridge`, hooked in by `bdm.attach`,
sampled with `bdm.sampling` — moves generated latents toward the caption's colour.

Checked in latent space: the tiny random VAE decoder is no colour reproducer, so "redder" is measured
as the projection of generated latents on (latent of a red block − latent of a blue block).
"""
from __future__ import annotations

import pytest

from tests.train_util import train_and_check_steering

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (conftest.py)


@pytest.mark.slow
def test_loss_falls_and_the_caption_steers_the_image(tmp_path, tmp_path_factory):
    train_and_check_steering(tmp_path, tmp_path_factory)
