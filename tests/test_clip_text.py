"""`bdm.text.clip`: the CLIP tokenizer (transformers' Rust BPE on the shipped vocabulary, after ftfy's
deterministic fixes) against open_clip's pure-Python one (its own copy of OpenAI's merges, ftfy) and,
under transformers 4.x, the WebUI's own Python `CLIPTokenizer`; and `EnglishTextEncoder`'s A1111 prompt
handling against hand-built token sequences run through the plain transformers `CLIPTextModel`."""
from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
import torch

from bdm.text.clip import (
    CHUNK_LENGTH,
    CLIPTokenizer,
    EnglishTextEncoder,
    tokenizer_dir,
    load_text_model,
    text_config,
    text_config_from_state_dict,
)

from .util import oracle

transformers = oracle("transformers")
BDM_870 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "BDM_870.json"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
BOS, EOS, COMMA = 49406, 49407, 267

STRINGS = [
    "a photo of a cat", "A Photo OF a CAT!!", "masterpiece, best quality, (detailed:1.2), 1girl, [blurry]",
    "it's don't we'll they're I'm you've he'd", "IT'S DON'T", "hello\tworld\n\nnew   line", "  padded  ", "",
    "123 4567 3.14159 1e-5", "emoji 😀🎉 and symbols ©®™ § ¶", "Crème brûlée à la café, naïve façade",
    "车水马龙 红烧狮子头, 井底之蛙", "日本語のテキスト", "Ελληνικά Σίσυφος", "Привет, мир", "<|startoftext|> hi <|endoftext|>",
    "a,b;c:d", "__under_score__ and--dashes...", "www.example.com/path?x=1&y=2#frag", "e\u0301 combining",
    "non\u00a0breaking\u3000ideographic space", "tabs\t\tand\r\nCRLF", "ALLCAPS SHOUTING", "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "(((nested))) [[[down]]] {curly}",
    "lora:<lora:style_v1:0.8> trigger", "\"quoted\" 'single' `back`", "100% $5 #hash @at ^caret *star",
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    pool = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + " " * 12 + ",.;:!?'\"()[]<>-_/\\*&^%$#@~`"
            + "éüßçñøÅ中文字车水马龙日本のテ😀🎉—…€£¥\t\n")
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def open_clip_tok():
    """open_clip's pure-Python CLIP tokenizer (OpenAI's algorithm and BPE file): ftfy.fix_text, HTML
    unescaping, whitespace, lower-case, BPE. Its two specials are spelled `<start_of_text>`/`<end_of_text>`."""
    return oracle("open_clip.tokenizer").SimpleTokenizer()


def bdm_870_english() -> list[str]:
    if not BDM_870.exists():
        return []
    rows = json.loads(BDM_870.read_text(encoding="utf-8"))
    return [row[4] for row in rows] + [row[2] for row in rows]


FIXABLE = ["“quoted” ‘text’ ʼn", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ，１２３！", "红色的猫，蓝色的狗。", "ﬁne ﬂower ﬀ ĳ",
           "ｶﾀｶﾅ halfwidth", "a，b，c"]


def test_shipped_vocabulary_is_openais(tok, open_clip_tok):
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.comma_token_id) == (BOS, EOS, COMMA)
    ours = tok.backend.get_vocab()
    assert {t: i for t, i in ours.items() if i < BOS} == {t: i for t, i in open_clip_tok.encoder.items() if i < BOS}
    merges = (tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert merges == [" ".join(pair) for pair in sorted(open_clip_tok.bpe_ranks, key=open_clip_tok.bpe_ranks.get)]
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]  # well-known SD ids
    assert tok.decode(tok.encode("A photo of a CAT")) == "a photo of a cat"


def test_tokenizer_matches_open_clip(tok, open_clip_tok):
    texts = [t for t in STRINGS if "<|" not in t] + FIXABLE + bdm_870_english()
    mismatches = [t for t in texts if tok.encode(t) != open_clip_tok.encode(t)]
    assert not mismatches, mismatches[:5]


