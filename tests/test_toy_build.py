"""`python -m bdm.toy build --quick` runs end to end (tiny steps), so the build path cannot rot; what it
writes loads with the project's loaders and the original `ldm`, `export-webui` puts it where the WebUI
looks, and `eval` runs on it."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from bdm.toy import domain as D
from bdm.toy import paths


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    from bdm.toy.__main__ import main
    out = tmp_path_factory.mktemp("toy") / "weights"
    # not the default seed: `retrain` must take the build's seed (and --quick) from its build.json
    assert main(["build", "--quick", "--seed", "1", "--output", str(out), "--threads", "1"]) == 0
    return out


@pytest.mark.slow
def test_quick_build_writes_every_model(quick):
    names = [paths.backbone_checkpoint().name, paths.dreambooth_checkpoint().name, paths.bdm_file().name,
             paths.lora_file().name, paths.controlnet_file().name, paths.embedding_file().name,
             paths.judge_file().name, "bdm-toy-sd1.yaml", "bdm-toy-sd1-outline.yaml", "build.json"]
    for name in names:
        assert (quick / name).is_file(), name
    assert (quick / paths.CLIP_DIR_NAME / "config.json").is_file()
    report = json.loads((quick / "build.json").read_text())
    assert report["quick"] and set(report["stage_seconds"]) >= {"VAE", "English SD", "BDM (python -m bdm.train)"}


@pytest.mark.slow
def test_retrain_of_a_stage_equals_the_builds_stage(quick, tmp_path, capsys):
    import shutil

    from bdm.cli import run
    from bdm.formats.files import read_metadata, read_state_dict
    from bdm.toy.__main__ import main
    copy = tmp_path / "weights"
    shutil.copytree(quick, copy)
    for name in (paths.controlnet_file().name, paths.bdm_file().name):
        (copy / name).unlink()
    # named out of order: the Chinese CLIP is still trained before the BDM that reads it; no --seed, no
    # --quick: the build's own
    assert main(["retrain", "bdm", "controlnet", "chinese_clip", "--weights", str(copy), "--threads", "1"]) == 0
    for name in (paths.controlnet_file().name, paths.bdm_file().name):
        # same metadata and tensors (safetensors writes the metadata keys in a per-process order)
        meta_a, meta_b = (read_metadata(d / name) for d in (quick, copy))
        tensors_a, tensors_b = (read_state_dict(d / name) for d in (quick, copy))
        assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys(), name
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a), name
    assert {"controlnet", "chinese_clip", "bdm"} <= set(json.loads((copy / "build.json").read_text())["retrained"])
    assert run(main, ["retrain", "vae", "--weights", str(copy)]) == 2
    assert "unknown stage" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_models_load_in_their_community_formats(quick):
    from bdm.formats.bdm_file import read_bdm
    from bdm.formats.checkpoint import load_checkpoint
    from bdm.formats.controlnet import load_controlnet
    from bdm.formats.embedding import load_embedding, read_embedding
    from bdm.formats.files import read_state_dict
    from bdm.formats.lora import apply_loras
    from bdm.load import load_bridge
    ckpt = load_checkpoint(quick / paths.backbone_checkpoint().name)
    meta, _ = read_bdm(quick / paths.bdm_file().name)
    assert meta["bdm.trained_by"] == "bdm.train"  # the BDM comes from the project's trainer
    bridge = load_bridge(quick / paths.bdm_file().name)
    assert bridge.context_dim == bridge.text_encoder.hidden_size
    control = load_controlnet(quick / paths.controlnet_file().name)
    assert control.is_controlnet and control.config.hint_channels == 3
    lora = read_state_dict(quick / paths.lora_file().name)
    assert lora and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in lora)
    before = {k: v.clone() for k, v in ckpt.unet.state_dict().items()}
    patch = apply_loras(ckpt.unet, ckpt.text_encoder, [(quick / paths.lora_file().name, 1.0)])
    patch.remove()
    assert all(torch.equal(before[k], v) for k, v in ckpt.unet.state_dict().items())
    name, vectors = read_embedding(quick / paths.embedding_file().name)
    assert vectors.shape[1] == ckpt.text_encoder.hidden_size
    assert load_embedding(ckpt.text_encoder, quick / paths.embedding_file().name) == name


@pytest.mark.slow
def test_quick_checkpoint_is_a_webui_sd1_checkpoint(quick):
    from tests.util import check_webui_layout
    check_webui_layout(quick / paths.backbone_checkpoint().name)
    check_webui_layout(quick / paths.dreambooth_checkpoint().name)


@pytest.mark.slow
def test_export_webui(quick, tmp_path, capsys):
    from bdm.toy.__main__ import main
    import yaml
    root = tmp_path / "stable-diffusion-webui"
    root.mkdir()
    assert main(["export-webui", str(root), "--weights", str(quick)]) == 0
    sd = root / "models" / "Stable-diffusion"
    for path in (sd / "bdm-toy-sd1.safetensors", sd / "bdm-toy-sd1.yaml", sd / "bdm-toy-sd1-outline.safetensors",
                 root / "models" / "bdm" / "bdm-toy.safetensors", root / "models" / "Lora" / "bdm-toy-striped.safetensors",
                 root / "models" / "ControlNet" / "bdm-toy-bbox.safetensors",
                 root / "embeddings" / "bdm-toy-smallthing.safetensors"):
        assert path.is_file(), path
    version = yaml.safe_load((sd / "bdm-toy-sd1.yaml").read_text())["model"]["params"]["cond_stage_config"]["params"]["version"]
    assert Path(version).is_absolute() and (Path(version) / "vocab.json").is_file()
    from transformers import CLIPTokenizer
    assert CLIPTokenizer.from_pretrained(version)("a red circle").input_ids[0] == 49406  # offline, from the folder
    forge = sd / paths.FORGE_CONFIG_DIR_NAME  # Forge's component configs of the toy family
    index = json.loads((forge / "model_index.json").read_text())
    for component in ("scheduler", "text_encoder", "tokenizer", "vae"):
        assert index[component] and (forge / component).is_dir(), component
    assert CLIPTokenizer.from_pretrained(str(forge / "tokenizer"))("a red circle").input_ids[0] == 49406
    out = capsys.readouterr().out
    assert D.LORA_TRIGGER in out and "bdm-toy-smallthing" in out
    assert "NOT loadable by the stock sd-webui-controlnet extension" in out  # not advertised as working


@pytest.mark.slow
def test_eval_runs_on_the_quick_build(quick, tmp_path):
    from bdm.toy.evaluate import evaluate, print_table
    res = evaluate(quick, images=4, output=tmp_path, steps=2, rows=["bdm", "controlnet", "ti", "chinese_only"])
    assert set(res["rows"]) == {"bdm", "controlnet", "ti", "chinese_only"}
    assert (tmp_path / "controlnet.png").is_file() and (tmp_path / "eval.json").is_file()
    print_table(res)


def test_domain_chinese_only_concept_and_held_out_phrasings():
    rng = random.Random(0)
    specs = [D.random_spec(rng, shapes=D.ENGLISH_SHAPES) for _ in range(200)]
    english = {D.english_caption(s, D.train_template(rng, "en")) for s in specs}
    assert not any("star" in c for c in english)  # the English world never sees 五角星
    assert D.CHINESE_ONLY == "star" and D.SHAPES_ZH["star"] == "五角星"
    held = [D.EN_TEMPLATES[i] for i in D.held_out_templates("en")]
    assert not set(held) & {D.EN_TEMPLATES[D.train_template(rng, "en")] for _ in range(500)}
    held_zh = [D.ZH_TEMPLATES[i] for i in D.held_out_templates("zh")]
    assert not set(held_zh) & {D.ZH_TEMPLATES[D.train_template(rng, "zh")] for _ in range(500)}


def test_backbone_captions_name_the_size_in_about_half():
    from bdm.toy.build import backbone_captions, english_training_caption
    rng = random.Random(0)
    specs = [D.random_spec(rng, shapes=D.ENGLISH_SHAPES) for _ in range(400)]
    known = set(backbone_captions(specs))
    captions = [(s, english_training_caption(s, rng)) for s in specs for _ in range(5)]
    assert all(c in known for _, c in captions)  # the backbone stage encodes them all up front
    sized = [(s, c) for s, c in captions if c.split(",")[0] in D.SIZES]
    assert all(c.startswith(f"{s.size}, ") for s, c in sized)  # the picture's own size, never the other
    assert 0.35 < len(sized) / len(captions) < 0.55  # half of the 90 % non-empty ones
    assert {s.size for s, _ in sized} == set(D.SIZES)


def test_a_plugins_gain_is_counted_against_bdm_alone():
    """The TI row's small share passes only where it is 20 points above what BDM draws without the TI."""
    from bdm.toy.evaluate import check_targets
    for bdm_small, ti_small, gain_met in ((70.0, 85.6, False), (12.0, 85.6, True)):
        results = {"rows": {"bdm": {"colour": 100.0, "shape": 99.0, "small": bdm_small},
                            "ti": {"colour": 99.0, "shape": 98.0, "small": ti_small}}}
        check_targets(results)
        met = results["rows"]["ti"]["targets_met"]
        assert met["small"] is True and met["small +20 over BDM"] is gain_met
        assert met["colour within 5"] and met["shape within 5"]


def test_domain_pictures_and_hint():
    import numpy as np
    spec = D.Spec("red", "circle", 0, "large")
    a = np.asarray(D.render(spec)).astype(int)
    assert a.shape == (64, 64, 3)
    y, x = (int(v) for v in spec.centre[::-1])
    assert np.abs(a[y, x] - D.RGB["red"]).max() <= 3 and np.abs(a[63, 63] - D.BACKGROUND).max() <= 3
    h = np.asarray(D.hint_image(spec))
    assert h[y, x].tolist() == [255, 255, 255] and h[63, 63].tolist() == [0, 0, 0]
    striped = np.asarray(D.render(D.with_style(spec, background="striped", position=8))).astype(int)
    assert np.abs(striped[1, 1] - D.STRIPE).max() <= 3 and np.abs(striped[5, 1] - D.BACKGROUND).max() <= 3
