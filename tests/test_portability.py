"""The runtime also runs where POSIX-only modules do not exist (Windows, where most WebUI users are):
every module of `bdm` imports with `resource`, `fcntl` and `termios` unavailable to it, and the trainer's
DataLoader workers work under the `spawn` start method (Windows' only one)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Imports by bdm's own modules of the POSIX-only names fail, as on Windows. Only bdm's: a library that
# imports them on Linux takes another branch on Windows, which this machine cannot show.
IMPORT_EVERY_MODULE = textwrap.dedent('''
    import importlib, importlib.abc, pkgutil, sys, traceback
    BLOCKED = {"resource", "fcntl", "termios"}

    def importer():
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        return frame.f_globals.get("__name__", "") if frame is not None else ""

    class PosixOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            who = importer()
            if name.split(".")[0] in BLOCKED and (who == "bdm" or who.startswith("bdm.")):
                raise ImportError(f"{who} imports the POSIX-only module {name!r}")
            return None

    for name in [n for n in sys.modules if n.split(".")[0] in BLOCKED]:
        del sys.modules[name]  # imported by the interpreter's start-up: make bdm find them anew
    sys.meta_path.insert(0, PosixOnly())
    import bdm
    names, failed = ["bdm"], []
    for info in pkgutil.walk_packages(bdm.__path__, "bdm."):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception:
            failed.append(info.name + ": " + traceback.format_exc(limit=-3))
    print(len(names), "modules")  # none skipped: optional extras are imported inside functions
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
''')


def test_every_module_imports_without_posix_only_modules():
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    count = int(out.stdout.split()[0])
    assert count >= len(list((ROOT / "bdm").rglob("*.py"))), out.stdout  # every file was a module imported


def test_a_dataloader_with_spawned_workers(tmp_path):
    """Workers started by `spawn` get the dataset by pickling and import bdm afresh: no lambda, closure
    or local class may travel, and each worker reads its own share of the shards."""
    from bdm.train import data as D
    from tests.train_util import write_shards
    shards = write_shards(tmp_path, 2, 4)
    stream = D.ShardStream(shards, batch_size=2, resolution=16, center_crop=True, random_flip=False, seed=0,
                           num_workers=2, shuffle_buffer=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    it = iter(loader)
    batches = [next(it) for _ in range(4)]  # one epoch: 8 records, 2 per batch
    del it
    keys = sorted(k for b in batches for k in b["key"].tolist())
    assert len(set(keys)) == 8 and all(b["image"].shape == (2, 3, 16, 16) for b in batches)
    assert sorted({b["position"][0] for b in batches}) == [0, 1]
