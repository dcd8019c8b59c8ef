"""Text-to-image with a BDM branch on any SD1.x checkpoint: the headless twin of the WebUI path.

Four prompts: English positive/negative go to the backbone (default "" as in training), Chinese
positive/negative to the branch. One CFG pair per image; rows `[0, B)` are cond, `[B, 2B)` uncond —
the WebUI's layout. Plugins stay where the community puts them: LoRA and Textual Inversion in the
backbone and its English prompt, ControlNets as further branches reading the English context. The
pipeline owns its UNet, so the branches' residuals are summed and passed to its forward (no hooks).
With equal English prompts (the default), the backbone's input blocks run once per CFG pair
(`encoder_copies=2`): they see the same x, t and English context in both rows, and a branch changes
nothing before the middle block's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .bridge import Bridge, sum_residuals
from .formats.checkpoint import SDCheckpoint
from .sampling import SAMPLERS, EpsDenoiser, sample


@dataclass
class Request:
    """One generation: prompts, guidance and sampling settings (WebUI names and defaults)."""

    prompt: str = ""  # Chinese, to the branch
    negative_prompt: str = ""  # Chinese
    en_prompt: str = ""  # English, to the backbone: LoRA trigger words, TI names, style words
    en_negative_prompt: str = ""
    strength: float = 1.0  # the branch's residual multiplier
    cfg_scale: float = 7.5
    steps: int = 20
    sampler: str = "Euler a"
    seed: int = 0
    batch_size: int = 1
    width: int = 512
    height: int = 512
    shared_encoder: bool = True
    batch_noise: bool = False  # one CPU generator for the whole batch (diffusers, the official BDM script)

    def check(self, latent_factor: int = 8) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        for name in ("steps", "batch_size", "width", "height"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width % latent_factor or self.height % latent_factor:
            raise ValueError(f"width and height must be multiples of {latent_factor}, "
                             f"got {self.width}x{self.height}")
        from .text.prompt_schedule import schedule_prompts
        schedule_prompts([self.prompt], [self.negative_prompt], self.steps)  # refuses AND before any loading


@dataclass
class Control:
    """A ControlNet branch with its control image ([1, 3, H, W] in [0, 1], at the output size)."""

    model: Bridge
    image: torch.Tensor
    strength: float = 1.0
    name: str = ""


def chinese_contexts(encoder, request: Request):
    """`step -> [2B, L, H]`: the Chinese contexts (cond rows, then uncond rows) at a sampling step, every
    text of the prompts' schedules encoded once beforehand."""
    from .text.prompt_schedule import schedule_prompts
    from .webui.context import ContextBank
    schedules = schedule_prompts([request.prompt], [request.negative_prompt], request.steps)
    bank = ContextBank(encoder, schedules.all())
    slots = [bank.slot(schedules.positive[0])] * request.batch_size + \
        [bank.slot(schedules.negative[0])] * request.batch_size
    return lambda step: bank.rows(slots, step)


def row_generators(seed: int, rows: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed + i, drawing its initial and ancestral noise — the
    WebUI's CPU RNG, so a seed gives the same image on every device and in every batch position."""
    return [torch.Generator().manual_seed(seed + i) for i in range(rows)]


def initial_noise(seed: int, rows: int, shape: tuple[int, ...], batch_noise: bool = False):
    """Unit start noise [rows, *shape] and the generator(s) that continue with the ancestral noise.

    Per image (default): `row_generators`, the WebUI's way. `batch_noise`: one CPU generator seeded
    `seed` draws the whole batch at once, as diffusers' pipelines — and so the official BDM
    `inference.py` — do (`randn([B, 4, H/8, W/8], generator=torch.Generator("cpu").manual_seed(seed))`);
    image i then depends on its batch position.
    """
    if batch_noise:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((rows, *shape), generator=generator), generator
    generators = row_generators(seed, rows)
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def to_images(decoded: torch.Tensor) -> list[Image.Image]:
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).cpu().numpy())) for p in pixels]


