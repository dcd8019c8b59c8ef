"""bdm's LDM UNet equals the peers: diffusers' UNet2DConditionModel and the original ldm UNetModel."""
import pytest
import torch

from bdm.formats.diffusers_names import diffusers_unet2d_config, ldm_to_diffusers
from bdm.unet import SD15, SMALL, UNetConfig, UNetModel

from .util import build_random, ldm_unet, load_assigned, max_diff, oracle

diffusers = oracle("diffusers")
oracle("ldm.modules.diffusionmodules.openaimodel")

SD2_LIKE = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                      attention_resolutions=(1, 2, 4), num_head_channels=32, context_dim=48,
                      use_linear_in_transformer=True)


def inputs(cfg: UNetConfig, size: int, batch: int = 2, tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([999, 17][:batch] + [500] * (batch - 2))
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, ctx


@pytest.fixture(scope="module", params=["small", "sd2-like", "sd15"])
def case(request):
    cfg = {"small": SMALL, "sd2-like": SD2_LIKE, "sd15": SD15}[request.param]
    size = 8 if request.param == "sd15" else 16
    ours = build_random(lambda: UNetModel(cfg), seed=3)
    return cfg, ours, inputs(cfg, size)


@torch.no_grad()
def test_equals_diffusers_unet(case):
    cfg, ours, (x, t, ctx) = case
    peer = load_assigned(lambda: diffusers.UNet2DConditionModel(**diffusers_unet2d_config(cfg)),
                         ldm_to_diffusers(ours.state_dict(), cfg))
    expected = peer(x, t, encoder_hidden_states=ctx).sample
    got = ours(x, t, context=ctx)
    assert expected.abs().mean() > 0.01  # a real signal, 100× the tolerance
    assert max_diff(got, expected) <= 1e-4


@torch.no_grad()
def test_equals_original_ldm_unet(case):
    cfg, ours, (x, t, ctx) = case
    peer = load_assigned(lambda: ldm_unet(cfg), ours.state_dict())
    assert max_diff(ours(x, t, context=ctx), peer(x, t, context=ctx)) <= 1e-4


@torch.no_grad()
def test_scalar_timestep_broadcasts():
    ours = build_random(lambda: UNetModel(SMALL), seed=5)
    x, _, ctx = inputs(SMALL, 8)
    assert torch.equal(ours(x, torch.tensor(250), context=ctx), ours(x, torch.tensor([250, 250]), context=ctx))
