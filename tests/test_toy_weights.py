"""The committed toy models: they load, they have exactly a WebUI SD1.x checkpoint's layout (checked
against the original `ldm` package's `LatentDiffusion` built from the `.yaml`), and a small version of
`python -m bdm.toy eval` passes with thresholds far above chance."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from bdm.toy import paths

COMMITTED = paths.WEIGHTS / "build.json"
needs_weights = pytest.mark.skipif(not COMMITTED.is_file(),
                                   reason="no committed toy weights yet (python -m bdm.toy build)")


def ldm_latent_diffusion(checkpoint: Path):
    """`ldm.models.diffusion.ddpm.LatentDiffusion` instantiated from the checkpoint's `.yaml` as the WebUI
    does (CLIP built from the config folder `version:` names, no weights downloaded), then the file's
    state dict loaded strictly. pytorch_lightning is stubbed (current releases lack
    `utilities.distributed.rank_zero_only`); sys.modules is restored afterwards."""
    pytest.importorskip("ldm.util")
    pytest.importorskip("omegaconf")
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from bdm.formats.files import read_state_dict
    names = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.distributed",
             "ldm.models.diffusion.ddpm", "ldm.models.autoencoder")
    saved = {k: sys.modules.get(k) for k in names}
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = nn.Module
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = lambda f: f
    pl.utilities, utilities.distributed = utilities, distributed
    sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
                        "pytorch_lightning.utilities.distributed": distributed})
    sys.modules.pop("ldm.models.diffusion.ddpm", None)
    sys.modules.pop("ldm.models.autoencoder", None)
    original = CLIPTextModel.from_pretrained.__func__
    # the WebUI builds the text model from the folder's config only (weights come from the checkpoint)
    CLIPTextModel.from_pretrained = classmethod(lambda cls, version, **kw: cls(CLIPTextConfig.from_pretrained(version)))
    cwd = os.getcwd()
    try:
        from ldm.util import instantiate_from_config
        config = OmegaConf.load(checkpoint.with_suffix(".yaml"))
        os.chdir(checkpoint.parent)  # a relative `version:` is relative to the checkpoint (export-webui makes it absolute)
        model = instantiate_from_config(config.model)
        sd = read_state_dict(checkpoint)
        own = model.state_dict()
        te = "cond_stage_model.transformer."
        if not any(k.startswith(te + "text_model.") for k in own):
            # transformers ≥ 5 dropped CLIPTextModel's `text_model` level; the WebUI's transformers 4.x and
            # every SD1.x file have it: compare under the files' names
            sd = {te + k[len(te + "text_model."):] if k.startswith(te + "text_model.") else k: v
                  for k, v in sd.items()}
        # buffers LatentDiffusion computes itself (noise schedule) are not in SD files; CLIP's position_ids
        # is in SD1.x files (and ours: the WebUI's transformers 4.30 expects it) but not a saved buffer of
        # newer transformers
        computed = {k for k in own if not k.startswith(("model.", "first_stage_model.", "cond_stage_model."))
                    or k.endswith("position_ids")}
        missing = sorted(set(own) - set(sd) - computed)
        unexpected = sorted(k for k in set(sd) - set(own) if not k.endswith("position_ids"))
        assert any(k.endswith("embeddings.position_ids") for k in sd)
        assert not missing and not unexpected, (missing[:5], unexpected[:5])
        sd = {k: v for k, v in sd.items() if k in own}
        for k, v in sd.items():
            assert own[k].shape == v.shape, k
        model.load_state_dict({**{k: own[k] for k in computed}, **sd}, strict=True)
        return model, config
    finally:
        os.chdir(cwd)
        CLIPTextModel.from_pretrained = classmethod(original)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def check_webui_layout(checkpoint: Path) -> None:
    """A toy checkpoint as the WebUI gets it from `export-webui` (its CLIP folder plus the shipped tokenizer)."""
    import tempfile

    from bdm.toy.export import export_webui
    with tempfile.TemporaryDirectory() as root:
        export_webui(root, weights=checkpoint.parent, quiet=True)
        check_exported_layout(Path(root) / "models" / "Stable-diffusion" / checkpoint.name)


def check_exported_layout(checkpoint: Path) -> None:
    from bdm.formats.files import read_state_dict
    keys = read_state_dict(checkpoint).keys()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    model, config = ldm_latent_diffusion(checkpoint)
    params = config.model.params
    assert config.model.target == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert params.cond_stage_config.target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert params.first_stage_config.params.embed_dim == 4 and params.channels == 4
    assert params.unet_config.params.context_dim == model.cond_stage_model.transformer.config.hidden_size
    # the WebUI's tokenizer comes from the folder too: the real CLIP BPE vocabulary
    assert len(model.cond_stage_model.tokenizer) == 49408
    # the original UNet computes what ours computes
    from bdm.formats.checkpoint import load_checkpoint
    ours = load_checkpoint(checkpoint)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx = torch.randn(2, 77, ours.text_encoder.hidden_size)
    with torch.no_grad():
        a = model.model.diffusion_model.float()(x, t, context=ctx)
        b = ours.unet(x, t, ctx)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


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
