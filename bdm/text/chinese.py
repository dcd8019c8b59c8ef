"""Chinese CLIP text tower: prompt -> per-token hidden states for the BDM branch.

The bridge branch cross-attends to the **last hidden state of every token** of Chinese
CLIP's text encoder (RoBERTa-wwm-ext; BDM1.0 uses OFA-Sys/chinese-clip-vit-huge-patch14),
52 tokens per sequence: ``[CLS]`` + 50 tokens + ``[SEP]``, padded with ``[PAD]`` (id 0).

We lay prompts out as the official BDM inference does (360CVGroup/Bridge_Diffusion_Model,
``inference.py``: ``get_weighted_text_embeddings(..., model_max_length=52, skip_weighting=True,
no_boseos_middle=True, cn=True)``; the diffusers ``pipeline_controlnet_BDM.py`` only receives
the finished embeddings through ``prompt_embeds``), so the same prompt gives the same context:

* **attention mask: none.**  It calls ``text_encoder(ids)[0]`` without ``attention_mask``, so
  transformers uses all ones and ``[PAD]`` positions are attended to and returned.  We mirror
  that by default (``attend_to_padding=True``); ``False`` passes ``ids != [PAD]`` instead,
  the Chinese CLIP pre-training convention.
* **chunks:** tokens (no specials) are cut into chunks of 50; each chunk becomes
  ``[CLS] tokens [SEP] [PAD]...`` (``[SEP]`` right after the last token) and is encoded on its
  own; all rows of a batch — the prompt and its negative — get the same number of chunks k,
  shorter rows padded with the empty chunk ``[CLS][SEP][PAD]*50``.  At most
  ``max_embeddings_multiples=5`` chunks (250 tokens); longer prompts are truncated with a warning.
* **concatenation:** the inner ends go (``no_boseos_middle=True``): the first chunk loses its last
  position, middle chunks both ends, the last chunk its first, giving ``50*k + 2`` tokens — every
  chunk's 50 token positions between the first chunk's ``[CLS]`` and the last chunk's last position.
  One chunk (any prompt of at most 50 tokens, alone) is the plain 52.
* **weights:** it parses the A1111 syntax (brackets are removed) but skips the weighting for
  Chinese.  We apply A1111 weighting: hidden states times token weight, then rescaled so the
  mean of each (row, chunk) block is unchanged (A1111 rescales per chunk; we do it per row too
  so a prompt's embedding never depends on what else is in the batch).  ``BREAK`` pads the
  current chunk and starts a new one, as in A1111.  Without weights or ``BREAK`` the context is
  the official one.

transformers compatibility (checked against 4.30.2, the WebUI's, and 5.25): only
``ChineseCLIPTextConfig``, ``ChineseCLIPTextModel(config, add_pooling_layer=False)`` and
``model(input_ids, attention_mask=...)[0]`` are used; 4.30 stores ``embeddings.position_ids``
as a persistent buffer and 5.x does not, so those buffers are optional when loading.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ..formats.checks import check_text_config
from ..formats.files import read_state_dict
from .emphasis import apply_weights
from .prompt_parser import BREAK_WEIGHT, parse_prompt_attention
from .tokenizer import BertChineseTokenizer

__all__ = ["ARCH_KEYS", "CHUNK_TOKENS", "CONTEXT_TOKENS", "ChineseTextEncoder", "context_length", "default_tokenizer",
           "prompt_chunks", "token_count", "toy_config"]

CHUNK_TOKENS = 50
CONTEXT_TOKENS = CHUNK_TOKENS + 2  # one chunk as the text tower reads it: [CLS] + 50 + [SEP]
DEFAULT_MAX_CHUNKS = 5


def context_length(chunks: int) -> int:
    """Tokens in the context of `chunks` chunks: ``50*k + 2`` (the inner [SEP]/[CLS] are dropped)."""
    return CHUNK_TOKENS * chunks + 2

# The ChineseCLIPTextConfig fields that define the network; everything else in a
# transformers config dict (versions, labels, return_dict ...) is ignored on purpose.
ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "initializer_factor",
    "layer_norm_eps",
    "pad_token_id",
)
# Buffers some transformers versions save and others do not.
_OPTIONAL_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


def toy_config() -> dict:
    """A tiny random Chinese CLIP text tower (real vocabulary) for tests and the toy world."""
    return {
        "vocab_size": 21128,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }


def hf_text_defaults() -> dict:
    """What transformers assumes for an architecture key a Hugging Face `config.json` leaves out:
    `save_pretrained` writes a nested `text_config` as its difference from these defaults."""
    from transformers import ChineseCLIPTextConfig

    return {k: v for k, v in ChineseCLIPTextConfig().to_dict().items() if k in ARCH_KEYS}


def _build_config(config: dict):
    from transformers import ChineseCLIPTextConfig

    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r} is not supported (only 'absolute')")
    return ChineseCLIPTextConfig(**{k: v for k, v in config.items() if k in ARCH_KEYS})


class ChineseTextEncoder(nn.Module):
    """Frozen Chinese CLIP text model + our tokenizer, with A1111 chunking and weighting."""

    def __init__(
        self,
        config: dict,
        tokenizer: BertChineseTokenizer | None = None,
        *,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        attend_to_padding: bool = True,
    ):
        super().__init__()
        from transformers import ChineseCLIPTextModel

        self.model = ChineseCLIPTextModel(_build_config(config), add_pooling_layer=False)
        self.tokenizer = tokenizer or BertChineseTokenizer()
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                f"{self.model.config.vocab_size} embeddings"
            )
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.max_chunks = max_chunks
        self.attend_to_padding = attend_to_padding
        # BDM never trains the text encoder: frozen, and dropout always off.
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(False)
        return self

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, **kwargs) -> ChineseTextEncoder:
        """Randomly initialised encoder from a ChineseCLIPTextConfig dict (weights loaded later)."""
        return cls(config, **kwargs)

    def config_dict(self) -> dict:
        """The architecture as a plain dict; ``from_config(config_dict())`` rebuilds it."""
        return {k: getattr(self.model.config, k) for k in ARCH_KEYS}

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> ChineseTextEncoder:
        """Deterministic tiny random encoder (``toy_config``).

        LayerNorms get a random affine part, as trained models have: with the default
        (weight 1, bias 0) every token's mean over channels is exactly 0 and the
        mean-preserving A1111 weighting would divide by ~0.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = cls(toy_config(), **kwargs)
            for module in enc.model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.data.normal_(1.0, 0.1)
                    module.bias.data.normal_(0.1, 0.05)
        return enc

    @classmethod
    def from_hf_dir(cls, path: str | Path, *, dtype: torch.dtype | None = None, **kwargs) -> ChineseTextEncoder:
        """Load a Hugging Face ``ChineseCLIPModel`` (keys ``text_model.*``) or bare
        ``ChineseCLIPTextModel`` directory: ``config.json`` plus ``model.safetensors`` or
        ``pytorch_model.bin`` (sharded ``*.index.json`` variants too).  Never downloads."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
        full = json.loads(config_file.read_text(encoding="utf-8"))
        text_config = full.get("text_config") or full.get("text_config_dict")
        if text_config is None:
            if "hidden_size" not in full:
                raise ValueError(f"{config_file}: neither a ChineseCLIPModel (text_config) nor a text model config")
            text_config = full
        if not isinstance(text_config, dict):
            raise ValueError(f"{config_file}: text_config must be a JSON object, found {type(text_config).__name__}")
        text_config = {**hf_text_defaults(), **text_config}  # keys left out mean transformers' defaults
        tensors, source = _read_text_weights(path)  # read first: the config is checked against them
        check_text_config(text_config, {k: tuple(t.shape) for k, t in tensors.items()}, str(config_file),
                          "text_config" if text_config is not full else "config", prefix=f"{source}: text_model.")
        enc = cls(text_config, **kwargs)
        enc.load_weights(tensors, source=source)
        if dtype is not None:
            enc.to(dtype)
        return enc

    def text_state_dict(self) -> dict[str, torch.Tensor]:
        """ChineseCLIPTextModel weights (HF key names, no ``model.``/``text_model.`` prefix),
        minus the position/token-type id buffers that only some transformers versions save,
        so a file written under 5.x loads under 4.30 and vice versa."""
        return {k: v for k, v in self.model.state_dict().items() if k not in _OPTIONAL_KEYS}

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy text-tower weights in, checking every key and shape first.

        Keys may carry a ``text_model.`` (ChineseCLIPModel) prefix or none; vision/projection
        keys are ignored.  Raises ``ValueError`` naming ``source``, the key and both shapes.
        """
        tensors = {short: t for k, t in tensors.items() if (short := _text_key(k)) is not None}
        expected = self.model.state_dict()
        for key, param in expected.items():
            if key not in tensors:
                if key in _OPTIONAL_KEYS:
                    continue
                raise ValueError(f"{source}: missing weight {key!r} (looked for 'text_model.{key}' and '{key}')")
            found = tensors[key]
            if tuple(found.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source}: weight {key!r} has shape {tuple(found.shape)}, "
                    f"expected {tuple(param.shape)} from the config"
                )
        unexpected = sorted(
            k for k in tensors if k not in expected and k not in _OPTIONAL_KEYS and not k.startswith("pooler.")
        )
        if unexpected:
            warnings.warn(f"{source}: ignoring {len(unexpected)} unexpected text weights, e.g. {unexpected[:3]}")
        with torch.no_grad():
            for key, param in expected.items():
                if key in tensors:
                    param.copy_(tensors[key])

    # -- properties -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.word_embeddings.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    # -- tokens -> chunks -------------------------------------------------------------
    def prompt_chunks(self, text: str) -> list[tuple[list[int], list[float]]]:
        """Token ids and weights per chunk (<= 50 each, no specials), before truncation."""
        return prompt_chunks(text, self.tokenizer)

    def token_count(self, text: str) -> tuple[int, int]:
        """``(used, capacity)`` for a token counter (see the module function ``token_count``)."""
        return token_count(text, self.tokenizer, self.max_chunks)

    def chunk_ids(self, prompts: list[str], min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` [B, k, 52] (long) and ``weights`` [B, k, 52] (1.0 on specials/padding)."""
        per_row = []
        for text in prompts:
            chunks = self.prompt_chunks(text)
            if len(chunks) > self.max_chunks:
                warnings.warn(
                    f"Chinese prompt has {len(chunks)} chunks of {CHUNK_TOKENS} tokens; "
                    f"only the first {self.max_chunks} are used (truncated): {text[:40]!r}..."
                )
                chunks = chunks[: self.max_chunks]
            per_row.append(chunks)
        k = max([min_chunks, *(len(c) for c in per_row)])
        tok = self.tokenizer
        ids = torch.full((len(prompts), k, CONTEXT_TOKENS), tok.pad_id, dtype=torch.long)
        weights = torch.ones((len(prompts), k, CONTEXT_TOKENS), dtype=torch.float32)
        ids[:, :, 0] = tok.cls_id
        ids[:, :, 1] = tok.sep_id  # the empty chunk, overwritten where there are tokens
        for b, chunks in enumerate(per_row):
            for c, (chunk_ids, chunk_weights) in enumerate(chunks):
                n = len(chunk_ids)
                ids[b, c, 1 : n + 1] = torch.tensor(chunk_ids, dtype=torch.long)
                ids[b, c, n + 1] = tok.sep_id
                weights[b, c, 1 : n + 1] = torch.tensor(chunk_weights, dtype=torch.float32)
        return ids, weights

    # -- encoding ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden state [N, L, hidden] of already built sequences [N, L]."""
        input_ids = input_ids.to(self.device)
        mask = None if self.attend_to_padding else (input_ids != self.tokenizer.pad_id).long()
        return self.model(input_ids, attention_mask=mask)[0]

    def encode(self, prompts: list[str] | str, min_chunks: int = 1, *, no_grad: bool = True) -> torch.Tensor:
        """Prompts -> [B, 50*k + 2, hidden], the official layout (see the module docstring).

        k = max(min_chunks, chunks of the longest prompt), capped at ``max_chunks`` per prompt.
        Encode a prompt and its negative together (or pass the same ``min_chunks``) so that both
        are laid out over the same k chunks, as the official inference does.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode() needs at least one prompt (use [''] for the empty prompt)")
        ids, weights = self.chunk_ids(prompts, min_chunks)
        b, k, n = ids.shape
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            z = self(ids.reshape(b * k, n)).reshape(b, k, n, -1)
            z = apply_weights(z, weights.to(z.device))
            # the first chunk's [CLS], every chunk's 50 token positions, the last chunk's last position
            return torch.cat([z[:, 0, :1], z[:, :, 1:-1].flatten(1, 2), z[:, -1, -1:]], dim=1)


_DEFAULT_TOKENIZER = None


def default_tokenizer():
    """The tokenizer every ChineseTextEncoder uses unless given another (the shipped vocabulary);
    built once. Counting tokens needs no model."""
    global _DEFAULT_TOKENIZER
    if _DEFAULT_TOKENIZER is None:
        _DEFAULT_TOKENIZER = BertChineseTokenizer()
    return _DEFAULT_TOKENIZER


def prompt_chunks(text: str, tokenizer=None) -> list[tuple[list[int], list[float]]]:
    """Token ids and weights per chunk (<= 50 each, no specials), before truncation.

    Follows A1111: a full chunk is closed when the next token arrives (so exactly 50
    tokens stay one chunk), ``BREAK`` closes the current chunk even if empty, and an
    empty prompt is one empty chunk.
    """
    tokenizer = tokenizer or default_tokenizer()
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        if piece == "BREAK" and weight == BREAK_WEIGHT:
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in tokenizer.encode(piece):
            if len(ids) == CHUNK_TOKENS:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def token_count(text: str, tokenizer=None, max_chunks: int = DEFAULT_MAX_CHUNKS) -> tuple[int, int]:
    """``(used, capacity)`` for a token counter, counted like A1111: every chunk but the last counts
    as full (50), capacity is the next multiple of 50, capped at ``max_chunks * 50``, so
    ``used > capacity`` means the prompt will be truncated (by ``used - capacity`` tokens)."""
    chunks = prompt_chunks(text, tokenizer)
    used = CHUNK_TOKENS * (len(chunks) - 1) + len(chunks[-1][0])
    n = min(math.ceil(max(used, 1) / CHUNK_TOKENS), max_chunks)
    return used, n * CHUNK_TOKENS


def _read_text_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The text-tower tensors of an HF directory, keys without the ``text_model.`` prefix."""
    candidates = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ]
    for name in candidates:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(file.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted({v for k, v in weight_map.items() if _text_key(k) is not None})
            files = [path / s for s in shards]
        else:
            files = [file]
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise ValueError(f"{file}: shard {f.name} is missing")
            for key, tensor in read_state_dict(f, keep=lambda k: _text_key(k) is not None).items():
                short = _text_key(key)
                if short is not None:
                    tensors[short] = tensor
        if not tensors:
            raise ValueError(
                f"{file}: no Chinese CLIP text weights (keys 'text_model.*' or 'embeddings.*'/'encoder.*')"
            )
        return tensors, str(file)
    raise ValueError(f"{path}: no weights found (looked for {', '.join(candidates)})")


def _text_key(key: str) -> str | None:
    """Map a checkpoint key to a ChineseCLIPTextModel key, or None for non-text weights."""
    for prefix in ("text_model.", "chinese_clip.", "bert.", ""):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest.split(".", 1)[0] in ("embeddings", "encoder", "pooler"):
                return rest
    return None
