"""`python -m bdm.convert` and `python -m bdm.inspect` on files in the real formats."""
import subprocess
import sys

import torch
from transformers import ChineseCLIPConfig, ChineseCLIPModel

import bdm
from bdm import convert, inspect as bdm_inspect
from bdm.cli import run
from bdm.text.chinese import ChineseTextEncoder, toy_config

from .util import CN_DIM, REPO, make_official_dir


def official_release(tmp_path):
    """The BDM1.0 layout in small: a diffusers branch folder and a Hugging Face Chinese CLIP folder."""
    branch, _ = make_official_dir(tmp_path, context_dim=CN_DIM)
    text = {**toy_config(), "hidden_size": CN_DIM, "num_attention_heads": 2, "intermediate_size": 64}
    cfg = ChineseCLIPConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=37,
                            num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16),
                            projection_dim=16)
    torch.manual_seed(0)
    ChineseCLIPModel(cfg).save_pretrained(tmp_path / "chinese-clip", safe_serialization=True)
    return branch, tmp_path / "chinese-clip"


def test_convert_official_release_to_one_bdm_file(tmp_path, capsys):
    branch, clip_dir = official_release(tmp_path)
    out = tmp_path / "bdm1.safetensors"
    assert run(convert.main, [str(branch), "--chinese-clip", str(clip_dir), "-o", str(out), "--dtype", "fp32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    direct = bdm.load_bridge(branch, chinese_clip=clip_dir)
    converted = bdm.load_bridge(out)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in direct.state_dict().items())
    prompt = ["长城上的日落,(金色:1.2)的光"]
    assert torch.equal(converted.text_encoder.encode(prompt), direct.text_encoder.encode(prompt))
    reference = ChineseTextEncoder.from_hf_dir(clip_dir)
    assert torch.equal(converted.text_encoder.encode(prompt), reference.encode(prompt))

    assert run(bdm_inspect.main, [str(out), str(branch)]) == 0
    text = capsys.readouterr().out
    assert "bdm1.safetensors: BDM file" in text and "metadata format_version: 1" in text
    assert "diffusers folder, class 'ControlNetModelBDM'" in text and f"cross_attention_dim: {CN_DIM}" in text


def test_convert_keeps_the_chinese_encoder_fp32(tmp_path):
    """Default --dtype fp16: the branch is rounded as released, the Chinese encoder stays fp32 (the official
    inference runs it in fp32), so its embeddings are exactly those of the Hugging Face folder."""
    from bdm.formats.files import read_state_dict
    branch, clip_dir = official_release(tmp_path)
    out = tmp_path / "bdm1.safetensors"
    assert run(convert.main, [str(branch), "--chinese-clip", str(clip_dir), "-o", str(out)]) == 0
    tensors = read_state_dict(out)
    dtypes = {prefix: {v.dtype for k, v in tensors.items() if k.startswith(prefix) and v.is_floating_point()}
              for prefix in ("bridge.", "text_encoder.")}
    assert dtypes == {"bridge.": {torch.float16}, "text_encoder.": {torch.float32}}
    prompt = ["长城上的日落,(金色:1.2)的光，" * 8]  # two chunks
    reference = ChineseTextEncoder.from_hf_dir(clip_dir)
    assert torch.equal(bdm.load_bridge(out).text_encoder.encode(prompt), reference.encode(prompt))
    direct = bdm.load_bridge(branch, chinese_clip=clip_dir)
    converted = bdm.load_bridge(out).state_dict()
    assert all(torch.equal(converted[k], v.half().float()) for k, v in direct.state_dict().items())


def test_cli_errors_exit_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bdm.convert", str(tmp_path / "missing"), "--chinese-clip",
                             str(tmp_path), "-o", str(tmp_path / "o.safetensors")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "missing/config.json: no such file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.safetensors").exists()
    result = subprocess.run([sys.executable, "-m", "bdm.inspect", str(tmp_path / "none.ckpt")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "none.ckpt: no such file" in result.stderr
