"""Integration tests against a real Stable Diffusion WebUI Forge, run when `FORGE_DIR` points at one
(`../shared/tools/forge/setup.sh` builds a CPU-only, offline one; its venv is `FORGE_DIR/../venv`).

The session links this project into `FORGE_DIR/extensions/bdm`, exports the toy world into it
(`python -m bdm.toy export-webui FORGE_DIR`), writes the test-only support extension and checkpoints
(tests/forge/support.py) and broken BDM files, runs the extension's `install.py` through Forge's own
installer function, starts Forge (127.0.0.1, a free port, `--api`, gradio UI on, the toy checkpoint)
and stops it at the end. `bare_forge`: a second Forge with `--api-auth` and no BDM model installed.
Without `FORGE_DIR` every test here is skipped. The harness code shared with the A1111 suite is in
tests/host_util.py.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.host_util import (WebUI, bare_models_dir, free_port, host_python, host_session, link_extension, mark_suite,
                             stop_server, wait_until_ready)

FORGE = os.environ.get("FORGE_DIR")
HAVE_FORGE = bool(FORGE) and Path(FORGE, "modules_forge").is_dir()
SKIP_REASON = "FORGE_DIR is not set to a Stable Diffusion WebUI Forge folder (integration tests need one)"
LOG = Path(os.environ.get("BDM_FORGE_LOG", "/tmp/bdm-forge-test.log"))
CHECKPOINT = "bdm-toy-sd1"
TOY = "bdm-toy"  # the toy BDM model, source of the broken files
AUTH = ("bdm-tester", "secret-pw")

BASE = {"prompt": "", "negative_prompt": "", "width": 64, "height": 64, "steps": 12, "sampler_name": "Euler a",
        "scheduler": "Automatic", "cfg_scale": 7, "seed": 1, "batch_size": 2, "n_iter": 1}


def pytest_collection_modifyitems(config, items):
    mark_suite(items, Path(__file__).parent, pytest.mark.forge, HAVE_FORGE, SKIP_REASON)


class Forge(WebUI):
    ERROR_KEY = "message"  # Forge's webui.py answers API errors with {"error", "detail", "body", "message"}


def prepare(forge: Path) -> str:
    """Everything the suite needs inside FORGE_DIR (idempotent); returns what building the foreign
    checkpoints said."""
    from bdm.toy.export import export_webui
    from tests.forge.support import write_foreign_checkpoints, write_inpainting_checkpoint, write_support_extension
    from tests.webui.foreign import write_vae_approx_sdxl
    from tests.webui.models import make_broken_files, make_wrong_file
    link_extension(forge)
    write_vae_approx_sdxl(forge)  # SDXL previews would download it
    export_webui(forge, quiet=True)
    make_wrong_file(forge)
    make_broken_files(forge, source=TOY)
    write_support_extension(forge)
    write_inpainting_checkpoint(forge)
    return write_foreign_checkpoints(forge, host_python(forge))


def forge_command(forge: Path, port: int, checkpoint: str, flags=()) -> list[str]:
    """Forge on the CPU, offline (the harness's run.sh flags: `--always-cpu --all-in-fp32`, no install)."""
    return [host_python(forge), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
            "--skip-version-check", "--skip-python-version-check", "--always-cpu", "--all-in-fp32", "--no-half",
            "--precision", "full", "--api", "--server-name", "127.0.0.1", "--port", str(port),
            "--ckpt", f"models/Stable-diffusion/{checkpoint}.safetensors", *flags]


def forge_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                DIFFUSERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", CUDA_VISIBLE_DEVICES="")


def start_forge(forge: Path, log_path: Path = LOG, checkpoint: str = CHECKPOINT, flags=(),
                auth: tuple[str, str] | None = None) -> Forge:
    port = free_port()
    log = open(log_path, "w")
    cmd = forge_command(forge, port, checkpoint, flags) + (["--api-auth", ":".join(auth)] if auth else [])
    proc = subprocess.Popen(cmd, cwd=forge, env=forge_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Forge(f"http://127.0.0.1:{port}", forge, proc, auth)
    server.log, server._log_file = log_path, log
    # ready once the last start-up step has added the built-in ControlNet's routes: then scripts have their args
    return wait_until_ready(server, "Forge", lambda s: s.call("GET", "/controlnet/model_list", timeout=10)[0] == 200)


@pytest.fixture(scope="session")
def forge():
    yield from host_session(FORGE if HAVE_FORGE else None, SKIP_REASON, prepare, start_forge, BASE)


@pytest.fixture(scope="session")
def bare_forge(forge):
    """A second Forge with `--api-auth` and no BDM model installed: `--models-dir` is a folder whose
    subfolders link to the main one's, except an empty `bdm`; its own copy of the settings."""
    models, settings = bare_models_dir(forge.dir, "bdm-forge-bare")
    server = start_forge(forge.dir, Path("/tmp/bdm-forge-bare.log"),
                         flags=["--models-dir", str(models), "--ui-settings-file", str(settings)], auth=AUTH)
    try:
        yield server
    finally:
        stop_server(server)
