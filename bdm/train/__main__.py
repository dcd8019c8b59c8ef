"""`python -m bdm.train --help` (see bdm/train/config.py for every option)."""
from __future__ import annotations

import sys

from ..cli import run


def main(argv=None) -> int:
    from .config import parse_args
    from .loop import train
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
