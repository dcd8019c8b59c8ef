"""`python -m bdm.toy export-webui WEBUI_DIR`: the toy models where an AUTOMATIC1111 WebUI or Forge finds
them. A1111 builds a checkpoint from the `.yaml` beside it; Forge recognises the toy family by its tensor
shapes (the extension registers it, bdm_forge/toy_family.py) and builds it from the component configs in
`models/Stable-diffusion/bdm-toy-sd1-forge/`, which this writes from the same `.yaml`."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from ..formats.checkpoint import write_clip_tokenizer
from . import domain as D
from . import paths


def _write_yaml(src_yaml: Path, dst_yaml: Path, clip_dir: Path) -> None:
    """Copy a checkpoint's `.yaml` with `cond_stage_config.params.version` set to an ABSOLUTE path:
    the WebUI resolves it from its own working directory."""
    text = src_yaml.read_text(encoding="utf-8")
    text, n = re.subn(r"(\n\s*version:\s*).*", lambda m: m.group(1) + str(clip_dir.resolve()), text, count=1)
    if n != 1:
        raise ValueError(f"{src_yaml}: no cond_stage_config.params.version line")
    dst_yaml.write_text(text, encoding="utf-8")


# Forge's SD1 pipeline layout (what `backend/loader.py` reads from a family's `model_index.json`).
PIPELINE = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def forge_components(ldm_yaml: Path) -> dict[str, dict]:
    """The scheduler and VAE configs (diffusers names) of the checkpoint an LDM `.yaml` describes."""
    params = yaml.safe_load(ldm_yaml.read_text(encoding="utf-8"))["model"]["params"]
    first = params["first_stage_config"]["params"]
    dd = first["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ValueError(f"{ldm_yaml}: Forge's VAE has no attention outside the middle block "
                         f"(attn_resolutions {dd['attn_resolutions']})")
    levels = len(dd["ch_mult"])
    vae = {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": dd["in_channels"],
           "out_channels": dd["out_ch"], "latent_channels": dd["z_channels"], "layers_per_block": dd["num_res_blocks"],
           "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "norm_num_groups": 32,
           "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
           "sample_size": dd["resolution"], "scaling_factor": params["scale_factor"]}
    scheduler = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                 "beta_start": params["linear_start"], "beta_end": params["linear_end"],
                 "num_train_timesteps": params.get("timesteps", 1000), "clip_sample": False,
                 "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    return {"vae": vae, "scheduler": scheduler}


def write_forge_config(folder: Path, ldm_yaml: Path, clip_dir: Path) -> None:
    """The toy family's config folder for Forge: pipeline index, scheduler, VAE (from the `.yaml`),
    tokenizer (the package's CLIP vocabulary) and text-encoder config (from the toy CLIP folder)."""
    if folder.exists():
        shutil.rmtree(folder)
    configs = forge_components(ldm_yaml)
    files = {"model_index.json": PIPELINE, "scheduler/scheduler_config.json": configs["scheduler"],
             "vae/config.json": configs["vae"]}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    write_clip_tokenizer(folder / "tokenizer")
    (folder / "text_encoder").mkdir()
    shutil.copyfile(clip_dir / "config.json", folder / "text_encoder" / "config.json")


def export_webui(webui_dir: str | Path, weights: str | Path | None = None, quiet: bool = False) -> list[Path]:
    """Copy the toy models into an A1111 or Forge folder (`models/…`, `embeddings/`)."""
    root = Path(webui_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (give the WebUI's or Forge's root folder)")
    w = Path(weights) if weights else paths.WEIGHTS
    sd = root / "models" / "Stable-diffusion"
    clip_dir = sd / paths.CLIP_DIR_NAME
    written: list[Path] = []

    def put(src: Path, dst: Path) -> None:
        if not src.exists():
            raise FileNotFoundError(f"{src}: missing toy weights (build them with `python -m bdm.toy build`)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(dst)

    if clip_dir.exists():
        shutil.rmtree(clip_dir)
    shutil.copytree(w / paths.CLIP_DIR_NAME, clip_dir)  # the toy CLIP's config.json
    write_clip_tokenizer(clip_dir)  # the package's one copy of the CLIP vocabulary
    written.append(clip_dir)
    for ckpt in (paths.backbone_checkpoint().name, paths.dreambooth_checkpoint().name):
        put(w / ckpt, sd / ckpt)
        yaml_name = Path(ckpt).with_suffix(".yaml").name
        _write_yaml(w / yaml_name, sd / yaml_name, clip_dir)
        written.append(sd / yaml_name)
    forge_config = sd / paths.FORGE_CONFIG_DIR_NAME  # both checkpoints are of the one toy family
    write_forge_config(forge_config, w / paths.backbone_checkpoint().with_suffix(".yaml").name, w / paths.CLIP_DIR_NAME)
    written.append(forge_config)
    put(w / paths.bdm_file().name, root / "models" / "bdm" / paths.bdm_file().name)
    put(w / paths.lora_file().name, root / "models" / "Lora" / paths.lora_file().name)
    put(w / paths.controlnet_file().name, root / "models" / "ControlNet" / paths.controlnet_file().name)
    put(w / paths.embedding_file().name, root / "embeddings" / paths.embedding_file().name)
    if not quiet:
        for p in written:
            print(f"wrote {p}")
        print(f"""
Trigger words and how to use them (Chinese prompt → the BDM panel, English prompt → the WebUI prompt):
  checkpoint  {paths.backbone_checkpoint().stem} (64×64, English prompt "" or e.g. "a red circle")
  BDM         {paths.bdm_file().stem}: Chinese prompt e.g. 红色的圆形, 蓝色的三角形, 黄色的五角星
  LoRA        <lora:{paths.lora_file().stem}:1> {D.LORA_TRIGGER}   (striped background)
  ControlNet  {paths.controlnet_file().stem}: NOT loadable by the stock sd-webui-controlnet extension. It
              builds every SD1 ControlNet with SD1.5's block layout (320 channels, 4 levels), and this toy
              ControlNet has the small toy backbone's layout: the extension fails to load it (and then
              generates without control). It is copied for the project's WebUI test suite only, which
              adds a test-only shim (tests/webui/foreign.py); use it headless with
              `python -m bdm.toy eval` or `python -m bdm.generate --controlnet`. Real SD1.5 ControlNets work with BDM.
  embedding   {paths.embedding_file().stem} in the English prompt (small objects; the name is the file name)
  DreamBooth  switch the checkpoint to {paths.dreambooth_checkpoint().stem} (outline drawings)
Set width and height to 64.""")
    return written
