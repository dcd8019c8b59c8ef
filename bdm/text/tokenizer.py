"""The Chinese tokenizer: transformers' BERT WordPiece on the vocabulary shipped in ``bdm/data``, offline.

Chinese CLIP's text tower (RoBERTa-wwm-ext) reads the plain BERT Chinese vocabulary (21128 entries,
lower-cased, every ideograph its own word). The official BDM inference tokenizes with the
Rust-backed ``BertTokenizerFast`` that ``ChineseCLIPProcessor.from_pretrained`` loads; so do we, from
the shipped folder (``from_pretrained`` also keeps ``[CLS]``/``[SEP]``/… typed in a prompt whole, as
the official tokenizer does). ``encode`` gives ids without ``[CLS]``/``[SEP]``: the encoder builds its
chunks itself.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BertChineseTokenizer", "default_vocab_dir"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def default_vocab_dir() -> Path:
    """The folder with the BERT Chinese ``vocab.txt`` shipped in ``bdm/data``."""
    return Path(__file__).resolve().parents[1] / "data" / "chinese_tokenizer"


class BertChineseTokenizer:
    """``encode(text)`` → WordPiece ids; the special tokens' ids as ``pad_id``, ``cls_id``, ``sep_id``."""

    def __init__(self, vocab_dir: str | Path | None = None):
        from transformers import BertTokenizerFast

        folder = Path(vocab_dir) if vocab_dir is not None else default_vocab_dir()
        vocab = folder / "vocab.txt"
        if not vocab.is_file():
            raise FileNotFoundError(f"{folder}: no vocab.txt (a BERT WordPiece vocabulary, one token a line)")
        tokens = set(vocab.read_text(encoding="utf-8").splitlines())
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise ValueError(f"{vocab}: special token(s) {', '.join(missing)} missing from the vocabulary")
        self.backend = BertTokenizerFast.from_pretrained(
            str(folder), local_files_only=True, do_lower_case=True, tokenize_chinese_chars=True
        )
        self.pad_id, self.cls_id, self.sep_id = (
            self.backend.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]")
        )

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def encode(self, text: str) -> list[int]:
        """Token ids without ``[CLS]``/``[SEP]``."""
        return self.backend(text, add_special_tokens=False)["input_ids"]
