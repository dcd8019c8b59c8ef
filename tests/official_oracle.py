"""The official BDM1.0 inference as an oracle: run by `tests/test_official_parity.py` with the Python of a
side venv that has the official diffusers fork (0.24) installed (see docs/official-parity.md).

`python tests/official_oracle.py SPEC.json` — SPEC names the official checkout, the project's tiny LDM
backbone, the tiny branch/encoder configs and the cases. This script, with the official code only:
1. writes the official formats: a `ControlNetModelBDM` folder and a Hugging Face `ChineseCLIPModel` folder
   (random weights, the real BERT vocabulary); loads the LDM backbone as `inference.py` does
   (`StableDiffusionControlNetPipelineBDM.from_single_file`) and saves it as a diffusers SD1 folder too;
2. runs every case on that pipeline as `inference.py` does: the prompts through its own
   `get_weighted_text_embeddings` (read from the checkout's `inference.py`, without running its module
   code, which downloads models), the scheduler swapped by
   `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` (or DDIM), `torch.manual_seed(seed)`;
3. runs the fork's DPM-Solver alone on `eps_model` for a few step counts;
and saves final latents, images, timesteps and sigmas to one safetensors file.

Only the standard library and torch are imported at module level: the parity test imports `eps_model`.
"""
from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def eps_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, smooth ε(x, t) for comparing schedulers: depends on t strongly, keeps samples O(1)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1) / 1000
    return 0.9 * x * t.sqrt() + 0.2 * torch.sin(3 * x + 5 * t) + 0.1 * x.roll(1, dims=1) * (1 - t)


def scheduler_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def inference_functions(official_dir: Path) -> dict:
    """The official `inference.py`'s imports, `re_attention`, `logger` and functions — not its model loading."""
    tree = ast.parse((official_dir / "inference.py").read_text(encoding="utf-8"))

    def wanted(node) -> bool:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
            return True
        return isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("re_attention", "logger")
                                                    for t in node.targets)
    namespace: dict = {"__name__": "official_inference"}
    module = ast.Module(body=[n for n in tree.body if wanted(n)], type_ignores=[])
    exec(compile(module, str(official_dir / "inference.py"), "exec"), namespace)
    return namespace


