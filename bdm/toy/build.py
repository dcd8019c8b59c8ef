"""`python -m bdm.toy build`: every toy model from scratch, deterministic from a seed.

Stages (each prints its time): data → VAE → latents → English SD (UNet + CLIP text tower) →
toy Chinese CLIP (contrastive) → BDM (`python -m bdm.train`) → judge → LoRA → ControlNet → DreamBooth →
Textual Inversion → write `bdm/toy/weights/`. Every stage after the English SD trains on the shipped
(fp16) backbone and its VAE's latents, each from its own random stream, so `python -m bdm.toy retrain
STAGE…` redoes stages alone exactly as a full build would.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..formats.lora import lora_tensors
from ..train.ema import EMA
from ..train.schedules import NoiseSchedule, lr_factor
from . import domain as D
from . import models as M
from . import paths


@dataclass(frozen=True)
class Steps:
    """Optimizer steps per stage (and batch sizes); `QUICK` is the CI-sized smoke run."""

    n_base: int = 8000  # plain pictures (all shapes; the English side drops the stars)
    n_style: int = 1500  # striped / outline pictures each
    vae: int = 1000
    vae_batch: int = 32
    judge: int = 1500  # never scaled: the judge must be good whatever the build's scale
    backbone: int = 6000
    backbone_batch: int = 64
    chinese_clip: int = 3000  # fewer leave shapes with one sentence embedding (docs/training-notes.md)
    bdm: int = 3000
    bdm_batch: int = 64
    lora: int = 400
    controlnet: int = 1600  # at lr 1e-3: position well above 800 steps at 5e-4 (docs/training-notes.md)
    dreambooth: int = 800
    ti: int = 300
    plugin_batch: int = 32


FULL = Steps()
LR_FLOOR = 0.1  # every stage's learning rate: warm-up, then a cosine decay to a tenth of the peak


def scaled(steps: Steps, scale: float) -> Steps:
    """The same build with every stage's step count multiplied by `scale` (data sizes kept)."""
    names = ("vae", "backbone", "chinese_clip", "bdm", "lora", "controlnet", "dreambooth", "ti")
    return replace(steps, **{n: max(1, round(getattr(steps, n) * scale)) for n in names})


def steps_for(quick: bool, scale: float) -> Steps:
    """The step counts of a build or retrain: `QUICK`, or `FULL` times `scale`."""
    return QUICK if quick else scaled(FULL, scale)


QUICK = Steps(n_base=96, n_style=32, vae=3, vae_batch=8, judge=3, backbone=3, backbone_batch=8, chinese_clip=3,
              bdm=2, bdm_batch=4, lora=2, controlnet=2, dreambooth=2, ti=2, plugin_batch=4)

CHINESE_CONFIG = {"vocab_size": 21128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 128, "max_position_embeddings": 64, "type_vocab_size": 2,
                  "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0}


class Log:
    def __init__(self):
        self.t0 = time.time()
        self.times: dict[str, float] = {}

    def stage(self, name: str):
        log = self

        class _Stage:
            def __enter__(self):
                self.t = time.time()
                print(f"== {name}", file=sys.stderr, flush=True)

            def __exit__(self, *exc):
                dt = time.time() - self.t
                log.times[name] = dt
                print(f"== {name}: {dt:.0f} s (total {time.time() - log.t0:.0f} s)", file=sys.stderr, flush=True)
        return _Stage()


def bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=2.0, leave=True)


# -- data ----------------------------------------------------------------------------------------

@dataclass
class Pool:
    specs: list
    images: torch.Tensor  # [N, 3, 64, 64] in [-1, 1]
    latents: torch.Tensor | None = None


def make_pool(rng: random.Random, n: int, **kwargs) -> Pool:
    specs = [D.random_spec(rng, **kwargs) for _ in range(n)]
    return Pool(specs, torch.from_numpy(D.to_array([D.render(s) for s in specs])))


