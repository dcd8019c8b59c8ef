"""A model file's configs are checked against its own tensors before anything is built: a crafted file
cannot make a loader allocate from its metadata, and every error names the file and the key."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import bdm
from bdm.formats import bdm_file
from bdm.formats.checks import TEXT_ACTIVATIONS, check_text_config, check_unet_config
from bdm.formats.files import FormatError
from bdm.unet import SMALL, UNetConfig, UNetModel
from tests.util import REPO, build_random


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from bdm.text.chinese import ChineseTextEncoder
    path = tmp_path_factory.mktemp("checks") / "good.safetensors"
    unet = build_random(lambda: UNetModel(SMALL), seed=0)
    bdm_file.save_bdm(path, bdm.from_backbone(unet, 64), ChineseTextEncoder.tiny(seed=0))
    return path


def _rewrite(src, dst, **metadata_changes):
    """`src` with changed metadata; a value that is a dict is applied to that JSON metadata entry."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for key, change in metadata_changes.items():
        if isinstance(change, dict):
            d = json.loads(meta[key])
            for k, v in change.items():
                if isinstance(v, dict):
                    d[k] = {**d[k], **v}
                else:
                    d[k] = v
            meta[key] = json.dumps(d)
        else:
            meta[key] = change
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("change, message", [
    ({"text_encoder_config": {"vocab_size": 8_000_000}},
     r"text_encoder_config\['vocab_size'\] is 8000000, but the file's tensor "
     r"'text_encoder.embeddings.word_embeddings.weight' gives 21128"),
    ({"text_encoder_config": {"num_hidden_layers": 1000}},
     r"text_encoder_config\['num_hidden_layers'\] is 1000, but the file's tensor 'text_encoder.encoder.layer.N.\*' gives 2"),
    ({"text_encoder_config": {"intermediate_size": 10 ** 9}}, r"\['intermediate_size'\] is 1000000000"),
    ({"text_encoder_config": {"max_position_embeddings": 10 ** 7}}, r"\['max_position_embeddings'\] is 10000000"),
    ({"text_encoder_config": {"hidden_act": "os.system"}}, r"\['hidden_act'\] is 'os.system'; expected one of gelu"),
    ({"text_encoder_config": {"num_attention_heads": 3}}, r"\['num_attention_heads'\] is 3, which does not divide"),
    ({"text_encoder_config": {"hidden_size": "64"}}, r"\['hidden_size'\] must be an integer ≥ 1, found '64'"),
    ({"text_encoder_config": {"layer_norm_eps": -1}}, r"\['layer_norm_eps'\] must be a number from 0 to 1"),
    ({"text_encoder_config": {"position_embedding_type": "relative_key"}}, "only 'absolute'"),
    ({"text_encoder_config": "[1, 2]"}, "text_encoder_config must be a JSON object"),
    ({"bridge_config": {"unet": {"num_res_blocks": 10 ** 6}}},
     r"bridge_config\['unet'\] describes 2000003 blocks or more, but the file holds only \d+ tensors"),
    ({"bridge_config": {"unet": {"transformer_depth": 10 ** 7}}}, "describes 10000004 blocks or more"),
    ({"bridge_config": {"unet": {"model_channels": 64000}}},
     r"branch weights \(bridge.\*\) key 'bridge.time_embed.0.weight' has shape \(128, 32\), expected "
     r"\(256000, 64000\)"),
    ({"bridge_config": {"unet": {"channel_mult": "12"}}}, r"\['channel_mult'\] must be a list of integers"),
    ({"bridge_config": {"unet": {"context_dim": 0}}}, r"\['context_dim'\] must be an integer ≥ 1, found 0"),
    ({"bridge_config": {"hint_channels": 3}}, r"1 unexpected|missing \(first: 'bridge.input_hint_block"),
    ({"bridge_config": "{not json"}, "metadata bridge_config is not valid JSON"),
    ({"format_version": "x"}, "metadata format_version is 'x', not a number"),
])
def test_crafted_metadata_is_refused_naming_file_and_key(good, tmp_path, change, message):
    bad = _rewrite(good, tmp_path / "crafted.safetensors", **change)
    with pytest.raises(FormatError, match=message) as e:
        bdm.load_bridge(bad)
    assert str(e.value).startswith(str(bad)), e.value


