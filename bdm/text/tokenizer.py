"""Pure-Python BERT Chinese WordPiece tokenizer (no transformers / no hub at run time).

Chinese CLIP's text tower (RoBERTa-wwm-ext) uses the plain BERT Chinese vocabulary
(21128 entries) with ``do_lower_case=True`` and Chinese characters split out.  This file
re-implements exactly that pipeline so the WebUI extension and the toy world tokenize
offline and identically to ``transformers.BertTokenizer(vocab_file, do_lower_case=True)``:

1. clean: drop NUL, U+FFFD and control characters (Unicode category C*, except tab/CR/LF),
   map whitespace (space, tab, CR, LF, category Zs) to a space;
2. put spaces around CJK ideographs so each becomes its own word;
3. NFC-normalise, split on whitespace, lower-case, strip accents (NFD, drop category Mn);
4. split every punctuation character (ASCII symbols and Unicode category P*) out;
5. greedy longest-match-first WordPiece with ``##`` continuations; a word that cannot be
   covered, or is longer than 100 characters, becomes a single ``[UNK]``.

The special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` written literally in the text are
kept whole, as transformers does for its registered special tokens.

Verified (tests/test_text_tokenizer.py): identical ids to transformers' Python tokenizer
(``BertTokenizer`` in 4.x, ``BertTokenizerLegacy`` in 5.x) on random Unicode strings, and to the
Rust-backed one (``BertTokenizer`` in 5.x / ``BertTokenizerFast``) on the 870 BDM prompts.  The
Rust one differs only for code points unassigned in its Unicode table (kept as ``[UNK]`` there,
dropped here as category C*).  Lower-casing is per character (``Σ`` -> ``σ`` even at a word's
end), as in 4.x and the Rust tokenizer; 5.x's legacy class applies the final-sigma rule.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

__all__ = ["BertChineseTokenizer", "default_vocab_path"]

_MAX_CHARS_PER_WORD = 100
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in _SPECIAL_TOKENS) + ")")
# CJK Unified Ideographs (+ extensions A-E) and the compatibility blocks, as in BERT.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def default_vocab_path() -> Path:
    """The BERT Chinese vocabulary shipped in ``bdm/data``."""
    return Path(__file__).resolve().parents[1] / "data" / "bert_chinese_vocab.txt"


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # ASCII non-alphanumerics such as ^ $ ` count as punctuation even though Unicode says S*.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


@lru_cache(maxsize=65536)
def _clean_char(ch: str) -> str:
    """Steps 1-2 for one character: dropped, a space, a space-padded ideograph, or itself."""
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD or _is_control(ch):
        return ""
    if _is_whitespace(ch):
        return " "
    if _is_cjk(cp):
        return f" {ch} "
    return ch


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    for ch in word:
        if _is_punctuation(ch):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(ch)
        else:
            current.append(ch)
    if current:
        pieces.append("".join(current))
    return pieces


def _normalise_word(word: str) -> list[str]:
    """Steps 3-4 for one whitespace-free word (NFC never composes across a space, so
    normalising word by word equals BERT's whole-text NFC)."""
    # lower-case character by character: no final-sigma rule, like the Rust tokenizer and
    # transformers 4.x (whose tokenize() lowers one character at a time)
    word = _strip_accents("".join(c.lower() for c in unicodedata.normalize("NFC", word)))
    return " ".join(_split_punctuation(word)).split()


class BertChineseTokenizer:
    """BERT Chinese tokenizer: ``encode`` gives WordPiece ids without [CLS]/[SEP]."""

    def __init__(self, vocab_path: str | Path | None = None, cache_size: int = 65536):
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        # A duplicated entry keeps its last index, as transformers' load_vocab does.
        self.vocab: dict[str, int] = {tok: i for i, tok in enumerate(tokens)}
        self.inv_vocab: dict[int, str] = {i: tok for tok, i in self.vocab.items()}
        self.vocab_path = path
        for tok in _SPECIAL_TOKENS:
            if tok not in self.vocab:
                raise ValueError(f"{path}: special token {tok} missing from the vocabulary")
        # words (single ideographs above all) repeat a lot; caching per word keeps encode() cheap
        self._word_ids = lru_cache(maxsize=cache_size)(self._encode_word)

    # -- ids of the special tokens ----------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.vocab["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self.vocab["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self.vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self.vocab["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self.vocab["[MASK]"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- encoding ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """WordPiece strings, e.g. ``"hello世界"`` -> ``["hello", "世", "界"]``."""
        return [self.inv_vocab[i] for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens added (``[CLS]``/``[SEP]`` are the caller's job)."""
        ids: list[int] = []
        for part in _SPECIAL_SPLIT.split(text):
            if not part:
                continue
            if part in _SPECIAL_TOKENS:
                ids.append(self.vocab[part])
                continue
            for word in "".join(map(_clean_char, part)).split():
                ids.extend(self._word_ids(word))
        return ids

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def _encode_word(self, raw: str) -> tuple[int, ...]:
        ids: list[int] = []
        for word in _normalise_word(raw):
            ids.extend(self._wordpiece(word))
        return tuple(ids)

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        if len(word) > _MAX_CHARS_PER_WORD:
            return (self.unk_id,)
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                idx = self.vocab.get(piece)
                if idx is not None:
                    ids.append(idx)
                    break
                end -= 1
            else:  # nothing matched: the whole word is unknown
                return (self.unk_id,)
            start = end
        return tuple(ids)

    def decode(self, ids) -> str:
        """Readable text for debugging: joins ``##`` pieces, spaces between other tokens."""
        out = ""
        for i in ids:
            tok = self.inv_vocab.get(int(i), "[UNK]")
            if tok.startswith("##"):
                out += tok[2:]
            else:
                out += (" " if out else "") + tok
        return out
