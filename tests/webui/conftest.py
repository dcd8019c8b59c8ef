"""Integration tests against a real AUTOMATIC1111 WebUI (v1.10.x), run when `A1111_DIR` points at one.

The session links this project into `A1111_DIR/extensions/bdm`, writes the synthetic test models into
`A1111_DIR/models/bdm/`, runs the extension's `install.py` through the WebUI's own installer function,
starts the WebUI with the gradio UI on (127.0.0.1, a free port, `--api`, no `--skip-install`) and stops
it at the end. Without `A1111_DIR` every test here is skipped; the core suite never needs a WebUI.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.host_util import (REPO, bare_models_dir, free_port, host_python, host_session, link_extension, mark_suite,
                             stop_server, wait_until_ready)
from tests.host_util import WebUI as HostWebUI

A1111 = os.environ.get("A1111_DIR")
HAVE_WEBUI = bool(A1111) and Path(A1111, "launch.py").is_file()
SKIP_REASON = "A1111_DIR is not set to an AUTOMATIC1111 WebUI folder (integration tests need one)"
LOG = Path(os.environ.get("BDM_WEBUI_LOG", "/tmp/bdm-webui-test.log"))

# The WebUI defaults the layout-sensitive tests rely on (`override_settings` of a key missing from
# config.json is never restored by the WebUI, so they are set explicitly).
DEFAULT_OPTS = {"batch_cond_uncond": True, "pad_cond_uncond": False, "pad_cond_uncond_v0": False,
                "s_min_uncond_all": False, "skip_early_cond": 0.0}


def pytest_collection_modifyitems(config, items):
    mark_suite(items, Path(__file__).parent, pytest.mark.webui, HAVE_WEBUI, SKIP_REASON)


class WebUI(HostWebUI):
    def txt2img(self, **payload):
        self.post("/sdapi/v1/options", DEFAULT_OPTS)
        return super().txt2img(**payload)

    def txt2img_status(self, **payload):
        self.post("/sdapi/v1/options", DEFAULT_OPTS)
        return super().txt2img_status(**payload)


def _make_foreign(a1111: Path) -> str:
    """Tiny SD2 / SDXL / SD1-inpainting checkpoints (bdm-test-*) and the test-support extension, built
    with the WebUI's python (tests/webui/foreign.py); rebuilt only when foreign.py changed."""
    from tests.webui import foreign
    from tests.webui import schedule_probe
    script = Path(foreign.__file__)
    foreign.write_support_extension(a1111)
    schedule_probe.write(a1111)
    outs = [a1111 / "models" / "Stable-diffusion" / f"{n}.safetensors" for n in foreign.NAMES.values()]
    if all(o.is_file() and o.stat().st_mtime >= script.stat().st_mtime for o in outs):
        return "up to date"
    r = subprocess.run([host_python(a1111), str(script), str(a1111)], cwd=a1111, capture_output=True, text=True,
                       timeout=600)
    if r.returncode:
        return f"foreign checkpoints failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout


def prepare_models(a1111: Path) -> dict:
    """Everything the integration suites need inside A1111_DIR (idempotent, once per session)."""
    global _PREPARED
    if _PREPARED is None:
        sys.path.insert(0, str(REPO))
        from tests.webui.models import (TEST_MODEL_2, make_broken_files, make_finetuned_checkpoint, make_test_bdm,
                                        make_test_embedding, make_wrong_file)
        link_extension(a1111)
        make_test_bdm(a1111)
        make_test_bdm(a1111, TEST_MODEL_2, seed=1)
        make_wrong_file(a1111)
        make_broken_files(a1111)
        make_test_embedding(a1111)
        make_finetuned_checkpoint(a1111)
        _PREPARED = {"foreign": _make_foreign(a1111)}
    return _PREPARED


_PREPARED = None


