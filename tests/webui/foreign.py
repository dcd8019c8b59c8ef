"""Tiny random checkpoints of the families BDM must refuse (SD2, SDXL, SD1 inpainting), each with the
`.yaml` the WebUI loads it by, written to `A1111_DIR/models/Stable-diffusion/bdm-test-*.safetensors`.

Run with the WebUI's own python (it needs `ldm`, `sgm` and `open_clip` from the WebUI's venv):
    A1111_VENV_PYTHON tests/webui/foreign.py A1111_DIR [sd2] [sdxl] [inpaint]
The models are built by instantiating the WebUI's own model classes from the `.yaml` (so the keys are
exactly what the WebUI expects) with random weights; layers ldm zero-initialises get small random
values so that the models react to their inputs. The OpenCLIP text towers use a tiny architecture
`bdm-test-tiny-openclip` that the test-only extension `extensions/bdm-test-support` registers in the
WebUI (open_clip only knows named architectures).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPENCLIP_ARCH = "bdm-test-tiny-openclip"
OPENCLIP_CONFIG = {"embed_dim": 32,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SD1_CKPT = "models/Stable-diffusion/tiny-sd1.safetensors"
NAMES = {"sd2": "bdm-test-sd2", "sdxl": "bdm-test-sdxl", "inpaint": "bdm-test-sd1-inpainting"}

SUPPORT_SCRIPT = '''"""Test-only (written by the BDM integration tests): register the tiny OpenCLIP architecture used by
the tiny SD2/SDXL test checkpoints, before the WebUI loads any model."""
import os
import open_clip
open_clip.add_model_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "{arch}.json"))
'''


TOY_CONTROLNET_SCRIPT = '''"""Test-only (written by the BDM integration tests): sd-webui-controlnet builds every SD1 ControlNet
with SD1.5's architecture (`controlnet_default_config`; the harness's tiny-controlnet-patch changes
only model_channels), and its UNet hook keeps SD1.5's 13 residual slots, popping the last ones for
the middle block and the decoder. The toy world's ControlNet (models/ControlNet/bdm-toy-*.safetensors)
has the toy backbone's smaller architecture: those files are built from the toy backbone's .yaml, and
their residuals are handed over in the last slots (leading zeros), which the hook pops for the toy UNet's
middle block and decoder blocks in the right order."""
import os
import sys

from modules import paths, script_callbacks
from modules import scripts as webui_scripts

KEYS = ("in_channels", "model_channels", "num_res_blocks", "attention_resolutions", "channel_mult", "num_heads",
        "num_head_channels", "context_dim", "transformer_depth", "use_linear_in_transformer")
PROBE = "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"  # where the guess reads the context width


def _toy_config():
    from omegaconf import OmegaConf
    y = os.path.join(paths.models_path, "Stable-diffusion", "bdm-toy-sd1.yaml")
    params = OmegaConf.to_container(OmegaConf.load(y).model.params.unet_config.params)
    config = {k: params[k] for k in KEYS if k in params}
    config["transformer_depth_middle"] = params.get("transformer_depth", 1)
    return config


def _patch(*_args, **_kwargs):
    guess = sys.modules.get("scripts.controlnet_model_guess")
    if guess is None or getattr(guess.build_model_by_guess, "bdm_toy", False):
        return
    original = guess.build_model_by_guess

    def build_model_by_guess(state_dict, unet, model_path):
        if not os.path.basename(model_path).startswith("bdm-toy-"):
            return original(state_dict, unet, model_path)
        saved = dict(guess.controlnet_default_config)
        guess.controlnet_default_config.update(_toy_config())
        state_dict = dict(state_dict)
        if PROBE not in state_dict and "control_model." + PROBE not in state_dict:
            state_dict[PROBE] = next(v for k, v in state_dict.items() if k.endswith("attn2.to_k.weight"))
        try:
            built = original(state_dict, unet, model_path)
        finally:
            guess.controlnet_default_config.clear()
            guess.controlnet_default_config.update(saved)
        network = built.model
        residuals = network.forward

        def forward(*args, **kwargs):
            out = list(residuals(*args, **kwargs))
            return [0.0] * (13 - len(out)) + out

        network.forward = forward
        return built

    build_model_by_guess.bdm_toy = True
    guess.build_model_by_guess = build_model_by_guess
    # scripts/controlnet.py imported the name: replace it in that module's globals too
    for data in webui_scripts.scripts_data:
        for value in vars(data.script_class).values():
            g = getattr(getattr(value, "__func__", value), "__globals__", None)  # staticmethods too
            if g is not None and g.get("build_model_by_guess") is original:
                g["build_model_by_guess"] = build_model_by_guess
    print("[bdm-test-support] toy ControlNets are built from bdm-toy-sd1.yaml")


script_callbacks.on_app_started(_patch)
'''


def write_vae_approx_sdxl(a1111: Path) -> None:
    """SDXL generation loads `models/VAE-approx/vaeapprox-sdxl.pt` and downloads it when missing (no
    network here): give it the SD1 approximation's file (same class, same keys; previews only)."""
    import shutil
    d = a1111 / "models" / "VAE-approx"
    if (d / "model.pt").is_file() and not (d / "vaeapprox-sdxl.pt").is_file():
        shutil.copyfile(d / "model.pt", d / "vaeapprox-sdxl.pt")


