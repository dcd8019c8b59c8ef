"""Tiny random checkpoints of families BDM must refuse in Forge (SD2, SDXL), built with Forge's own UNet
class and transformers' CLIP, with the config folders Forge builds them from. Test-only.

Run with Forge's python (it needs Forge's `backend`):
    FORGE_VENV_PYTHON tests/forge/foreign.py FORGE_DIR
Writes `models/Stable-diffusion/bdm-test-{sd2,sdxl}.safetensors` and, in the test support extension,
`families/{sd2,sdxl}/` (model_index.json, scheduler, tokenizers and VAE copied from the exported toy
family's folder, text-encoder configs). The support extension registers the two families
(tests/forge/support.py) keyed on these shapes: the toy VAE, UNet width 32, text width 32 (SDXL: two
encoders, context 64, pooled 32 + six 256-wide size embeddings).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

KINDS = {"sd2": "bdm-test-sd2", "sdxl": "bdm-test-sdxl"}
WIDTH = 32
UNET = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
            transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
            use_linear_in_transformer=True, use_spatial_transformer=True, num_heads=-1, num_head_channels=16)
SDXL_UNET = dict(UNET, context_dim=2 * WIDTH, adm_in_channels=WIDTH + 6 * 256, num_classes="sequential")
SD2_UNET = dict(UNET, context_dim=WIDTH)
INDEX = {"scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}
SDXL_INDEX = dict(INDEX, text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                  tokenizer_2=["transformers", "CLIPTokenizer"])


def clip_config(projection: bool):
    import transformers
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      projection_dim=WIDTH, hidden_act="quick_gelu")
    cfg.architectures = ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"]
    return cfg


def write_family(folder: Path, toy_family: Path, kind: str) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    index = SDXL_INDEX if kind == "sdxl" else INDEX
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    for sub in ("scheduler", "vae", "tokenizer"):
        shutil.copytree(toy_family / sub, folder / sub)
    clip_config(False).save_pretrained(str(folder / "text_encoder"))
    if kind == "sdxl":
        shutil.copytree(toy_family / "tokenizer", folder / "tokenizer_2")
        clip_config(True).save_pretrained(str(folder / "text_encoder_2"))


def build(forge: Path, support: Path, kind: str) -> Path:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from backend.nn.unet import IntegratedUNet2DConditionModel

    torch.manual_seed({"sd2": 2, "sdxl": 3}[kind])
    sd_dir = forge / "models" / "Stable-diffusion"
    toy = load_file(str(sd_dir / "bdm-toy-sd1.safetensors"))
    write_family(support / "families" / kind, sd_dir / "bdm-toy-sd1-forge", kind)
    unet = IntegratedUNet2DConditionModel(**(SDXL_UNET if kind == "sdxl" else SD2_UNET))
    for m in unet.modules():  # layers that start at zero make a random model ignore its inputs
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({k: v for k, v in toy.items() if k.startswith("first_stage_model.")})
    text = transformers.CLIPTextModel(clip_config(False)).state_dict()
    if kind == "sd2":  # OpenCLIP-H's place; Forge converts, and takes transformers' names as they are
        sd.update({"cond_stage_model.model.transformer." + k: v for k, v in text.items()})
    else:
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in text.items()})
        big = transformers.CLIPTextModelWithProjection(clip_config(True)).state_dict()
        sd.update({"conditioner.embedders.1.model.transformer." + k: v for k, v in big.items()
                   if k.startswith("text_model.")})
        sd["conditioner.embedders.1.model.text_projection"] = big["text_projection.weight"].t()  # OpenCLIP layout
    sd = {k: v.detach().float().contiguous().clone() for k, v in sd.items() if "position_ids" not in k}
    out = sd_dir / f"{KINDS[kind]}.safetensors"
    save_file(sd, str(out))
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(root), str(root / "packages_3rdparty"), str(root / "repositories" / "huggingface_guess")]
    sys.argv = sys.argv[:1] + ["--always-cpu"]  # backend.args reads the command line on import
    os.chdir(root)
    support_dir = root / "extensions" / "bdm-forge-test-support"
    for k in KINDS:
        print(build(root, support_dir, k))
