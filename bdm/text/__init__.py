"""Text side of BDM: A1111 prompt syntax, the Chinese BERT tokenizer, the Chinese CLIP encoder.

Exports are resolved lazily so ``from bdm.text import parse_prompt_attention`` does not
import torch/transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "parse_prompt_attention": "prompt_parser",
    "BREAK_WEIGHT": "prompt_parser",
    "BertChineseTokenizer": "tokenizer",
    "ChineseTextEncoder": "chinese",
    "toy_config": "chinese",
}

__all__ = ["BREAK_WEIGHT", "BertChineseTokenizer", "ChineseTextEncoder", "parse_prompt_attention", "toy_config"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
