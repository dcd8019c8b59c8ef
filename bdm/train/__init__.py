"""`python -m bdm.train` — train a BDM branch on a frozen SD1.x backbone (the paper's recipe).

- `config`: options (flags, YAML/TOML) · `data`: datasets, shards, latent cache, bad-data handling
- `model`: frozen backbone + branch, the loss · `loop`: the run · `state`: checkpoints · `distributed`: DDP
"""
from .config import TrainConfig, parse_args
from .loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "parse_args", "train"]
