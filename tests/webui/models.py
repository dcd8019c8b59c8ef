"""Synthetic BDM test models for the tiny random SD1 checkpoint of the test WebUI (tiny-sd1)."""
from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT = "models/Stable-diffusion/tiny-sd1.safetensors"
TEST_MODEL = "test-bdm"
WRONG_MODEL = "wrong-bdm"


def make_test_bdm(a1111_dir: str | Path, name: str = TEST_MODEL, seed: int = 0) -> Path:
    """`models/bdm/<name>.safetensors`: a branch from tiny-sd1's UNet with small random zero convs (so
    the branch changes the output) and the tiny Chinese encoder."""
    import bdm
    from bdm.formats import bdm_file, checkpoint
    from bdm.text.chinese import ChineseTextEncoder

    a1111_dir = Path(a1111_dir)
    out = a1111_dir / "models" / "bdm" / f"{name}.safetensors"
    unet = checkpoint.load_unet(a1111_dir / CHECKPOINT)
    bridge = bdm.from_backbone(unet, 64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [z[0] for z in bridge.zero_convs] + [bridge.middle_block_out[0]]:
            conv.weight.copy_(0.3 * torch.randn(conv.weight.shape, generator=g) / conv.weight.shape[1] ** 0.5)
            conv.bias.copy_(0.05 * torch.randn(conv.bias.shape, generator=g))
        # a stronger Chinese read-out: scale the branch's cross-attention value projections
        for name_, p in bridge.named_parameters():
            if "attn2.to_v" in name_:
                p.mul_(3.0)
    enc = ChineseTextEncoder.tiny(seed=0)
    bdm_file.save_bdm(out, bridge, enc)
    return out


def make_wrong_file(a1111_dir: str | Path, name: str = WRONG_MODEL) -> Path:
    """A `.safetensors` in models/bdm that is not a BDM file (a LoRA-like tensor dict)."""
    from safetensors.torch import save_file
    out = Path(a1111_dir) / "models" / "bdm" / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(out))
    return out