def control_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A control image as ControlNets take it: RGB, resized to the output size, values in [0, 1]."""
    rgb = image.convert("RGB").resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


class Pipeline:
    """An SD1.x checkpoint, optionally a BDM branch and ControlNets; `pipeline(request) -> images`."""

    def __init__(self, checkpoint: SDCheckpoint, bridge: Bridge | None = None, controls: list[Control] = (),
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 text_device: str | torch.device = "cpu"):
        self.checkpoint, self.bridge, self.controls = checkpoint, bridge, list(controls)
        self.device, self.dtype = torch.device(device), dtype
        checkpoint.unet.to(self.device, dtype)
        checkpoint.vae.to(self.device, dtype)
        checkpoint.text_encoder.to(self.device)  # English CLIP stays fp32: it runs once per generation
        for branch in [bridge] + [c.model for c in self.controls]:
            if branch is not None:
                branch.to(self.device, dtype)
        if bridge is not None:
            if bridge.text_encoder is None:
                raise ValueError("the BDM branch has no Chinese text encoder; give one with --chinese-clip")
            bridge.text_encoder.to(text_device)

    @property
    def latent_factor(self) -> int:
        return self.checkpoint.vae.config.downscale

    def encode_prompts(self, request: Request):
        """English contexts for the backbone, and the Chinese contexts for the branch: a function of the
        sampling step giving cond rows then uncond rows (prompt editing `[猫:狗:0.5]`, `[红|蓝]` as in the
        WebUI), or None without a branch."""
        b = request.batch_size
        english = self.checkpoint.text_encoder.encode([request.en_prompt] * b + [request.en_negative_prompt] * b)
        chinese = None
        if self.bridge is not None:
            chinese = chinese_contexts(self.bridge.text_encoder, request)
        return english.to(self.device, self.dtype), chinese

    def branches(self, request: Request, chinese, step: list[int]):
        """The branches of a request, each `(x, t, English context) -> residuals` for one UNet call;
        `chinese(step)` is the Chinese context of the current model evaluation `step[0]`."""
        out = []
        if self.bridge is not None and request.strength != 0:
            out.append(lambda x, t, en: self.bridge.residuals(x, t, chinese(step[0]), request.strength))
        for control in self.controls:
            hint = control.image.to(self.device, self.dtype)
            out.append(lambda x, t, en, c=control, hint=hint: c.model.residuals(x, t, en, c.strength, hint))
        return out

    @torch.no_grad()
    def latents(self, request: Request, callback=None) -> torch.Tensor:
        request.check(self.latent_factor)
        english, chinese = self.encode_prompts(request)
        shared = request.shared_encoder and request.en_prompt == request.en_negative_prompt
        copies = 2 if shared else 1
        step = [0]  # model evaluations so far: the WebUI's CFGDenoiser.step, which picks scheduled prompts
        branches = self.branches(request, chinese, step)
        unet = self.checkpoint.unet

        def unet_with_branches(x, t, context):
            residuals = sum_residuals(branch(x, t, context) for branch in branches)
            return unet(x, t, context, residuals=residuals, encoder_copies=copies)

        denoiser = EpsDenoiser(unet_with_branches).to(self.device)

        def cfg_model(x, sigma):
            out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=english)
            step[0] += 1
            cond, uncond = out.chunk(2)
            return uncond + request.cfg_scale * (cond - uncond)

        f = self.latent_factor
        noise, generators = initial_noise(request.seed, request.batch_size,
                                          (4, request.height // f, request.width // f), request.batch_noise)
        return sample(request.sampler, cfg_model, noise.to(self.device, self.dtype), request.steps,
                      sigma_schedule=denoiser, callback=callback, generator=generators)

    @torch.no_grad()
    def __call__(self, request: Request, callback=None) -> list[Image.Image]:
        latents = self.latents(request, callback)
        return to_images(self.checkpoint.vae.decode(latents.to(self.dtype)))
