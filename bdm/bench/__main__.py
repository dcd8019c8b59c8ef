"""`python -m bdm.bench [step|train|webui] …` — dispatch to one benchmark."""
from __future__ import annotations

import importlib
import sys

from ..cli import run

BENCHES = {"step": "bdm.bench.step", "train": "bdm.bench.train", "webui": "bdm.bench.webui"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in BENCHES else "step"
    if argv[:1] in (["-h"], ["--help"]) and name == "step" and not argv[1:]:
        print(__doc__ + "\nbenchmarks: " + ", ".join(BENCHES))
    module = importlib.import_module(BENCHES[name])
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(run(main))
