"""Where the embedded toy models live (package data, committed)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


def backbone_checkpoint() -> Path:
    return WEIGHTS / "bdm-toy-sd1.safetensors"


def bdm_file() -> Path:
    return WEIGHTS / "bdm-toy.safetensors"
