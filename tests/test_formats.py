"""Weight formats: the BDM file, the official diffusers release, SD checkpoints — and every bad file
gets an error that names the file and says what was expected and what was found."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import bdm
from bdm.formats import bdm_file
from bdm.formats.checkpoint import (UNET_PREFIX, detect_family, infer_unet_config, load_unet,
                                    unet_config_from_yaml)
from bdm.formats.controlnet import save_controlnet
from bdm.formats.files import FormatError, read_state_dict
from bdm.text.chinese import ChineseTextEncoder
from bdm.unet import SD15, SMALL, UNetModel

from .util import build_random, randomize_

TOY_TEXT = ChineseTextEncoder.tiny(seed=0)


@pytest.fixture(scope="module")
def unet():
    return build_random(lambda: UNetModel(SMALL), seed=1)


@pytest.fixture()
def bdm_path(tmp_path, unet):
    bridge = randomize_(bdm.from_backbone(unet, TOY_TEXT.hidden_size), seed=7)
    return bdm_file.save_bdm(tmp_path / "toy.safetensors", bridge, TOY_TEXT, notes={"steps": 12}), bridge


def checkpoint_sd(unet, family="sd1"):
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    if family == "sd2":
        sd["cond_stage_model.model.ln_final.weight"] = torch.ones(4)
    if family == "sdxl":
        sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    if family == "inpaint":
        w = sd[UNET_PREFIX + "input_blocks.0.0.weight"]
        sd[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], 1)
    return sd


def test_bdm_file_round_trip(bdm_path):
    path, bridge = bdm_path
    loaded = bdm.load_bridge(path)
    assert loaded.config == bridge.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in bridge.state_dict().items())
    assert loaded.meta["bdm.steps"] == "12"
    prompts = ["红色的圆形", "一只(猫:1.2)在屋顶上"]
    assert torch.equal(loaded.text_encoder.encode(prompts), TOY_TEXT.encode(prompts))
    # the encoder is beside the branch, not inside it: casting the branch leaves it alone
    assert not any(k.startswith("text_encoder") for k in loaded.state_dict())
    loaded.half()
    assert loaded.text_encoder.dtype == torch.float32
    keys = load_file(str(path))
    assert any(k.startswith("bridge.zero_convs.") for k in keys)
    assert any(k.startswith("text_encoder.embeddings.word_embeddings") for k in keys)


def test_bdm_file_write_is_atomic(tmp_path, unet, monkeypatch):
    import safetensors.torch as st
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous good file")

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        bdm_file.save_bdm(target, bdm.from_backbone(unet, 64))
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_bad_files_get_clear_errors(tmp_path, bdm_path, unet):
    path, _ = bdm_path
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file"):
        bdm.load_bridge(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="empty.safetensors: the file is empty"):
        bdm.load_bridge(empty)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated.safetensors: not a readable safetensors file"):
        bdm.load_bridge(truncated)
    control = save_controlnet(tmp_path / "cn.safetensors",
                              bdm.Bridge(bdm.BridgeConfig(SMALL, hint_channels=3)))
    with pytest.raises(FormatError, match="cn.safetensors: this is a ControlNet"):
        bdm.load_bridge(control)
    sd_file = tmp_path / "sd.safetensors"
    save_file(checkpoint_sd(unet), str(sd_file))
    with pytest.raises(FormatError, match="sd.safetensors: this is a Stable Diffusion checkpoint"):
        bdm.load_bridge(sd_file)


def test_wrong_shape_and_newer_version_are_named(tmp_path, bdm_path):
    path, _ = bdm_path
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = "bridge.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 1024)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(FormatError, match=r"bad.safetensors: .*'bridge.input_blocks.1.1.transformer_blocks.0.attn2"
                                          r".to_k.weight' has shape \(32, 1024\), expected \(32, 64\)"):
        bdm.load_bridge(bad)
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(str(path)), str(newer), metadata={**meta, "format_version": "99"})
    with pytest.raises(FormatError, match="format version 99 is newer"):
        bdm.load_bridge(newer)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "zero_convs.2" not in k}, str(missing),
              metadata=meta)
    with pytest.raises(FormatError, match=r"missing.safetensors: .* 2 missing \(first: 'bridge.zero_convs.2.0.weight'\)"):
        bdm.load_bridge(missing)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_are_never_unpickled(tmp_path, capsys):
    good = tmp_path / "weights.bin"
    torch.save({"a": torch.ones(2)}, good)
    assert torch.equal(read_state_dict(good)["a"], torch.ones(2))
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(FormatError, match="evil.ckpt: cannot be read safely"):
        read_state_dict(evil)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(FormatError, match="unknown weights file type '.zip'"):
        (tmp_path / "x.zip").write_bytes(b"PK")
        read_state_dict(tmp_path / "x.zip")


def test_official_dir_errors(tmp_path):
    from .util import make_official_dir
    directory, _ = make_official_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FormatError, match="config.json: _class_name is 'UNet2DConditionModel'"):
        bdm.load_bridge(directory)
    (directory / "config.json").write_text(json.dumps(config))
    # a .bin release is read with weights_only and gives the same branch
    weights = directory / "diffusion_pytorch_model.safetensors"
    from_st = bdm.load_bridge(directory)
    torch.save(load_file(str(weights)), directory / "diffusion_pytorch_model.bin")
    weights.unlink()
    from_bin = bdm.load_bridge(directory)
    assert all(torch.equal(from_bin.state_dict()[k], v) for k, v in from_st.state_dict().items())
    (directory / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        bdm.load_bridge(directory)
    with pytest.raises(FormatError, match="a folder without config.json"):
        bdm.load_bridge(tmp_path)


def test_chinese_clip_width_must_match_branch(tmp_path):
    from transformers import ChineseCLIPConfig, ChineseCLIPModel
    from .util import make_official_dir
    directory, _ = make_official_dir(tmp_path, context_dim=96)
    text = TOY_TEXT.config_dict()  # hidden 64: not the branch's 96
    cfg = ChineseCLIPConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=37,
                            num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16),
                            projection_dim=16)
    ChineseCLIPModel(cfg).save_pretrained(tmp_path / "cnclip", safe_serialization=True)
    with pytest.raises(FormatError, match="hidden size is 64, but the branch's cross-attention expects 96"):
        bdm.load_bridge(directory, chinese_clip=tmp_path / "cnclip")


def test_family_detection_and_refusals(tmp_path, unet):
    assert detect_family(checkpoint_sd(unet)).name == "sd1"
    assert detect_family(checkpoint_sd(unet, "sd2")).name == "sd2"
    assert detect_family(checkpoint_sd(unet, "sdxl")).name == "sdxl"
    assert detect_family(checkpoint_sd(unet, "inpaint")).in_channels == 9
    for family, message in [("sd2", "this is an SD2.x \\(UNet context 64\\) checkpoint"),
                            ("sdxl", "this is an SDXL \\(UNet context 2048\\) checkpoint"),
                            ("inpaint", "this is an SD1.x inpainting checkpoint \\(9 input channels\\)")]:
        path = tmp_path / f"{family}.safetensors"
        save_file(checkpoint_sd(unet, family), str(path))
        with pytest.raises(FormatError, match=f"{family}.safetensors: {message}"):
            load_unet(path)


def test_unet_config_from_shapes_and_yaml(tmp_path, unet):
    with torch.device("meta"):
        sd15 = UNetModel(SD15).state_dict()
    assert infer_unet_config(sd15) == SD15
    path = tmp_path / "small.safetensors"
    save_file(checkpoint_sd(unet), str(path))
    inferred = infer_unet_config(unet.state_dict())
    assert inferred == SMALL.__class__(**{**SMALL.to_dict(), "num_heads": 8})  # heads are not in shapes
    yaml_text = ("model:\n  params:\n    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n"
                 "      params:\n" + "".join(f"        {k}: {json.dumps(v)}\n" for k, v in SMALL.to_dict().items())
                 + "        use_checkpoint: true\n        legacy: false\n")
    (tmp_path / "small.yaml").write_text(yaml_text)
    assert unet_config_from_yaml(tmp_path / "small.yaml") == SMALL
    loaded = load_unet(path)
    assert loaded.config == SMALL
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in unet.state_dict().items())


@torch.no_grad()
def test_a_lora_trained_by_the_toy_build_is_the_lora_its_file_applies(tmp_path, unet):
    """One LoRA parametrisation: the toy's trainable `LoraLinear` layers (Linear and 1×1 conv), written by
    `lora_tensors` as a kohya file, merged back by `apply_loras`, give the wrapped UNet's output."""
    import copy

    from bdm.formats.files import save_safetensors
    from bdm.formats.lora import apply_loras, lora_tensors
    from bdm.toy.models import add_loras
    torch.manual_seed(0)
    wrapped = copy.deepcopy(unet)
    loras = add_loras(wrapped, rank=4, alpha=2.0)
    assert {type(lora.base) for lora in loras.values()} == {torch.nn.Linear, torch.nn.Conv2d}
    for lora in loras.values():
        lora.up.normal_(0, 0.05)
    path = save_safetensors(tmp_path / "lora.safetensors",
                            lora_tensors(SMALL, {name: lora.layer for name, lora in loras.items()}))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 5, SMALL.context_dim)
    plain = unet(x, t, ctx)
    patch = apply_loras(unet, None, [(path, 1.0)])
    try:
        merged = unet(x, t, ctx)
    finally:
        patch.remove()
    assert (merged - plain).abs().max() > 1e-3
    assert torch.allclose(merged, wrapped(x, t, ctx), atol=1e-5, rtol=1e-4)