def write_support_extension(a1111: Path) -> Path:
    """`extensions/bdm-test-support`: the tiny OpenCLIP architecture, the toy ControlNet builder, and the
    probe (tests/webui/support/: diagnostics routes and fault injection over BDM's public state)."""
    import shutil
    write_vae_approx_sdxl(a1111)
    ext = a1111 / "extensions" / "bdm-test-support"
    (ext / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "support" / "bdm_test_probe.py", ext / "scripts" / "bdm_test_probe.py")
    shutil.copyfile(HERE / "support" / "metadata.ini", ext / "metadata.ini")
    (ext / f"{OPENCLIP_ARCH}.json").write_text(json.dumps(OPENCLIP_CONFIG), encoding="utf-8")
    (ext / "scripts" / "bdm_test_support.py").write_text(SUPPORT_SCRIPT.format(arch=OPENCLIP_ARCH),
                                                          encoding="utf-8")
    (ext / "scripts" / "bdm_test_toy_controlnet.py").write_text(TOY_CONTROLNET_SCRIPT, encoding="utf-8")
    return ext


def _sd1_yaml(a1111: Path) -> str:
    return (a1111 / SD1_CKPT).with_suffix(".yaml").read_text(encoding="utf-8")


def _clip_dir(a1111: Path) -> str:
    for line in _sd1_yaml(a1111).splitlines():
        if line.strip().startswith("version:"):
            return line.split(":", 1)[1].strip()
    raise ValueError("tiny-sd1.yaml has no version: line")


def sd2_yaml(a1111: Path) -> str:
    text = _sd1_yaml(a1111)
    head, _, _ = text.partition("    cond_stage_config:")
    head = head.replace("        num_heads: 8\n", "        num_head_channels: 8\n        use_linear_in_transformer: True\n")
    return head + (f"    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
                   f"      params:\n        arch: {OPENCLIP_ARCH}\n        version: null\n        freeze: True\n"
                   f"        layer: penultimate\n")


def inpaint_yaml(a1111: Path) -> str:
    text = _sd1_yaml(a1111)
    text = text.replace("target: ldm.models.diffusion.ddpm.LatentDiffusion",
                        "target: ldm.models.diffusion.ddpm.LatentInpaintDiffusion")
    text = text.replace("conditioning_key: crossattn", "conditioning_key: hybrid\n    finetune_keys: null")
    return text.replace("        in_channels: 4\n        out_channels: 4",
                        "        in_channels: 9\n        out_channels: 4", 1)


def sdxl_yaml(a1111: Path) -> str:
    clip = _clip_dir(a1111)
    w_l, w_g = 64, OPENCLIP_CONFIG["text_cfg"]["width"]
    pooled = OPENCLIP_CONFIG["embed_dim"]
    return f"""model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {pooled + 3 * 2 * 16}
        num_classes: sequential
        use_checkpoint: False
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 8
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 1, 1]
        context_dim: {w_l + w_g}
        spatial_transformer_attn_type: softmax
        legacy: False
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              version: {clip}
              layer: hidden
              layer_idx: 1
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: {OPENCLIP_ARCH}
              version: null
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 16
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 16
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 16
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


YAMLS = {"sd2": sd2_yaml, "sdxl": sdxl_yaml, "inpaint": inpaint_yaml}


def build(a1111: Path, kind: str) -> Path:
    """Instantiate the model of `kind` from its yaml (WebUI venv only) and save it beside the yaml."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    sys.path[:0] = [str(a1111 / "repositories" / "stable-diffusion-stability-ai"),
                    str(a1111 / "repositories" / "generative-models")]
    import open_clip
    ext = write_support_extension(a1111)
    open_clip.add_model_config(str(ext / f"{OPENCLIP_ARCH}.json"))
    from ldm.util import instantiate_from_config
    import transformers

    def from_config(version, *args, **kwargs):  # the tiny CLIP folder has a config, no weights
        return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(version))
    transformers.CLIPTextModel.from_pretrained = from_config

    out = a1111 / "models" / "Stable-diffusion" / f"{NAMES[kind]}.safetensors"
    yaml = YAMLS[kind](a1111)
    out.with_suffix(".yaml").write_text(yaml, encoding="utf-8")
    torch.manual_seed({"sd2": 2, "sdxl": 3, "inpaint": 4}[kind])
    config = OmegaConf.create(yaml)
    if kind == "sdxl":
        import sgm.util
        model = sgm.util.instantiate_from_config(config.model)
    else:
        model = instantiate_from_config(config.model)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if isinstance(v, torch.Tensor)}
    g = torch.Generator().manual_seed(7)
    for k, v in sd.items():  # ldm's zero_module layers: small random values, so the model reacts
        if v.is_floating_point() and v.ndim >= 1 and not v.any() and ("diffusion_model" in k):
            sd[k] = 0.02 * torch.randn(v.shape, generator=g)
    if kind == "inpaint":  # the SD1 weights with 5 more input channels: the same tiny backbone family
        from safetensors.torch import load_file
        base = load_file(str(a1111 / SD1_CKPT))
        for k, v in base.items():
            if k in sd and sd[k].shape == v.shape:
                sd[k] = v.clone()
        w = base["model.diffusion_model.input_blocks.0.0.weight"]
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat(
            [w, 0.05 * torch.randn((w.shape[0], 5, *w.shape[2:]), generator=g)], dim=1)
    save_file(sd, str(out))
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve()
    os.chdir(root)
    for kind in sys.argv[2:] or list(NAMES):
        print(build(root, kind))