def test_good_file_still_loads(good):
    bridge = bdm.load_bridge(good)
    assert bridge.text_encoder is not None and next(bridge.parameters()).device.type == "cpu"
    assert not any(p.is_meta for p in bridge.parameters())


def test_text_config_checks_directly():
    shapes = {"embeddings.word_embeddings.weight": (100, 8), "embeddings.position_embeddings.weight": (16, 8),
              "embeddings.token_type_embeddings.weight": (2, 8), "encoder.layer.0.intermediate.dense.weight": (32, 8),
              "encoder.layer.0.attention.self.query.weight": (8, 8)}
    config = {"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "max_position_embeddings": 16, "hidden_act": "gelu", "pad_token_id": 0}
    check_text_config(config, shapes, "x")
    assert "gelu" in TEXT_ACTIVATIONS and "exec" not in TEXT_ACTIVATIONS
    with pytest.raises(FormatError, match=r"x: missing tensor 'text_encoder.embeddings.position_embeddings.weight'"):
        check_text_config(config, {k: v for k, v in shapes.items() if "position" not in k}, "x")
    with pytest.raises(FormatError, match=r"'pad_token_id'\] must be a token id below 100, found 100"):
        check_text_config(dict(config, pad_token_id=100), shapes, "x")
    with pytest.raises(FormatError, match=r"encoder.layer.N.\* are not numbered"):
        check_text_config(config, {**shapes, "encoder.layer.5.output.dense.weight": (8, 32)}, "x")


def test_unet_config_checks_directly():
    check_unet_config(SMALL, 1000, "f", "cfg")
    with pytest.raises(FormatError, match=r"f: cfg\['num_heads'\] must be an integer ≥ 1 \(or -1\), found 0"):
        check_unet_config(UNetConfig(**{**SMALL.to_dict(), "num_heads": 0}), 1000, "f", "cfg")
    with pytest.raises(FormatError, match="sets neither 'num_heads' nor 'num_head_channels'"):
        check_unet_config(UNetConfig(**{**SMALL.to_dict(), "num_heads": -1, "num_head_channels": -1}), 1000, "f", "cfg")
    with pytest.raises(FormatError, match="'use_linear_in_transformer'] must be true or false"):
        check_unet_config(UNetConfig(**{**SMALL.to_dict(), "use_linear_in_transformer": "yes"}), 1000, "f", "cfg")


def test_crafted_vocabulary_allocates_nothing(good, tmp_path):
    """Loading the crafted file (a vocabulary of 8,000,000 claimed: 2 GB of embeddings if built) in a fresh
    process raises the config error; its peak memory stays within 300 MB of loading the good file."""
    crafted = _rewrite(good, tmp_path / "crafted.safetensors", text_encoder_config={"vocab_size": 8_000_000})
    code = textwrap.dedent("""
        import resource, sys
        import bdm
        bdm.load_bridge(sys.argv[2])  # the good file: the same imports and a real load
        try:
            bdm.load_bridge(sys.argv[1])
            print("LOADED")
        except Exception as e:  # noqa: BLE001 - which error comes is asserted by the caller
            print("ERROR", type(e).__name__, e)
        print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """)

    def peak(*files):
        r = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, cwd=REPO,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout, int(r.stdout.split("PEAK_KB")[1])

    out, crafted_kb = peak(str(crafted), str(good))
    _, good_kb = peak(str(good), str(good))
    assert (crafted_kb - good_kb) / 1024 < 300, (crafted_kb, good_kb, out)
    assert "ERROR FormatError" in out and "vocab_size'] is 8000000" in out, out
