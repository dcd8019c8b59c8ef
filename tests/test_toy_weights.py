"""The committed toy models: they load, they have exactly a WebUI SD1.x checkpoint's layout (checked
against the original `ldm` package's `LatentDiffusion` built from the `.yaml`), and a small version of
`python -m bdm.toy eval` passes with thresholds far above chance."""
from __future__ import annotations

import pytest

from bdm.toy import paths

from .util import check_webui_layout

COMMITTED = paths.WEIGHTS / "build.json"
needs_weights = pytest.mark.skipif(not COMMITTED.is_file(),
                                   reason="no committed toy weights yet (python -m bdm.toy build)")


@needs_weights
def test_committed_models_load():
    from bdm.formats.checkpoint import load_checkpoint
    from bdm.formats.controlnet import load_controlnet
    from bdm.formats.embedding import load_embedding
    from bdm.formats.lora import apply_loras
    from bdm.load import load_bridge
    ckpt = load_checkpoint(paths.backbone_checkpoint())
    load_checkpoint(paths.dreambooth_checkpoint())
    bridge = load_bridge(paths.bdm_file())
    assert bridge.text_encoder is not None and bridge.text_encoder.tokenizer.vocab_size == 21128
    assert load_controlnet(paths.controlnet_file()).is_controlnet
    apply_loras(ckpt.unet, ckpt.text_encoder, [(paths.lora_file(), 1.0)]).remove()
    assert load_embedding(ckpt.text_encoder, paths.embedding_file()) == paths.embedding_file().stem
    total = sum(f.stat().st_size for f in paths.WEIGHTS.rglob("*") if f.is_file())
    assert total < 30e6, f"committed toy weights are {total / 1e6:.1f} MB"


@needs_weights
def test_committed_checkpoint_is_a_webui_sd1_checkpoint():
    check_webui_layout(paths.backbone_checkpoint())


@needs_weights
@pytest.mark.slow
def test_small_eval_far_above_chance(tmp_path):
    """A reduced `python -m bdm.toy eval`: 24 images per row; chance is 25 % (colour) and 33 % (shape)."""
    from bdm.toy.evaluate import evaluate
    res = evaluate(images=24, output=tmp_path, rows=["bdm", "controlnet", "lora", "lora_english"])["rows"]
    assert res["bdm"]["colour"] >= 60 and res["bdm"]["shape"] >= 55, res["bdm"]
    assert res["controlnet"]["position"] >= 50, res["controlnet"]  # chance 11 %
    assert res["lora"]["style"] >= 50, res["lora"]  # the plain background is the backbone's only one
    # the reference row: the LoRA on its own, with an English prompt and no BDM
    assert res["lora_english"]["colour"] >= 60 and res["lora_english"]["style"] >= 50, res["lora_english"]
    assert (tmp_path / "bdm.png").is_file()


@needs_weights
def test_generate_cli_default_is_the_toy_model(tmp_path):
    from bdm.generate import main
    out = tmp_path / "out.png"
    assert main(["--prompt", "红色的圆形", "-o", str(out), "--steps", "8"]) == 0
    from PIL import Image
    assert Image.open(out).size == (64, 64)
