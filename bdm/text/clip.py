"""The English side of an SD1.x checkpoint: CLIP BPE tokenizer + CLIP-L text tower, prompted the A1111 way.

The backbone keeps reading exactly what the WebUI would give it, so everything made for SD1.x
(Textual Inversion, LoRA trigger words, long prompts, `(word:1.2)`, `BREAK`, CLIP skip) behaves the
same in BDM. Mirrors AUTOMATIC1111 v1.10 `modules/sd_hijack_clip.py` (`FrozenCLIPEmbedderWithCustomWords`,
emphasis "Original", `comma_padding_backtrack` 20), re-implemented:

* prompt → `(text, weight)` pieces (`bdm.text.prompt_parser`), each piece tokenized on its own;
* tokens go into chunks of 75; when a chunk is full and a comma is among its last 20 tokens, the
  tokens after that comma move to the next chunk; `BREAK` closes the chunk;
* each chunk is `[BOS] + 75 tokens + [EOS]`, padded with EOS (SD1's pad token *is* EOS);
* each chunk is encoded separately; output = last hidden state after the final layer norm
  (`clip_skip` n > 1: hidden state of layer -n, then the final layer norm);
* every token's vector is multiplied by its weight, then the chunk is rescaled to its old mean;
* chunks are concatenated along the token axis: `[B, 77·k, hidden]`; shorter rows are padded with
  the encoding of an empty chunk.

One deliberate difference: A1111 restores the mean over the whole batch of a chunk, so a prompt's
encoding depends on the other prompts encoded with it; here it is restored per row. Identical when a
batch holds one distinct prompt (A1111's usual case).

The tokenizer is transformers' Rust-backed `CLIPTokenizerFast` on the vocabulary shipped in
`bdm/data/clip_tokenizer` (`vocab.json` + `merges.txt`, the folder `python -m bdm.toy export-webui` also
hands the WebUI). The WebUI tokenizes with transformers 4.x's Python `CLIPTokenizer`, which first runs
`ftfy.fix_text` (ftfy comes with open_clip in every WebUI install); the Rust tokenizer does not. So
ftfy's deterministic fixes that matter for prompts run first (`fix_text=True`, the default): curly →
straight quotes, full-width → normal width (`，` → `,`, a comma for the chunker too), Latin ligatures.
Not applied: ftfy's heuristic mojibake repair and HTML-entity decoding.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .emphasis import apply_weights

CHUNK_LENGTH = 75  # prompt tokens per chunk; +BOS +EOS = 77 positions
COMMA_PADDING_BACKTRACK = 20  # A1111 default
BREAK_WEIGHT = -1.0


def tokenizer_dir() -> Path:
    """The CLIP tokenizer folder shipped in `bdm/data` (OpenAI CLIP's BPE: vocab.json + merges.txt)."""
    return Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"


def _width_map() -> dict[int, str]:
    """ftfy's `fix_character_width` table: half/full-width forms → their normal form, U+3000 → space."""
    table = {0x3000: " "}
    for code in range(0xFF01, 0xFFF0):
        normal = unicodedata.normalize("NFKC", chr(code))
        if normal != chr(code):
            table[code] = normal
    return table


_QUOTES = {**{c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},
           **{c: '"' for c in (0x201C, 0x201D, 0x201E, 0x201F)}}
_LIGATURES = {ord(k): v for k, v in {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ",
                                      "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj",
                                      "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl",
                                      "ﬅ": "ſt", "ﬆ": "st"}.items()}
_FIXES = {**_LIGATURES, **_width_map()}


def ftfy_fixes(text: str) -> str:
    """ftfy's deterministic fixes, in its order: ligatures, character width, quotes."""
    return text.translate(_FIXES).translate(_QUOTES)


class CLIPTokenizer:
    """SD1's CLIP BPE (vocab 49408, BOS 49406, EOS 49407): `encode(text)` → ids without BOS/EOS."""

    def __init__(self, folder: str | Path | None = None, fix_text: bool = True):
        from transformers import CLIPTokenizerFast
        folder = Path(folder) if folder is not None else tokenizer_dir()
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: no {name} (a CLIP tokenizer folder has vocab.json + merges.txt)")
        self.backend = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        self.fix_text = fix_text
        self.bos_token_id = self.backend.bos_token_id
        self.eos_token_id = self.backend.eos_token_id
        self.comma_token_id = self.backend.convert_tokens_to_ids(",</w>")

    def __len__(self) -> int:
        return len(self.backend)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (A1111 tokenizes with `add_special_tokens=False`)."""
        return self([text])[0]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        texts = [ftfy_fixes(t) for t in texts] if self.fix_text else list(texts)
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------
# The text tower


SD1_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407}


def text_config(**overrides):
    """A transformers `CLIPTextConfig`: SD1.x's CLIP ViT-L/14 text tower unless overridden."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(**{**SD1_TEXT, **overrides})


PREFIX = "cond_stage_model.transformer."


def _strip(state_dict: dict) -> dict:
    """Text-tower tensors with every wrapper prefix removed (`embeddings.*`, `encoder.*`, …)."""
    if any(k.startswith(PREFIX) for k in state_dict):
        state_dict = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    for prefix in ("transformer.", "text_model."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if "embeddings.token_embedding.weight" not in state_dict:  # e.g. SD2/SDXL OpenCLIP, or no text tower
        raise KeyError(PREFIX + "text_model.embeddings.token_embedding.weight")
    return state_dict


def text_config_from_state_dict(state_dict: dict, **overrides):
    """Infer the tower's shape from its tensors; heads default to hidden/64 (CLIP's head width)."""
    sd = _strip(state_dict)
    vocab, hidden = sd["embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    shape = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                 intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                 max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
                 num_attention_heads=max(1, hidden // 64), projection_dim=hidden)
    return text_config(**{**shape, **overrides})


def _inner(transformer: nn.Module) -> nn.Module:
    """The module holding `embeddings`/`encoder`/`final_layer_norm`: `.text_model` in transformers 4.x,
    the model itself in 5.x."""
    return getattr(transformer, "text_model", transformer)


def load_text_model(transformer: nn.Module, state_dict: dict) -> None:
    """Strictly load checkpoint tensors in any SD1 layout into a `CLIPTextModel` of either transformers
    generation; `position_ids` (a stored buffer in old files, absent in new ones, sometimes corrupted
    into floats) always comes from the model itself."""
    sd = _strip(state_dict)
    own = transformer.state_dict()
    lead = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    sd = {lead + k: v for k, v in sd.items()}
    for key in own:
        if key.endswith("position_ids"):
            sd[key] = own[key]
    transformer.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# A1111 prompt → chunks → embeddings


@dataclass
class PromptChunk:
    """One 77-position window: token ids ([BOS] + 75 + [EOS] once closed), a weight per position, and
    the Textual Inversion vectors to place (A1111's `PromptChunk`)."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)  # (offset in tokens, embedding name)


class EnglishTextEncoder(nn.Module):
    """SD1.x conditioning from English prompts, A1111 semantics; `encode(prompts) -> [B, 77·k, hidden]`."""

    def __init__(self, transformer: nn.Module | None = None, tokenizer: CLIPTokenizer | None = None,
                 clip_skip: int = 1, comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK):
        super().__init__()
        if transformer is None:
            from transformers import CLIPTextModel
            transformer = CLIPTextModel(text_config())
        self.transformer = transformer.eval()
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.clip_skip = clip_skip
        self.comma_padding_backtrack = comma_padding_backtrack
        self.id_start, self.id_end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self._vectors: dict[str, torch.Tensor] = {}
        self._lookup: dict[int, list[tuple[list[int], str]]] = {}
        self._pending_fixes: list[list[tuple[int, torch.Tensor]]] | None = None
        self._hook = _inner(self.transformer).embeddings.token_embedding.register_forward_hook(self._apply_fixes)

    @classmethod
    def from_state_dict(cls, state_dict: dict, config=None, **kwargs) -> EnglishTextEncoder:
        """From a full SD1 checkpoint (`cond_stage_model.transformer.[text_model.]*`) or a bare tower."""
        from transformers import CLIPTextModel
        transformer = CLIPTextModel(config or text_config_from_state_dict(state_dict))
        load_text_model(transformer, state_dict)
        return cls(transformer, **kwargs)

    def ldm_state_dict(self) -> dict:
        """Tensors under the names an SD1 checkpoint uses after `cond_stage_model.`, with the
        `embeddings.position_ids` buffer real SD1.x files carry (newer transformers no longer save it, and
        the WebUI's --medvram/--lowvram loading leaves a missing buffer on the meta device)."""
        sd = {k.removeprefix("text_model."): v for k, v in self.transformer.state_dict().items()
              if not k.endswith("position_ids")}
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        sd["embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
        return {"transformer.text_model." + k: v for k, v in sd.items()}

    @property
    def hidden_size(self) -> int:
        return _inner(self.transformer).embeddings.token_embedding.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return _inner(self.transformer).embeddings.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return _inner(self.transformer).embeddings.token_embedding.weight.dtype

    # -- Textual Inversion -------------------------------------------------------------------

    def add_embedding(self, name: str, vectors: torch.Tensor) -> None:
        """Register a Textual Inversion embedding: `name` in a prompt becomes these n input vectors."""
        vectors = torch.as_tensor(vectors)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.hidden_size:
            raise ValueError(f"embedding {name!r} has shape {tuple(vectors.shape)}; this text encoder needs "
                             f"[n, {self.hidden_size}] (an SD1.x embedding for an SD1.x model)")
        if vectors.shape[0] > CHUNK_LENGTH:
            raise ValueError(f"embedding {name!r} has {vectors.shape[0]} vectors; at most {CHUNK_LENGTH} fit a chunk")
        ids = self.tokenizer.encode(name)
        if not ids:
            raise ValueError(f"embedding name {name!r} has no tokens")
        self.remove_embedding(name)
        self._vectors[name] = vectors.detach()
        entries = self._lookup.setdefault(ids[0], [])
        entries.append((ids, name))
        entries.sort(key=lambda e: len(e[0]), reverse=True)  # longest name wins, as in A1111

    def remove_embedding(self, name: str) -> None:
        self._vectors.pop(name, None)
        for entries in self._lookup.values():
            entries[:] = [e for e in entries if e[1] != name]

    @property
    def embedding_names(self) -> list[str]:
        return list(self._vectors)

    def _find_embedding(self, tokens: list[int], position: int) -> tuple[str | None, int]:
        for ids, name in self._lookup.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return name, len(ids)
        return None, 1

    def _apply_fixes(self, module, inputs, output):
        """Forward hook on the token embedding: put TI vectors at their placeholder positions."""
        fixes, self._pending_fixes = self._pending_fixes, None
        if not fixes or not any(fixes):
            return None
        rows = []
        for row_fixes, row in zip(fixes, output):
            for offset, vec in row_fixes:
                vec = vec.to(row.device, row.dtype)
                n = min(row.shape[0] - offset - 1, vec.shape[0])
                row = torch.cat([row[:offset + 1], vec[:n], row[offset + 1 + n:]])
            rows.append(row)
        return torch.stack(rows)

    # -- prompt → chunks ---------------------------------------------------------------------

    def tokenize_line(self, line: str) -> tuple[list[PromptChunk], int]:
        """A1111's `tokenize_line`: the prompt's chunks and its token count."""
        from bdm.text.prompt_parser import parse_prompt_attention
        parsed = parse_prompt_attention(line)
        tokenized = self.tokenizer([text for text, _ in parsed])
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last: bool = False) -> None:
            nonlocal chunk, token_count, last_comma
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            to_add = CHUNK_LENGTH - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == BREAK_WEIGHT:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.tokenizer.comma_token_id:
                    last_comma = len(chunk.tokens)
                elif (self.comma_padding_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(chunk.tokens) - last_comma <= self.comma_padding_backtrack):
                    # full chunk, comma close to its end: move what follows the comma to the next chunk
                    cut = last_comma + 1
                    moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    next_chunk()
                    chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()
                name, name_length = self._find_embedding(tokens, position)
                if name is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                n_vectors = self._vectors[name].shape[0]
                if len(chunk.tokens) + n_vectors > CHUNK_LENGTH:
                    next_chunk()
                chunk.fixes.append((len(chunk.tokens), name))
                chunk.tokens += [0] * n_vectors
                chunk.multipliers += [weight] * n_vectors
                position += name_length

        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def empty_chunk(self) -> PromptChunk:
        return PromptChunk(tokens=[self.id_start] + [self.id_end] * (CHUNK_LENGTH + 1),
                           multipliers=[1.0] * (CHUNK_LENGTH + 2))

    # -- chunks → tensors --------------------------------------------------------------------

    def encode_chunks(self, chunks: list[PromptChunk]) -> torch.Tensor:
        """[n, 77, hidden] for n chunks: transformer, CLIP skip, weights with the mean restored per chunk."""
        tokens = torch.tensor([c.tokens for c in chunks], device=self.device)
        self._pending_fixes = [[(offset, self._vectors[name]) for offset, name in c.fixes] for c in chunks]
        try:
            if self.clip_skip > 1:
                out = self.transformer(input_ids=tokens, output_hidden_states=True)
                z = _inner(self.transformer).final_layer_norm(out.hidden_states[-self.clip_skip])
            else:
                z = self.transformer(input_ids=tokens).last_hidden_state
        finally:
            self._pending_fixes = None
        return apply_weights(z, torch.tensor([c.multipliers for c in chunks], device=z.device, dtype=z.dtype))

    @torch.no_grad()
    def encode(self, prompts: list[str], min_chunks: int = 1) -> torch.Tensor:
        """[B, 77·k, hidden]; k = the most chunks any prompt needs (at least `min_chunks`), shorter rows
        padded with empty chunks — pass the other side's k to pad cond/uncond alike."""
        if isinstance(prompts, str):
            prompts = [prompts]
        layers = _inner(self.transformer).config.num_hidden_layers
        if not 1 <= self.clip_skip <= layers + 1:  # layers + 1 = the token embeddings themselves
            raise ValueError(f"clip_skip must be in 1..{layers + 1}, got {self.clip_skip}")
        rows = [self.tokenize_line(p)[0] for p in prompts]
        k = max([min_chunks] + [len(r) for r in rows])
        rows = [r + [self.empty_chunk() for _ in range(k - len(r))] for r in rows]
        z = self.encode_chunks([c for r in rows for c in r])
        return z.reshape(len(prompts), k * (CHUNK_LENGTH + 2), z.shape[-1])

    def forward(self, prompts: list[str], min_chunks: int = 1) -> torch.Tensor:
        return self.encode(prompts, min_chunks)

    def pad_chunks(self, cond: torch.Tensor, chunks: int) -> torch.Tensor:
        """Append empty-chunk encodings to `cond` [B, 77·j, hidden] until it has `chunks` chunks."""
        have = cond.shape[1] // (CHUNK_LENGTH + 2)
        if have >= chunks:
            return cond
        with torch.no_grad():
            empty = self.encode_chunks([self.empty_chunk()]).to(cond)
        return torch.cat([cond, empty.repeat(cond.shape[0], chunks - have, 1)], dim=1)
