"""`python -m bdm.toy export-webui A1111_DIR`: the toy models where an AUTOMATIC1111 WebUI finds them."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

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


def export_webui(a1111_dir: str | Path, weights: str | Path | None = None, quiet: bool = False) -> list[Path]:
    root = Path(a1111_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (give the WebUI's root folder)")
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
