"""A BDM request that cannot be applied never looks like a result (issue 21 §1), the API is strict (§1),
crafted files and the model route are safe (§4) — in a real WebUI (needs A1111_DIR).

By default the generation stops: the API answers non-200 with the WebUI's error body naming BDM (the
error type `BdmError`, or `ArgsError` for bad arguments), the model, its file (relative to models/bdm)
and what is wrong; the UI shows the same message in its error box (tests/webui/test_webui_browser.py). With the setting "continue
without BDM" the image is made without BDM, with a visible warning and "BDM error" in the parameters.
"""
from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest

from bdm.webui.session import CONTINUE, FAILURE_CHOICES, STOP
from tests.host_util import pixels
from tests.webui.conftest import AUTH, BASE, DEFAULT_OPTS
from tests.webui.models import CRAFTED_MODEL, CRAFTED_VOCAB, TEST_MODEL, TRUNCATED_MODEL, WRONG_MODEL

PROMPT = "红色的圆形，蓝色的背景"


def bdm(args) -> dict:
    return {"alwayson_scripts": {"BDM": {"args": args}}}


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


def extra(r) -> dict:
    return json.loads(r["info"])["extra_generation_params"]


def generate_status(webui, args, **kw):
    webui.post("/sdapi/v1/options", DEFAULT_OPTS)
    return webui.call("POST", "/sdapi/v1/txt2img", dict(BASE, **kw, **bdm(args)))


@contextmanager
def continue_without_bdm(webui):
    webui.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[CONTINUE]})
    try:
        yield
    finally:
        webui.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP]})


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


FAILURES = [
    ("wrong file", [True, WRONG_MODEL, 1.0, PROMPT, ""], 500,
     [f"cannot load the BDM model '{WRONG_MODEL}' (models/bdm/{WRONG_MODEL}.safetensors)",
      "this is a LoRA, not a BDM file"]),
    ("truncated file", [True, TRUNCATED_MODEL, 1.0, PROMPT, ""], 500,
     [f"models/bdm/{TRUNCATED_MODEL}.safetensors: not a readable safetensors file (truncated or corrupt?)"]),
    ("unknown model", [True, "no-such-model", 1.0, PROMPT, ""], 422,
     ["no BDM model 'no-such-model' (installed: ", f"{TEST_MODEL} ["]),
    ("hash mismatch", [True, f"{TEST_MODEL} [0000000000]", 1.0, PROMPT, ""], 422,
     [f"the BDM model '{TEST_MODEL}' installed here has hash", "not 0000000000 as asked"]),
    ("unknown key", [{"promt": PROMPT}], 422,
     ["unknown BDM argument 'promt'; the known ones are: enabled, model, strength, prompt, negative_prompt"]),
    ("strength as a string", [True, TEST_MODEL, "0.5", PROMPT, ""], 422,
     ["BDM argument 'strength' must be a number from 0 to 2 (a JSON number), got '0.5'"]),
    ("strength as a bool", [{"model": TEST_MODEL, "prompt": PROMPT, "strength": True}], 422,
     ["BDM argument 'strength' must be a number from 0 to 2 (a JSON number), got True"]),
    ("enabled as a string", [{"enabled": "yes", "prompt": PROMPT}], 422,
     ["BDM argument 'enabled' must be true or false (a JSON boolean), got 'yes'"]),
]


@pytest.mark.parametrize("case, args, status, parts", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failure_stops_the_generation_with_the_error(webui, case, args, status, parts):
    code, body = generate_status(webui, args)
    assert code == status, (case, code, str(body)[:600])
    body = json.loads(body)
    assert body["error"] == ("ArgsError" if status == 422 and "argument" in parts[0] else "BdmError"), body
    for part in parts:
        assert part in body["errors"], (part, body["errors"])
    assert str(webui.dir) not in body["errors"]  # no absolute server path in what a client sees
    assert webui.alive()
    assert same(webui.txt2img(**BASE), webui.baseline)  # the next plain generation is untouched


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


def test_continue_without_bdm_warns_visibly(webui):
    with continue_without_bdm(webui):
        r = webui.txt2img(**BASE, **bdm([True, WRONG_MODEL, 1.0, PROMPT, ""]))
        code, body = generate_status(webui, [{"promt": PROMPT}])  # a request's own mistake stays an error
    assert same(r, webui.baseline)  # made without BDM …
    error = extra(r)["BDM error"]
    assert "this is a LoRA, not a BDM file" in error  # … and says so in its parameters
    assert "BDM error: " in json.loads(r["info"])["infotexts"][0]
    assert "BDM was not applied: cannot load the BDM model" in webui.log.read_text()
    assert code == 422 and "unknown BDM argument 'promt'" in body


def test_enabled_with_empty_chinese_boxes_only_warns(webui):
    """BDM switched on with both Chinese boxes empty (nothing asked of it): a failure is a warning."""
    r = webui.txt2img(**BASE, **bdm([True, WRONG_MODEL, 1.0, "", ""]))
    assert same(r, webui.baseline) and "this is a LoRA" in extra(r)["BDM error"]


def test_args_as_a_dict_are_not_the_webuis_api(webui):
    """The WebUI copies `args` position by position; a dict there is an error, never ignored."""
    code, body = generate_status(webui, {"enabled": True, "prompt": PROMPT})
    assert code != 200, str(body)[:300]


def test_a_model_from_the_parameters_that_is_not_installed(webui):
    """Pasted parameters (the API's `infotext`) of a model whose file changed: an error, not another model."""
    text = f"a cat\nSteps: 4, Seed: 1, BDM model: {TEST_MODEL}, BDM model hash: 0123456789, BDM prompt: {PROMPT}"
    webui.post("/sdapi/v1/options", DEFAULT_OPTS)
    code, body = webui.call("POST", "/sdapi/v1/txt2img", dict(BASE, infotext=text))
    assert code == 422 and "not 0123456789 as asked" in body, (code, str(body)[:500])


# -- a WebUI with --api-auth and no BDM model installed ---------------------------------------------
def test_models_route_honours_api_auth(bare_webui):
    code, _ = bare_webui.call("GET", "/bdm/models", headers={})
    assert code == 401
    code, _ = bare_webui.call("GET", "/bdm/models", headers={"Authorization": "Basic Ym9ndXM6Ym9ndXM="})
    assert code == 401
    body = bare_webui.get("/bdm/models")  # with the right credentials
    assert body["models"] == [] and body["selected"] is None and body["folders"] == ["models/bdm"]
    assert "/tmp" not in json.dumps(body) and AUTH[1] not in json.dumps(body)


def test_no_model_installed_says_where_to_put_one(bare_webui):
    bare_webui.post("/sdapi/v1/options", DEFAULT_OPTS)
    code, body = bare_webui.call("POST", "/sdapi/v1/txt2img", dict(BASE, **bdm([True, "", 1.0, PROMPT, ""])))
    assert code == 422, (code, str(body)[:500])
    message = json.loads(body)["errors"]
    for part in ("no BDM model is installed: put a BDM .safetensors file into models/bdm",
                 "qihoo360/BDM1.0", "OFA-Sys/chinese-clip-vit-huge-patch14", "python -m bdm.convert"):
        assert part in message, message
    plain = bare_webui.post("/sdapi/v1/txt2img", dict(BASE))  # without BDM the WebUI works as ever
    assert len(plain["images"]) == BASE["batch_size"]
