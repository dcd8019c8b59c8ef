"""`python -m bdm.train` — train a BDM branch on a frozen SD1.x backbone (the paper's recipe).

- `config`: options (flags, YAML/TOML) · `data`: datasets, shards, latent cache, bad-data handling (a package)
- `model`: frozen backbone + branch, the loss · `schedules`: learning rate and noise · `ema`: weight average
- `loop`: the run · `state`: checkpoints · `distributed`: DDP · `graphs`: CUDA graphs · `lean`: frozen convolutions
  that keep only their weights · `validate`: validation images
"""
from .config import TrainConfig, parse_args
from .loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "parse_args", "train"]
