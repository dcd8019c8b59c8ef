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


TEST_MODEL_2 = "test-bdm-2"
TI_NAME = "bdm-test-ti"
FT_CHECKPOINT = "bdm-test-sd1-ft"
TOY_BDM = "models/bdm/bdm-toy.safetensors"


def have_toy(a1111_dir: str | Path) -> bool:
    """The trained toy models were exported into this WebUI (`python -m bdm.toy export-webui`)."""
    return (Path(a1111_dir) / TOY_BDM).is_file()


def make_test_embedding(a1111_dir: str | Path, name: str = TI_NAME, width: int = 64) -> Path:
    """`embeddings/<name>.safetensors`: a random 2-vector Textual Inversion embedding (A1111 format)."""
    from safetensors.torch import save_file
    out = Path(a1111_dir) / "embeddings" / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    save_file({"emb_params": 0.05 * torch.randn((2, width), generator=g)}, str(out))  # token scale 0.02
    return out


def make_finetuned_checkpoint(a1111_dir: str | Path, name: str = FT_CHECKPOINT) -> Path:
    """A "fine-tuned" tiny-sd1 (DreamBooth stand-in): same architecture, UNet weights perturbed, its
    own `.yaml` (a copy of tiny-sd1's)."""
    from safetensors.torch import load_file, save_file
    a1111_dir = Path(a1111_dir)
    src = a1111_dir / CHECKPOINT
    out = src.with_name(f"{name}.safetensors")
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    sd = load_file(str(src))
    g = torch.Generator().manual_seed(5)
    for k, v in sd.items():
        if k.startswith("model.diffusion_model.") and v.is_floating_point():
            sd[k] = v + 0.1 * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=g)
    save_file(sd, str(out))
    out.with_suffix(".yaml").write_text(src.with_suffix(".yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return out
