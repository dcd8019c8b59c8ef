"""ChineseTextEncoder: chunking, padding, A1111 weighting, BREAK and HF-directory loading."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from .util import oracle

transformers = oracle("transformers")

from bdm.text.chinese import CONTEXT_TOKENS, ChineseTextEncoder, toy_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "BDM_870.json"
H = toy_config()["hidden_size"]


@pytest.fixture(scope="module")
def enc():
    return ChineseTextEncoder.tiny(seed=0)


def test_shapes_one_and_three_chunks(enc):
    assert enc.encode(["一只猫"]).shape == (1, 52, H)
    assert enc.encode(["猫" * 120, "狗"]).shape == (2, 152, H)  # 50*k + 2
    assert enc.encode("一只猫", min_chunks=3).shape == (1, 152, H)
    assert enc.encode([""]).shape == (1, 52, H)
    with pytest.raises(ValueError, match="at least one prompt"):
        enc.encode([])


def test_public_api_at_the_package_top_level():
    namespace = {}
    exec("from bdm import *", namespace)
    assert namespace["ChineseTextEncoder"] is ChineseTextEncoder
    assert namespace["ChineseTextEncoder"].tiny(seed=0).encode("一只猫").shape == (1, 52, H)


def test_encode_runs_without_grad_and_on_module_dtype(enc):
    out = enc.encode(["一只猫"])
    assert not out.requires_grad and out.dtype == torch.float32
    enc64 = ChineseTextEncoder.tiny(seed=0).to(torch.float64)
    assert enc64.encode(["一只猫"]).dtype == torch.float64


def test_120_tokens_make_three_chunks_with_cls_sep(enc):
    text = "猫" * 70 + "狗" * 50
    assert len(enc.tokenizer.encode(text)) == 120
    ids, weights = enc.chunk_ids([text])
    assert ids.shape == (1, 3, CONTEXT_TOKENS)
    tok = enc.tokenizer
    cat, dog = tok.encode("猫狗")
    for c in range(3):
        assert ids[0, c, 0] == tok.cls_id
    assert ids[0, 0, 51] == tok.sep_id and ids[0, 1, 51] == tok.sep_id
    assert ids[0, 2, 21] == tok.sep_id and (ids[0, 2, 22:] == tok.pad_id).all()
    body = torch.cat([ids[0, 0, 1:51], ids[0, 1, 1:51], ids[0, 2, 1:21]]).tolist()
    assert body == [cat] * 70 + [dog] * 50
    assert (weights == 1.0).all()


def test_exactly_50_tokens_is_one_chunk(enc):
    ids, _ = enc.chunk_ids(["猫" * 50])
    assert ids.shape[1] == 1 and ids[0, 0, 51] == enc.tokenizer.sep_id


@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not present (shared BDM_870 prompts)")
def test_long_bdm870_descriptions_give_several_chunks(enc):
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    text = rows[0][3]
    k = math.ceil(len(enc.tokenizer.encode(text)) / 50)
    assert k == 3
    assert enc.encode([text]).shape == (1, 50 * k + 2, H)
    longest = max((r[3] for r in rows), key=lambda t: len(enc.tokenizer.encode(t)))
    assert len(enc.tokenizer.encode(longest)) > 250
    with pytest.warns(UserWarning, match="truncated"):
        assert enc.encode([text, longest]).shape == (2, 252, H)


def official_layout(enc, prompts):
    """An independent construction of the official inference's Chinese context
    (`get_weighted_text_embeddings(..., model_max_length=52, no_boseos_middle=True, cn=True)`): one row
    [CLS] + tokens + [PAD]... of 50*m + 2 ids for all prompts (m chunks for the longest), cut into windows
    of 52 that overlap by 2; each window's first id becomes [CLS], its last [PAD], its first [PAD] [SEP];
    each window through the plain transformers model; the first window loses its last position, the
    last its first, the middle ones both."""
    tok = enc.tokenizer
    rows = [tok.encode(p)[:250] for p in prompts]
    m = max(1, (max(len(r) for r in rows) - 1) // 50 + 1)
    ids = torch.tensor([[tok.cls_id] + r + [tok.pad_id] * (50 * m + 1 - len(r)) for r in rows])
    parts = []
    for i in range(m):
        window = ids[:, i * 50 : i * 50 + 52].clone()
        window[:, 0], window[:, -1] = tok.cls_id, tok.pad_id
        window[torch.arange(len(rows)), (window == tok.pad_id).float().argmax(dim=1)] = tok.sep_id
        with torch.no_grad():
            z = enc.model(window)[0]
        parts.append(z if m == 1 else z[:, :-1] if i == 0 else z[:, 1:] if i == m - 1 else z[:, 1:-1])
    return torch.cat(parts, dim=1)


LONG_NEGATIVE = "最差质量,低质量,低分辨率,伪影,丑陋,脸崩坏,变形,模糊,重复,病态,残缺,多余的手指,变异的手," * 4


@pytest.mark.parametrize(
    "prompt, negative",
    [
        ("一只猫", ""),  # the paper's setting: one chunk each
        ("猫" * 50, ""),  # exactly one full chunk
        ("猫" * 100, "狗" * 51),  # exactly two full chunks; the negative one token into its second
        ("一只红色的猫坐在长城上，" * 14, ""),  # > 150 tokens: four chunks, the negative padded to four
        ("一只猫", LONG_NEGATIVE),  # a typical long negative: the prompt padded to its chunks
    ],
    ids=["short", "50", "100-51", "over-150", "long-negative"],
)
def test_layout_is_the_official_inferences(enc, prompt, negative):
    z = enc.encode([prompt, negative])
    expected = official_layout(enc, [prompt, negative])
    k = max(math.ceil(len(enc.tokenizer.encode(t)) / 50) for t in (prompt, negative, "x"))
    assert z.shape == expected.shape == (2, 50 * k + 2, H)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    # encoded alone with the other's chunk count: the same rows (what the WebUI's ContextBank does)
    torch.testing.assert_close(enc.encode([negative], min_chunks=k), z[1:], atol=1e-5, rtol=1e-5)


def test_short_rows_are_padded_with_the_empty_chunk(enc):
    z = enc.encode(["猫" * 120, "狗"])
    empty = enc.encode([""])[0]
    dog = enc.encode(["狗"])[0]
    torch.testing.assert_close(z[1, :51], dog[:51], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z[1, 51:101], empty[1:51], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z[1, 101:], empty[1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z[0, 101:], empty[1:], atol=1e-3)  # the long row really has content there


def test_chunks_are_encoded_independently(enc):
    z = enc.encode(["猫" * 70 + "狗" * 50])[0]
    torch.testing.assert_close(z[:51], enc.encode(["猫" * 50])[0, :51], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z[101:], enc.encode(["狗" * 20])[0, 1:], atol=1e-5, rtol=1e-5)


def test_weight_one_is_exactly_plain(enc):
    assert torch.equal(enc.encode(["(词:1.0)语"]), enc.encode(["词语"]))


def test_weighting_scales_only_weighted_tokens_and_keeps_the_mean(enc):
    plain = enc.encode(["一只猫在草地上"])[0].double()
    weighted = enc.encode(["一只(猫:1.5)在草地上"])[0].double()
    # a single rescale factor c for the whole chunk, times 1.5 on the token of 猫 (position 3)
    ratio = weighted / plain
    c = ratio[0, 0]
    expected = torch.full((52, 1), float(c), dtype=torch.float64)
    expected[3] *= 1.5
    torch.testing.assert_close(ratio, expected.expand_as(ratio), atol=1e-4, rtol=1e-4)
    assert abs(float(c) - 1.0) > 1e-4  # the mean correction really happened
    torch.testing.assert_close(weighted.mean(), plain.mean(), atol=1e-6, rtol=1e-5)


def test_weighting_mean_is_kept_per_chunk(enc):
    text = "猫" * 50 + "(狗:1.3)" * 10
    plain = enc.encode(["猫" * 50 + "狗" * 10])[0]
    weighted = enc.encode([text])[0]
    assert torch.equal(weighted[:51], plain[:51])  # first chunk has no weights: not rescaled
    assert not torch.allclose(weighted[51:], plain[51:])


def test_brackets_are_syntax_not_tokens(enc):
    ids, weights = enc.chunk_ids(["[模糊]((猫))"])
    tok = enc.tokenizer
    assert ids[0, 0, :5].tolist() == [tok.cls_id, *tok.encode("模糊猫"), tok.sep_id]
    assert weights[0, 0, :5].tolist() == pytest.approx([1.0, 1 / 1.1, 1 / 1.1, 1.21, 1.0])


def test_break_starts_a_new_chunk(enc):
    ids, _ = enc.chunk_ids(["猫 BREAK 狗"])
    assert ids.shape[1] == 2
    tok = enc.tokenizer
    assert ids[0, 0, :3].tolist() == [tok.cls_id, tok.encode("猫")[0], tok.sep_id]
    assert ids[0, 1, :3].tolist() == [tok.cls_id, tok.encode("狗")[0], tok.sep_id]
    z = enc.encode(["猫 BREAK 狗"])[0]
    torch.testing.assert_close(z, torch.cat([enc.encode("猫")[0, :51], enc.encode("狗")[0, 1:]]), atol=1e-5, rtol=1e-5)
    assert enc.chunk_ids(["BREAK 狗"])[0].shape[1] == 2  # leading BREAK: empty first chunk (A1111)
    assert enc.chunk_ids(["狗 BREAK"])[0].shape[1] == 1  # trailing BREAK adds nothing


def test_token_count(enc):
    assert enc.token_count("一只猫") == (3, 50)
    assert enc.token_count("") == (0, 50)
    assert enc.token_count("猫" * 60) == (60, 100)
    assert enc.token_count("猫 BREAK 狗") == (51, 100)
    assert enc.token_count("猫" * 300) == (300, 250)  # over capacity: will be truncated


def test_truncation_beyond_max_chunks_warns(enc):
    with pytest.warns(UserWarning, match="truncated"):
        z = enc.encode(["猫" * 320])
    assert z.shape == (1, 252, H)
    small = ChineseTextEncoder.tiny(seed=0, max_chunks=2)
    with pytest.warns(UserWarning, match="truncated"):
        assert small.encode(["猫" * 120]).shape == (1, 102, H)


def test_attention_mask_convention(enc):
    ids, _ = enc.chunk_ids(["一只猫"])
    ids = ids.reshape(1, 52)
    hf_no_mask = enc.model(ids)[0]
    assert torch.equal(enc.encode(["一只猫"]), hf_no_mask)  # official BDM: no mask
    masked = ChineseTextEncoder.tiny(seed=0, attend_to_padding=False)
    hf_masked = enc.model(ids, attention_mask=(ids != 0).long())[0]
    torch.testing.assert_close(masked.encode(["一只猫"]), hf_masked)
    assert not torch.allclose(hf_masked, hf_no_mask, atol=1e-4)


def test_tiny_is_deterministic_and_frozen():
    a, b = ChineseTextEncoder.tiny(seed=3), ChineseTextEncoder.tiny(seed=3)
    assert torch.equal(a.encode("猫"), b.encode("猫"))
    assert not torch.equal(a.encode("猫"), ChineseTextEncoder.tiny(seed=4).encode("猫"))
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.model.training  # dropout stays off
    assert torch.equal(a.encode("猫"), b.encode("猫"))


def test_config_dict_round_trip(enc):
    cfg = enc.config_dict()
    assert cfg["hidden_size"] == H and cfg["vocab_size"] == 21128
    json.dumps(cfg)
    clone = ChineseTextEncoder.from_config(cfg)
    clone.load_state_dict(enc.state_dict())
    assert torch.equal(clone.encode(["一只猫"]), enc.encode(["一只猫"]))


# -- Hugging Face directories ----------------------------------------------------------


def _tiny_clip_model(seed=0):
    torch.manual_seed(seed)
    text = toy_config()
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    }
    config = transformers.ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.ChineseCLIPModel(config).eval()


def _save(model, path, fmt="safetensors"):
    """save_pretrained, then force one weight format (4.30 defaults to .bin, 5.x only writes safetensors)."""
    from safetensors.torch import save_file

    model.save_pretrained(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        (path / name).unlink(missing_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, path / "model.safetensors")
    else:
        torch.save(state, path / "pytorch_model.bin")


def _reference(model, enc, prompt="一只可爱的猫, a cute cat"):
    ids, _ = enc.chunk_ids([prompt])
    with torch.no_grad():
        return model(ids.reshape(1, 52))[0]


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_hf_dir_matches_transformers(tmp_path, safe, monkeypatch):
    clip = _tiny_clip_model()
    _save(clip, tmp_path, "safetensors" if safe else "bin")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    enc = ChineseTextEncoder.from_hf_dir(tmp_path)
    assert (not calls) if safe else (calls and all(calls))  # .bin only through weights_only=True
    expected = _reference(clip.text_model, enc)
    torch.testing.assert_close(enc.encode(["一只可爱的猫, a cute cat"]), expected)


def test_from_hf_dir_bare_text_model(tmp_path):
    torch.manual_seed(1)
    model = transformers.ChineseCLIPTextModel(transformers.ChineseCLIPTextConfig(**toy_config())).eval()
    _save(model, tmp_path)
    enc = ChineseTextEncoder.from_hf_dir(tmp_path)
    torch.testing.assert_close(enc.encode(["一只可爱的猫, a cute cat"]), _reference(model, enc))


def test_from_hf_dir_reads_left_out_keys_as_transformers_defaults(tmp_path):
    """save_pretrained may write a nested text_config as its difference from the defaults (transformers
    4.38 leaves out max_position_embeddings=512, type_vocab_size=2, ...): such a folder loads as
    transformers loads it."""
    clip = _tiny_clip_model()
    _save(clip, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    defaults = transformers.ChineseCLIPTextConfig().to_dict()
    left_out = [k for k in list(cfg["text_config"]) if k in defaults and cfg["text_config"][k] == defaults[k]]
    for k in left_out:
        del cfg["text_config"][k]
    assert "max_position_embeddings" in left_out
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    enc = ChineseTextEncoder.from_hf_dir(tmp_path)
    assert transformers.ChineseCLIPConfig.from_pretrained(tmp_path).text_config.max_position_embeddings == 512
    torch.testing.assert_close(enc.encode(["一只可爱的猫, a cute cat"]), _reference(clip.text_model, enc))


def test_from_hf_dir_dtype(tmp_path):
    _save(_tiny_clip_model(), tmp_path)
    assert ChineseTextEncoder.from_hf_dir(tmp_path, dtype=torch.float16).dtype == torch.float16


def test_bad_dirs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ChineseTextEncoder.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": toy_config()}))
    with pytest.raises(ValueError, match="no weights found"):
        ChineseTextEncoder.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "something"}))
    with pytest.raises(ValueError, match="text_config"):
        ChineseTextEncoder.from_hf_dir(tmp_path)


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    _save(_tiny_clip_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        ChineseTextEncoder.from_hf_dir(tmp_path)
    msg = str(err.value)  # checked against the weights before anything is built
    assert "config.json: text_config['intermediate_size'] is 96" in msg, msg
    assert "model.safetensors: text_model.encoder.layer.0.intermediate.dense.weight' gives 128" in msg, msg


def test_missing_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _save(_tiny_clip_model(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_model.encoder.layer.1.output.dense.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weight 'encoder\.layer\.1\.output\.dense\.bias'"):
        ChineseTextEncoder.from_hf_dir(tmp_path)


def test_no_warning_for_a_clean_checkpoint(tmp_path):
    _save(_tiny_clip_model(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ChineseTextEncoder.from_hf_dir(tmp_path)


def test_text_state_dict_is_portable_and_load_weights_checks(enc):
    state = enc.text_state_dict()
    assert "embeddings.word_embeddings.weight" in state
    assert not any(k.endswith(("position_ids", "token_type_ids")) for k in state)
    clone = ChineseTextEncoder.tiny(seed=9)
    clone.load_weights({"text_model." + k: v for k, v in state.items()})
    assert torch.equal(clone.encode("猫"), enc.encode("猫"))
    state["encoder.layer.0.output.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"my.file: weight 'encoder.layer.0.output.dense.weight' has shape \(3, 3\)"):
        clone.load_weights(state, source="my.file")
