"""The Chinese tokenizer (transformers' Rust-backed BERT WordPiece on the shipped vocabulary) gives the
ids of an independent implementation: transformers' pure-Python BERT tokenizer (4.x `BertTokenizer`,
5.x `BertTokenizerLegacy`) on the same vocabulary."""

import json
import random
import unicodedata
from pathlib import Path

import pytest

from bdm.text.tokenizer import BertChineseTokenizer, default_vocab_dir

from .util import oracle

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "BDM_870.json"

TRICKY = [
    "",
    "   \t\n ",
    "Café naïve RÉSUMÉ Ångström façade Œuvre",
    "e\u0301cole",  # decomposed accent
    "ＡＢＣ１２３，（全角）！？：；“引号”【括号】《书名》——……",
    "你好，世界！Hello, World!",
    "emoji 😀🐱‍👤 🇨🇳 ❤️ 猫😺",
    "ctrl\x00chars\x07here\x1b[0m\u200b\ufeff\ufffdend",
    "tabs\tand\r\nnewlines\u3000ideographic space\xa0nbsp",
    "2024年3月15日 下午3:45, 价格¥1,299.00 / $199.99 (50% off)",
    "iPhone15ProMax和MacBookAir M3芯片",
    "a" * 99,
    "a" * 100,
    "a" * 101,
    "x" + "的" * 3 + "supercalifragilisticexpialidocious" * 4,
    "[CLS] 你好 [SEP] [MASK]的[PAD] [UNK] [mask] [ CLS ]",
    "unaffable playing ##ing #hashtag @user foo_bar-baz",
    "İstanbul ß ﬁ Kelvin\u212a Ω\u2126",
    "한국어 日本語のテキスト ไทย العربية русский",
    "𠀀𪜀𫝀 CJK extensions 㐀 丽 豈",
    "^$`~|\\<>=+*&%#@!",
    "line\u2028sep\u2029para",
]


@pytest.fixture(scope="module")
def ours():
    return BertChineseTokenizer()


@pytest.fixture(scope="module")
def hf_python():
    """transformers' pure-Python BERT tokenizer (4.x BertTokenizer, 5.x BertTokenizerLegacy), offline."""
    transformers = oracle("transformers")
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as cls
    except ImportError:
        cls = transformers.BertTokenizer
    tok = cls.from_pretrained(str(default_vocab_dir()), do_lower_case=True, tokenize_chinese_chars=True)
    assert not tok.is_fast and len(tok) == 21128

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    encode.final_sigma = tok.tokenize("ΑΣ") == tok.tokenize("ας")
    return encode


def test_vocab_and_special_ids(ours):
    assert ours.vocab_size == 21128
    assert (ours.pad_id, ours.cls_id, ours.sep_id) == (0, 101, 102)


def test_simple_examples(ours):
    pieces = ours.backend.convert_ids_to_tokens(ours.encode("Hello世界, unaffable"))
    assert pieces == ["hello", "世", "界", ",", "u", "##na", "##ff", "##able"]
    assert ours.encode("") == []
    assert ours.encode("a" * 101) == [100]  # over 100 chars -> one [UNK]
    assert ours.encode("[CLS]猫[SEP]") == [101, ours.encode("猫")[0], 102]  # typed specials stay whole


@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not present (shared BDM_870 prompts)")
@pytest.mark.parametrize("column", [1, 3, 4], ids=["concept_zh", "description_zh", "description_en"])
def test_bdm870_matches_the_python_tokenizer(ours, hf_python, column):
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    assert len(rows) == 870
    mismatches = [r[column] for r in rows if ours.encode(r[column]) != hf_python(r[column])]
    assert not mismatches, f"{len(mismatches)} rows differ, first: {mismatches[0]!r}"


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_match_the_python_tokenizer(ours, hf_python, text):
    assert ours.encode(text) == hf_python(text)


def test_random_unicode_matches_python_reference(ours, hf_python):
    """Fuzz across scripts, combining marks, controls, spaces, emoji and unassigned code points."""
    rng = random.Random(1234)
    pools = [
        range(0x20, 0x7F),
        range(0x80, 0x250),
        range(0x300, 0x370),
        range(0x370, 0x500),
        range(0x4E00, 0x4E80),
        range(0x3000, 0x3040),
        range(0xFF00, 0xFF70),
        range(0x20),
        range(0x1F600, 0x1F610),
        range(0x2000, 0x2070),
        range(0x600, 0x700),
        range(0xE00, 0xE60),
        range(0xAC00, 0xAC20),
        range(0x1100, 0x1120),
        [0x85, 0xA0, 0x2028, 0xFEFF, 0xFFFD, 0x130, 0x3A3],
    ]
    checked = 0
    for _ in range(3000):
        text = "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 14)))
        if "\u03a3" in text and hf_python.final_sigma:
            continue  # 5.x's legacy class lowers whole words (final sigma); 4.x and Rust do not
        if any(unicodedata.category(c) == "Cn" or c == "\u061d" for c in text):
            continue  # unassigned in the Rust tokenizer's Unicode table (U+061D came in Unicode 14): it keeps
            # an [UNK] where Python drops the character (category C*) or splits it off (Po)
        assert ours.encode(text) == hf_python(text), repr(text)
        checked += 1
    assert checked > 2000


def test_custom_vocab_folder(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "猫"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertChineseTokenizer(tmp_path)
    assert tok.vocab_size == 9 and tok.cls_id == 2
    assert tok.encode("Unaffable 猫 狗") == [5, 6, 7, 8, 1]


def test_bad_vocab_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        BertChineseTokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        BertChineseTokenizer(tmp_path)
