"""`python -m bdm.convert`: the official BDM1.0 release (diffusers branch folder + Hugging Face Chinese
CLIP folder) → one BDM `.safetensors` file that `generate`, the trainer and the WebUI load directly."""
from __future__ import annotations

import argparse
import sys

import torch

from .cli import run
from .formats.bdm_file import save_bdm
from .formats.official import load_diffusers_bridge

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdm.convert", description=__doc__)
    parser.add_argument("branch", help="official BDM folder (config.json + diffusion_pytorch_model.*)")
    parser.add_argument("--chinese-clip", required=True,
                        help="Hugging Face ChineseCLIPModel folder (config.json + model.safetensors / pytorch_model.bin)")
    parser.add_argument("-o", "--output", required=True, help="the BDM file to write (.safetensors)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="storage precision of the branch (default fp16, as released); the Chinese "
                             "encoder is always stored in fp32, as the official inference runs it")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        raise ValueError(f"{args.output}: the output must be a .safetensors file")
    bridge = load_diffusers_bridge(args.branch, args.chinese_clip)
    path = save_bdm(args.output, bridge, bridge.text_encoder, dtype=DTYPES[args.dtype],
                    notes={"source": str(args.branch), "chinese_clip": str(args.chinese_clip)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
