"""Training schedules, used by the trainer and the toy build alike: the learning rate over optimizer
steps, and the noise over diffusion timesteps (SD1's, q(z_t | z_0))."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant", low: float = 0.0) -> float:
    """The learning rate at `step` of `total`, as a multiple of the peak: a linear warm-up over `warmup`
    steps, then constant, or a cosine or linear decay to `low`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return low + (1 - low) * (1 - progress)
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant, cosine or linear)")


class NoiseSchedule:
    """SD1.5's training schedule (scaled-linear β, 1000 steps, `bdm.sampling.sd1_alphas_cumprod`)."""

    def __init__(self, device=None):
        from ..sampling import sd1_alphas_cumprod
        ac = sd1_alphas_cumprod().to(device)
        self.num_timesteps = ac.shape[0]
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t for each row's timestep, in fp32."""
        shape = (-1,) + (1,) * (z0.ndim - 1)
        return (self.sqrt_ac[t].view(shape) * z0.float() + self.sqrt_1m_ac[t].view(shape) * noise.float())

    def noisy(self, z0: torch.Tensor, generator: torch.Generator, t_max: int | None = None):
        """(z_t, t, noise): z0 noised at timesteps drawn from [0, t_max) (default: the whole schedule),
        timesteps and noise drawn from `generator`."""
        t = torch.randint(0, t_max or self.num_timesteps, (z0.shape[0],), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        return self.add_noise(z0, noise, t), t, noise
