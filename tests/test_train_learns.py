"""The method works end to end on a learnable toy set: colour blocks captioned 红色/绿色/蓝色/黄色 on a
toy "English SD" that learnt them unconditionally (English ""). Trained from cached latents, the loss
falls clearly and the exported BDM file — loaded by `bdm.load_bridge`, hooked in by `bdm.attach`,
sampled with `bdm.sampling` — moves generated latents toward the caption's colour.

Checked in latent space: the tiny random VAE decoder is no colour reproducer, so "redder" is measured
as the projection of generated latents on (latent of a red block − latent of a blue block).
"""
from __future__ import annotations

import statistics

import torch

from tests.test_train_support import (  # noqa: F401 (one_thread: autouse fixture)
    COLOURS, caption, colour_block, config, one_thread, shared_backbone, write_colour_set)

SIZE, REPEAT = 16, 8


def test_loss_falls_and_the_caption_steers_the_image(tmp_path, tmp_path_factory):
    train_and_check_steering(tmp_path, tmp_path_factory)


def train_and_check_steering(tmp_path, tmp_path_factory, **options):
    """Train 300 steps (`options` override the trainer config, e.g. device / mixed precision), then
    check that the loss fell and that the exported branch steers generation (sampled on the CPU, fp32)."""
    import bdm
    from bdm.formats.checkpoint import load_checkpoint
    from bdm.sampling import EpsDenoiser, sample
    from bdm.train import Trainer
    ckpt = shared_backbone(tmp_path_factory, pretrain_size=SIZE)
    data = write_colour_set(tmp_path / "data", size=SIZE, repeat=REPEAT)
    result = Trainer(config(tmp_path, ckpt, data, resolution=SIZE, max_steps=300, cache_latents=True, batch_size=8,
                            learning_rate=2e-3, lr_warmup_steps=10, log_every=50, random_flip=False,
                            **options)).run()
    losses = [h["loss"] for h in result["history"]]
    first, last = statistics.mean(losses[:30]), statistics.mean(losses[-30:])
    assert last < 0.8 * first, (first, last)

    sd = load_checkpoint(ckpt)
    bridge = bdm.load_bridge(tmp_path / "out" / "bdm.safetensors").float()
    chinese, english = bridge.text_encoder, sd.text_encoder.encode([""])

    def latent(name):
        image = torch.from_numpy(colour_block(COLOURS[name], SIZE, 0)).permute(2, 0, 1).float() / 127.5 - 1
        return sd.vae.encode(image[None])[0]
    direction = latent("红色") - latent("蓝色")
    direction = direction / direction.norm()
    eps = EpsDenoiser(lambda x, t: sd.unet(x, t, context=english.expand(x.shape[0], -1, -1)))
    n, scale = 6, 3.0
    uncond = chinese.encode([""] * n)

    def redness(name):
        cond = chinese.encode([caption(name, REPEAT)] * n)
        noise = torch.randn((n, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(0))

        def cfg(x, sigma):
            u, c = eps(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
            return u + scale * (c - u)
        with torch.no_grad(), bdm.attach(sd.unet, bridge, torch.cat([uncond, cond])):
            z = sample("Euler", cfg, noise, 20, sigma_schedule=eps)
        return (z * direction).sum(dim=(1, 2, 3))
    red, blue = redness("红色"), redness("蓝色")
    # same seeds, only the Chinese caption differs: every "红色" image is redder than its "蓝色" twin
    assert (red > blue).all(), (red, blue)
    assert (red - blue).mean() > 0.5, (red, blue)
    return first, last, (red - blue).mean().item()
