"""Same pictures as the official BDM1.0 inference: the project against the official code itself.

Gated on `BDM_OFFICIAL_DIR` (a checkout of 360CVGroup/Bridge_Diffusion_Model) and a side venv with its
diffusers fork installed (`BDM_OFFICIAL_PYTHON`, default `$BDM_OFFICIAL_DIR/.venv/bin/python`); how to
build both: docs/official-parity.md. On tiny random weights in the official formats (written by the
official code: `tests/official_oracle.py`), the official pipeline — run as `inference.py` runs it — and
`python -m bdm.generate --preset official` must give the same images (≤ 2 of 255 levels) for the same
seed: with the official script's DPM-Solver and with DDIM; short, > 150-token and long negative prompts.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from bdm import convert, generate
from bdm.cli import run
from bdm.formats.checkpoint import config_path_for, save_checkpoint
from bdm.formats.diffusers_names import diffusers_unet_config
from bdm.unet import SMALL

from .official_oracle import eps_model, give_layer_norms_an_affine_part, scheduler_noise
from .util import REPO, tiny_sd_parts

OFFICIAL_DIR = os.environ.get("BDM_OFFICIAL_DIR")
pytestmark = [pytest.mark.skipif(not OFFICIAL_DIR, reason="needs BDM_OFFICIAL_DIR: see docs/official-parity.md"),
              pytest.mark.slow]

CN_DIM = 96  # the Chinese encoder's width (1024 in BDM1.0), unlike the backbone's 64
SIZE, SEED, LEVELS = 64, 3546724423, 2  # 64×64 pictures; inference.py's seed; tolerance in 255 levels
SHORT = "一只戴着红色围巾的橘猫坐在木窗台上，窗外下着小雪"
LONG = ("江南水乡的清晨，薄雾笼罩着蜿蜒的小河，河面上漂着几只乌篷船，船夫戴着斗笠，慢慢摇着橹。岸边是白墙黑瓦的老房子，"
        "屋檐下挂着红灯笼，石板路被昨夜的细雨打湿，闪着微光。一位穿着蓝色印花布衣裳的老奶奶坐在门口的竹椅上剥豆子，"
        "身旁的黄狗懒洋洋地趴着晒太阳。远处的石拱桥倒映在水中，桥上走过一个撑着油纸伞的姑娘，柳树的枝条垂到水面，"
        "几只白鹭从芦苇丛中飞起，天空是淡淡的青灰色，整幅画面安静而温柔，充满诗意。")  # 197 tokens: 4 chunks
NEGATIVE = ("最差质量，低质量，低分辨率，模糊，噪点，伪影，水印，文字，签名，裁切，构图混乱，比例失调，畸形的手，多余的手指，"
            "缺失的手指，融合的手指，扭曲的脸，重复的人物，病态，丑陋，过度曝光，颜色暗淡，画面脏乱")  # 99 tokens
EN_LONG_NEGATIVE = ", ".join(["(low quality:1.3)", "worst quality", "blurry", "bad anatomy", "bad proportions",
                              "extra limbs", "cloned face", "watermark", "text", "username", "signature",
                              "out of frame", "low res", "error", "cropped", "artifacts", "ugly", "duplicate",
                              "morbid", "mutilated", "extra fingers", "mutated hands", "poorly drawn hands",
                              "disfigured", "gross proportions", "malformed limbs", "missing arms",
                              "missing legs", "fused fingers", "too many fingers", "long neck"])  # > 75 tokens


def case(name, scheduler, prompt, negative="", en_prompt="", en_negative="", steps=None, batch=1, strength=1.0):
    steps = steps or (50 if scheduler == "dpm" else 20)
    return dict(name=name, scheduler=scheduler, prompt=prompt, negative=negative, en_prompt=en_prompt,
                en_negative=en_negative, steps=steps, cfg=7.5, seed=SEED, batch=batch, width=SIZE,
                height=SIZE, strength=strength)


CASES = [c for scheduler in ("dpm", "ddim") for c in (
    case(f"{scheduler}-short", scheduler, SHORT),
    case(f"{scheduler}-long", scheduler, LONG, "模糊，低质量"),
    case(f"{scheduler}-negative", scheduler, SHORT + "，高质量，杰作", NEGATIVE, "best quality, a cat",
         "(low quality:1.3), blurry", batch=2, strength=0.8),
)] + [
    case("dpm-12-steps", "dpm", SHORT, NEGATIVE, steps=12),  # below 15 steps: a first-order last step
    # known differences (docs/official-parity.md), measured, not matched:
    case("dpm-long-english", "dpm", SHORT, en_negative=EN_LONG_NEGATIVE),  # 77·k vs 75·k + 2, comma backtrack
    case("dpm-weighted-chinese", "dpm", "一只(红色:1.5)的猫，[窗台]"),  # the official code ignores weights
]
KNOWN_DIFFERENCES = ("dpm-long-english", "dpm-weighted-chinese")


def official_python() -> str:
    python = os.environ.get("BDM_OFFICIAL_PYTHON") or str(Path(OFFICIAL_DIR) / ".venv" / "bin" / "python")
    if not Path(python).is_file():
        pytest.fail(f"{python}: no side-venv Python with the official diffusers fork; set BDM_OFFICIAL_PYTHON "
                    "(see docs/official-parity.md)")
    return python


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny models in the official formats, the official pipeline's results, and the project's."""
    d = tmp_path_factory.mktemp("official-parity")
    unet, vae, text = tiny_sd_parts()
    give_layer_norms_an_affine_part(text, seed=13)  # else the sequence mean is ~0 and weighting divides by it
    ckpt = save_checkpoint(d / "tiny-sd1.safetensors", unet, vae, text, "tiny-clip")
    spec = dict(
        official_dir=str(Path(OFFICIAL_DIR).resolve()), work=str(d), out=str(d / "official.safetensors"),
        ldm_checkpoint=str(ckpt), ldm_yaml=str(config_path_for(ckpt)), clip_dir=str(d / "tiny-clip"),
        bdm_config=diffusers_unet_config(SMALL.with_context_dim(CN_DIM)), bdm_seed=11,
        cn_text_config=dict(vocab_size=21128, hidden_size=CN_DIM, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=2 * CN_DIM, max_position_embeddings=512),
        cn_vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16),
        cn_seed=12, vocab=str(REPO / "bdm" / "data" / "chinese_tokenizer" / "vocab.txt"), cases=CASES,
        schedule_steps=[10, 50])
    (d / "spec.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    done = subprocess.run([official_python(), str(REPO / "tests" / "official_oracle.py"), str(d / "spec.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-5000:]
    with safe_open(spec["out"], "pt") as f:
        meta = f.metadata()
    return dict(dir=d, ckpt=ckpt, bdm=d / "BDM1.0", cn=d / "chinese-clip", meta=meta,
                official=load_file(spec["out"]), ours={c["name"]: project_run(d, ckpt, c) for c in CASES})


