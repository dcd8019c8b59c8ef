"""`python -m bdm.generate`: images from a Chinese prompt with any SD1.x checkpoint and any mix of
community plugins (LoRA, Textual Inversion, ControlNet), written as PNGs the WebUI's PNG Info reads.

Everything is loaded and checked before the first step, and images are written only at the end
(each through a temp file + rename): a bad input stops with one clear line and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from .cli import run
from .formats.files import short_hash
from .infotext import format_infotext

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Defaults a preset changes; flags given on the command line still win. "official": the official BDM1.0
# `inference.py` (diffusers' DPM-Solver on its own schedule, 50 steps, CFG 7.5), whose noise comes from
# one CPU generator for the whole batch (its Chinese token layout is everyone's default).
PRESETS = {"official": {"sampler": "DPM++ 2M (official)", "steps": 50, "cfg": 7.5}}


def toy_weights() -> tuple[Path, Path]:
    """The embedded toy backbone and toy BDM (the default when no weights are given)."""
    from .toy import paths
    return paths.backbone_checkpoint(), paths.bdm_file()


def parse_args(argv=None) -> argparse.Namespace:
    from .sampling import SAMPLERS
    p = argparse.ArgumentParser(prog="python -m bdm.generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="PNG path; batches get _0, _1 … suffixes")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="official: the same picture for the same seed as the official BDM1.0 inference.py run "
                        "on a CPU (its DPM-Solver, 50 steps, CFG 7.5 unless given, the batch's noise from one "
                        "generator seeded --seed); see docs/official-parity.md")
    g = p.add_argument_group("prompts (Chinese → the BDM branch, English → the backbone)")
    g.add_argument("--prompt", default="", help="Chinese prompt in the WebUI's syntax: (词:1.3), [词], BREAK, prompt editing "
                   "[猫:狗:0.5] / [猫:狗:10] / [猫::5], alternation [红色|蓝色] (not AND)")
    g.add_argument("--negative", default="", help="Chinese negative prompt (same syntax)")
    g.add_argument("--en-prompt", default="", help="English prompt: LoRA trigger words, embedding names, style")
    g.add_argument("--en-negative", default="", help="English negative prompt")
    g = p.add_argument_group("sampling")
    g.add_argument("--strength", type=float, default=1.0, help="BDM branch strength")
    g.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--sampler", default="Euler a", choices=list(SAMPLERS))
    g.add_argument("--seed", type=int, default=0,
                   help="image i of the batch uses seed + i (--preset official: the batch draws from one seed)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--width", type=int, default=None, help="default: 512, or 64 for the toy model")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--no-shared-encoder", action="store_true",
                   help="run the backbone's input blocks for both CFG rows even when the English prompts are equal")
    g = p.add_argument_group("models (no flags: the embedded toy model)")
    g.add_argument("--checkpoint", help="SD1.x single-file checkpoint (.safetensors; a .yaml beside it is used)")
    g.add_argument("--bdm", help="BDM file, or an official diffusers BDM folder (with --chinese-clip)")
    g.add_argument("--chinese-clip", help="Hugging Face Chinese CLIP folder (for official BDM folders)")
    g.add_argument("--no-bdm", action="store_true", help="the backbone alone")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help="kohya/A1111 LoRA; repeatable")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="Textual Inversion embedding, used by its file name in --en-prompt; repeatable")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH", help="LDM ControlNet; repeatable")
    g.add_argument("--control-image", action="append", default=[], metavar="IMG", help="one per --controlnet")
    g.add_argument("--control-strength", action="append", default=[], type=float, metavar="S",
                   help="one per --controlnet (default 1.0)")
    g = p.add_argument_group("device")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    g.add_argument("--chinese-device", default="cpu", help="device of the Chinese encoder (runs once per image)")
    preset, _ = p.parse_known_args(argv)  # a preset changes the defaults; given flags stay as given
    if preset.preset is not None:
        p.set_defaults(**PRESETS[preset.preset])
    return p.parse_args(argv)


def lora_spec(spec: str) -> tuple[str, float]:
    path, _, weight = spec.rpartition(":") if ":" in Path(spec).name else (spec, "", "1")
    try:
        return path, float(weight)
    except ValueError:
        raise ValueError(f"--lora {spec}: the weight after ':' must be a number") from None


def load_controls(args, width: int, height: int):
    from PIL import Image, UnidentifiedImageError

    from .formats.controlnet import load_controlnet
    from .pipeline import Control, control_image
    if len(args.control_image) != len(args.controlnet):
        raise ValueError(f"give one --control-image per --controlnet ({len(args.controlnet)} ControlNets, "
                         f"{len(args.control_image)} images)")
    strengths = args.control_strength or [1.0] * len(args.controlnet)
    if len(strengths) != len(args.controlnet):
        raise ValueError("give one --control-strength per --controlnet, or none")
    controls = []
    for path, image_path, strength in zip(args.controlnet, args.control_image, strengths):
        try:
            with Image.open(image_path) as image:
                hint = control_image(image, width, height)
        except FileNotFoundError:
            raise FileNotFoundError(f"{image_path}: no such control image") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{image_path}: cannot read the control image: {e}") from None
        controls.append(Control(load_controlnet(path), hint, strength, Path(path).stem))
    return controls


def output_paths(output: str, batch: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{output}: the output must be a .png file")
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(batch)]


def save_png(image, path: Path, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    from .formats.files import atomic_write
    info = PngInfo()
    info.add_text("parameters", parameters)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from .formats.checkpoint import load_checkpoint
    from .formats.embedding import load_embedding
    from .formats.lora import apply_loras
    from .load import load_bridge
    from .pipeline import Pipeline, Request

    checkpoint_path, bdm_path, toy = args.checkpoint, args.bdm, False
    if checkpoint_path is None:
        checkpoint_path, default_bdm = toy_weights()
        bdm_path, toy = bdm_path or default_bdm, True
        for path in (checkpoint_path, bdm_path):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path}: the embedded toy model is missing (build it with "
                                        "`python -m bdm.toy build`), or give --checkpoint and --bdm")
    elif bdm_path is None and not args.no_bdm:
        raise ValueError("give --bdm FILE_OR_FOLDER for the Chinese branch, or --no-bdm for the backbone alone")
    width = args.width or (64 if toy else 512)
    height = args.height or (64 if toy else 512)
    paths = output_paths(args.output, args.batch)
    request = Request(prompt=args.prompt, negative_prompt=args.negative, en_prompt=args.en_prompt,
                      en_negative_prompt=args.en_negative, strength=args.strength, cfg_scale=args.cfg,
                      steps=args.steps, sampler=args.sampler, seed=args.seed, batch_size=args.batch,
                      width=width, height=height, shared_encoder=not args.no_shared_encoder,
                      batch_noise=args.preset == "official")
    request.check()

    checkpoint = load_checkpoint(checkpoint_path)
    bridge = None if args.no_bdm else load_bridge(bdm_path, args.chinese_clip)
    for path in args.embedding:
        load_embedding(checkpoint.text_encoder, path)
    loras = [lora_spec(s) for s in args.lora]
    apply_loras(checkpoint.unet, checkpoint.text_encoder, loras)
    controls = load_controls(args, width, height)
    pipeline = Pipeline(checkpoint, bridge, controls, args.device, DTYPES[args.dtype], args.chinese_device)

    with warnings.catch_warnings(record=True) as caught, tqdm(total=args.steps, desc="sampling", unit="step") as bar:
        warnings.simplefilter("always")
        images = pipeline(request, callback=lambda i, total: bar.update(1))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)

    params = {"Steps": args.steps, "Sampler": args.sampler, "CFG scale": args.cfg, "Seed": None,
              "Size": f"{width}x{height}", "Model hash": checkpoint.hash, "Model": checkpoint.name}
    if loras:
        params["Lora hashes"] = ", ".join(f"{Path(p).stem}: {short_hash(p)}" for p, _ in loras)
    if bridge is not None:
        bdm_name = Path(bdm_path).stem if Path(bdm_path).is_file() else Path(bdm_path).name
        params.update({"BDM prompt": args.prompt or None, "BDM negative prompt": args.negative or None,
                       "BDM model": bdm_name,
                       "BDM model hash": short_hash(bdm_path) if Path(bdm_path).is_file() else None,
                       "BDM strength": args.strength})
    if args.preset is not None:
        params["BDM preset"] = args.preset
    for i, (image, path) in enumerate(zip(images, paths)):
        if args.preset == "official":  # one seed for the batch: the image is fixed by seed and position
            params.update({"Seed": args.seed, "Batch size": args.batch if args.batch > 1 else None,
                           "Batch pos": i if args.batch > 1 else None})
        else:
            params["Seed"] = args.seed + i
        save_png(image, path, format_infotext(args.en_prompt, args.en_negative, dict(params)))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