def test_bpe_matches_open_clip_on_random_text(open_clip_tok):
    """Random text (no ftfy: its mojibake heuristics are not applied here) through both BPE implementations."""
    import regex
    oc = open_clip_tok

    def open_clip_bpe(text):  # open_clip's encode with the Rust tokenizer's cleaning: NFC, whitespace, lower
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        return [oc.encoder[piece] for word in regex.findall(oc.pat, text)
                for piece in oc.bpe("".join(oc.byte_encoder[b] for b in word.encode("utf-8"))).split(" ")]

    raw = CLIPTokenizer(fix_text=False)
    texts = random_strings(300) + [t for t in STRINGS if "<|" not in t]
    mismatches = [t for t in texts if raw.encode(t) != open_clip_bpe(t)]
    assert not mismatches, mismatches[:5]


def test_tokenizer_matches_the_webuis(tok):
    """The WebUI's own tokenizer: transformers 4.x's Python `CLIPTokenizer`, which runs ftfy.fix_text."""
    oracle("ftfy")
    webui = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir()))
    if webui.is_fast:
        pytest.skip(f"transformers {transformers.__version__} has no Python CLIPTokenizer (the WebUI ships 4.x)")
    texts = STRINGS + FIXABLE + bdm_870_english()
    mismatches = [t for t in texts if tok.encode(t) != webui(t, add_special_tokens=False)["input_ids"]]
    assert not mismatches, mismatches[:5]


def test_fixes_make_full_width_commas_commas(tok):
    raw = CLIPTokenizer(fix_text=False)
    assert tok.encode("a，b“c”") == tok.encode('a,b"c"') == raw.encode('a,b"c"') != raw.encode("a，b“c”")
    assert tok(["红色", "猫，狗"]) == [tok.encode("红色"), raw.encode("猫,狗")]
    encoder = EnglishTextEncoder(transformers.CLIPTextModel(text_config(**TINY)), tokenizer=tok)
    full_width, ascii_commas = (encoder.tokenize_line("cat" + comma + " dog " * 3) for comma in ("，", ","))
    assert [c.tokens for c in full_width[0]] == [c.tokens for c in ascii_commas[0]]  # the chunker sees commas


# ---------------------------------------------------------------------------------------------
# The encoder


