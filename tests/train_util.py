"""Helpers for the trainer tests: a tiny SD1.x checkpoint on disk, toy datasets, the learning check.
Imported by test modules (test modules never import each other); fixtures live in conftest.py."""
from __future__ import annotations

import io
import json
import statistics
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {"红色": (220, 30, 30), "绿色": (30, 200, 40), "蓝色": (30, 40, 220), "黄色": (230, 210, 30)}


def train_vae_on_colours(vae, steps: int = 150, size: int = 32, seed: int = 0):
    """A few hundred Adam steps of reconstruction on solid colours, so decoded colours mean something."""
    g = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(steps):
        rgb = torch.rand((8, 3, 1, 1), generator=g) * 2 - 1
        images = rgb.expand(8, 3, size, size)
        recon, mean, logvar = vae(images, sample=False)
        loss = torch.nn.functional.mse_loss(recon, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval().requires_grad_(False), loss.item()


def tiny_parts(seed: int = 0):
    """UNet (SMALL, context 64), a VAE with downscale 2 (tiny images stay cheap), a tiny English CLIP."""
    import transformers

    from bdm.text.clip import EnglishTextEncoder, text_config
    from bdm.unet import SMALL, UNetModel
    from bdm.vae import AutoencoderKL, VAEConfig
    from tests.util import randomize_
    torch.manual_seed(seed)
    unet = randomize_(UNetModel(SMALL), seed).eval()
    # scale_factor makes the latents of colour blocks about unit-variance (as SD's 0.18215 does for its
    # VAE); a near-deterministic posterior (logvar ≈ -20), as a trained VAE has
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=5.0)).eval()
    with torch.no_grad():
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-20.0)
    text = EnglishTextEncoder(transformers.CLIPTextModel(text_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))).eval()
    return unet, vae, text


