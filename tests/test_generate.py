"""`python -m bdm.generate` end to end on a synthetic SD1.x checkpoint in the real formats, with every
community plugin; plugins on and off; bad inputs."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import bdm
from bdm import generate
from bdm.cli import run
from bdm.formats.checkpoint import load_checkpoint
from bdm.formats.embedding import save_embedding
from bdm.formats.lora import apply_loras, read_lora
from bdm.infotext import parse_infotext

from .util import write_lora

def generate_pixels(world, tmp_path, *extra, name="out.png", expect=0, batch=False):
    out = tmp_path / name
    argv = ["-o", str(out), "--checkpoint", str(world["ckpt"]), "--steps", "4", "--width", "64",
            "--height", "64", "--seed", "7", "--cfg", "2", *extra]
    if "--no-bdm" not in extra and "--bdm" not in extra:
        argv += ["--bdm", str(world["bdm"])]
    assert run(generate.main, argv) == expect
    if expect or batch:
        return None
    return np.asarray(Image.open(out)), out


@pytest.mark.slow
def test_deterministic_and_strength_zero_is_the_backbone(world, tmp_path):
    a, out = generate_pixels(world, tmp_path, "--prompt", "红色的圆形")
    b, _ = generate_pixels(world, tmp_path, "--prompt", "红色的圆形", name="again.png")
    assert np.array_equal(a, b)
    other, _ = generate_pixels(world, tmp_path, "--prompt", "蓝色的方形", name="other.png")
    assert not np.array_equal(a, other)
    zero, _ = generate_pixels(world, tmp_path, "--prompt", "红色的圆形", "--strength", "0", name="zero.png")
    alone, _ = generate_pixels(world, tmp_path, "--no-bdm", name="alone.png")
    assert np.array_equal(zero, alone) and not np.array_equal(a, alone)


def test_png_parameters_round_trip(world, tmp_path):
    _, out = generate_pixels(world, tmp_path, "--prompt", "红色的圆形, 大", "--negative", "模糊",
                             "--en-prompt", "masterpiece", "--strength", "0.8")
    prompt, negative, params = parse_infotext(Image.open(out).info["parameters"])
    assert prompt == "masterpiece" and negative == ""
    assert params["BDM prompt"] == "红色的圆形, 大" and params["BDM negative prompt"] == "模糊"
    assert params["BDM model"] == "tiny-bdm" and params["BDM strength"] == "0.8"
    assert params["Steps"] == "4" and params["Seed"] == "7" and params["Size"] == "64x64"
    assert params["Model"] == "tiny-sd1" and len(params["Model hash"]) == 10
    assert len(params["BDM model hash"]) == 10


@pytest.mark.slow
def test_each_plugin_changes_the_output_and_removing_it_restores(world, tmp_path):
    base, _ = generate_pixels(world, tmp_path, "--prompt", "红色的圆形", "--en-prompt", "bigthing")
    runs = {
        "lora": ["--lora", f"{world['lora']}:0.8"],
        "embedding": ["--embedding", str(world["emb"])],
        "controlnet": ["--controlnet", str(world["control"]), "--control-image", str(world["hint"])],
    }
    for name, flags in runs.items():
        changed, _ = generate_pixels(world, tmp_path, "--prompt", "红色的圆形", "--en-prompt", "bigthing",
                                     *flags, name=f"{name}.png")
        assert not np.array_equal(changed, base), name
    everything = [f for flags in runs.values() for f in flags]
    all_on, _ = generate_pixels(world, tmp_path, "--prompt", "红色的圆形", "--en-prompt", "bigthing",
                                *everything, name="all.png")
    assert not np.array_equal(all_on, base)
    restored, _ = generate_pixels(world, tmp_path, "--prompt", "红色的圆形", "--en-prompt", "bigthing",
                                  name="restored.png")
    assert np.array_equal(restored, base)


def test_lora_equals_merge_and_removal_is_bit_exact(world):
    ck = load_checkpoint(world["ckpt"])
    before = {k: v.clone() for k, v in ck.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in ck.text_encoder.state_dict().items()}
    layers = read_lora(world["lora"])
    patch = apply_loras(ck.unet, ck.text_encoder, [(world["lora"], 0.8)])
    q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    layer = layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    expected = before[q] + 0.8 * (2.0 / 4) * (layer.up @ layer.down)
    assert torch.allclose(ck.unet.state_dict()[q], expected, atol=1e-6)
    conv = "output_blocks.2.0.in_layers.2.weight"  # up_blocks.1.resnets.0.conv1 in diffusers names
    c = layers["lora_unet_up_blocks_1_resnets_0_conv1"]
    merged = before[conv] + 0.8 * 0.5 * (c.up.flatten(1) @ c.down.flatten(1)).view(before[conv].shape)
    assert torch.allclose(ck.unet.state_dict()[conv], merged, atol=1e-6)
    changed = [k for k, v in ck.text_encoder.state_dict().items() if not torch.equal(v, te_before[k])]
    assert len(changed) == 1 and changed[0].endswith("layers.0.self_attn.q_proj.weight")
    patch.remove()
    assert all(torch.equal(ck.unet.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(ck.text_encoder.state_dict()[k], v) for k, v in te_before.items())


@pytest.mark.slow
def test_shared_encoder_equals_plain_path(world):
    from bdm.pipeline import Pipeline, Request
    ck = load_checkpoint(world["ckpt"])
    pipe = Pipeline(ck, bdm.load_bridge(world["bdm"]))
    for sampler in ("Euler a", "DPM++ 2M Karras", "DDIM"):
        req = dict(prompt="绿色的三角形", negative_prompt="红色", steps=5, width=64, height=64, sampler=sampler,
                   batch_size=2, seed=3)
        shared = pipe.latents(Request(**req, shared_encoder=True))
        plain = pipe.latents(Request(**req, shared_encoder=False))
        assert (shared - plain).abs().max() <= 1e-3 * plain.abs().max()
        assert not torch.equal(shared[0], shared[1])  # rows have their own seeds


def test_long_negative_gets_the_official_layout(world):
    """A long Chinese negative: prompt and negative over the same chunks, 50*k + 2 tokens (the official
    inference's layout; `tests/test_text_chinese.py` checks it against an independent construction)."""
    from bdm.pipeline import Pipeline, Request
    pipe = Pipeline(load_checkpoint(world["ckpt"]), bdm.load_bridge(world["bdm"]))
    negative = "最差质量,低质量,低分辨率,伪影,丑陋,脸崩坏,变形,模糊,重复,病态,残缺,多余的手指," * 2  # 2 chunks
    _, contexts = pipe.encode_prompts(Request(prompt="红色的圆形", negative_prompt=negative, batch_size=2))
    chinese = contexts(0)  # the contexts at step 0 (a function of the step: prompt editing)
    assert chinese.shape[:2] == (4, 102)
    expected = pipe.bridge.text_encoder.encode(["红色的圆形", negative])
    torch.testing.assert_close(chinese, expected[[0, 0, 1, 1]].to(chinese))


@pytest.mark.parametrize("case", ["missing", "sd2", "inpaint", "lora-sdxl", "lora-shape", "emb-width",
                                  "control-image", "overlong", "garbage"])
def test_bad_inputs_exit_2_and_write_nothing(world, tmp_path, capsys, case):
    from safetensors.torch import load_file
    d = tmp_path
    flags, message = [], ""
    if case == "missing":
        flags, message = ["--lora", str(d / "nope.safetensors")], "nope.safetensors: no such file"
    elif case in ("sd2", "inpaint"):
        sd = load_file(str(world["ckpt"]))
        if case == "sd2":
            sd["cond_stage_model.model.ln_final.weight"] = torch.ones(3)
        else:
            w = sd["model.diffusion_model.input_blocks.0.0.weight"]
            sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], 1)
        save_file(sd, str(d / f"{case}.safetensors"))
        flags = ["--checkpoint", str(d / f"{case}.safetensors")]
        message = "SD2.x" if case == "sd2" else "SD1.x inpainting checkpoint (9 input channels)"
    elif case == "lora-sdxl":
        write_lora(d / "xl.safetensors", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((4, 64), (64, 4))})
        flags, message = ["--lora", str(d / "xl.safetensors")], "(an SDXL LoRA)"
    elif case == "lora-shape":
        write_lora(d / "wide.safetensors", {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
                                            ((4, 320), (320, 4))})
        flags, message = ["--lora", str(d / "wide.safetensors")], "made for another architecture"
    elif case == "emb-width":
        save_embedding(d / "wide.safetensors", torch.randn(2, 768))
        flags, message = ["--embedding", str(d / "wide.safetensors")], "wide.safetensors: embedding 'wide' has shape (2, 768)"
    elif case == "control-image":
        (d / "broken.png").write_bytes(b"not an image")
        flags = ["--controlnet", str(world["control"]), "--control-image", str(d / "broken.png")]
        message = "broken.png: cannot read the control image"
    if case in ("overlong", "garbage"):
        prompt = "很长的描述," * 200 if case == "overlong" else "\x00\x07�🙂(((]]\\"
        out = generate_pixels(world, d, "--prompt", prompt)
        assert out is not None
        if case == "overlong":
            assert "warning: " in capsys.readouterr().err
        return
    generate_pixels(world, d, *flags, expect=2)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not list(d.glob("out*.png"))


