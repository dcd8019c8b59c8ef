"""`python -m bdm.inspect PATH`: what a weights file or folder holds — its kind, architecture,
metadata and tensor counts — without building any model."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .cli import run
from .formats.checkpoint import UNET_PREFIX, detect_family, infer_unet_config
from .formats.files import read_json, read_metadata, read_state_dict, short_hash, strip_prefix
from .formats.official import _weights_file


def kind_of(tensors: dict, meta: dict) -> str:
    keys = tensors.keys()
    if meta.get("format") == "bdm":
        return "BDM file"
    if any(k.startswith("control_model.") for k in keys):
        return "ControlNet (LDM single file)"
    if any(k.startswith(UNET_PREFIX) for k in keys) or any(k.startswith("conditioner.") for k in keys):
        return f"Stable Diffusion checkpoint, {detect_family(tensors).describe()}"
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "LoRA (kohya / A1111)"
    if "emb_params" in keys or any(k.startswith("string_to_param") for k in keys):
        return "Textual Inversion embedding"
    return "unknown"


def describe(path: Path) -> list[str]:
    if path.is_dir():
        config = read_json(path / "config.json")
        weights = _weights_file(path) if config.get("_class_name", "").startswith("ControlNet") else None
        lines = [f"{path}: diffusers folder, class {config.get('_class_name')!r}"]
        for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "attention_head_dim"):
            if key in config:
                lines.append(f"  {key}: {config[key]}")
        if weights is not None:
            lines += tensor_summary(read_state_dict(weights), indent="  ")
        return lines
    meta = read_metadata(path)
    tensors = read_state_dict(path)
    lines = [f"{path}: {kind_of(tensors, meta)}", f"  size: {path.stat().st_size:,} bytes, hash {short_hash(path)}"]
    for key, value in sorted(meta.items()):
        if key.endswith("_config"):
            value = json.dumps(json.loads(value), ensure_ascii=False)
        lines.append(f"  metadata {key}: {value}")
    unet = strip_prefix(tensors, UNET_PREFIX) or strip_prefix(tensors, "control_model.")
    if unet and "input_blocks.0.0.weight" in unet:
        cfg = infer_unet_config(unet, str(path))
        lines.append(f"  UNet architecture (from shapes; heads assumed): {json.dumps(cfg.to_dict())}")
    return lines + tensor_summary(tensors, indent="  ")


def tensor_summary(tensors: dict, indent: str) -> list[str]:
    groups: Counter = Counter()
    dtypes: Counter = Counter()
    for key, t in tensors.items():
        groups[key.split(".")[0]] += t.numel()
        dtypes[str(t.dtype).replace("torch.", "")] += 1
    lines = [f"{indent}tensors: {len(tensors)} ({', '.join(f'{n} {d}' for d, n in dtypes.most_common())})"]
    lines += [f"{indent}  {group}: {n:,} parameters" for group, n in groups.most_common()]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdm.inspect", description=__doc__)
    parser.add_argument("paths", nargs="+", help="weights files (.safetensors, .ckpt …) or diffusers folders")
    args = parser.parse_args(argv)
    for p in args.paths:
        print("\n".join(describe(Path(p))))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