def give_layer_norms_an_affine_part(model: torch.nn.Module, seed: int) -> None:
    """LayerNorm weights ≈ 1 and biases ≈ 0.1, as trained models have: with BERT's `LayerNorm` left tiny by
    `randomize_` every token's output is its bias and the prompt would change nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 + 0.05 * torch.randn(module.bias.shape, generator=g))


def build_official_formats(spec: dict, work: Path):
    """The BDM branch, Chinese CLIP and SD1 folders, written by the official code's own classes, and the
    pipeline `from_single_file` loads (what `inference.py` runs)."""
    from diffusers import ControlNetModelBDM, StableDiffusionControlNetPipelineBDM
    from transformers import (BertTokenizer, ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel,
                              ChineseCLIPProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer)
    sys.path.insert(0, str(REPO))
    from tests.util import randomize_

    bdm_dir, cn_dir, sd1_dir = work / "BDM1.0", work / "chinese-clip", work / "sd1-diffusers"
    torch.manual_seed(0)
    branch = randomize_(ControlNetModelBDM(**spec["bdm_config"]), spec["bdm_seed"]).eval()
    branch.save_pretrained(bdm_dir, safe_serialization=True)

    config = ChineseCLIPConfig(text_config=spec["cn_text_config"], vision_config=spec["cn_vision_config"],
                               projection_dim=32)
    clip = randomize_(ChineseCLIPModel(config), spec["cn_seed"]).eval()
    give_layer_norms_an_affine_part(clip, spec["cn_seed"])
    clip.save_pretrained(cn_dir, safe_serialization=True)
    processor = ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessor(),
                                     tokenizer=BertTokenizer(vocab_file=spec["vocab"]))
    processor.save_pretrained(cn_dir)

    clip_dir = Path(spec["clip_dir"])
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(clip_dir))  # weights come from the checkpoint
    pipe = StableDiffusionControlNetPipelineBDM.from_single_file(
        spec["ldm_checkpoint"], original_config_file=spec["ldm_yaml"], controlnet=branch,
        text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(clip_dir), load_safety_checker=False,
        safety_checker=None)
    pipe.save_pretrained(sd1_dir, safe_serialization=True)
    return bdm_dir, cn_dir, sd1_dir, pipe


def main(spec_path: str) -> None:
    import diffusers
    import numpy as np
    from diffusers import (ControlNetModelBDM, DDIMScheduler, DPMSolverMultistepScheduler,
                           StableDiffusionControlNetPipelineBDM)
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import ChineseCLIPModel, ChineseCLIPProcessor

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    official_dir, work = Path(spec["official_dir"]), Path(spec["work"])
    inference = inference_functions(official_dir)
    get_weighted_text_embeddings = inference["get_weighted_text_embeddings"]
    bdm_dir, cn_dir, sd1_dir, pipe = build_official_formats(spec, work)
    pipe.controlnet = ControlNetModelBDM.from_pretrained(bdm_dir)  # the branch as users load it
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    # A folder written by save_pretrained spells out PNDM's default timestep_spacing="leading", which
    # DPMSolverMultistepScheduler.from_config then keeps: not inference.py's schedule (recorded only).
    saved = StableDiffusionControlNetPipelineBDM.from_pretrained(sd1_dir, controlnet=pipe.controlnet,
                                                                 safety_checker=None).scheduler.config
    started = time.time()
    bdm_tokenizer = ChineseCLIPProcessor.from_pretrained(cn_dir).tokenizer
    bdm_text_encoder = ChineseCLIPModel.from_pretrained(cn_dir).text_model
    schedulers = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}

    out: dict[str, torch.Tensor] = {}
    for case in spec["cases"]:
        pipe.scheduler = schedulers[case["scheduler"]].from_config(config)
        batch = case["batch"]
        with torch.no_grad():
            en, en_neg = get_weighted_text_embeddings(
                pipe.tokenizer, pipe.text_encoder, [case["en_prompt"]] * batch, [case["en_negative"]] * batch,
                model_max_length=77, no_boseos_middle=True)
            cn, cn_neg = get_weighted_text_embeddings(
                bdm_tokenizer, bdm_text_encoder, [case["prompt"]] * batch, [case["negative"]] * batch,
                model_max_length=52, skip_weighting=True, no_boseos_middle=True, cn=True)
        final = {}

        def keep_latents(pipeline, step, timestep, tensors):
            final["latents"] = tensors["latents"].clone()
            return tensors
        generator = torch.manual_seed(case["seed"])
        hint = Image.new("RGB", (case["width"], case["height"]))
        images = pipe(num_inference_steps=case["steps"], generator=generator, image=hint,
                      height=case["height"], width=case["width"], prompt_embeds=[en, en_neg, cn, cn_neg],
                      controlnet_conditioning_scale=case["strength"], guidance_scale=case["cfg"],
                      callback_on_step_end=keep_latents).images
        name = case["name"]
        out[f"{name}.latents"] = final["latents"]
        out[f"{name}.images"] = torch.from_numpy(np.stack([np.asarray(i) for i in images]))
        out[f"{name}.cn_tokens"] = torch.tensor(cn.shape[1])
        print(f"{name}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    for steps in spec["schedule_steps"]:
        scheduler = DPMSolverMultistepScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        out[f"dpm{steps}.timesteps"], out[f"dpm{steps}.sigmas"] = scheduler.timesteps, scheduler.sigmas
        x = scheduler_noise() * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(eps_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        out[f"dpm{steps}.final"] = x
    save_file({k: v.contiguous() for k, v in out.items()}, spec["out"],
              metadata={"diffusers": diffusers.__version__, "diffusers_file": diffusers.__file__,
                        "dpm_config": json.dumps(dict(DPMSolverMultistepScheduler.from_config(config).config)),
                        "dpm_config_saved_folder": json.dumps(dict(DPMSolverMultistepScheduler.from_config(
                            saved).config))})


if __name__ == "__main__":
    main(sys.argv[1])
