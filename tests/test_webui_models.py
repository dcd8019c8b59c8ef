"""Model discovery and lookup, loading through the manager (clear errors), UNet/branch refusals, and
the Chinese context bank (chunk padding, cache)."""
from __future__ import annotations

import json

import pytest
import torch

import bdm
from bdm.formats import bdm_file
from bdm.formats.files import short_hash
from bdm.unet import UNetConfig, UNetModel
from bdm.webui.context import ContextBank, EncodingCache
from bdm.webui.errors import BdmError
from bdm.webui.manager import ModelManager, bridge_refusal, unet_refusal
from bdm.webui.models import ModelEntry, discover_models, find_model, pick_model
from tests.util import build_random

TINY = UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                  num_heads=1, context_dim=64)


@pytest.fixture(scope="module")
def encoder():
    from bdm.text.chinese import ChineseTextEncoder
    return ChineseTextEncoder.tiny(seed=0)


@pytest.fixture(scope="module")
def unet():
    return build_random(lambda: UNetModel(TINY), seed=1)


@pytest.fixture(scope="module")
def bdm_path(tmp_path_factory, unet, encoder):
    path = tmp_path_factory.mktemp("bdm") / "bdm" / "tiny-bdm.safetensors"
    bdm_file.save_bdm(path, bdm.from_backbone(unet, 64), encoder)
    return path