@pytest.fixture(scope="module")
def tower():
    """A tiny CLIP text tower with random weights (layer norms too, so the final norm matters)."""
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(text_config(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def tower_tensors(model) -> dict:
    return {k.removeprefix("text_model."): v.clone() for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


@pytest.fixture(scope="module")
def encoder(tower):
    """Loaded from a current-layout checkpoint: `cond_stage_model.transformer.text_model.*`, no position_ids."""
    ckpt = {"cond_stage_model.transformer.text_model." + k: v for k, v in tower_tensors(tower).items()}
    ckpt["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    return EnglishTextEncoder.from_state_dict(ckpt, config=text_config(**TINY))


def plain(tower, token_rows: list[list[int]]) -> torch.Tensor:
    """Reference: the bare transformers model on [BOS] + tokens + EOS padding to 77."""
    ids = [[BOS] + r + [EOS] * (CHUNK_LENGTH + 1 - len(r)) for r in token_rows]
    with torch.no_grad():
        return tower(input_ids=torch.tensor(ids)).last_hidden_state


def ids(tok, text):
    return tok.encode(text)


def test_old_layout_checkpoint_and_inferred_config(tower, encoder, tok):
    old = {"cond_stage_model.transformer." + k: v for k, v in tower_tensors(tower).items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.4  # corrupted
    cfg = text_config_from_state_dict(old, num_attention_heads=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size,
            cfg.max_position_embeddings, cfg.hidden_act) == (64, 2, 128, 49408, 77, "quick_gelu")
    assert text_config_from_state_dict(old).num_attention_heads == 1  # hidden/64 unless told
    other = EnglishTextEncoder.from_state_dict(old, config=cfg)
    prompt = ["a photo of a cat"]
    assert torch.allclose(other.encode(prompt), encoder.encode(prompt), atol=1e-6)
    assert torch.allclose(encoder.encode(prompt)[0], plain(tower, [ids(tok, prompt[0])])[0], atol=1e-5)
    # and our own export loads back under the checkpoint prefix
    again = transformers.CLIPTextModel(cfg)
    load_text_model(again, {"cond_stage_model." + k: v for k, v in encoder.ldm_state_dict().items()})
    assert all(k.startswith("transformer.text_model.") for k in encoder.ldm_state_dict())
    with pytest.raises(RuntimeError):  # strict: a missing tensor is an error, not silent random weights
        load_text_model(again, {k: v for k, v in tower_tensors(tower).items() if "layers.1." not in k})


def test_sd1_default_config():
    cfg = text_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.max_position_embeddings, cfg.vocab_size, cfg.hidden_act) == (768, 12, 12, 3072, 77, 49408, "quick_gelu")


def test_chunks_of_75(encoder, tower, tok):
    chunks, count = encoder.tokenize_line("cat " * 80)
    cat = ids(tok, "cat")[0]
    assert count == 80 and len(chunks) == 2
    assert chunks[0].tokens == [BOS] + [cat] * 75 + [EOS]
    assert chunks[1].tokens == [BOS] + [cat] * 5 + [EOS] * 71
    z = encoder.encode(["cat " * 80])
    assert z.shape == (1, 154, 64)
    ref = plain(tower, [[cat] * 75, [cat] * 5])
    assert torch.allclose(z[0], ref.reshape(154, 64), atol=1e-5)


def test_comma_backtrack(encoder, tok):
    cat, dog = ids(tok, "cat")[0], ids(tok, "dog")[0]
    near = "cat " * 70 + ", (dog dog dog dog dog dog dog dog dog dog:1.5)"  # comma 5 tokens before the end
    chunks, _ = encoder.tokenize_line(near)
    assert chunks[0].tokens == [BOS] + [cat] * 70 + [COMMA] + [EOS] * 5
    assert chunks[1].tokens == [BOS] + [dog] * 10 + [EOS] * 66
    assert chunks[1].multipliers[1:11] == [1.5] * 10  # weights travel with their tokens
    edge = "cat " * 55 + ", " + "dog " * 30  # comma 20 tokens before the end: still moved
    chunks, _ = encoder.tokenize_line(edge)
    assert chunks[0].tokens == [BOS] + [cat] * 55 + [COMMA] + [EOS] * 20
    assert chunks[1].tokens[:31] == [BOS] + [dog] * 30
    far = "cat " * 54 + ", " + "dog " * 30  # 21 tokens before the end: too far, no move
    chunks, _ = encoder.tokenize_line(far)
    assert chunks[0].tokens == [BOS] + [cat] * 54 + [COMMA] + [dog] * 20 + [EOS]
    encoder.comma_padding_backtrack = 0
    try:
        chunks, _ = encoder.tokenize_line(near)
        assert chunks[0].tokens == [BOS] + [cat] * 70 + [COMMA] + [dog] * 4 + [EOS]
    finally:
        encoder.comma_padding_backtrack = 20


def test_weights_scale_tokens_and_restore_mean(encoder, tower, tok):
    chunks, _ = encoder.tokenize_line("a (cat:1.5) on [a] (mat)")
    assert chunks[0].multipliers[:7] == pytest.approx([1.0, 1.0, 1.5, 1.0, 1 / 1.1, 1.1, 1.0])
    z = encoder.encode(["a (cat:1.5) on [a] (mat)"])[0]
    base = plain(tower, [ids(tok, "a cat on a mat")])[0]
    mult = torch.tensor(chunks[0].multipliers)[:, None]
    expected = base * mult * (base.mean() / (base * mult).mean())
    assert torch.allclose(z, expected, atol=1e-5)
    assert abs(z.mean() - base.mean()) < 1e-6
    assert not torch.allclose(z, base, atol=1e-3)


def test_break_starts_a_new_chunk(encoder, tok):
    chunks, _ = encoder.tokenize_line("a cat BREAK a dog")
    assert [c.tokens[:4] for c in chunks] == [[BOS] + ids(tok, "a cat") + [EOS], [BOS] + ids(tok, "a dog") + [EOS]]
    z = encoder.encode(["a cat BREAK a dog"])
    assert z.shape == (1, 154, 64)
    assert torch.allclose(z[:, 77:], encoder.encode(["a dog"]), atol=1e-6)
    assert torch.allclose(z[:, :77], encoder.encode(["a cat"]), atol=1e-6)


def test_rows_padded_with_empty_chunk(encoder):
    z = encoder.encode(["a cat", "cat " * 80])
    empty = encoder.encode([""])
    assert z.shape == (2, 154, 64)
    assert torch.allclose(z[0, :77], encoder.encode(["a cat"])[0], atol=1e-6)
    assert torch.allclose(z[0, 77:], empty[0], atol=1e-6)
    assert torch.allclose(encoder.pad_chunks(encoder.encode(["a cat"]), 2), z[:1], atol=1e-6)
    assert encoder.encode(["a cat"], min_chunks=3).shape == (1, 231, 64)


def test_textual_inversion_embedding(encoder, tower, tok):
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    before = encoder.encode(["a photo of a cat"])
    encoder.add_embedding("myemb", vectors)
    try:
        chunks, _ = encoder.tokenize_line("a photo of (myemb:1.2) on a table")
        assert chunks[0].tokens[:11] == [BOS] + ids(tok, "a photo of") + [0, 0, 0] + ids(tok, "on a table") + [EOS]
        assert chunks[0].fixes == [(3, "myemb")] and chunks[0].multipliers[4:7] == [1.2] * 3
        z = encoder.encode(["a photo of myemb on a table", "a photo of a cat"])
        # reference: a copy of the tower whose (unused) tokens 1000..1002 embed to the TI vectors
        ref_tower = transformers.CLIPTextModel(text_config(**TINY)).eval()
        ref_tower.load_state_dict(tower.state_dict())
        with torch.no_grad():
            ref_tower.get_input_embeddings().weight[1000:1003] = vectors
        ref = plain(ref_tower, [ids(tok, "a photo of") + [1000, 1001, 1002] + ids(tok, "on a table")])
        assert torch.allclose(z[0], ref[0], atol=1e-5)
        assert torch.allclose(z[1], before[0], atol=1e-6)  # rows without the name are untouched
        plain_prompt = encoder.encode(["a photo of some on a table"])[0]
        assert torch.allclose(z[0, :4], plain_prompt[:4], atol=1e-6)  # causal: earlier positions unchanged
        assert not torch.allclose(z[0, 4:], plain_prompt[4:], atol=1e-3)
        # an embedding that does not fit in the chunk starts the next one
        chunks, _ = encoder.tokenize_line("cat " * 74 + "myemb")
        assert len(chunks) == 2 and chunks[1].fixes == [(0, "myemb")] and chunks[1].tokens[1:4] == [0, 0, 0]
        with pytest.raises(ValueError, match="768"):
            encoder.add_embedding("wide", torch.zeros(2, 768))
    finally:
        encoder.remove_embedding("myemb")
    assert torch.allclose(encoder.encode(["a photo of myemb"]), plain(tower, [ids(tok, "a photo of myemb")]),
                          atol=1e-5)


def test_clip_skip(encoder, tower, tok):
    prompt = ["a photo of a cat"]
    last = encoder.encode(prompt)
    encoder.clip_skip = 2
    try:
        skipped = encoder.encode(prompt)
        # independent reference: the same tower cut to its first layer, then the final layer norm
        one = transformers.CLIPTextModel(text_config(**{**TINY, "num_hidden_layers": 1})).eval()
        load_text_model(one, {k: v for k, v in tower_tensors(tower).items() if "layers.1." not in k})
        assert torch.allclose(skipped, plain(one, [ids(tok, prompt[0])]), atol=1e-5)
        assert not torch.allclose(skipped, last, atol=1e-3)
        encoder.clip_skip = 3
        assert encoder.encode(prompt).shape == last.shape  # the embeddings, normed
        encoder.clip_skip = 4
        with pytest.raises(ValueError):
            encoder.encode(prompt)
    finally:
        encoder.clip_skip = 1
