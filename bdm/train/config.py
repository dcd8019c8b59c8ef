"""Training options: one dataclass, read from a YAML/TOML file and/or command-line flags.

Precedence: built-in defaults < `--config FILE` < flags. Every field has its help text beside it, so
`python -m bdm.train --help` explains every option and a config file uses the same names (dashes or
underscores).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path


def opt(default, help: str, **extra):
    """A field with its help text (and argparse extras such as `choices`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


DEFAULT_VALIDATION_PROMPTS = ["红色的圆形", "一只在草地上奔跑的狗", "车水马龙的城市街道"]

GROUPS = {
    "checkpoint": "models", "text_encoder": "models", "init_bdm": "models",
    "data": "data", "resolution": "data", "center_crop": "data", "random_flip": "data",
    "caption_dropout": "data", "num_workers": "data", "shuffle_buffer": "data",
    "cache_latents": "data", "latent_cache": "data", "aspect_buckets": "data",
    "bucket_max_ratio": "data",
    "output": "run", "max_steps": "run", "epochs": "run", "seed": "run", "device": "run",
    "resume": "run",
}


@dataclass
class TrainConfig:
    # -- models --------------------------------------------------------------------------------
    checkpoint: str = opt(None, "backbone: an SD1.x single-file checkpoint (.safetensors, or .ckpt read "
                                "with weights_only); a .yaml beside it sets the architecture. Frozen.")
    text_encoder: str = opt(None, "Chinese text encoder: a Hugging Face Chinese CLIP folder, a BDM file "
                                  "(its encoder is used), or 'toy' (the tiny random test encoder). "
                                  "Default: the encoder of --init-bdm.")
    init_bdm: str = opt(None, "continue from this BDM file's branch instead of a fresh copy of the "
                              "backbone's encoder half (Bridge.from_backbone)")
    # -- data ----------------------------------------------------------------------------------
    data: str = opt(None, "training data: a .jsonl ({\"image\": path, \"text\": caption} per line, paths "
                          "relative to the file), a .csv (image,text columns), a folder of name.jpg|png + "
                          "name.txt, a folder / brace pattern / list file of WebDataset .tar shards "
                          "(NNNN.jpg|png|webp + NNNN.txt|json), or a latent cache folder (--cache-latents)")
    resolution: int = opt(512, "training images are resized (short side) and cropped to this square size "
                               "(a multiple of 8 × the VAE's downscale)")
    center_crop: bool = opt(True, "crop the center (else a random crop)")
    random_flip: bool = opt(True, "flip images horizontally with probability 1/2")
    caption_dropout: float = opt(0.1, "probability of replacing a Chinese caption by \"\" (learns the "
                                      "unconditional branch for classifier-free guidance)")
    num_workers: int = opt(2, "data loader worker processes per rank (0: load in the main process)")
    shuffle_buffer: int = opt(1000, "WebDataset only: samples kept in the shuffle buffer of each worker")
    cache_latents: bool = opt(False, "encode every image with the VAE once (into --latent-cache) and train "
                                     "from the cached latents; file/folder datasets")
    latent_cache: str = opt(None, "where --cache-latents writes (default OUTPUT/latents); reused when it "
                                  "already matches the data and resolution")
    aspect_buckets: bool = opt(False, "aspect-ratio bucketing: train each image at the size of the bucket "
                                      "nearest its aspect ratio (sides multiples of the backbone's 64 px for "
                                      "SD1, at most --resolution² pixels) instead of a square crop; each batch "
                                      "is one bucket. File/folder datasets and their latent caches")
    bucket_max_ratio: float = opt(2.0, "--aspect-buckets: the most elongated bucket (long side / short side)")
    # -- optimisation --------------------------------------------------------------------------
    batch_size: int = opt(4, "samples per rank per micro-step")
    gradient_accumulation: int = opt(1, "micro-steps per optimizer step; global batch = batch_size × "
                                        "gradient_accumulation × world size")
    learning_rate: float = opt(1e-5, "peak learning rate of AdamW")
    lr_schedule: str = opt("constant", "learning-rate schedule after warm-up",
                           choices=["constant", "cosine", "linear"])
    lr_warmup_steps: int = opt(0, "linear warm-up from 0 over this many optimizer steps")
    min_lr_ratio: float = opt(0.0, "cosine/linear schedules end at learning_rate × this")
    adam_beta1: float = opt(0.9, "AdamW β1")
    adam_beta2: float = opt(0.999, "AdamW β2")
    adam_epsilon: float = opt(1e-8, "AdamW ε")
    weight_decay: float = opt(1e-2, "AdamW decoupled weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    fused_adam: bool = opt(True, "use the fused AdamW kernel where this torch and device have one")
    mixed_precision: str = opt("no", "autocast dtype; the frozen models are stored in it, the branch and "
                                     "its optimizer stay fp32; fp16 uses dynamic loss scaling",
                               choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = opt(False, "recompute the branch's blocks in backward (less memory, "
                                              "~30 %% more time)")
    checkpoint_backbone: int = opt(0, "recompute the last N decoder blocks of the frozen backbone in backward "
                                      "instead of keeping their activations (3: SD1's full-resolution level, the "
                                      "most memory per unit of recompute, ~10-20 %% more time; 0: none)")
    cuda_graphs: bool = opt(True, "on one CUDA device, replay each step's forward and backward as CUDA graphs "
                                  "(the same kernels and numbers, far less CPU launch time; one graph per batch "
                                  "shape, up to 8, then eager; not under torchrun or with checkpointing)")
    compile: bool = opt(False, "torch.compile the training step's forward and backward (fuses the small "
                               "element-wise kernels: a few %% less time per step on a CPU; the first step, and "
                               "each new batch shape, spends a minute or more compiling; CUDA graphs off)")
    ema: bool = opt(False, "keep an exponential moving average of the branch; exported files use it")
    ema_decay: float = opt(0.9999, "EMA decay (with the usual (1+n)/(10+n) warm-up)")
    # -- run -----------------------------------------------------------------------------------
    output: str = opt(None, "output folder: bdm.safetensors, checkpoints/, validation/, log.jsonl")
    max_steps: int = opt(None, "optimizer steps to train (default: from --epochs)")
    epochs: float = opt(None, "passes over the data (used when --max-steps is not given)")
    seed: int = opt(0, "seed of everything random: data order, augmentations, noise, timesteps, dropout")
    device: str = opt(None, "cuda, cuda:N, cpu (default: cuda when available; under torchrun each rank "
                            "takes cuda:LOCAL_RANK)")
    checkpoint_every: int = opt(500, "write a resumable checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = opt(3, "keep the newest N checkpoints (0: keep all)")
    resume: str = opt(None, "continue from a checkpoint folder, or 'latest' (OUTPUT/checkpoints/latest)")
    log_every: int = opt(10, "append averaged metrics to OUTPUT/log.jsonl every N steps")
    tensorboard: bool = opt(False, "also write TensorBoard logs to OUTPUT/tensorboard (needs the "
                                   "tensorboard package)")
    progress: bool = opt(True, "show a tqdm progress bar (rank 0)")
    validation_every: int = opt(0, "sample validation images from --validation-prompts every N steps (0: never)")
    validation_prompts: list = opt(DEFAULT_VALIDATION_PROMPTS, "fixed Chinese prompts for validation images")
    validation_steps: int = opt(20, "sampler steps for validation images")
    validation_cfg: float = opt(7.5, "classifier-free guidance scale for validation images")
    validation_sampler: str = opt("DPM++ 2M", "sampler for validation images (WebUI name)")
    save_dtype: str = opt("fp16", "dtype of the branch in the exported BDM file (its Chinese encoder stays fp32)",
                          choices=["fp16", "bf16", "fp32"])

    # -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "TrainConfig":
        """Refuse inconsistent options before any work, with one clear message."""
        for name in ("checkpoint", "data", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        if not self.text_encoder and not self.init_bdm:
            raise ValueError("--text-encoder is required (or --init-bdm, whose encoder is then used)")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give --max-steps or --epochs")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError("--max-steps must be >= 0")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError("--batch-size and --gradient-accumulation must be >= 1")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError("--caption-dropout must be in [0, 1]")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.bucket_max_ratio < 1.0:
            raise ValueError(f"--bucket-max-ratio must be >= 1 (long side / short side), got {self.bucket_max_ratio}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError("--ema-decay must be in (0, 1)")
        return self


EPILOG = """\
minimal call:
  python -m bdm.train --checkpoint SD.safetensors --text-encoder DIR_OR_FILE --data DATA \\
      --output OUT_DIR --max-steps N
  leaves OUT_DIR/bdm.safetensors (loadable by bdm.load_bridge, the generator and the WebUI).
boolean flags take an optional value: --ema, --ema true, --no-ema.
several GPUs / nodes: torchrun --nproc_per_node N [--nnodes M --node_rank R --master_addr H] -m bdm.train …
"""

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(f) -> type:
    default = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(default, bool):
        return bool
    if isinstance(default, list):
        return list
    kind = {"max_steps": int, "epochs": float}.get(f.name)
    if kind:
        return kind
    return type(default) if default is not None else str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bdm.train",
        description="Train a BDM branch (arXiv 2309.00952) on a frozen SD1.x backbone: the backbone's "
                    "English context is always the embedding of \"\", only the branch learns "
                    "(ε-prediction MSE, uniform timesteps of the SD1.5 schedule). Scales out with "
                    "`torchrun --nproc_per_node N -m bdm.train …` (DDP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG)
    p.add_argument("--config", help="YAML (.yaml/.yml) or TOML (.toml) file of options (same names as the "
                                    "flags, dashes or underscores); flags override it")
    groups = {name: p.add_argument_group(name) for name in ("models", "data", "optimisation", "run")}
    for f in fields(TrainConfig):
        group = groups[GROUPS.get(f.name) or ("optimisation" if f.name in _OPTIM else "run")]
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        default = f.default if f.default is not MISSING else f.default_factory()
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        help_text = f.metadata["help"]
        if kind is bool:
            group.add_argument(flag, dest=f.name, type=_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                               metavar="BOOL", help=f"{help_text} (default: {default})")
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif kind is list:
            group.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {default})")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {default})", **extra)
    return p


_OPTIM = {"batch_size", "gradient_accumulation", "learning_rate", "lr_schedule", "lr_warmup_steps",
          "min_lr_ratio", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm",
          "fused_adam", "mixed_precision", "gradient_checkpointing", "checkpoint_backbone", "ema", "ema_decay"}


def read_config_file(path: str | Path) -> dict:
    """Options from a YAML or TOML file, names checked (a typo is an error, not a silent default)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except Exception as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from e
    else:
        import yaml
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    data = data.get("train", data) if isinstance(data.get("train"), dict) else data
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ValueError(f"{path}: unknown option {key!r}")
        out[name] = _coerce(name, value, str(path))
    return out


def _coerce(name: str, value, source: str):
    f = _FIELDS[name]
    kind = _field_type(f)
    if value is None:
        return None
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _bool(value)
        if kind is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        return kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{source}: option {name!r}: {e}") from None


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    values = read_config_file(config_file) if config_file else {}
    values.update(args)
    return TrainConfig(**values).check()


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), ensure_ascii=False, sort_keys=True)
