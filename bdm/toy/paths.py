"""Where the embedded toy models live (package data, committed)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


def backbone_checkpoint() -> Path:
    return WEIGHTS / "bdm-toy-sd1.safetensors"


def bdm_file() -> Path:
    return WEIGHTS / "bdm-toy.safetensors"


# the toy CLIP's config folder the `.yaml` points at (export-webui adds the shipped tokenizer)
CLIP_DIR_NAME = "bdm-toy-sd1-clip"


def clip_dir() -> Path:
    return WEIGHTS / CLIP_DIR_NAME


def dreambooth_checkpoint() -> Path:
    """The fine-tuned backbone ("DreamBooth"): outline-only drawings."""
    return WEIGHTS / "bdm-toy-sd1-outline.safetensors"


def lora_file() -> Path:
    return WEIGHTS / "bdm-toy-striped.safetensors"


def controlnet_file() -> Path:
    return WEIGHTS / "bdm-toy-bbox.safetensors"


def embedding_file() -> Path:
    return WEIGHTS / "bdm-toy-smallthing.safetensors"


def judge_file() -> Path:
    """The evaluation judge (not a model users load)."""
    return WEIGHTS / "bdm-toy-judge.safetensors"