def _dir(path, config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_discovery(tmp_path):
    main, extra = tmp_path / "models" / "bdm", tmp_path / "extra"
    (main / "sub").mkdir(parents=True)
    (main / "a.safetensors").write_bytes(b"aaaa")
    (main / "sub" / "b.safetensors").write_bytes(b"bbbb")
    (main / "notes.txt").write_text("x")
    (main / ".hidden.safetensors").write_bytes(b"h")
    official = _dir(main / "BDM1.0", {"_class_name": "ControlNetModelBDM"})
    (official / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    _dir(official / "chinese_clip", {"model_type": "chinese_clip"})
    _dir(main / "some-other-diffusers", {"_class_name": "UNet2DConditionModel"})
    (main / "some-other-diffusers" / "x.safetensors").write_bytes(b"x")  # inside a model folder: not listed
    lone = _dir(extra / "BDM-lone", {"_class_name": "ControlNetModelBDM"})
    (lone / "diffusion_pytorch_model.safetensors").write_bytes(b"w2")
    clip = _dir(extra / "chinese-clip-vit-huge-patch14", {"architectures": ["ChineseCLIPModel"]})
    entries = discover_models([main, extra, tmp_path / "missing", main], labels={main: "models/bdm"})
    by_name = {e.name: e for e in entries}
    assert by_name["b"].where == "models/bdm/sub/b.safetensors" and by_name["BDM-lone"].where == "extra/BDM-lone"
    assert [e.name for e in entries] == ["a", "b", "BDM-lone", "BDM1.0"]  # case-insensitive order
    assert by_name["a"].kind == "bdm" and by_name["a"].hash == short_hash(main / "a.safetensors")
    assert by_name["a"].title == f"a [{by_name['a'].hash}]"
    assert by_name["BDM1.0"].kind == "diffusers" and by_name["BDM1.0"].chinese_clip == official / "chinese_clip"
    assert by_name["BDM1.0"].hash == short_hash(official / "diffusion_pytorch_model.safetensors")
    assert by_name["BDM-lone"].chinese_clip == clip  # the only Chinese CLIP folder found
    assert discover_models([main], hasher=None)[0].hash is None


def test_find_model(tmp_path):
    (tmp_path / "bdm-toy.safetensors").write_bytes(b"toy")
    (tmp_path / "other.safetensors").write_bytes(b"other")
    entries = discover_models([tmp_path])
    toy = next(e for e in entries if e.name == "bdm-toy")
    for q in ("bdm-toy", "bdm-toy.safetensors", toy.title, f"bdm-toy [{toy.hash}]", toy.hash,
              "BDM-TOY", f"renamed [{toy.hash}]", str(toy.path)):
        assert find_model(q, entries) == toy, q
    for q in (None, "", "None"):
        assert find_model(q, entries) is None
    with pytest.raises(LookupError, match=r"no BDM model 'nope' \(installed: bdm-toy \["):
        find_model("nope", entries)
    # a title whose hash is not the installed file's: a different file under the same name
    with pytest.raises(LookupError, match=f"'bdm-toy' installed here has hash {toy.hash}, not 0000000000"):
        find_model(f"bdm-toy [{'0' * 10}]", entries)


def test_pick_model(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
    entries = discover_models([tmp_path])
    a, b, c = entries
    assert pick_model("c", entries, "b", a.title) == c  # asked for
    assert pick_model("", entries, b.title, a.title) == b  # the default of the settings
    assert pick_model("None", entries, "None", c.title) == c  # the last used
    assert pick_model("", entries, "", "gone [0123456789]") == a  # the first found
    with pytest.raises(LookupError, match="the default BDM model of the settings: no BDM model 'x'"):
        pick_model("", entries, "x", None)
    with pytest.raises(LookupError, match="no BDM model is installed: put a BDM .safetensors file into "
                                          "models/bdm.*qihoo360/BDM1.0.*chinese-clip-vit-huge-patch14.*bdm.convert"):
        pick_model("", [], "", None)


def test_manager_loads_and_caches(bdm_path):
    m = ModelManager(1)
    entry = ModelEntry("tiny-bdm", bdm_path, "bdm")
    bridge = m.load(entry)
    assert bridge.text_encoder is not None and m.load(entry) is bridge
    assert m.loaded() == [(entry, bridge)]
    assert not any(p.requires_grad for p in bridge.parameters())


@pytest.mark.parametrize("content, message", [
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, "this is a LoRA, not a BDM file"),
    ({"model.diffusion_model.x": torch.zeros(2)}, "Stable Diffusion checkpoint, not a BDM file"),
    (b"garbage", "not a readable safetensors file"),
    (b"", "empty"),
])
def test_wrong_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "wrong.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        from safetensors.torch import save_file
        save_file(content, str(path))
    entry = ModelEntry("wrong", path, "bdm", shown="models/bdm/wrong.safetensors")
    with pytest.raises(BdmError, match=f"cannot load the BDM model 'wrong' \\(models/bdm/wrong.safetensors\\): "
                                       f"models/bdm/wrong.safetensors: .*{message}") as e:
        ModelManager().load(entry)
    assert str(tmp_path) not in str(e.value)  # no absolute path of the server


def test_diffusers_without_chinese_clip(tmp_path):
    folder = _dir(tmp_path / "BDM1.0", {"_class_name": "ControlNetModelBDM"})
    with pytest.raises(BdmError, match="needs its Chinese CLIP folder"):
        ModelManager().load(ModelEntry("BDM1.0", folder, "diffusers"))


def test_refusals(unet, bdm_path):
    assert unet_refusal(unet) is None
    assert "SDXL" in unet_refusal(unet, is_sdxl=True)
    assert "SD2" in unet_refusal(unet, is_sd2=True)
    assert "TensorRT" in unet_refusal(unet, custom_unet=True)
    assert unet_refusal(None, family="Flux") == "the loaded checkpoint is Flux; BDM needs an SD1.x checkpoint"
    inpaint = build_random(lambda: UNetModel(UNetConfig(**{**TINY.to_dict(), "in_channels": 9})), seed=0)
    assert "inpainting" in unet_refusal(inpaint)
    bridge = ModelManager().load(ModelEntry("tiny-bdm", bdm_path, "bdm"))
    assert bridge_refusal(bridge, unet) is None
    wider = build_random(lambda: UNetModel(UNetConfig(**{**TINY.to_dict(), "model_channels": 64})), seed=0)
    assert "model_channels 32" in bridge_refusal(bridge, wider)


def test_context_bank_pads_with_the_empty_chunk(encoder):
    long = "，".join(["红色的圆形在蓝色的背景上"] * 6)  # > 50 tokens: 2 chunks
    bank = ContextBank(encoder, ["红色", long, "红色", ""])
    assert bank.prompts == ["红色", long, ""] and bank.chunks == 2
    assert bank.tensor.shape == (3, 102, 64)  # the official layout: 50*k + 2
    short = bank.rows([0])
    assert torch.equal(short[:, :51], encoder.encode(["红色"])[:, :51])
    assert torch.equal(short[:, 51:], encoder.encode([""])[:, 1:])  # padding = encoding of the empty chunk
    assert torch.equal(bank.rows([1]), encoder.encode([long]))
    assert torch.equal(bank.rows([2, 0, 2]), torch.cat([bank.tensor[2:3], short, bank.tensor[2:3]]))
    assert torch.equal(bank.tensor, encoder.encode(["红色", long, ""]))  # = encoding them together


def test_cache_encodes_each_prompt_once(encoder):
    cache = EncodingCache(2)
    calls = []
    real = encoder.encode

    class Counting:
        max_chunks = encoder.max_chunks
        prompt_chunks = staticmethod(encoder.prompt_chunks)

        def encode(self, prompts, min_chunks=1):
            calls.append(tuple(prompts))
            return real(prompts, min_chunks=min_chunks)

    enc = Counting()
    ContextBank(enc, ["红色", "", "红色"], cache, "m")
    ContextBank(enc, ["红色", ""], cache, "m")
    assert calls == [("红色",), ("",)] and cache.hits == 2
    ContextBank(enc, ["蓝色"], cache, "m")  # evicts the oldest ("红色")
    ContextBank(enc, ["红色"], cache, "other-model")
    assert calls[2:] == [("蓝色",), ("红色",)] and len(cache) == 2
