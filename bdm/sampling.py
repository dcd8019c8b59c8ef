"""Samplers for SD1.x-style ε-models, the k-diffusion / A1111 way.

Everything runs in k-diffusion's "VE" space: `x = x0 + σ·ε`, and a sampler is a short function over a
denoiser `model(x, sigma, **extra_args) -> x0 estimate`. `EpsDenoiser` turns an ε-predicting UNet into
such a denoiser exactly as k-diffusion's `CompVisDenoiser` does (what A1111 runs), so the deterministic
samplers give the WebUI's latents for the same start noise. Sampler signature (k-diffusion's):
`fn(model, x, sigmas, extra_args=None, callback=None, generator=None)`; `callback(done, total)` after
each step; `generator` (one, or one per batch row) drives Euler a's fresh noise.

Schedules (all end in 0 except DDIM's, see below):
* "automatic": `CompVisDenoiser.get_sigmas(n)` — n timesteps uniform in [999, 0], σ by log-linear
  interpolation of the training table. = diffusers `timestep_spacing="linspace"` (diffusers interpolates
  σ linearly, so the two agree exactly when (n-1) divides 999, e.g. n = 10, 28, 38; else to ~1e-5).
* "karras": Karras et al. ρ=7 between the table's σ_min and σ_max (A1111's choice of bounds).
  = diffusers `use_karras_sigmas=True`.
* "ddim": the DDIM timesteps t = i·(1000//n) + 1 ("leading" spacing, `steps_offset=1`) and a last
  step to ᾱ₀ rather than to 0 (`set_alpha_to_one=False`) — SD1's DDIMScheduler config, and the original
  LDM DDIMSampler. (A1111 ≥ 1.6 runs only n-1 of these steps, ending at t = 1.)
* "dpm-solver": what the official BDM `inference.py` gets from diffusers 0.24's
  `DPMSolverMultistepScheduler.from_config(<SD1 scheduler config>)`: n integer timesteps
  round(i·999/n) from 999 down ("linspace" spacing; t = 0 itself is never evaluated), then σ(t=0), not 0
  (diffusers ≥ 0.25 `final_sigmas_type="sigma_min"`; their new default "zero" gives other pictures).

diffusers' DDIM and DPM-Solver work in "VP" space: x_vp = x_ve / √(1+σ²). `sample()` starts those two
(`VP_SCHEDULES`) from unit VP noise — noise·√(1+σ_max²) in VE — and returns their result in VP scaling,
as diffusers' pipelines do (`init_noise_sigma` = 1); the other samplers start from noise·σ_max
(k-diffusion/A1111) and end at σ = 0, where VE = VP.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

NUM_TRAIN_TIMESTEPS = 1000


def sd1_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                       num_steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """SD1's "scaled_linear" schedule, computed in float64 and stored in float32 as LDM does."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device="cpu") -> torch.Tensor:
    """Karras et al. (2022) noise levels, n of them plus a final 0 (k-diffusion's function)."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


class EpsDenoiser(nn.Module):
    """k-diffusion's `CompVisDenoiser`: ε-model `unet(x·c_in, t, **cond)` → denoised `x - σ·ε`.

    c_in = 1/√(σ²+1) turns VE `x` into the VP input the UNet was trained on; t is found from σ by
    interpolating the log-σ table (fractional t unless `quantize`, A1111's default is fractional).
    """

    def __init__(self, unet: Callable, alphas_cumprod: torch.Tensor | None = None, quantize: bool = False):
        super().__init__()
        self.inner_model = unet
        ac = sd1_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod).float()
        sigmas = ((1 - ac) / ac) ** 0.5
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.quantize = quantize

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if self.quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """The "automatic" schedule: n timesteps uniform from the last to the first, then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return _append_zero(self.t_to_sigma(t))

    def get_sigmas_karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        return get_sigmas_karras(n, self.sigma_min.item(), self.sigma_max.item(), rho, self.sigmas.device)

    def get_sigmas_ddim(self, n: int) -> torch.Tensor:
        """σ at the DDIM timesteps (leading, offset 1), then σ at t=0 (ᾱ₀, not 0): see module doc."""
        step = NUM_TRAIN_TIMESTEPS // n
        t = torch.arange(n - 1, -1, -1, device=self.sigmas.device) * step + 1
        return torch.cat([self.sigmas[t], self.sigmas[:1]])

    def get_sigmas_dpm_solver(self, n: int) -> torch.Tensor:
        """σ at diffusers' "linspace" integer timesteps round(i·999/n), i = n … 1, then σ(t=0): see module doc.

        Rounded like numpy's `linspace(0, 999, n + 1).round()` (half to even), which diffusers uses.
        """
        last = len(self.sigmas) - 1
        t = (torch.arange(n, 0, -1, dtype=torch.float64) * (last / n)).round().long().to(self.sigmas.device)
        return torch.cat([self.sigmas[t], self.sigmas[:1]])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s ** 2 + 1) ** 0.5
        eps = self.inner_model((x * c_in).to(x.dtype), self.sigma_to_t(sigma), **cond)
        return (x - s * eps).to(x.dtype)