def pretrain_backbone(unet, vae, text, size: int, steps: int = 300, seed: int = 0):
    """The toy "English SD": the UNet trained as an ε-model with the "" context on colour blocks of every
    colour (what SD1.5 learnt from its 10 % empty captions: the average image manifold)."""
    from bdm.train.schedules import NoiseSchedule
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([torch.from_numpy(colour_block(rgb, size, 0)).permute(2, 0, 1).float() / 127.5 - 1
                          for rgb in COLOURS.values()])
    with torch.no_grad():
        latents, english = vae.encode(images), text.encode([""])
    schedule = NoiseSchedule()
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        z0 = latents[torch.randint(0, len(latents), (16,), generator=g)]
        t = torch.randint(0, 1000, (16,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        eps = unet(schedule.add_noise(z0, noise, t), t, context=english.expand(16, -1, -1))
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval().requires_grad_(False), loss.item()


def write_backbone(folder: Path, seed: int = 0, pretrain_size: int = 0, steps: int = 300) -> Path:
    """A tiny SD1.x single-file checkpoint (+ .yaml + CLIP folder); `pretrain_size` > 0 first trains the
    UNet unconditionally on colour blocks of that size (`pretrain_backbone`)."""
    from bdm.formats.checkpoint import save_checkpoint
    unet, vae, text = tiny_parts(seed)
    if pretrain_size:
        pretrain_backbone(unet, vae, text, pretrain_size, steps, seed)
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(folder / "tiny.safetensors", unet, vae, text, "tiny-clip")


def colour_block(rgb, size: int, jitter) -> np.ndarray:
    """A coloured square (half the side) in the middle of a grey picture."""
    arr = np.full((size, size, 3), 128, dtype=np.int64)
    q = size // 4
    arr[q:size - q, q:size - q] = np.array(rgb) + jitter
    return np.clip(arr, 0, 255).astype(np.uint8)


def caption(name: str, repeat: int) -> str:
    """The colour word, repeated: the tiny random Chinese encoder spreads a 2-character caption's
    difference over all 52 token rows, repetition keeps it from being diluted (a real encoder does not
    need this)."""
    return name * repeat


def write_colour_set(folder: Path, per_colour: int = 4, size: int = 32, fmt: str = "jsonl", repeat: int = 1) -> Path:
    """Colour blocks captioned 红色/绿色/蓝色/黄色 (small jitter so images differ)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            image = Image.fromarray(colour_block(rgb, size, rng.integers(-15, 16, 3)))
            file = f"{len(rows):04d}.png"
            image.save(folder / file)
            rows.append({"image": file, "text": caption(name, repeat)})
    if fmt == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    if fmt == "csv":
        path = folder / "data.csv"
        path.write_text("image,text\n" + "".join(f"{r['image']},{r['text']}\n" for r in rows), encoding="utf-8")
        return path
    for r in rows:
        (folder / r["image"]).with_suffix(".txt").write_text(r["text"], encoding="utf-8")
    return folder


def config(tmp: Path, ckpt: Path, data: Path, **kw):
    from bdm.train import TrainConfig
    base = dict(checkpoint=str(ckpt), text_encoder="toy", data=str(data), output=str(tmp / "out"),
                resolution=32, batch_size=4, max_steps=3, num_workers=0, learning_rate=1e-4, progress=False,
                checkpoint_every=0, log_every=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def train(tmp: Path, ckpt: Path, data: Path, **kw):
    """A `Trainer` built from `config(...)` and run: (trainer, its result)."""
    from bdm.train import Trainer
    trainer = Trainer(config(tmp, ckpt, data, **kw))
    return trainer, trainer.run()


def shared_backbone(tmp_path_factory, pretrain_size: int = 0) -> Path:
    """One tiny checkpoint per pytest session (built by the first test module that asks)."""
    folder = tmp_path_factory.getbasetemp() / f"bdm-train-backbone-{pretrain_size}"
    path = folder / "tiny.safetensors"
    if not path.is_file():
        write_backbone(folder, pretrain_size=pretrain_size)
    return path


def write_shards(folder: Path, n_shards: int, per_shard: int, bad: bool = False) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{k:09d}"
                k += 1
                ext, image = ("webp", None) if i % 3 == 2 else ("jpg" if i % 2 else "png", None)
                buf = io.BytesIO()
                Image.new("RGB", (10, 8), (k % 255, 0, 0)).save(buf, format={"jpg": "JPEG", "png": "PNG",
                                                                              "webp": "WEBP"}[ext])
                members = {f"{key}.{ext}": buf.getvalue()}
                members[f"{key}.txt" if i % 2 else f"{key}.json"] = (
                    f"第{k}".encode() if i % 2 else json.dumps({"caption": f"第{k}"}).encode())
                if bad and i == 1:
                    members[f"{key}.{ext}"] = b""
                if bad and i == 2:
                    members = {f"{key}.{ext}": buf.getvalue()}  # no caption
                for name, content in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        paths.append(str(path))
    return paths


def write_mixed_set(folder: Path, bad: bool = False) -> Path:
    """Colour blocks in landscape, portrait and square pictures (JSONL), optionally with a broken file."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, rng = [], np.random.default_rng(0)
    shapes = [(40, 20), (20, 40), (24, 24), (36, 20), (18, 34), (30, 30)]
    for k, (w, h) in enumerate(shapes * 2):
        name, rgb = list(COLOURS.items())[k % 4]
        arr = np.full((h, w, 3), 128, dtype=np.uint8)
        arr[h // 4:h - h // 4, w // 4:w - w // 4] = np.clip(np.array(rgb) + rng.integers(-15, 16, 3), 0, 255)
        Image.fromarray(arr).save(folder / f"{k:04d}.png")
        rows.append({"image": f"{k:04d}.png", "text": name})
    if bad:
        (folder / "broken.png").write_bytes(b"not a picture")
        rows.append({"image": "broken.png", "text": "红色"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


SIZE, REPEAT = 16, 8


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
