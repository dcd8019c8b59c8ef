"""Resumable training checkpoints: safetensors + JSON, never pickles; written atomically.

A checkpoint is a folder `OUTPUT/checkpoints/step-NNNNNNN/` holding
- `state.safetensors`: the branch (`bridge.*`, fp32), the EMA branch (`ema.*`), the optimizer's tensors
  (`optim.<param index>.<name>`) and the RNG states (`rng.*`); its metadata `train_state` is JSON: step,
  data position, optimizer hyper-parameters, scheduler, loss scaler, Python/NumPy RNG, the config;
- `bdm.safetensors`: the branch (EMA weights when EMA is on) + Chinese encoder in the BDM single-file
  format, loadable as is by `bdm.load_bridge`, the generator and the WebUI.
The folder is written under a temporary name and renamed into place, so a killed run leaves either a
whole checkpoint or none; `latest` (a small text file, also replaced atomically) names the newest.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..formats.files import FormatError, atomic_write, read_metadata, read_state_dict, save_safetensors

STATE_FILE = "state.safetensors"
BDM_FILE = "bdm.safetensors"
LATEST = "latest"
STATE_VERSION = 1


# -- optimizer -------------------------------------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- RNG -------------------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- save / load -----------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(folder: Path, *, step: int, bridge, ema, optimizer, scheduler: dict, scaler,
                    position: dict, config: dict, export) -> Path:
    """Write checkpoint `folder` atomically; `export(path)` writes the BDM file into it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {f"bridge.{k}": v.float() if v.is_floating_point() else v for k, v in bridge.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        optim_tensors, optim_meta = optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
        rng_tensors, rng_meta = rng_state()
        tensors.update(rng_tensors)
        meta = {"version": STATE_VERSION, "step": step, "position": position, "optimizer": optim_meta,
                "scheduler": scheduler, "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.meta() if ema is not None else None, "rng": rng_meta, "config": config}
        save_safetensors(tmp / STATE_FILE, tensors, {"format": "bdm-train-state",
                                                     "train_state": json.dumps(meta, ensure_ascii=False)})
        export(tmp / BDM_FILE)
        _fsync_dir(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(folder.parent / LATEST, lambda p: Path(p).write_text(folder.name + "\n", encoding="utf-8"))
    return folder


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_resume(resume: str, output: Path) -> Path:
    """The checkpoint folder `--resume` names ('latest' = the newest under OUTPUT/checkpoints)."""
    if resume in ("latest", "auto"):
        latest = output / "checkpoints" / LATEST
        if not latest.is_file():
            raise FileNotFoundError(f"{latest}: no checkpoint to resume from in {output}")
        path = output / "checkpoints" / latest.read_text(encoding="utf-8").strip()
    else:
        path = Path(resume)
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON state, tensors) of a checkpoint folder."""
    path = Path(folder) / STATE_FILE
    meta = read_metadata(path)
    if meta.get("format") != "bdm-train-state":
        raise FormatError(f"{path}: not a bdm.train checkpoint")
    state = json.loads(meta["train_state"])
    if state.get("version", 0) > STATE_VERSION:
        raise FormatError(f"{path}: checkpoint version {state['version']} is newer than this trainer")
    return state, read_state_dict(path)


def prune_checkpoints(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted(p for p in Path(root).glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file())
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def sub_state(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
