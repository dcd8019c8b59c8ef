"""`bdm.sampling` against diffusers' schedulers on the same ε-models and the same noise.

Mapping used (see the `bdm.sampling` docstring): our "automatic" schedule = diffusers
`timestep_spacing="linspace"` (exact when (n-1) | 999, hence n = 10); "karras" = `use_karras_sigmas=True`;
"ddim" = DDIMScheduler with SD1's config (`steps_offset=1`, "leading", `set_alpha_to_one=False`,
`clip_sample=False`); "dpm-solver" = DPMSolverMultistepScheduler as diffusers 0.24 configured it for the
official BDM inference (`final_sigmas_type="sigma_min"` in today's diffusers, the rest its defaults).
DDIM/DPM-Solver live in VP space: x_vp = x_ve / √(1+σ²).
"""
from __future__ import annotations

import math

import pytest
import torch

from bdm.sampling import (
    SAMPLERS,
    EpsDenoiser,
    get_sigmas,
    get_sigmas_karras,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_official,
    sample_euler,
    sample_euler_ancestral,
    sd1_alphas_cumprod,
)

from .util import oracle

diffusers = oracle("diffusers")
SD1_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-4
SHAPE = (2, 4, 8, 8)


ALPHAS = sd1_alphas_cumprod()


def eps_model(x, t, context=None):
    """A fixed, smooth, non-linear ε(x, t), strongly t-dependent so a wrong t (or σ) shows: the exact ε
    for data ~ N(0, 0.5²) plus non-linear terms, so trajectories stay O(1) like real latents."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
    lo = t.floor().long().clamp(0, 999)
    a = torch.lerp(ALPHAS[lo], ALPHAS[(lo + 1).clamp(max=999)], t - lo)
    out = (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.2 * torch.sin(3 * x + 5 * t / 1000)
    out = out + 0.1 * x.roll(1, dims=1) * (1 - t / 1000)
    return out if context is None else out + context.reshape(-1, 1, 1, 1)


def rounded_t(model):
    """diffusers' DPM-Solver rounds Karras timesteps to integers before calling the model; k-diffusion
    (and A1111) pass the fractional t. Rounding inside the model makes the two comparable."""
    return lambda x, t, **kw: model(x, torch.as_tensor(t).round(), **kw)


def noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, model, x, steps, generator=None, **kw):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        step_kw = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **step_kw, **kw).prev_sample
    return x


def test_schedule_table_and_automatic_sigmas_match_diffusers():
    den = EpsDenoiser(eps_model)
    ref = diffusers.EulerDiscreteScheduler(**SD1_SCHEDULE, timestep_spacing="linspace")
    assert torch.allclose(sd1_alphas_cumprod(), ref.alphas_cumprod, rtol=1e-5, atol=0)
    ref.set_timesteps(10)
    assert torch.allclose(den.get_sigmas(10), ref.sigmas, rtol=1e-5, atol=0)
    ref.set_timesteps(20)  # fractional t: diffusers interpolates σ linearly, k-diffusion log-linearly
    assert torch.allclose(den.get_sigmas(20), ref.sigmas, rtol=1e-4, atol=0)
    assert not torch.allclose(den.get_sigmas(20), ref.sigmas, rtol=1e-7, atol=0)


def test_karras_and_ddim_sigmas_match_diffusers():
    den = EpsDenoiser(eps_model)
    dpm = diffusers.DPMSolverMultistepScheduler(**SD1_SCHEDULE, use_karras_sigmas=True)
    dpm.set_timesteps(15)
    assert torch.allclose(get_sigmas(den, "DPM++ 2M Karras", 15), dpm.sigmas, rtol=1e-5, atol=0)
    assert torch.equal(get_sigmas(den, "DPM++ 2M Karras", 15),
                       get_sigmas_karras(15, den.sigmas[0].item(), den.sigmas[-1].item()))
    ddim = diffusers.DDIMScheduler(**SD1_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(20)
    assert ddim.timesteps[0] == 951 and ddim.timesteps[-1] == 1
    ac = ddim.alphas_cumprod
    expected = torch.cat([((1 - ac[ddim.timesteps]) / ac[ddim.timesteps]) ** 0.5, ((1 - ac[:1]) / ac[:1]) ** 0.5])
    assert torch.allclose(get_sigmas(den, "DDIM", 20), expected, rtol=1e-5, atol=0)


def test_sigma_to_t_interpolates_log_sigma():
    den = EpsDenoiser(eps_model)
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    assert torch.equal(den.sigma_to_t(den.sigmas[t.long()]), t)  # table values map to exact integers
    frac = torch.tensor([0.25, 10.5, 500.75, 998.9])
    assert torch.allclose(den.sigma_to_t(den.t_to_sigma(frac)), frac, atol=1e-3)
    quantized = EpsDenoiser(eps_model, quantize=True)
    assert torch.equal(quantized.sigma_to_t(den.t_to_sigma(frac)), torch.tensor([0, 10, 501, 999]))


def test_eps_denoiser_scalings():
    seen = {}

    def probe(x, t, **kw):
        seen.update(x=x, t=t, kw=kw)
        return torch.ones_like(x)

    den = EpsDenoiser(probe)
    x, sigma = torch.full(SHAPE, 3.0), den.sigmas[600]
    out = den(x, sigma, context="c")
    assert torch.allclose(seen["x"], x / math.sqrt(sigma.item() ** 2 + 1))
    assert torch.allclose(seen["t"], torch.full((2,), 600.0)) and seen["kw"] == {"context": "c"}
    assert torch.allclose(out, x - sigma)


@torch.no_grad()
def test_euler_matches_diffusers():
    den, steps = EpsDenoiser(eps_model), 10
    sigmas = get_sigmas(den, "Euler", steps)
    ours = sample_euler(den, noise() * sigmas[0], sigmas)
    sched = diffusers.EulerDiscreteScheduler(**SD1_SCHEDULE, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    ref = run_diffusers(sched, eps_model, noise() * sched.init_noise_sigma, steps)
    assert (ours - ref).abs().max() <= TOL
    assert SAMPLERS["Euler"] == (sample_euler, "automatic")


@torch.no_grad()
def test_euler_ancestral_matches_diffusers_with_same_noise():
    den, steps = EpsDenoiser(eps_model), 10
    sigmas = get_sigmas(den, "Euler a", steps)
    ours = sample_euler_ancestral(den, noise() * sigmas[0], sigmas, generator=torch.Generator().manual_seed(5))
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD1_SCHEDULE, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    ref = run_diffusers(sched, eps_model, noise() * sched.init_noise_sigma, steps,
                        generator=torch.Generator().manual_seed(5))
    assert (ours - ref).abs().max() <= TOL
    other = sample_euler_ancestral(den, noise() * sigmas[0], sigmas, generator=torch.Generator().manual_seed(6))
    assert (ours - other).abs().max() > 0.01  # the generator really drives the ancestral noise
    deterministic = sample_euler(den, noise() * sigmas[0], sigmas)
    assert (ours - deterministic).abs().max() > 0.01


@torch.no_grad()
def test_dpmpp_2m_karras_matches_diffusers():
    model, steps = rounded_t(eps_model), 15
    den = EpsDenoiser(model)
    fn, schedule = SAMPLERS["DPM++ 2M Karras"]
    assert (fn, schedule) == (sample_dpmpp_2m, "karras")
    sigmas = get_sigmas(den, "DPM++ 2M Karras", steps)
    ours = sample_dpmpp_2m(den, noise() * sigmas[0], sigmas)
    sched = diffusers.DPMSolverMultistepScheduler(**SD1_SCHEDULE, use_karras_sigmas=True,
                                                  algorithm_type="dpmsolver++", solver_order=2)
    vp_start = noise() * sigmas[0] / math.sqrt(1 + sigmas[0].item() ** 2)
    ref = run_diffusers(sched, model, vp_start, steps)
    assert (ours - ref).abs().max() <= TOL
    euler = sample_euler(den, noise() * sigmas[0], sigmas)
    assert (ours - euler).abs().max() > 0.01  # the second-order correction is really applied


def official_dpm_scheduler(**overrides):
    """diffusers 0.24's DPMSolverMultistepScheduler.from_config(SD1 config), spelled for today's diffusers:
    0.24 had no `final_sigmas_type` and ended on σ(t=0) ("sigma_min"); the other values are its defaults."""
    config = dict(SD1_SCHEDULE, steps_offset=1, timestep_spacing="linspace", algorithm_type="dpmsolver++",
                  solver_order=2, solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                  final_sigmas_type="sigma_min")
    return diffusers.DPMSolverMultistepScheduler(**{**config, **overrides})


@pytest.mark.parametrize("steps", [1, 2, 7, 14, 15, 20, 50, 100])
def test_dpm_solver_schedule_matches_diffusers(steps):
    den = EpsDenoiser(eps_model)
    sched = official_dpm_scheduler()
    sched.set_timesteps(steps)
    sigmas = get_sigmas(den, "DPM++ 2M (official)", steps)
    assert torch.equal(den.sigma_to_t(sigmas[:-1]), sched.timesteps.float())  # integer t from 999 down
    assert sched.timesteps[0] == 999 and sigmas[-1] == den.sigmas[0] > 0.02  # ends at σ(t=0), not 0
    # the only difference: diffusers computes the β table in float32, LDM (and we) in float64
    assert torch.allclose(sigmas, sched.sigmas, rtol=2e-5, atol=0)


@pytest.mark.parametrize("steps", [50, 10])
@torch.no_grad()
def test_dpmpp_2m_official_matches_diffusers(steps):
    den = EpsDenoiser(eps_model)
    assert SAMPLERS["DPM++ 2M (official)"] == (sample_dpmpp_2m_official, "dpm-solver")
    ours = sample("DPM++ 2M (official)", den, noise(), steps)  # unit VP noise in, VP latents out
    sched = official_dpm_scheduler()
    ref = run_diffusers(sched, eps_model, noise() * sched.init_noise_sigma, steps)
    assert sched.init_noise_sigma == 1.0
    assert (ours - ref).abs().max() <= TOL
    sigmas = get_sigmas(den, "DPM++ 2M (official)", steps)
    start = noise() * math.sqrt(1 + sigmas[0].item() ** 2)
    second_order_end = sample_dpmpp_2m(den, start, sigmas) / math.sqrt(1 + sigmas[-1].item() ** 2)
    if steps < 15:  # lower_order_final: diffusers makes the last step first order below 15 steps only
        assert (second_order_end - ours).abs().max() > 1e-3
    else:
        assert (second_order_end - ours).abs().max() <= TOL
    # today's diffusers default (final σ = 0) and the WebUI's "DPM++ 2M" are other pictures
    newer = run_diffusers(official_dpm_scheduler(final_sigmas_type="zero"), eps_model, noise(), steps)
    assert (newer - ref).abs().max() > 1e-3
    assert (sample("DPM++ 2M", den, noise(), steps) - ref).abs().max() > 1e-3


@torch.no_grad()
def test_ddim_matches_diffusers():
    context = torch.tensor([0.1, -0.2])
    den, steps = EpsDenoiser(eps_model), 20
    ours = sample("DDIM", den, noise(), steps, extra_args={"context": context})
    sched = diffusers.DDIMScheduler(**SD1_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref = run_diffusers(sched, lambda x, t: eps_model(x, t, context), noise(), steps, eta=0.0)
    assert (ours - ref).abs().max() <= TOL
    # the bare function in VE space is the same trajectory
    sigmas = get_sigmas(den, "DDIM", steps)
    ve = sample_ddim(den, noise() * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, extra_args={"context": context})
    assert (ve / math.sqrt(1 + sigmas[-1].item() ** 2) - ref).abs().max() <= TOL


@torch.no_grad()
def test_euler_ancestral_with_real_unet_matches_diffusers():
    """The LDM UNet signature `unet(x, timesteps, context=...)` through `EpsDenoiser`, Euler a."""
    from bdm.unet import SMALL, UNetModel
    torch.manual_seed(0)
    unet = UNetModel(SMALL).eval()
    context = torch.randn(2, 5, SMALL.context_dim, generator=torch.Generator().manual_seed(1))
    den, steps = EpsDenoiser(unet), 10
    ours = sample("Euler a", den, noise(2), steps, extra_args={"context": context},
                  generator=torch.Generator().manual_seed(3))
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD1_SCHEDULE, timestep_spacing="linspace")
    ref = run_diffusers(sched, lambda x, t: unet(x, t, context=context), noise(2) * 14.614641, steps,
                        generator=torch.Generator().manual_seed(3))
    assert (ours - ref).abs().max() <= TOL


def test_same_seed_same_result_and_progress_callback():
    den = EpsDenoiser(eps_model)
    calls = []
    a = sample("Euler a", den, noise(), 6, generator=torch.Generator().manual_seed(1),
               callback=lambda i, total: calls.append((i, total)))
    b = sample("Euler a", den, noise(), 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert calls == [(i, 6) for i in range(1, 7)]
    for name in SAMPLERS:
        out = sample(name, den, noise(), 4)
        assert out.shape == SHAPE and torch.isfinite(out).all()
    assert (sample("DPM++ 2M", den, noise(), 8) - sample("DPM++ 2M Karras", den, noise(), 8)).abs().max() > 1e-3


def test_per_row_generators_give_each_image_its_own_stream():
    """One generator per image (A1111's CPU RNG): row i is what sampling that image alone gives."""
    den = EpsDenoiser(eps_model)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    start = torch.stack([torch.randn(SHAPE[1:], generator=g) for g in gens])  # initial noise from the same streams
    both = sample("Euler a", den, start, 5, generator=gens)
    for i, seed in enumerate((11, 12)):
        g = torch.Generator().manual_seed(seed)
        alone = sample("Euler a", den, torch.randn(SHAPE[1:], generator=g)[None], 5, generator=g)
        assert torch.allclose(both[i], alone[0], atol=1e-6)
