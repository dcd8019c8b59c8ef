"""Checking a model file's configs against its own tensors before anything is built.

A file's metadata (a BDM file's `bridge_config` / `text_encoder_config`, a diffusers `config.json`) says
how big the networks are; a crafted or broken one could claim a vocabulary of millions or a thousand
layers and make a server allocate gigabytes before any weight is compared. So every size a config
gives is checked against the tensor shapes in the file's header first (the header is bounded by the
file itself), strings against allow-lists, and the branch is built on the meta device (no memory) and
compared shape by shape. Only then is anything allocated — exactly what the file holds. Every error
names the file and the key.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

from torch import nn

from ..unet import UNetConfig
from .files import FormatError, check_shapes

# ChineseCLIPTextConfig.hidden_act values transformers implements (ACT2FN) that a text tower may use.
TEXT_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_python", "gelu_pytorch_tanh", "gelu_accurate",
                    "quick_gelu", "relu", "silu", "swish", "tanh", "mish")

Shapes = Mapping[str, tuple]


def _int(config: Mapping, key: str, source: str, what: str, *, minimum: int = 1, allow=()) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or (value < minimum and value not in allow):
        raise FormatError(f"{source}: {what}[{key!r}] must be an integer ≥ {minimum}"
                          + (f" (or {', '.join(map(str, allow))})" if allow else "") + f", found {value!r}")
    return value


def _number(config: Mapping, key: str, source: str, what: str, lo: float, hi: float, default=None) -> None:
    value = config.get(key, default)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise FormatError(f"{source}: {what}[{key!r}] must be a number from {lo:g} to {hi:g}, found {value!r}")


def _equal(config_value, key: str, tensor: str, found, source: str, what: str) -> None:
    if config_value != found:
        raise FormatError(f"{source}: {what}[{key!r}] is {config_value!r}, but the file's tensor {tensor!r} "
                          f"gives {found!r}")


def _shape(shapes: Shapes, key: str, source: str, what: str, prefix: str) -> tuple:
    if key not in shapes:
        raise FormatError(f"{source}: missing tensor {prefix + key!r} (needed to check {what})")
    return tuple(shapes[key])


def check_text_config(config, shapes: Shapes, source: str, what: str = "text_encoder_config",
                      prefix: str = "text_encoder.") -> None:
    """A Chinese CLIP text-tower config (`ChineseCLIPTextConfig` fields) against the tower's tensor
    shapes (keys without `prefix`, which only appears in messages)."""
    if not isinstance(config, Mapping):
        raise FormatError(f"{source}: {what} must be a JSON object, found {type(config).__name__}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        _int(config, key, source, what)
    act = config.get("hidden_act", "gelu")
    if act not in TEXT_ACTIVATIONS:
        raise FormatError(f"{source}: {what}['hidden_act'] is {act!r}; expected one of {', '.join(TEXT_ACTIVATIONS)}")
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise FormatError(f"{source}: {what}['position_embedding_type'] is {kind!r}; only 'absolute' is supported")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        _number(config, key, source, what, 0.0, 1.0)
    _number(config, "layer_norm_eps", source, what, 0.0, 1.0)
    _number(config, "initializer_range", source, what, 0.0, 1e3)
    _number(config, "initializer_factor", source, what, 0.0, 1e3)

    word = "embeddings.word_embeddings.weight"
    vocab, hidden = _shape(shapes, word, source, what, prefix)
    _equal(config["vocab_size"], "vocab_size", prefix + word, vocab, source, what)
    _equal(config["hidden_size"], "hidden_size", prefix + word, hidden, source, what)
    pos = "embeddings.position_embeddings.weight"
    _equal(config["max_position_embeddings"], "max_position_embeddings", prefix + pos,
           _shape(shapes, pos, source, what, prefix)[0], source, what)
    types = "embeddings.token_type_embeddings.weight"
    type_vocab = _int({"type_vocab_size": config.get("type_vocab_size", 2)}, "type_vocab_size", source, what)
    _equal(type_vocab, "type_vocab_size", prefix + types, _shape(shapes, types, source, what, prefix)[0],
           source, what)
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if layers != set(range(len(layers))):
        raise FormatError(f"{source}: the tensors {prefix}encoder.layer.N.* are not numbered 0…{len(layers) - 1}")
    _equal(config["num_hidden_layers"], "num_hidden_layers", f"{prefix}encoder.layer.N.*", len(layers), source, what)
    inter = "encoder.layer.0.intermediate.dense.weight"
    _equal(config["intermediate_size"], "intermediate_size", prefix + inter,
           _shape(shapes, inter, source, what, prefix)[0], source, what)
    heads = config["num_attention_heads"]
    if heads > hidden or hidden % heads:
        raise FormatError(f"{source}: {what}['num_attention_heads'] is {heads}, which does not divide the hidden "
                          f"size {hidden}")
    pad = config.get("pad_token_id", 0)
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab):
        raise FormatError(f"{source}: {what}['pad_token_id'] must be a token id below {vocab}, found {pad!r}")


def check_unet_config(cfg: UNetConfig, n_tensors: int, source: str, what: str) -> None:
    """The types and sizes of a branch's `UNetConfig`, and a bound from the file: every block it claims
    holds tensors, so it cannot claim more blocks than the file has tensors. After this, building the
    module on the meta device is cheap."""
    d = cfg.to_dict()
    for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim",
                "transformer_depth"):
        _int(d, key, source, what)
    _int(d, "num_heads", source, what, allow=(-1,))
    _int(d, "num_head_channels", source, what, allow=(-1,))
    if d["num_heads"] == -1 and d["num_head_channels"] == -1:
        raise FormatError(f"{source}: {what} sets neither 'num_heads' nor 'num_head_channels'")
    for key in ("channel_mult", "attention_resolutions"):
        values = d[key]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values) or \
                (key == "channel_mult" and not values):
            raise FormatError(f"{source}: {what}[{key!r}] must be a list of integers ≥ 1, found {values!r}")
    if not isinstance(d["use_linear_in_transformer"], bool):
        raise FormatError(f"{source}: {what}['use_linear_in_transformer'] must be true or false, "
                          f"found {d['use_linear_in_transformer']!r}")
    blocks = len(d["channel_mult"]) * (d["num_res_blocks"] + 1) + d["transformer_depth"]
    if blocks > n_tensors:
        raise FormatError(f"{source}: {what} describes {blocks} blocks or more, but the file holds only "
                          f"{n_tensors} tensors for them")


def check_module_shapes(module: nn.Module, shapes: Shapes, source: str, what: str, prefix: str = "") -> None:
    """Every tensor `module` (built on the meta device) expects is in `shapes` with the same shape, and
    nothing else is (keys without `prefix`, which only appears in messages)."""
    check_shapes({k: v.shape for k, v in module.state_dict().items()}, shapes, source, what, prefix)
