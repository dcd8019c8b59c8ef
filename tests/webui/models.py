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


TRUNCATED_MODEL = "bdm-test-truncated"
CRAFTED_MODEL = "bdm-test-crafted"
CRAFTED_VOCAB = 8_000_000


def make_broken_files(a1111_dir: str | Path, source: str = TEST_MODEL) -> list[Path]:
    """Two BDM files that must be refused with a clear error: the first 60 % of the bytes of
    `models/bdm/<source>` (a download cut short), and that file with a text-encoder config claiming a
    vocabulary of 8,000,000 (2 GB of embeddings if anything were built from it before checking its
    tensors)."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    folder = Path(a1111_dir) / "models" / "bdm"
    src = folder / f"{source}.safetensors"
    truncated = folder / f"{TRUNCATED_MODEL}.safetensors"
    data = src.read_bytes()
    truncated.write_bytes(data[: len(data) * 6 // 10])
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["text_encoder_config"])
    meta["text_encoder_config"] = json.dumps(dict(config, vocab_size=CRAFTED_VOCAB))
    crafted = folder / f"{CRAFTED_MODEL}.safetensors"
    save_file(tensors, str(crafted), metadata=meta)
    return [truncated, crafted]


# -- an SD1.5-architecture world for the stock ControlNet extension (issue 21 §4) ------------------------
SD15_CHECKPOINT = "bdm-test-sd15"
SD15_CONTROLNET = "bdm-test-sd15-control"
SD15_BDM = "bdm-test-sd15-bdm"
SD15_VERSION = "2"  # bump to rebuild the cached files


def sd15_files(a1111_dir: str | Path) -> dict:
    root = Path(a1111_dir)
    return {"checkpoint": root / "models" / "Stable-diffusion" / f"{SD15_CHECKPOINT}.safetensors",
            "controlnet": root / "models" / "ControlNet" / f"{SD15_CONTROLNET}.safetensors",
            "bdm": root / "models" / "bdm" / f"{SD15_BDM}.safetensors"}


def make_sd15_world(a1111_dir: str | Path) -> dict:
    """Random-weight fp16 files of SD1.5's architecture, as users hold them, built once (cached by a
    version in the checkpoint's metadata): a checkpoint (SD1.5 UNet, 768-wide one-layer CLIP text
    tower, small VAE; with its `.yaml` and CLIP folder), an LDM ControlNet of SD1.5's layout
    (`control_model.*`, 768 context, RGB hint) for the stock sd-webui-controlnet, and a BDM branch for
    that UNet with the tiny Chinese encoder."""
    import torch
    from safetensors import safe_open

    import bdm
    from bdm.bridge import Bridge
    from bdm.formats import bdm_file
    from bdm.formats.checkpoint import save_checkpoint
    from bdm.formats.controlnet import save_controlnet
    from bdm.formats.files import save_safetensors
    from bdm.text.chinese import ChineseTextEncoder
    from bdm.text.clip import EnglishTextEncoder, text_config
    from bdm.unet import SD15, UNetModel
    from bdm.vae import AutoencoderKL, VAEConfig
    from tests.util import randomize_

    files = sd15_files(a1111_dir)
    ckpt = files["checkpoint"]
    if all(f.is_file() for f in files.values()):
        with safe_open(str(ckpt), "pt") as f:
            if (f.metadata() or {}).get("bdm_test_version") == SD15_VERSION:
                return files
    with torch.device("meta"):
        unet = UNetModel(SD15)
    unet = randomize_(unet.to_empty(device="cpu"), seed=15).eval()
    with torch.no_grad():
        unet.out[2].weight.mul_(10)  # ε of unit scale (randomize_ gives ~0.1): the image follows the UNet

    def small_zero_convs(bridge, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            convs = [z[0] for z in bridge.zero_convs] + [bridge.middle_block_out[0]]
            if bridge.input_hint_block is not None:
                convs.append(bridge.input_hint_block[-1])
            for conv in convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight.shape[1] ** 0.5)
                conv.bias.copy_(0.02 * torch.randn(conv.bias.shape, generator=g))
        return bridge

    branch = small_zero_convs(bdm.from_backbone(unet, 64), 16)
    bdm_file.save_bdm(files["bdm"], branch, ChineseTextEncoder.tiny(seed=0), dtype=torch.float16)
    del branch
    control = small_zero_convs(Bridge.from_backbone(unet, hint_channels=3), 17).half()
    save_controlnet(files["controlnet"], control)
    del control
    torch.manual_seed(15)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()
    text = EnglishTextEncoder(__import__("transformers").CLIPTextModel(text_config(
        hidden_size=768, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=12))).eval()
    save_checkpoint(ckpt, unet.half(), vae.half(), text.half(), ckpt.with_name(f"{SD15_CHECKPOINT}-clip"))
    from safetensors.torch import load_file
    save_safetensors(ckpt, load_file(str(ckpt)), {"bdm_test_version": SD15_VERSION})  # the cache marker, last
    return files