def _controlnet_channels(a1111: Path) -> str:
    """TINY_CONTROLNET_MODEL_CHANNELS for the test-only ControlNet patch: the toy backbone's when the
    toy is exported (its ControlNet matches it), else tiny-sd1's 32."""
    from tests.webui.models import have_toy
    if have_toy(a1111):
        import re
        y = a1111 / "models" / "Stable-diffusion" / "bdm-toy-sd1.yaml"
        m = re.search(r"model_channels:\s*(\d+)", y.read_text(encoding="utf-8")) if y.is_file() else None
        if m:
            return m.group(1)
    return os.environ.get("TINY_CONTROLNET_MODEL_CHANNELS", "32")


def start_server(a1111: Path, flags=(), log_path: Path = LOG, settings_file: Path | None = None,
                 skip_install: bool = False, auth: tuple[str, str] | None = None) -> "WebUI":
    """Start a WebUI on a free port and wait until its API answers. `settings_file`: a private copy of
    config.json (so that a second server never writes the main one)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PORT=str(port), TINY_CONTROLNET_MODEL_CHANNELS=_controlnet_channels(a1111))
    # run.sh's flags minus --skip-install (so install paths are live) and minus --nowebui (gradio UI on);
    # --skip-prepare-environment keeps the WebUI from reinstalling its own requirements offline.
    cmd = [host_python(a1111), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
           "--skip-version-check", "--use-cpu", "all", "--api",
           "--server-name", "127.0.0.1", "--port", str(port),
           "--ckpt", "models/Stable-diffusion/tiny-sd1.safetensors", *flags]
    if "--precision" not in flags:
        cmd += ["--no-half", "--precision", "full"]
    if skip_install:
        cmd.append("--skip-install")
    if settings_file is not None:
        cmd += ["--ui-settings-file", str(settings_file)]
    if auth:
        cmd += ["--api-auth", ":".join(auth)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=a1111, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = WebUI(f"http://127.0.0.1:{port}", a1111, proc, auth)
    server.log = log_path
    server._log_file = log
    server.cmd = cmd
    return wait_until_ready(server, "the WebUI", _ready)


def _ready(server: "WebUI") -> bool:
    """A request that reaches the app before the WebUI has added its API (between gradio's launch and
    `create_api`) makes starlette build the middleware stack, and the WebUI's own `add_middleware` then
    fails ("Cannot add middleware after an application has started"): ask only once the WebUI says it
    has started, then wait for its first checkpoint load."""
    if "Startup time:" not in server.log.read_text(errors="replace"):
        return False
    if server.call("GET", "/sdapi/v1/sd-models", timeout=10)[0] != 200:
        return False
    _wait_for_startup_model(server)
    return True


def _wait_for_startup_model(server: "WebUI") -> None:
    """The WebUI loads its first checkpoint in a thread after its API is up. A checkpoint switch sent
    meanwhile (`sd_model_checkpoint` in /sdapi/v1/options) runs a second load beside it, and the two
    collide in the WebUI's meta-device initialisation ("Cannot copy out of meta tensor"): the switch
    fails and the old checkpoint stays. A one-step generation waits for that first load (it needs the
    model, behind the WebUI's model lock); its own result does not matter (some flags cannot generate
    on a CPU at all)."""
    server.call("POST", "/sdapi/v1/txt2img", dict(BASE, steps=1, batch_size=1), timeout=300)


@pytest.fixture(scope="session")
def webui():
    yield from host_session(A1111 if HAVE_WEBUI else None, SKIP_REASON, prepare_models, start_server, BASE)


AUTH = ("bdm-tester", "secret-pw")


@pytest.fixture(scope="session")
def bare_webui(webui):
    """A second WebUI with `--api-auth` and no BDM model installed: `--models-dir` is a folder whose
    subfolders link to the main one's, except an empty `bdm`."""
    models, settings = bare_models_dir(webui.dir, "bdm-webui-bare")
    server = start_server(webui.dir, ["--models-dir", str(models)], log_path=Path("/tmp/bdm-webui-bare.log"),
                          settings_file=settings, skip_install=True, auth=AUTH)
    try:
        yield server
    finally:
        stop_server(server)


BASE = {"prompt": "", "negative_prompt": "", "width": 64, "height": 64, "steps": 4, "sampler_name": "Euler a",
        "scheduler": "Automatic", "cfg_scale": 7, "seed": 1, "batch_size": 2, "n_iter": 1}
