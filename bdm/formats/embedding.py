"""Textual Inversion embeddings (A1111 `.pt` / `.safetensors`, and diffusers' learned_embeds), used
by name in the English prompt — the name is the file name, as in the WebUI."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import FormatError, read_pickle, read_state_dict


def _vectors_of(data: dict, path: Path) -> torch.Tensor:
    if isinstance(data.get("string_to_param"), dict):  # A1111 .pt
        params = list(data["string_to_param"].values())
        if len(params) == 1 and isinstance(params[0], torch.Tensor):
            return params[0]
    if isinstance(data.get("emb_params"), torch.Tensor):  # A1111 .safetensors
        return data["emb_params"]
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1 and len(data) == 1:  # diffusers learned_embeds: {"<token>": vector}
        return tensors[0]
    raise FormatError(f"{path}: not a Textual Inversion embedding (expected string_to_param, emb_params or "
                      f"one token vector; found keys {sorted(map(str, data))[:5]})")


def read_embedding(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """`(name, vectors [n, width])` of an embedding file."""
    path = Path(path)
    data = read_state_dict(path) if path.suffix == ".safetensors" else read_pickle(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a Textual Inversion embedding (found {type(data).__name__})")
    vectors = _vectors_of(data, path).detach().float()
    return path.stem, vectors[None] if vectors.ndim == 1 else vectors


def load_embedding(text_encoder, path: str | os.PathLike) -> str:
    """Register the embedding with the English text encoder; returns the name to use in prompts."""
    name, vectors = read_embedding(path)
    try:
        text_encoder.add_embedding(name, vectors)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    return name


def save_embedding(path: str | os.PathLike, vectors: torch.Tensor, name: str | None = None) -> Path:
    """Write an A1111 `.safetensors` embedding (`emb_params`)."""
    from .files import save_safetensors
    return save_safetensors(path, {"emb_params": vectors.detach().float()},
                            {"name": name or Path(path).stem})