def cli_args(c: dict) -> list[str]:
    args = ["--preset", "official", "--width", str(c["width"]), "--height", str(c["height"]), "--seed",
            str(c["seed"]), "--batch", str(c["batch"]), "--steps", str(c["steps"]), "--cfg", str(c["cfg"]),
            "--strength", str(c["strength"]), "--prompt", c["prompt"], "--negative", c["negative"],
            "--en-prompt", c["en_prompt"], "--en-negative", c["en_negative"]]
    return args + (["--sampler", "DDIM"] if c["scheduler"] == "ddim" else [])


def read_images(out: Path, batch: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in generate.output_paths(str(out), batch)])


def project_run(d: Path, ckpt: Path, c: dict, bdm: Path | None = None) -> np.ndarray:
    """`python -m bdm.generate --preset official` on the official folders (or on a converted BDM file)."""
    out = d / f"ours-{c['name']}{'-converted' if bdm else ''}.png"
    models = ["--bdm", str(bdm)] if bdm else ["--bdm", str(d / "BDM1.0"), "--chinese-clip", str(d / "chinese-clip")]
    assert run(generate.main, ["-o", str(out), "--checkpoint", str(ckpt), *models, *cli_args(c)]) == 0
    return read_images(out, c["batch"])


def project_latents(w: dict, c: dict, sampler: str | None = None) -> torch.Tensor:
    """The same generation through the library, for the latent-space difference."""
    from bdm.formats.checkpoint import load_checkpoint
    from bdm.load import load_bridge
    from bdm.pipeline import Pipeline, Request
    if "pipeline" not in w:
        w["pipeline"] = Pipeline(load_checkpoint(w["ckpt"]), load_bridge(w["bdm"], w["cn"]))
    args = generate.parse_args(["-o", "x.png", *cli_args(c)])
    request = Request(prompt=c["prompt"], negative_prompt=c["negative"], en_prompt=c["en_prompt"],
                      en_negative_prompt=c["en_negative"], strength=c["strength"], cfg_scale=c["cfg"],
                      steps=c["steps"], sampler=sampler or args.sampler, seed=c["seed"], batch_size=c["batch"],
                      width=c["width"], height=c["height"], batch_noise=True)
    return w["pipeline"].latents(request)