def test_official_preset_defaults_and_overrides():
    args = generate.parse_args(["-o", "x.png", "--preset", "official"])
    assert (args.sampler, args.steps, args.cfg) == ("DPM++ 2M (official)", 50, 7.5)
    args = generate.parse_args(["-o", "x.png", "--preset", "official", "--steps", "8", "--sampler", "DDIM",
                                "--cfg", "3"])
    assert (args.sampler, args.steps, args.cfg) == ("DDIM", 8, 3.0)
    args = generate.parse_args(["-o", "x.png"])
    assert (args.sampler, args.steps, args.preset) == ("Euler a", 20, None)


def test_batch_noise_is_one_generator_for_the_batch():
    from bdm.pipeline import initial_noise
    shape = (4, 8, 8)
    noise, generator = initial_noise(5, 3, shape, batch_noise=True)
    assert torch.equal(noise, torch.randn((3, *shape), generator=torch.Generator("cpu").manual_seed(5)))
    replay = torch.Generator().manual_seed(5)
    torch.randn((3, *shape), generator=replay)
    assert torch.equal(torch.randn(2, generator=generator), torch.randn(2, generator=replay))  # it continues
    per_image, generators = initial_noise(5, 3, shape)
    assert len(generators) == 3 and torch.equal(per_image[0], noise[0])  # the streams start alike ...
    assert torch.equal(per_image[1], torch.randn(shape, generator=torch.Generator().manual_seed(6)))
    assert not torch.equal(per_image[1], noise[1])  # ... but image 1 is seed 6's start, not the batch's next draw


