"""Single-file SD1.x checkpoints: written as the WebUI expects (LDM keys + `.yaml` + offline CLIP
folder) and read back, checked against the original ldm package's classes."""
import pytest
import torch
import yaml

from bdm.formats.checkpoint import load_checkpoint, save_checkpoint, UNET_PREFIX
from bdm.formats.files import read_state_dict

from .util import oracle, tiny_sd_parts

openaimodel = oracle("ldm.modules.diffusionmodules.openaimodel")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    unet, vae, text = tiny_sd_parts()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", unet, vae, text, "tiny-clip")
    return path, unet, vae, text


def test_round_trip(saved):
    path, unet, vae, text = saved
    ck = load_checkpoint(path)
    for ours, theirs in [(ck.unet, unet), (ck.vae, vae)]:
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    prompts = ["a red circle", "(a big:1.3) blue square, on white"]
    assert torch.equal(ck.text_encoder.encode(prompts), text.encode(prompts))
    assert ck.family.name == "sd1" and ck.name == "tiny" and len(ck.hash) == 10


def test_yaml_builds_the_original_ldm_unet_and_it_loads_strictly(saved):
    path, unet, _, _ = saved
    params = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    assert params["unet_config"]["target"] == "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    assert (path.parent / params["cond_stage_config"]["params"]["version"] / "vocab.json").is_file()
    ldm_unet = openaimodel.UNetModel(**params["unet_config"]["params"])
    sd = read_state_dict(path)
    ldm_unet.load_state_dict({k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)},
                             strict=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    t = torch.tensor([321])
    with torch.no_grad():
        assert (ldm_unet(x, t, context=ctx) - unet(x, t, context=ctx)).abs().max() <= 1e-4
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") for k in sd)


def test_ldm_vae_loads_the_first_stage_strictly(saved):
    model = oracle("ldm.modules.diffusionmodules.model")
    path, _, vae, _ = saved
    dd = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]["first_stage_config"]["params"]
    enc, dec = model.Encoder(**dd["ddconfig"]), model.Decoder(**dd["ddconfig"])
    sd = read_state_dict(path)
    enc.load_state_dict({k[len("first_stage_model.encoder."):]: v for k, v in sd.items()
                         if k.startswith("first_stage_model.encoder.")}, strict=True)
    dec.load_state_dict({k[len("first_stage_model.decoder."):]: v for k, v in sd.items()
                         if k.startswith("first_stage_model.decoder.")}, strict=True)
