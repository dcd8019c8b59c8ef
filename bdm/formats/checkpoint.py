"""Single-file SD checkpoints (Civitai style): which family, which UNet architecture, the UNet itself.

The architecture comes from a `.yaml` beside the file (the WebUI's convention, LDM config format) or,
without one, from the state dict's shapes. Only SD1.x-family backbones can carry a BDM branch: SD2
(OpenCLIP, 1024 context), SDXL, inpainting (9 input channels) and instruct-pix2pix (8) are refused
with a message that says what was found.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..unet import UNetConfig, UNetModel
from .files import (FormatError, load_checked, materialize, read_json, read_state_dict, short_hash,
                    strip_prefix)

UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Family:
    """What kind of SD model a checkpoint holds, read from its keys and shapes."""

    name: str  # "sd1", "sd2", "sdxl", or "unknown"
    in_channels: int = 4
    context_dim: int = 768

    @property
    def variant(self) -> str:
        return {4: "", 9: " inpainting", 8: " instruct-pix2pix"}.get(self.in_channels, f" {self.in_channels}-channel")

    def describe(self) -> str:
        label = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(self.name, "unrecognised")
        return f"{label}{self.variant} (UNet context {self.context_dim})"


def detect_family(state_dict: dict) -> Family:
    keys = state_dict.keys()
    if any(k.startswith("conditioner.") for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in keys:
        return Family("sdxl", context_dim=2048)
    conv_in = state_dict.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    to_k = next((v for k, v in state_dict.items()
                 if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    if conv_in is None or to_k is None:
        return Family("unknown")
    in_channels, context = conv_in.shape[1], to_k.shape[1]
    if any(k.startswith("cond_stage_model.model.") for k in keys) or context == 1024:
        return Family("sd2", in_channels, context)
    return Family("sd1", in_channels, context)


def require_sd1(family: Family, source: str, allow_inpainting: bool = False) -> None:
    """Refuse backbones a BDM branch cannot be bridged onto, saying what was found."""
    if family.name != "sd1":
        raise FormatError(f"{source}: this is an {family.describe()} checkpoint; BDM needs an SD1.x-family "
                          "backbone (LDM UNet with a CLIP ViT-L-style text encoder)")
    if family.in_channels != 4 and not (allow_inpainting and family.in_channels == 9):
        raise FormatError(f"{source}: this is an SD1.x{family.variant} checkpoint "
                          f"({family.in_channels} input channels); BDM needs a plain 4-channel SD1.x UNet")


def read_ldm_yaml(path: str | os.PathLike) -> dict:
    """The LDM config (`model.params`) of a `.yaml` like the WebUI's `v1-inference.yaml`."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FormatError(f"{path}: not valid YAML: {e}") from e
    try:
        return data["model"]["params"]
    except (KeyError, TypeError):
        raise FormatError(f"{path}: not an LDM model config (expected model.params.unet_config)") from None


