"""A BDM request that cannot be applied never looks like a result (issue 21 §1), the API is strict (§1),
crafted files and the model route are safe (§4) — in a real WebUI (needs A1111_DIR).

By default the generation stops: the API answers non-200 with the WebUI's error body naming BDM (the
error type `BdmError`, or `ArgsError` for bad arguments), the model, its file (relative to models/bdm)
and what is wrong; the UI shows the same message in its error box (tests/webui/test_webui_browser.py).
With the setting "continue without BDM" the image is made without BDM, with a visible warning and "BDM
error" in the parameters. The checks shared with the Forge suite are in tests/host_checks.py.
"""
from __future__ import annotations

import json

import pytest

from tests.host_checks import PROMPT, bdm, check_models_route_auth, check_no_model_installed, failure_checks
from tests.webui.conftest import AUTH, BASE, DEFAULT_OPTS
from tests.webui.models import CRAFTED_MODEL, CRAFTED_VOCAB, TEST_MODEL


def generate_status(webui, args, **kw):
    return webui.txt2img_status(**dict(BASE, **kw, **bdm(args)))


def vm_peak_kb(webui, field="VmHWM") -> int:
    """Peak resident memory of the WebUI's process tree (the launcher starts webui.py as a child)."""
    import subprocess
    pids = [str(webui.proc.pid)] + subprocess.run(["pgrep", "-P", str(webui.proc.pid)], capture_output=True,
                                                   text=True).stdout.split()
    peak = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith(field + ":"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return peak


def test_a_crafted_config_is_refused_before_anything_is_allocated(webui):
    """A 2.4 MB BDM file whose text-encoder config claims a vocabulary of 8,000,000 (2 GB of embeddings
    if built): the config is checked against the file's tensors first; the server's peak memory stays."""
    before = vm_peak_kb(webui)
    code, body = generate_status(webui, [True, CRAFTED_MODEL, 1.0, PROMPT, ""])
    grown_mb = (vm_peak_kb(webui) - before) / 1024
    assert code == 500, (code, str(body)[:500])
    message = json.loads(body)["errors"]
    assert (f"models/bdm/{CRAFTED_MODEL}.safetensors: text_encoder_config['vocab_size'] is {CRAFTED_VOCAB}, but the "
            "file's tensor 'text_encoder.embeddings.word_embeddings.weight' gives 21128") in message, message
    assert grown_mb < 300, f"the WebUI's peak memory grew by {grown_mb:.0f} MB"
    assert webui.alive()


@pytest.mark.parametrize("check", failure_checks(TEST_MODEL))
def test_a_failure_is_an_error_or_a_visible_warning(webui, check):
    check(webui, BASE)


def test_a_model_from_the_parameters_that_is_not_installed(webui):
    """Pasted parameters (the API's `infotext`) of a model whose file changed: an error, not another model."""
    text = f"a cat\nSteps: 4, Seed: 1, BDM model: {TEST_MODEL}, BDM model hash: 0123456789, BDM prompt: {PROMPT}"
    webui.post("/sdapi/v1/options", DEFAULT_OPTS)
    code, body = webui.call("POST", "/sdapi/v1/txt2img", dict(BASE, infotext=text))
    assert code == 422 and "not 0123456789 as asked" in body, (code, str(body)[:500])


# -- a WebUI with --api-auth and no BDM model installed ---------------------------------------------
def test_models_route_honours_api_auth(bare_webui):
    check_models_route_auth(bare_webui, AUTH)


def test_no_model_installed_says_where_to_put_one(bare_webui):
    check_no_model_installed(bare_webui, BASE)