def test_official_preset_end_to_end(world, tmp_path):
    """The batch's noise from one seed: image 0 of a batch is the single image, image 1 is not seed + 1."""
    flags = ["--preset", "official", "--steps", "4", "--prompt", "红色的圆形", "--negative", "模糊"]
    single, out = generate_pixels(world, tmp_path, *flags)
    params = parse_infotext(Image.open(out).info["parameters"])[2]
    assert params["Sampler"] == "DPM++ 2M (official)" and params["BDM preset"] == "official"
    assert params["Seed"] == "7" and params["CFG scale"] == "2.0" and "Batch pos" not in params
    generate_pixels(world, tmp_path, *flags, "--batch", "2", "--seed", "6", name="batch.png", expect=0,
                    batch=True)
    first, second = (np.asarray(Image.open(tmp_path / f"batch_{i}.png")) for i in (0, 1))
    alone6, _ = generate_pixels(world, tmp_path, *flags, "--seed", "6", name="seed6.png")
    assert np.abs(first.astype(int) - alone6.astype(int)).max() <= 1
    assert np.abs(second.astype(int) - single.astype(int)).max() > 10  # not seed 6 + 1
    params = parse_infotext(Image.open(tmp_path / "batch_1.png").info["parameters"])[2]
    assert params["Seed"] == "6" and params["Batch size"] == "2" and params["Batch pos"] == "1"