def unet_config_from_yaml(path: str | os.PathLike) -> UNetConfig:
    params = read_ldm_yaml(path)
    try:
        return UNetConfig.from_dict(params["unet_config"]["params"])
    except (KeyError, TypeError):
        raise FormatError(f"{path}: no model.params.unet_config.params in this config") from None


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(unet_sd: dict, source: str = "checkpoint") -> UNetConfig:
    """An LDM UNet's architecture from the shapes of its weights (`model.diffusion_model.` stripped).

    Shapes cannot tell the number of attention heads: SD1's 8 heads are assumed, or SD2's 64-wide
    heads when the transformers use linear projections. Put a `.yaml` beside other checkpoints.
    """
    keys = list(unet_sd)
    try:
        conv_in = unet_sd["input_blocks.0.0.weight"]
        mc, in_channels = conv_in.shape[0], conv_in.shape[1]
    except KeyError as e:
        raise FormatError(f"{source}: no SD UNet weights found (missing {e.args[0]!r})") from None
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet_sd]
    levels = len(downs) + 1
    num_res = (len(blocks) - 1 - len(downs)) // levels
    mult, attn, idx = [], [], 1
    for level in range(levels):
        mult.append(unet_sd[f"input_blocks.{idx}.0.out_layers.3.weight"].shape[0] // mc)
        if f"input_blocks.{idx}.1.proj_in.weight" in unet_sd:
            attn.append(2 ** level)
        idx += num_res + 1
    to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not to_k:
        raise FormatError(f"{source}: the UNet has no cross-attention; not an SD text-to-image UNet")
    first = to_k[0].split(".transformer_blocks.")[0]
    linear = unet_sd[f"{first}.proj_in.weight"].ndim == 2
    depth = len(_indices(keys, re.escape(first) + r"\.transformer_blocks\.(\d+)\."))
    out = unet_sd.get("out.2.weight")  # absent in a ControlNet, which has no decoder half
    return UNetConfig(in_channels=in_channels, out_channels=in_channels if out is None else out.shape[0], model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=num_res, attention_resolutions=tuple(attn),
                      num_heads=-1 if linear else 8, num_head_channels=64 if linear else -1,
                      context_dim=unet_sd[to_k[0]].shape[1], transformer_depth=depth,
                      use_linear_in_transformer=linear)


def config_path_for(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).with_suffix(".yaml")


def unet_config_for(checkpoint: str | os.PathLike, unet_sd: dict) -> UNetConfig:
    """The `.yaml` beside the checkpoint if there is one, else the architecture read from shapes."""
    yaml_path = config_path_for(checkpoint)
    if yaml_path.is_file():
        return unet_config_from_yaml(yaml_path)
    return infer_unet_config(unet_sd, str(checkpoint))


def load_unet(checkpoint: str | os.PathLike, state_dict: dict | None = None,
              config: UNetConfig | None = None, allow_inpainting: bool = False) -> UNetModel:
    """The SD1.x UNet of a single-file checkpoint, refusing other families with a clear message."""
    sd = read_state_dict(checkpoint) if state_dict is None else state_dict
    require_sd1(detect_family(sd), str(checkpoint), allow_inpainting)
    unet_sd = strip_prefix(sd, UNET_PREFIX)
    cfg = config or unet_config_for(checkpoint, unet_sd)
    unet = materialize(lambda: UNetModel(cfg))
    load_checked(unet, unet_sd, str(checkpoint), "UNet weights (model.diffusion_model.*)")
    return unet.eval().requires_grad_(False)


@dataclass
class SDCheckpoint:
    """The three models of a single-file SD1.x checkpoint, plus what the WebUI shows about it."""

    path: Path
    unet: UNetModel
    vae: "object"  # bdm.vae.AutoencoderKL
    text_encoder: "object"  # bdm.text.clip.EnglishTextEncoder
    family: Family

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def hash(self) -> str:
        if not hasattr(self, "_hash"):
            self._hash = short_hash(self.path)
        return self._hash

    def modules(self):
        return [self.unet, self.vae, self.text_encoder]


def _clip_config(yaml_params: dict | None, checkpoint: Path, state_dict: dict):
    """The CLIP text config: from the folder the `.yaml`'s `cond_stage_config.params.version` names
    (the WebUI's offline convention), else inferred from the shapes."""
    from ..text.clip import text_config, text_config_from_state_dict
    version = ((yaml_params or {}).get("cond_stage_config") or {}).get("params", {}).get("version")
    if version:
        folder = Path(version) if Path(version).is_absolute() else checkpoint.parent / version
        if (folder / "config.json").is_file():
            config = read_json(folder / "config.json")
            config = config.get("text_config", config)
            known = {k: v for k, v in config.items() if not k.startswith(("_", "architectures", "transformers_version"))}
            return text_config(**known)
    return text_config_from_state_dict(state_dict)


def load_checkpoint(path: str | os.PathLike, allow_inpainting: bool = False) -> SDCheckpoint:
    """UNet, VAE and English CLIP of an SD1.x single-file checkpoint, frozen and in eval mode.

    Architectures come from the `.yaml` beside the file when there is one, else from the shapes.
    """
    from ..text.clip import EnglishTextEncoder
    from ..vae import VAEConfig, load_vae
    path = Path(path)
    sd = read_state_dict(path)
    family = detect_family(sd)
    require_sd1(family, str(path), allow_inpainting)
    yaml_path = config_path_for(path)
    params = read_ldm_yaml(yaml_path) if yaml_path.is_file() else None
    unet = load_unet(path, sd, unet_config_from_yaml(yaml_path) if params else None, allow_inpainting)
    vae_cfg = None
    if params and "first_stage_config" in params:
        vae_cfg = VAEConfig.from_ldm(params["first_stage_config"]["params"], params.get("scale_factor", 0.18215))
    try:
        vae = load_vae(sd, vae_cfg)
        text = EnglishTextEncoder.from_state_dict(sd, _clip_config(params, path, sd))
    except KeyError as e:
        raise FormatError(f"{path}: incomplete SD checkpoint, no tensor {e.args[0]!r}") from None
    except RuntimeError as e:  # strict load_state_dict of a mismatched part
        raise FormatError(f"{path}: the VAE or text encoder does not match its architecture: {e}") from None
    for module in (vae, text):
        module.eval().requires_grad_(False)
    return SDCheckpoint(path, unet, vae, text, family)


LDM_YAML = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {latent_size}
    channels: {in_channels}
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {scale_factor}
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
{unet}
        use_spatial_transformer: True
        use_checkpoint: False
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {embed_dim}
        monitor: val/rec_loss
        ddconfig:
{ddconfig}
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {clip_dir}
"""


def _yaml_fields(values: dict, indent: int) -> str:
    import json
    return "\n".join(f"{' ' * indent}{k}: {json.dumps(v)}" for k, v in values.items())


def ldm_yaml(unet_cfg: UNetConfig, vae_cfg, clip_dir: str, latent_size: int = 64) -> str:
    """The WebUI's `v1-inference.yaml` for this architecture; `clip_dir` is where the WebUI finds the
    CLIP tokenizer and config offline (`cond_stage_config.params.version`)."""
    vae = vae_cfg.to_dict()
    dd = {k: vae[k] for k in ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                              "num_res_blocks", "attn_resolutions")}
    return LDM_YAML.format(latent_size=latent_size, in_channels=unet_cfg.in_channels,
                           scale_factor=vae_cfg.scale_factor, unet=_yaml_fields(unet_cfg.to_dict(), 8),
                           embed_dim=vae["embed_dim"], ddconfig=_yaml_fields(dd, 10), clip_dir=clip_dir)


def write_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """Copy the shipped CLIP tokenizer (vocab.json + merges.txt) into `folder`, where the WebUI's
    `FrozenCLIPEmbedder` builds its tokenizer from (`CLIPTokenizer.from_pretrained(version)`)."""
    import shutil
    from ..text.clip import tokenizer_dir
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir() / name, folder / name)
    return folder


def write_clip_folder(folder: str | os.PathLike, text_encoder, tokenizer: bool = True) -> Path:
    """A Hugging Face CLIP folder (`config.json`, and the tokenizer files unless `tokenizer=False`), so the
    WebUI's `FrozenCLIPEmbedder` can build the tokenizer and model without a hub."""
    import json
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        write_clip_tokenizer(folder)
    config = text_encoder.transformer.config.to_dict()
    config["architectures"] = ["CLIPTextModel"]
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def save_checkpoint(path: str | os.PathLike, unet: UNetModel, vae, text_encoder, clip_dir: str | os.PathLike,
                    latent_size: int = 64, clip_tokenizer: bool = True) -> Path:
    """Write an SD1.x single-file checkpoint the WebUI loads offline: the `.safetensors` (LDM keys),
    the `.yaml` beside it, and the CLIP folder its `version:` points at (relative paths are kept
    relative to the checkpoint's folder in the file, so the three can move together).
    `clip_tokenizer=False` leaves the tokenizer files out of that folder (the package's toy weights:
    `export-webui` adds the one shipped copy)."""
    from .files import atomic_write, save_safetensors
    path = Path(path)
    tensors = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    tensors.update({"cond_stage_model." + k: v for k, v in text_encoder.ldm_state_dict().items()})
    clip_dir = Path(clip_dir)
    write_clip_folder(clip_dir if clip_dir.is_absolute() else path.parent / clip_dir, text_encoder, clip_tokenizer)
    yaml_text = ldm_yaml(unet.config, vae.config, str(clip_dir), latent_size)
    save_safetensors(path, tensors)
    atomic_write(config_path_for(path), lambda tmp: Path(tmp).write_text(yaml_text, encoding="utf-8"))
    return path
