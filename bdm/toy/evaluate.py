"""`python -m bdm.toy eval`: the paper's claims as numbers, from freshly generated images.

Every row samples ≥ 100 images with fixed seeds from held-out phrasings, runs the judge on them and
saves a contact sheet (`<output>/<row>.png`, prompts under the images' grid order in `eval.json`).
Sampling goes through the same pieces as `bdm.generate` (`bdm.attach`, the k-diffusion samplers,
LoRA merging, ControlNet branches, TI embeddings), batched over prompts.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import domain as D
from . import paths

DEFAULT_CFG = 7.5
DEFAULT_SAMPLER = "Euler a"
TI = paths.embedding_file().stem  # an embedding is used by its file name, as in the WebUI
SEMANTIC_MARGIN = 5.0  # points: plugins must keep BDM's semantics within this
LORA_WEIGHT = 1.0  # the toy LoRA at full weight, as <lora:bdm-toy-striped:1>


@dataclass
class Row:
    key: str
    title: str
    checkpoint: str = "backbone"  # or "dreambooth"
    bdm: bool = True
    en_prompt: str = "{en}"  # "{en}" = the held-out English caption; "" = empty
    chinese: bool = True
    lora: float = 0.0  # LoRA weight (0: none), as in <lora:name:weight>
    ti: bool = False
    controlnet: bool = False
    chinese_only: bool = False
    extra: list[str] = field(default_factory=list)  # judged attributes beyond colour/shape
    targets: dict[str, float] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)  # points above BDM alone (the plugin's own effect)


ROWS = [
    Row("backbone_empty", 'backbone alone, English ""', bdm=False, en_prompt="", chinese=False),
    Row("backbone_english", "backbone with English prompt", bdm=False, chinese=False, extra=["small"]),
    Row("backbone_small", 'backbone with English "small, …"', bdm=False, chinese=False, en_prompt="small, {en}",
        extra=["small"]),
    Row("bdm", 'BDM, Chinese prompt, EN ""', en_prompt="", extra=["small"], targets={"colour": 90, "shape": 85}),
    Row("lora", f"BDM + LoRA (EN \"{D.LORA_TRIGGER}\")", en_prompt=D.LORA_TRIGGER, lora=LORA_WEIGHT, extra=["style"],
        targets={"style": 80}),
    Row("lora_english", "reference: backbone + LoRA, English prompt, no BDM", bdm=False, chinese=False,
        en_prompt=f"{D.LORA_TRIGGER}, {{en}}", lora=LORA_WEIGHT, extra=["style"]),
    Row("controlnet", "BDM + ControlNet (bbox hint)", en_prompt="", controlnet=True, extra=["position"],
        targets={"position": 85}),
    Row("controlnet_english", "reference: backbone + ControlNet, English prompt, no BDM", bdm=False, chinese=False,
        controlnet=True, extra=["position"]),
    Row("dreambooth", "BDM on the fine-tuned backbone", checkpoint="dreambooth", en_prompt="", extra=["style"],
        targets={"style": 80}),
    Row("dreambooth_english", "reference: fine-tuned backbone, English prompt, no BDM", checkpoint="dreambooth",
        bdm=False, chinese=False, extra=["style"]),
    Row("ti", f"BDM + Textual Inversion (EN \"{TI}\")", en_prompt=TI, ti=True, extra=["small"],
        targets={"small": 80}, gains={"small": 20}),
    Row("ti_english", "reference: backbone + Textual Inversion, English prompt, no BDM", bdm=False, chinese=False,
        en_prompt=f"{TI}, {{en}}", ti=True, extra=["small"]),
    Row("chinese_only", "Chinese-only concept (五角星)", en_prompt="", chinese_only=True),
    Row("all", "all plugins together", checkpoint="dreambooth", en_prompt=f"{D.LORA_TRIGGER} {TI}",
        lora=LORA_WEIGHT, ti=True, controlnet=True, extra=["position", "small", "stripes", "outline"]),
]
STYLE = {"lora": ("background", "striped"), "lora_english": ("background", "striped"),
         "dreambooth": ("drawing", "outline"), "dreambooth_english": ("drawing", "outline")}


def prompts(row: Row, n: int) -> list[dict]:
    """n requests: colour × shape (× position for the ControlNet) × seed, held-out phrasings."""
    shapes = [D.CHINESE_ONLY] if row.chinese_only else D.ENGLISH_SHAPES
    combos = [(c, s) for s in shapes for c in D.COLOURS]
    en_t, zh_t = D.held_out_templates("en"), D.held_out_templates("zh")
    out = []
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        k = i // len(combos)
        spec = D.Spec(colour, shape, (i * 7 + k) % 9, "large")
        en = D.english_caption(spec, en_t[k % len(en_t)])
        out.append({"colour": colour, "shape": shape, "position": spec.position, "seed": 1000 + i,
                    "zh": D.chinese_caption(spec, zh_t[k % len(zh_t)]) if row.chinese else "",
                    "en": row.en_prompt.format(en=en)})
    return out


class World:
    """The toy models, loaded once."""

    def __init__(self, weights: str | Path | None = None):
        from ..formats.checkpoint import load_checkpoint
        from ..formats.controlnet import load_controlnet
        from ..load import load_bridge
        from .models import Judge
        from ..formats.files import read_state_dict
        w = Path(weights) if weights else paths.WEIGHTS
        self.dir = w
        self.checkpoints = {"backbone": load_checkpoint(w / paths.backbone_checkpoint().name),
                            "dreambooth": load_checkpoint(w / paths.dreambooth_checkpoint().name)}
        self.bridge = load_bridge(w / paths.bdm_file().name)
        self.controlnet = load_controlnet(w / paths.controlnet_file().name)
        self.lora = w / paths.lora_file().name
        self.embedding = w / paths.embedding_file().name
        self.judge = Judge()
        self.judge.load_state_dict(read_state_dict(w / paths.judge_file().name))
        self.judge.eval()


@torch.no_grad()
def generate(world: World, row: Row, requests: list[dict], cfg: float, steps: int, sampler: str,
             batch: int = 64) -> torch.Tensor:
    """Images [N, 3, 64, 64] in [-1, 1] for the requests (negative prompts "")."""
    from ..formats.embedding import load_embedding
    from ..formats.lora import apply_loras
    from ..inject import attach
    from ..sampling import EpsDenoiser, sample
    ckpt = world.checkpoints[row.checkpoint]
    unet, vae, text = ckpt.unet, ckpt.vae, ckpt.text_encoder
    patch = apply_loras(unet, text, [(world.lora, row.lora)] if row.lora else [])
    if row.ti:
        load_embedding(text, world.embedding)
    denoiser = EpsDenoiser(unet)
    out = []
    try:
        for start in range(0, len(requests), batch):
            part = requests[start:start + batch]
            b = len(part)
            english = text.encode([r["en"] for r in part] + [""] * b)
            gens = [torch.Generator().manual_seed(r["seed"]) for r in part]
            noise = torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens])

            def cfg_model(x, sigma):
                o = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=english)
                cond, uncond = o.chunk(2)
                return uncond + cfg * (cond - uncond)

            with contextlib.ExitStack() as stack:
                if row.bdm:
                    chinese = world.bridge.text_encoder.encode([r["zh"] for r in part] + [""] * b)
                    stack.enter_context(attach(unet, world.bridge, chinese, 1.0))
                if row.controlnet:
                    hints = torch.cat([_hint(r["position"]) for r in part])
                    stack.enter_context(attach(unet, world.controlnet, lambda x, t, en: en, 1.0,
                                               hint=torch.cat([hints, hints])))
                latents = sample(sampler, cfg_model, noise, steps, sigma_schedule=denoiser, generator=gens)
            out.append(vae.decode(latents).clamp(-1, 1))
    finally:
        patch.remove()
        if row.ti:
            text.remove_embedding(TI)
    return torch.cat(out)


def _hint(position: int) -> torch.Tensor:
    import numpy as np
    a = np.asarray(D.hint_for(position), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def judge_row(world: World, row: Row, requests: list[dict], images: torch.Tensor) -> dict:
    pred = world.judge.predict(images)
    n = len(requests)

    def rate(mask) -> float:
        return round(100.0 * float(torch.as_tensor(mask, dtype=torch.float32).mean()), 1)

    result = {"n": n}
    if not row.chinese_only:
        result["colour"] = rate([D.COLOURS[int(p)] == r["colour"] for p, r in zip(pred["colour"], requests)])
        result["shape"] = rate([D.SHAPES[int(p)] == r["shape"] for p, r in zip(pred["shape"], requests)])
    else:
        result["colour"] = rate([D.COLOURS[int(p)] == r["colour"] for p, r in zip(pred["colour"], requests)])
        result["star"] = rate(pred["shape"] == D.SHAPES.index(D.CHINESE_ONLY))
    for extra in row.extra:
        if extra == "position":
            result["position"] = rate([int(p) == r["position"] for p, r in zip(pred["position"], requests)])
        elif extra == "small":  # the share drawn small: the TI's attribute
            result["small"] = rate(pred["size"] == D.SIZES.index("small"))
        elif extra == "style":
            head, value = STYLE[row.key]
            result["style"] = rate(pred[head] == (D.BACKGROUNDS if head == "background" else D.DRAWINGS).index(value))
        elif extra == "stripes":
            result["stripes"] = rate(pred["background"] == D.BACKGROUNDS.index("striped"))
        elif extra == "outline":
            result["outline"] = rate(pred["drawing"] == D.DRAWINGS.index("outline"))
    return result


def contact_sheet(images: torch.Tensor, path: Path, columns: int = 12) -> None:
    from PIL import Image
    n = images.shape[0]
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * 66, rows * 66), (255, 255, 255))
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        sheet.paste(Image.fromarray(pixels[i]), ((i % columns) * 66 + 1, (i // columns) * 66 + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def evaluate(weights=None, images: int = 216, output: str | Path | None = "toy-eval", cfg: float = DEFAULT_CFG,
             steps: int = 20, sampler: str = DEFAULT_SAMPLER, rows: list[str] | None = None,
             world: World | None = None) -> dict:
    world = world or World(weights)
    results = {"images_per_row": images, "cfg": cfg, "steps": steps, "sampler": sampler, "rows": {}}
    for row in ROWS:
        if rows and row.key not in rows:
            continue
        t = time.time()
        requests = prompts(row, images)
        generated = generate(world, row, requests, cfg, steps, sampler)
        result = judge_row(world, row, requests, generated)
        result["title"] = row.title
        result["seconds"] = round(time.time() - t, 1)
        results["rows"][row.key] = result
        if output:
            contact_sheet(generated, Path(output) / f"{row.key}.png")
        print(f"{row.title}: {result}", file=sys.stderr, flush=True)
    check_targets(results)
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "eval.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
        (Path(output) / "eval.md").write_text(table(results) + "\n", encoding="utf-8")
    return results


def check_targets(results: dict) -> None:
    """Mark every row's targets met or not (semantics within SEMANTIC_MARGIN of BDM alone; a plugin's
    gain counted against BDM alone, so a share the backbone draws anyway does not pass for its effect)."""
    rows = results["rows"]
    base = rows.get("bdm")
    for key, res in rows.items():
        row = next(r for r in ROWS if r.key == key)
        verdicts = {}
        for attr, target in row.targets.items():
            verdicts[attr] = res.get(attr, 0) >= target
        for attr, gain in row.gains.items():
            if base and attr in base:
                verdicts[f"{attr} +{gain:g} over BDM"] = res.get(attr, 0) >= base[attr] + gain
        if base and row.bdm and key not in ("bdm", "chinese_only", "all"):
            for attr in ("colour", "shape"):
                verdicts[f"{attr} within {SEMANTIC_MARGIN:g}"] = res[attr] >= base[attr] - SEMANTIC_MARGIN
        res["targets_met"] = verdicts


def table(results: dict) -> str:
    lines = ["| row | colour % | shape % | other % | targets (✓ met, ✗ not) |", "|---|---|---|---|---|"]
    for key, res in results["rows"].items():
        other = ", ".join(f"{k} {res[k]}" for k in ("star", "style", "position", "small", "stripes", "outline")
                          if k in res)
        met = res.get("targets_met", {})
        verdict = "; ".join(f"{k} {'✓' if v else '✗'}" for k, v in met.items()) or "report"
        lines.append(f"| {res['title']} | {res.get('colour', '')} | {res.get('shape', '')} | {other} | {verdict} |")
    lines.append(f"\n{results['images_per_row']} images per row, {results['sampler']}, {results['steps']} steps, "
                 f"CFG {results['cfg']}, held-out phrasings, seeds 1000+.")
    return "\n".join(lines)


def print_table(results: dict) -> None:
    print(table(results))