SCHEDULES: dict[str, Callable[[EpsDenoiser, int], torch.Tensor]] = {
    "automatic": lambda denoiser, n: denoiser.get_sigmas(n),
    "karras": lambda denoiser, n: denoiser.get_sigmas_karras(n),
    "ddim": lambda denoiser, n: denoiser.get_sigmas_ddim(n),
    "dpm-solver": lambda denoiser, n: denoiser.get_sigmas_dpm_solver(n),
}
VP_SCHEDULES = ("ddim", "dpm-solver")  # diffusers' schedulers: unit VP noise in, VP latents out


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal like x, drawn on the generator's device so a seed gives the same image anywhere.

    A list of generators draws one row each: with CPU generators seeded like the initial noise, that is
    A1111's ancestral noise with its "CPU" RNG source (`ImageRNG`: one generator per image, draws
    continue after the initial noise).
    """
    if isinstance(generator, (list, tuple)):
        return torch.stack([_noise(x[i:i + 1], g)[0] for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _row(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma * x.new_ones([x.shape[0]], dtype=sigma.dtype)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, generator=None):
    """Euler's method on the probability-flow ODE, dx/dσ = (x - x0)/σ."""
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _row(sigmas[i], x), **extra_args)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, generator=None, eta=1.0):
    """Euler down to σ_down, then fresh noise up to σ_next (eta=1: the DDPM posterior's noise)."""
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _row(sigma, x), **extra_args)
        sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                                    / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + _noise(x, generator) * sigma_up
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, generator=None, first_order_last=False):
    """DPM-Solver++(2M) (Lu et al. 2022) in k-diffusion's form: second-order multistep in λ = -log σ,
    first order on the first step and on the step to σ = 0 (and on the last step if `first_order_last`)."""
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _row(sigmas[i], x), **extra_args)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0 or (first_order_last and i == len(sigmas) - 2):
            d = denoised
        else:
            r = (t + sigmas[i - 1].log()) / h  # h_last / h, with h_last = t - (-log σ_{i-1})
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised = denoised
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


def sample_dpmpp_2m_official(model, x, sigmas, extra_args=None, callback=None, generator=None):
    """The official BDM inference's sampler: diffusers 0.24's `DPMSolverMultistepScheduler` with its
    defaults (DPM-Solver++, order 2, "midpoint", `lower_order_final`) on the "dpm-solver" schedule.
    That is DPM++ 2M, whose step to σ(t=0) stays second order except below 15 steps."""
    return sample_dpmpp_2m(model, x, sigmas, extra_args, callback, generator,
                           first_order_last=len(sigmas) - 1 < 15)


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, generator=None):
    """DDIM with η = 0: keep the predicted ε, move x0 + σ·ε to the next σ. In VE space this is Euler;
    what makes it DDIM is the "ddim" schedule (and, through `sample()`, VP scaling at both ends)."""
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _row(sigmas[i], x), **extra_args)
        eps = (x - denoised) / sigmas[i]
        x = denoised + sigmas[i + 1] * eps
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


# WebUI sampler name → (function, schedule). "DPM++ 2M" is the uniform ("automatic") schedule, as in
# A1111 ≤ 1.8 and A1111 1.10 with Schedule type "Uniform"; 1.10's "Automatic" for DPM++ 2M is Karras.
SAMPLERS: dict[str, tuple[Callable, str]] = {
    "Euler a": (sample_euler_ancestral, "automatic"),
    "Euler": (sample_euler, "automatic"),
    "DPM++ 2M": (sample_dpmpp_2m, "automatic"),
    "DPM++ 2M Karras": (sample_dpmpp_2m, "karras"),
    "DDIM": (sample_ddim, "ddim"),
    "DPM++ 2M (official)": (sample_dpmpp_2m_official, "dpm-solver"),  # `generate --preset official`
}


def get_sigmas(denoiser: EpsDenoiser, name: str, steps: int) -> torch.Tensor:
    """The noise levels sampler `name` uses for `steps` model evaluations."""
    return SCHEDULES[SAMPLERS[name][1]](denoiser, steps)


def sample(name: str, denoiser: Callable, noise: torch.Tensor, steps: int, sigma_schedule: EpsDenoiser | None = None,
           extra_args: dict | None = None, callback=None, generator=None) -> torch.Tensor:
    """txt2img in one call: latents from unit noise with sampler `name` (a WebUI name).

    `denoiser` is the (possibly CFG-wrapped) x0 model; `sigma_schedule` the `EpsDenoiser` whose table
    sets the noise levels (default: `denoiser` itself).
    """
    fn, schedule = SAMPLERS[name]
    table = sigma_schedule if sigma_schedule is not None else denoiser
    sigmas = SCHEDULES[schedule](table, steps).to(noise.device)
    if schedule in VP_SCHEDULES:
        x = noise * math.sqrt(1 + sigmas[0].item() ** 2)
        x = fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, generator=generator)
        return x / math.sqrt(1 + sigmas[-1].item() ** 2)
    x = noise * sigmas[0]
    return fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, generator=generator)