def levels(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_the_oracle_is_the_official_fork(world):
    assert world["meta"]["diffusers"] == "0.24.0"
    assert Path(world["meta"]["diffusers_file"]).resolve().is_relative_to(Path(OFFICIAL_DIR).resolve())
    config = json.loads(world["meta"]["dpm_config"])
    assert (config["timestep_spacing"], config["algorithm_type"], config["solver_order"]) == \
        ("linspace", "dpmsolver++", 2)
    assert config["lower_order_final"] and not config["euler_at_final"] and "final_sigmas_type" not in config
    # the same pipeline saved with save_pretrained and loaded again would sample another schedule
    assert json.loads(world["meta"]["dpm_config_saved_folder"])["timestep_spacing"] == "leading"


@pytest.mark.parametrize("steps", [10, 50])
@torch.no_grad()
def test_schedule_and_solver_equal_the_forks_scheduler(world, steps):
    from bdm.sampling import EpsDenoiser, get_sigmas, sample
    official = world["official"]
    den = EpsDenoiser(eps_model)
    sigmas = get_sigmas(den, "DPM++ 2M (official)", steps)
    assert torch.equal(den.sigma_to_t(sigmas[:-1]).long(), official[f"dpm{steps}.timesteps"])
    assert torch.allclose(sigmas, official[f"dpm{steps}.sigmas"], rtol=2e-5, atol=0)
    ours = sample("DPM++ 2M (official)", den, scheduler_noise(), steps)
    assert (ours - official[f"dpm{steps}.final"]).abs().max() <= 1e-4


@pytest.mark.parametrize("c", [c for c in CASES if c["name"] not in KNOWN_DIFFERENCES], ids=lambda c: c["name"])
def test_same_picture_as_the_official_pipeline(world, c):
    official = world["official"]
    images = official[f"{c['name']}.images"].numpy()
    diff = levels(world["ours"][c["name"]], images)
    latents = project_latents(world, c)
    latent_diff = (latents - official[f"{c['name']}.latents"]).abs().max().item()
    print(f"{c['name']}: {diff} levels, latents {latent_diff:.2e} (max |latent| "
          f"{official[c['name'] + '.latents'].abs().max().item():.2f})")
    assert diff <= LEVELS
    assert latent_diff <= 1e-3
    if c["batch"] > 1:  # one generator for the batch: the rows start from different noise
        assert levels(images[0], images[1]) > 10


def test_long_chinese_prompts_use_the_official_token_layout(world):
    official = world["official"]
    assert official["dpm-long.cn_tokens"].item() == 50 * 4 + 2  # 197 tokens → 4 chunks, inner specials dropped
    assert official["dpm-negative.cn_tokens"].item() == 50 * 2 + 2  # the prompt padded to the negative's chunks
    from bdm.load import load_bridge
    encoder = load_bridge(world["bdm"], world["cn"]).text_encoder
    assert encoder.encode([LONG]).shape[1] == 202 and encoder.encode([SHORT, NEGATIVE]).shape[1] == 102


@pytest.mark.parametrize("name", KNOWN_DIFFERENCES)
def test_known_differences_are_real(world, name):
    """Documented differences (docs/official-parity.md): if one disappears, update the documentation."""
    diff = levels(world["ours"][name], world["official"][f"{name}.images"].numpy())
    print(f"{name}: {diff} levels")
    assert diff > LEVELS


def test_the_webuis_dpmpp_2m_is_another_sampler(world):
    """Difference 3: the WebUI's "DPM++ 2M" is not the official script's sampler. (On these tiny models the
    pictures hardly show it — the random VAE flattens latent differences — so the latents are compared.)"""
    c = CASES[0]
    official = world["official"][f"{c['name']}.latents"]
    preset = (project_latents(world, c) - official).abs().max().item()
    webui = (project_latents(world, c, sampler="DPM++ 2M") - official).abs().max().item()
    print(f"latents from the official: {preset:.1e} with the preset, {webui:.1e} with the WebUI's DPM++ 2M")
    assert webui > 100 * preset and webui > 1e-2


@pytest.mark.parametrize("dtype", ["fp32", None])
def test_converted_file_gives_the_official_picture(world, dtype):
    c = next(c for c in CASES if c["name"] == "dpm-negative")
    path = world["dir"] / f"converted-{dtype}.safetensors"
    argv = [str(world["bdm"]), "--chinese-clip", str(world["cn"]), "-o", str(path)]
    assert run(convert.main, argv + (["--dtype", dtype] if dtype else [])) == 0
    converted = project_run(world["dir"], world["ckpt"], c, bdm=path)
    official = world["official"]["dpm-negative.images"].numpy()
    print(f"converted ({dtype or 'default dtype'}): {levels(converted, official)} levels from the official "
          f"pipeline, {levels(converted, world['ours']['dpm-negative'])} from the official folders")
    if dtype == "fp32":
        assert np.array_equal(converted, world["ours"]["dpm-negative"])
    assert levels(converted, official) <= LEVELS