def make_data(steps: Steps, seed: int) -> dict[str, Pool]:
    rng = random.Random(seed)
    return {"base": make_pool(rng, steps.n_base),
            "striped": make_pool(rng, steps.n_style, shapes=D.ENGLISH_SHAPES, background="striped"),
            "outline": make_pool(rng, steps.n_style, shapes=D.ENGLISH_SHAPES, drawing="outline")}


def english_rows(pool: Pool) -> list[int]:
    return [i for i, s in enumerate(pool.specs) if s.shape != D.CHINESE_ONLY]


# -- VAE -------------------------------------------------------------------------------------------

def train_vae(images: torch.Tensor, steps: Steps, gen: torch.Generator):
    from ..vae import AutoencoderKL
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    vae = AutoencoderKL(M.VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    n = images.shape[0]
    background = torch.tensor(D.BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    with bar(steps.vae, "VAE") as pb:
        for step in range(steps.vae):
            for g in opt.param_groups:
                g["lr"] = 2e-3 * lr_factor(step, steps.vae, 50, "cosine", LR_FLOOR)
            idx = torch.randint(0, n, (steps.vae_batch,), generator=gen)
            x = images[idx]
            if step < int(0.9 * steps.vae):  # most steps on 32×32 crops: 4× cheaper, same convolutions
                ox, oy = (int(v) * 8 for v in torch.randint(0, 5, (2,), generator=gen))
                x = x[:, :, oy:oy + 32, ox:ox + 32]
            rec, mean, logvar = vae(x, generator=gen)
            # the object covers a few % of the pixels: weight them up, or colour is learnt last
            weight = 1.0 + 20.0 * ((x - background).abs().amax(1, keepdim=True) > 0.08).float()
            weight = weight / weight.mean()
            mse = (weight * (rec - x).pow(2)).mean()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
            # a KL weight high enough to keep the posterior's spread: the decoder then maps the small
            # latent errors of sampling to clean pictures (with 1e-5 they decode to stripes and tints)
            loss = mse + 0.5 * (weight * (rec - x).abs()).mean() + 1e-3 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pb.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.1f}", refresh=False)
            pb.update()
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


# -- judge -----------------------------------------------------------------------------------------

def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise, so the judge reads generated (VAE-decoded, soft) images the way it reads ground truth."""
    b = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(b, 1, 1, 1, generator=gen)
    x = w * blurred + (1 - w) * x
    return x + 0.06 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)


def train_judge(steps: Steps, gen: torch.Generator, seed: int, vae):
    """Classifiers for every attribute, on ground-truth pictures with their true labels: half of each batch
    as rendered, half as the toy VAE reconstructs them: what every generated image has been through (a judge
    that only saw renders misread reconstructed shapes; docs/training-notes.md)."""
    rng = random.Random(seed + 17)
    n = max(64, steps.judge * 4)
    specs = [D.random_spec(rng, background=rng.choice(D.BACKGROUNDS), drawing=rng.choice(D.DRAWINGS))
             for _ in range(n)]
    images = torch.from_numpy(D.to_array([D.render(s) for s in specs]))
    rebuilt = reconstruct(vae, images)
    labels = {k: torch.tensor([s.labels()[k] for s in specs]) for k in M.HEADS}
    torch.manual_seed(seed + 17)
    judge = M.Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    with bar(steps.judge, "judge") as pb:
        for step in range(steps.judge):
            for g in opt.param_groups:
                g["lr"] = 2e-3 * lr_factor(step, steps.judge, 30, "cosine", LR_FLOOR)
            idx = torch.randint(0, n, (64,), generator=gen)
            pick = (torch.rand(64, generator=gen) < 0.5).view(-1, 1, 1, 1)
            out = judge(augment(torch.where(pick, rebuilt[idx], images[idx]), gen))
            loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in M.HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pb.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            pb.update()
    judge.eval().requires_grad_(False)
    # held-out check on fresh ground truth (every background and drawing), rendered and reconstructed
    test = [D.random_spec(rng, background=rng.choice(D.BACKGROUNDS), drawing=rng.choice(D.DRAWINGS))
            for _ in range(400)]
    truth = {k: torch.tensor([s.labels()[k] for s in test]) for k in M.HEADS}
    rendered = torch.from_numpy(D.to_array([D.render(s) for s in test]))
    accuracy = {}
    for what, pictures in (("judge_accuracy", rendered), ("judge_on_vae_reconstructions", reconstruct(vae, rendered))):
        pred = judge.predict(pictures)
        accuracy[what] = {k: float((pred[k] == truth[k]).float().mean()) for k in M.HEADS}
        print(f"{what}: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy[what].items()), file=sys.stderr)
    return judge, accuracy


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(images[i:i + batch])).clamp(-1, 1)
                      for i in range(0, images.shape[0], batch)])


# -- latent-space diffusion training ----------------------------------------------------------------

def caption_batch(specs, idx, rng: random.Random, make) -> list[str]:
    return [make(specs[i], rng) for i in idx.tolist()]


def diffusion_loop(name: str, total: int, params, lr: float, sample_batch, eps_fn, gen: torch.Generator,
                   modules_to_ema=None, ema_decay: float = 0.999, warmup: int = 100, t_max: int | None = None):
    """Generic ε-prediction training loop; `sample_batch()` → (z0, captions or extras); timesteps drawn
    from [0, t_max) (default: the whole schedule)."""
    sched = NoiseSchedule()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMA(modules_to_ema, ema_decay) if modules_to_ema is not None else None
    avg = None
    with bar(total, name) as pb:
        for step in range(total):
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, total, min(warmup, max(1, total // 10)), "cosine", LR_FLOOR)
            z0, extra = sample_batch()
            z_t, t, noise = sched.noisy(z0, gen, t_max)
            loss = F.mse_loss(eps_fn(z_t, t, extra), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                ema.update(modules_to_ema)
            avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
            pb.set_postfix(loss=f"{avg:.4f}", refresh=False)
            pb.update()
    return ema


def english_caption(spec, rng: random.Random) -> str:
    return D.english_caption(spec, D.train_template(rng, "en"))


def english_training_caption(spec, rng: random.Random) -> str:
    """10 % empty, 20 % partial (only the colour or only the shape), else a full caption; half of the
    non-empty ones start with the object's size ("large, …"). Partial captions teach the backbone that a
    word it does not know (a LoRA trigger, a style word) leaves colour and shape open — as in real
    captions — instead of standing for some colour. The size words let the backbone take size from text,
    so the toy Textual Inversion (small objects) has something to find: without them it cannot."""
    r = rng.random()
    if r < 0.1:
        return ""
    caption = (D.partial_caption(spec, rng.randrange(len(D.EN_PARTIAL))) if r < 0.3
               else english_caption(spec, rng))
    return with_size_word(spec.size, caption) if rng.random() < 0.5 else caption


def with_size_word(size: str, caption: str) -> str:
    return f"{size}, {caption}"


def backbone_captions(specs) -> list[str]:
    """Every caption `english_training_caption` can give for these pictures (encoded once, up front)."""
    plain = ({D.english_caption(s, t) for s in specs for t in range(len(D.EN_TEMPLATES))}
             | {D.partial_caption(s, t) for s in specs for t in range(len(D.EN_PARTIAL))})
    return sorted(plain | {with_size_word(size, c) for c in plain for size in D.SIZES} | {""})


def train_backbone(pool: Pool, steps: Steps, gen: torch.Generator, seed: int):
    from ..unet import UNetModel
    torch.manual_seed(seed + 1)
    unet, text = UNetModel(M.UNET_CONFIG), M.english_encoder()
    text.transformer.train()
    rows = torch.tensor(english_rows(pool))
    rng = random.Random(seed + 1)
    captions = backbone_captions(pool.specs)
    ids = M.english_ids(text, captions)
    index = {c: i for i, c in enumerate(captions)}

    def sample_batch():
        idx = rows[torch.randint(0, len(rows), (steps.backbone_batch,), generator=gen)]
        caps = [english_training_caption(pool.specs[i], rng) for i in idx.tolist()]
        return pool.latents[idx], torch.tensor([index[c] for c in caps])

    def eps_fn(z_t, t, cap_idx):
        return unet(z_t, t, M.english_hidden(text, ids[cap_idx]))

    both = torch.nn.ModuleDict({"unet": unet, "text": text.transformer})
    params = [p for p in both.parameters()]
    ema = diffusion_loop("English SD", steps.backbone, params, 1e-3, sample_batch, eps_fn, gen, both, 0.999,
                         warmup=200)
    ema.copy_to(both)
    text.transformer.eval()
    return unet.eval().requires_grad_(False), text.requires_grad_(False)


# -- toy Chinese CLIP --------------------------------------------------------------------------------

def train_chinese_clip(pool: Pool, steps: Steps, gen: torch.Generator, seed: int):
    """Contrastive pretraining (InfoNCE) of the tiny Chinese text tower against an image tower that
    reads latents: the stand-in for the pretrained Chinese CLIP the paper freezes."""
    from ..text.chinese import ChineseTextEncoder
    torch.manual_seed(seed + 2)
    encoder = ChineseTextEncoder(CHINESE_CONFIG)
    for module in encoder.model.modules():  # trained-model-like LayerNorm affines (see ChineseTextEncoder.tiny)
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.data.normal_(1.0, 0.1)
            module.bias.data.normal_(0.1, 0.05)
    dim = CHINESE_CONFIG["hidden_size"]
    image_tower = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 64, 256), torch.nn.GELU(),
                                      torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, dim))
    text_proj = torch.nn.Linear(dim, dim)
    logit_scale = torch.nn.Parameter(torch.tensor(2.6))
    encoder.model.requires_grad_(True)
    params = list(encoder.model.parameters()) + list(image_tower.parameters()) + list(text_proj.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    rng = random.Random(seed + 2)
    n = len(pool.specs)
    with bar(steps.chinese_clip, "Chinese CLIP") as pb:
        for step in range(steps.chinese_clip):
            for g in opt.param_groups:
                g["lr"] = 1e-3 * lr_factor(step, steps.chinese_clip, 30, "cosine", LR_FLOOR)
            idx = torch.randint(0, n, (128 if n >= 128 else n,), generator=gen)
            caps = [D.chinese_caption(pool.specs[i], D.train_template(rng, "zh")) for i in idx.tolist()]
            ids, _ = encoder.chunk_ids(caps)
            hidden = encoder(ids[:, 0])  # [B, 52, H]
            text_emb = F.normalize(text_proj(hidden[:, 0]), dim=-1)
            image_emb = F.normalize(image_tower(pool.latents[idx]), dim=-1)
            logits = logit_scale.exp().clamp(max=100) * text_emb @ image_emb.T
            # pictures with the same colour and shape are positives of each other
            key = torch.tensor([hash((pool.specs[i].colour, pool.specs[i].shape)) for i in idx.tolist()])
            target = (key[:, None] == key[None]).float()
            target = target / target.sum(1, keepdim=True)
            loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target.T * logits.log_softmax(0)).sum(0).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pb.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            pb.update()
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder


# -- BDM through `python -m bdm.train` ---------------------------------------------------------------

def write_folder(folder: Path, pool: Pool, captions: list[str]) -> Path:
    """A folder of name.png + name.txt, the trainer's simplest dataset."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(pool.images, captions)):
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption, encoding="utf-8")
    return folder


def train_bdm(work: Path, backbone_path: Path, unet, encoder, pool: Pool, steps: Steps, seed: int) -> Path:
    from ..bridge import Bridge
    from ..formats.bdm_file import save_bdm
    from ..train import parse_args, train
    rng = random.Random(seed + 3)
    data = write_folder(work / "bdm-data", pool,
                        [D.chinese_caption(s, D.train_template(rng, "zh")) for s in pool.specs])
    encoder_file = save_bdm(work / "chinese-clip.safetensors", Bridge.from_backbone(unet, encoder.hidden_size),
                            encoder, notes={"what": "toy Chinese CLIP text tower (the branch is untrained)"})
    out = work / "bdm-train"
    argv = ["--checkpoint", str(backbone_path), "--text-encoder", str(encoder_file), "--data", str(data),
            "--output", str(out), "--max-steps", str(steps.bdm), "--resolution", "64", "--no-random-flip",
            "--cache-latents", "--batch-size", str(steps.bdm_batch), "--learning-rate", "5e-4",
            "--lr-schedule", "cosine", "--lr-warmup-steps", str(min(100, max(1, steps.bdm // 10))),
            "--min-lr-ratio", "0.1", "--weight-decay", "0", "--ema", "--ema-decay", "0.998",
            "--num-workers", "0", "--checkpoint-every", "0", "--seed", str(seed), "--device", "cpu",
            "--save-dtype", "fp16", "--log-every", "50"]
    print("python -m bdm.train " + " ".join(argv), file=sys.stderr)
    train(parse_args(argv))
    return out / "bdm.safetensors"


# -- community plugins -----------------------------------------------------------------------------

def english_context(text, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return M.english_hidden(text, M.english_ids(text, captions))


def train_lora(unet, text, pool: Pool, steps: Steps, gen: torch.Generator, seed: int):
    torch.manual_seed(seed + 4)
    lora_unet = copy.deepcopy(unet)
    loras = M.add_loras(lora_unet, rank=4, alpha=4.0)
    rng = random.Random(seed + 4)
    trig = D.LORA_TRIGGER

    def sample_batch():
        idx = torch.randint(0, len(pool.specs), (steps.plugin_batch,), generator=gen)
        caps = [trig if rng.random() < 0.4 else f"{trig}, {english_caption(pool.specs[i], rng)}" for i in idx.tolist()]
        return pool.latents[idx], english_context(text, caps)

    params = [p for lora in loras.values() for p in (lora.down, lora.up)]
    diffusion_loop("LoRA", steps.lora, params, 2e-3, sample_batch, lambda z, t, ctx: lora_unet(z, t, ctx), gen,
                   warmup=30)
    return lora_tensors(unet.config, {name: lora.layer for name, lora in loras.items()})


def train_controlnet(unet, text, pool: Pool, steps: Steps, gen: torch.Generator, seed: int):
    from ..bridge import Bridge
    torch.manual_seed(seed + 5)
    control = Bridge.from_backbone(unet, hint_channels=3).train()
    rows = torch.tensor(english_rows(pool))
    hints = torch.from_numpy(D.to_array([D.hint_image(s) for s in pool.specs]) * 0.5 + 0.5)
    rng = random.Random(seed + 5)

    def sample_batch():
        idx = rows[torch.randint(0, len(rows), (steps.plugin_batch,), generator=gen)]
        caps = ["" if rng.random() < 0.5 else english_caption(pool.specs[i], rng) for i in idx.tolist()]
        return pool.latents[idx], (english_context(text, caps), hints[idx])

    def eps_fn(z_t, t, extra):
        ctx, hint = extra
        return unet(z_t, t, ctx, residuals=control(z_t, t, ctx, hint=hint))  # the frozen backbone

    ema = diffusion_loop("ControlNet", steps.controlnet, list(control.parameters()), 1e-3, sample_batch, eps_fn,
                         gen, control, 0.995, warmup=50)
    ema.copy_to(control)
    return control.eval().requires_grad_(False)


DREAMBOOTH_T_MAX = 600  # the fine-tune's timesteps: [0, 600) of 1000


def train_dreambooth(unet, text, pool: Pool, steps: Steps, gen: torch.Generator, seed: int):
    """A style fine-tune of the whole UNet on outline pictures with their English captions. It trains the
    timesteps below DREAMBOOTH_T_MAX only, where the drawing style is decided and not the composition (as
    the timestep-bias options of diffusers' training scripts do), and never on empty captions: together they
    keep most of BDM's shape accuracy on the fine-tuned backbone (docs/training-notes.md)."""
    torch.manual_seed(seed + 6)
    tuned = copy.deepcopy(unet).train().requires_grad_(True)
    rng = random.Random(seed + 6)

    def sample_batch():
        idx = torch.randint(0, len(pool.specs), (steps.plugin_batch,), generator=gen)
        caps = [english_caption(pool.specs[i], rng) for i in idx.tolist()]
        return pool.latents[idx], english_context(text, caps)

    ema = diffusion_loop("DreamBooth", steps.dreambooth, list(tuned.parameters()), 2e-4, sample_batch,
                         lambda z, t, ctx: tuned(z, t, ctx), gen, tuned, 0.99, warmup=30, t_max=DREAMBOOTH_T_MAX)
    ema.copy_to(tuned)
    return tuned.eval().requires_grad_(False)


def train_ti(unet, text, pool: Pool, steps: Steps, gen: torch.Generator, seed: int, n_vectors: int = 2):
    """Textual Inversion: `n_vectors` input embeddings for the name `smallthing`, on small-object pictures.
    Small, not large: CFG makes BDM alone draw mostly large objects, so only a small-making TI shows its
    own effect in the eval."""
    torch.manual_seed(seed + 7)
    rows = torch.tensor([i for i, s in enumerate(pool.specs) if s.size == "small" and s.shape != D.CHINESE_ONLY])
    name = D.TI_NAME
    token_embedding = text.transformer.get_input_embeddings()
    init = token_embedding.weight[text.tokenizer.encode("small")[0]].detach().clone()
    vectors = torch.nn.Parameter(init[None].repeat(n_vectors, 1) + 0.01 * torch.randn(n_vectors, init.shape[0]))
    rng = random.Random(seed + 7)
    text.add_embedding(name, torch.zeros(n_vectors, init.shape[0]))  # to tokenize the name as A1111 does

    def build(caps: list[str]):
        chunks = [text.tokenize_line(c)[0][0] for c in caps]
        ids = torch.tensor([c.tokens for c in chunks])
        offsets = [c.fixes[0][0] + 1 for c in chunks]
        return ids, offsets

    current: list = []

    def put_vectors(module, inputs, output):  # A1111's way: overwrite the placeholder rows
        rows_out = [torch.cat([row[:off], vectors.to(row.dtype), row[off + n_vectors:]])
                    for row, off in zip(output, current)]
        return torch.stack(rows_out)

    def eps_fn(z_t, t, extra):
        ids, offsets = extra
        current[:] = offsets
        handle = token_embedding.register_forward_hook(put_vectors)
        try:
            hidden = text.transformer(input_ids=ids).last_hidden_state
        finally:
            handle.remove()
        return unet(z_t, t, hidden)

    def sample_batch():
        idx = rows[torch.randint(0, len(rows), (steps.plugin_batch,), generator=gen)]
        caps = [name if rng.random() < 0.5 else f"{name}, {english_caption(pool.specs[i], rng)}" for i in idx.tolist()]
        return pool.latents[idx], build(caps)

    diffusion_loop("Textual Inversion", steps.ti, [vectors], 5e-3, sample_batch, eps_fn, gen, warmup=20)
    text.remove_embedding(name)
    return vectors.detach().clone()


# -- the whole build --------------------------------------------------------------------------------

PLUGINS = ("lora", "controlnet", "dreambooth", "ti")
# the stages that start from the shipped backbone: `retrain` redoes them (new stages go last: the index
# seeds each stage's random stream)
FROM_SHIPPED = ("judge",) + PLUGINS + ("chinese_clip", "bdm")
BUILD_ORDER = ("chinese_clip", "bdm", "judge") + PLUGINS


def stage_generator(seed: int, name: str) -> torch.Generator:
    """Each of these stages draws from its own stream, so `retrain` of one stage is the build's stage."""
    return torch.Generator().manual_seed(seed * 1000 + 100 + FROM_SHIPPED.index(name))


def train_from_shipped(out: Path, data: dict[str, Pool], steps: Steps, seed: int, log: Log,
                       names=BUILD_ORDER) -> dict:
    """Train the stages `names` on the backbone as shipped (`out`'s fp16 checkpoint, as a user or a
    community trainer would download it): the toy Chinese CLIP and the BDM (through `python -m bdm.train`),
    the judge (on the shipped VAE), the community plugins; write them to `out` in their real formats.
    The BDM reads the Chinese CLIP trained in the same call, else the one in `out`'s BDM file. Returns the
    judge's accuracies when it was trained."""
    from ..formats.bdm_file import load_bdm
    from ..formats.checkpoint import load_checkpoint, save_checkpoint
    from ..formats.controlnet import save_controlnet
    from ..formats.embedding import save_embedding
    from ..formats.files import save_safetensors
    shipped = load_checkpoint(out / paths.backbone_checkpoint().name)
    unet, vae, text = shipped.unet.float(), shipped.vae.float(), shipped.text_encoder
    text.transformer.float()
    if any(name in PLUGINS or name == "chinese_clip" for name in names):
        for pool in data.values():
            pool.latents = encode(vae, pool.images)
    report, chinese = {}, None
    for name in names:
        gen = stage_generator(seed, name)
        if name == "chinese_clip":
            with log.stage("Chinese CLIP"):
                chinese = train_chinese_clip(data["base"], steps, gen, seed)
        elif name == "bdm":
            if chinese is None:
                chinese = load_bdm(out / paths.bdm_file().name).text_encoder.float()
            with log.stage("BDM (python -m bdm.train)"), tempfile.TemporaryDirectory(prefix="bdm-toy-") as work:
                trained = train_bdm(Path(work), out / paths.backbone_checkpoint().name, unet, chinese,
                                    data["base"], steps, seed)
                load_bdm(trained)  # what the trainer wrote loads
                shutil.copyfile(trained, out / paths.bdm_file().name)
        elif name == "judge":
            with log.stage("judge"):
                judge, report = train_judge(steps, gen, seed, vae)
                save_safetensors(out / paths.judge_file().name,
                                 {k: v.contiguous() for k, v in judge.state_dict().items()},
                                 {"what": "toy judge: colour, shape, position, size, background, drawing"})
        elif name == "lora":
            with log.stage("LoRA"):
                lora = train_lora(unet, text, data["striped"], steps, gen, seed)
                save_safetensors(out / paths.lora_file().name, lora,
                                 {"ss_network_module": "networks.lora", "ss_network_dim": "4",
                                  "ss_network_alpha": "4.0", "trigger_word": D.LORA_TRIGGER})
        elif name == "controlnet":
            with log.stage("ControlNet"):
                control = train_controlnet(unet, text, data["base"], steps, gen, seed)
                save_controlnet(out / paths.controlnet_file().name, half(control))
        elif name == "dreambooth":
            with log.stage("DreamBooth"):
                tuned = train_dreambooth(unet, text, data["outline"], steps, gen, seed)
                save_checkpoint(out / paths.dreambooth_checkpoint().name, half(tuned), half(vae), half(text),
                                paths.CLIP_DIR_NAME, latent_size=8, clip_tokenizer=False)
        elif name == "ti":
            with log.stage("Textual Inversion"):
                vectors = train_ti(unet, text, data["base"], steps, gen, seed)
                save_embedding(out / paths.embedding_file().name, vectors, D.TI_NAME)
        else:
            raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(FROM_SHIPPED)}")
    return report


def retrain(names, weights: Path | None = None, seed: int | None = None, scale: float | None = None,
            quick: bool | None = None) -> dict:
    """Retrain stages of a finished build from its shipped backbone (e.g. after changing a stage's steps):
    the Chinese CLIP, the BDM, the judge, the plugins; the other models stay. Seed, scale and quick default
    to the build's own (its `build.json`), so a stage retrained unchanged is the build's stage. Records the
    new steps, times, accuracies in `build.json`."""
    bad = [n for n in names if n not in FROM_SHIPPED]
    if bad:
        raise ValueError(f"unknown stage(s) {', '.join(bad)}; retrain takes some of {', '.join(FROM_SHIPPED)}")
    out = Path(weights) if weights else paths.WEIGHTS
    if not (out / paths.backbone_checkpoint().name).is_file():
        raise FileNotFoundError(f"{out}: no {paths.backbone_checkpoint().name}; run `python -m bdm.toy build` first")
    record = out / "build.json"
    report = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    seed = report.get("seed", 0) if seed is None else seed
    scale = report.get("scale", 1.0) if scale is None else scale
    quick = report.get("quick", False) if quick is None else quick
    steps = steps_for(quick, scale)
    log = Log()
    with log.stage("data"):
        data = make_data(steps, seed)
    names = [n for n in BUILD_ORDER if n in names]  # the Chinese CLIP before the BDM that reads it
    judged = train_from_shipped(out, data, steps, seed, log, names)
    report.update(judged)
    for name in names:
        report.setdefault("steps", {})[name] = getattr(steps, name)
    report.setdefault("stage_seconds", {}).update({k: v for k, v in log.times.items() if k != "data"})
    report["retrained"] = sorted(set(report.get("retrained", [])) | set(names))
    record.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report


def half(module):
    return copy.deepcopy(module).half()


def build(out_dir: Path | None = None, quick: bool = False, seed: int = 0, scale: float = 1.0) -> dict:
    """Train every toy model and write them to `out_dir` (default: the package's weights folder)."""
    from ..formats.checkpoint import save_checkpoint
    steps = steps_for(quick, scale)
    out = Path(out_dir) if out_dir else paths.WEIGHTS
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    log = Log()
    with log.stage("data"):
        data = make_data(steps, seed)
    with log.stage("VAE"):
        all_images = torch.cat([p.images for p in data.values()])
        vae = train_vae(all_images, steps, gen)
        latents = encode(vae, all_images)
        std = float(latents.std())
        vae.config = replace(vae.config, scale_factor=round(1.0 / std, 5))
        start = 0
        for pool in data.values():  # the same latents, scaled: what vae.encode now returns
            pool.latents = latents[start:start + len(pool.specs)] * vae.config.scale_factor
            start += len(pool.specs)
        with torch.no_grad():
            rec = vae.decode(data["base"].latents[:256]).clamp(-1, 1)
        vae_mse = float(F.mse_loss(rec, data["base"].images[:256]))
        print(f"VAE: scale_factor {vae.config.scale_factor}, reconstruction MSE {vae_mse:.4f}", file=sys.stderr)
    with log.stage("English SD"):
        unet, text = train_backbone(data["base"], steps, gen, seed)
        save_checkpoint(out / paths.backbone_checkpoint().name, half(unet), half(vae), half(text),
                        paths.CLIP_DIR_NAME, latent_size=8, clip_tokenizer=False)
    judged = train_from_shipped(out, data, steps, seed, log)
    report = {"seed": seed, "quick": quick, "scale": scale, "steps": steps.__dict__, "stage_seconds": log.times,
              "vae_mse": vae_mse, "vae_scale_factor": vae.config.scale_factor, **judged}
    (out / "build.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"built the toy world in {time.time() - log.t0:.0f} s → {out}", file=sys.stderr)
    return report
