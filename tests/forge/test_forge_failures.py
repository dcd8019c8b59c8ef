"""A BDM request that cannot be applied never looks like a result, in Forge as in AUTOMATIC1111
(tests/webui/test_webui_failures.py): by default the generation stops and Forge's API answers non-200
with its error body naming BDM, the model, its file (relative to models/bdm) and what is wrong; the API
arguments are checked strictly; "continue without BDM" makes the plain image and says why; the model
route honours `--api-auth` and discloses no server path. The UI's error box and warning:
tests/forge/test_forge_browser.py."""
from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from bdm.webui.session import CONTINUE, FAILURE_CHOICES, STOP
from tests.forge.conftest import AUTH, BASE, TOY
from tests.host_util import bdm_error, same
from tests.webui.models import CRAFTED_MODEL, CRAFTED_VOCAB, TRUNCATED_MODEL, WRONG_MODEL

PROMPT = "红色的圆形"
MESSAGE = "message"  # Forge's API error body: {"error": type, "detail", "body", "message"} (A1111: "errors")


def bdm(args) -> dict:
    return {"alwayson_scripts": {"BDM": {"args": args}}}


@contextmanager
def continue_without_bdm(forge):
    forge.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[CONTINUE]})
    try:
        yield
    finally:
        forge.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP]})


FAILURES = [
    ("wrong file", [True, WRONG_MODEL, 1.0, PROMPT, ""], 500,
     [f"cannot load the BDM model '{WRONG_MODEL}' (models/bdm/{WRONG_MODEL}.safetensors)",
      "this is a LoRA, not a BDM file"]),
    ("truncated file", [True, TRUNCATED_MODEL, 1.0, PROMPT, ""], 500,
     [f"models/bdm/{TRUNCATED_MODEL}.safetensors: not a readable safetensors file (truncated or corrupt?)"]),
    ("crafted config", [True, CRAFTED_MODEL, 1.0, PROMPT, ""], 500,
     [f"models/bdm/{CRAFTED_MODEL}.safetensors: text_encoder_config['vocab_size'] is {CRAFTED_VOCAB}, but the "
      "file's tensor 'text_encoder.embeddings.word_embeddings.weight' gives 21128"]),
    ("unknown model", [True, "no-such-model", 1.0, PROMPT, ""], 422,
     ["no BDM model 'no-such-model' (installed: ", f"{TOY} ["]),
    ("hash mismatch", [True, f"{TOY} [0000000000]", 1.0, PROMPT, ""], 422,
     [f"the BDM model '{TOY}' installed here has hash", "not 0000000000 as asked"]),
    ("AND in the Chinese prompt", [True, TOY, 1.0, f"{PROMPT} AND 蓝色的背景", ""], 422, ["AND"]),
    ("unknown key", [{"promt": PROMPT}], 422,
     ["unknown BDM argument 'promt'; the known ones are: enabled, model, strength, prompt, negative_prompt"]),
    ("strength as a string", [True, TOY, "0.5", PROMPT, ""], 422,
     ["BDM argument 'strength' must be a number from 0 to 2 (a JSON number), got '0.5'"]),
    ("strength as a bool", [{"model": TOY, "prompt": PROMPT, "strength": True}], 422,
     ["BDM argument 'strength' must be a number from 0 to 2 (a JSON number), got True"]),
    ("enabled as a string", [{"enabled": "yes", "prompt": PROMPT}], 422,
     ["BDM argument 'enabled' must be true or false (a JSON boolean), got 'yes'"]),
]


@pytest.mark.parametrize("case, args, status, parts", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failure_stops_the_generation_with_the_error(forge, case, args, status, parts):
    code, body = forge.call("POST", "/sdapi/v1/txt2img", dict(BASE, **bdm(args)))
    assert code == status, (case, code, str(body)[:600])
    body = json.loads(body)
    assert body["error"] == ("ArgsError" if "argument" in parts[0] else "BdmError"), body
    for part in parts:
        assert part in body[MESSAGE], (part, body)
    assert str(forge.dir) not in body[MESSAGE]  # no absolute server path in what a client sees
    assert forge.alive()
    assert same(forge.txt2img(**BASE), forge.baseline)  # the next plain generation is untouched
    assert forge.state()["runs"] == 0


def test_continue_without_bdm_warns_visibly(forge):
    with continue_without_bdm(forge):
        r = forge.txt2img(**BASE, **bdm([True, WRONG_MODEL, 1.0, PROMPT, ""]))
        code, body = forge.call("POST", "/sdapi/v1/txt2img", dict(BASE, **bdm([{"promt": PROMPT}])))
    assert same(r, forge.baseline)  # made without BDM …
    assert "this is a LoRA, not a BDM file" in bdm_error(r)  # … and says so in its parameters
    assert "BDM error: " in json.loads(r["info"])["infotexts"][0]
    assert "BDM was not applied: cannot load the BDM model" in forge.log.read_text()
    assert code == 422 and "unknown BDM argument 'promt'" in body  # a request's own mistake stays an error


def test_enabled_with_empty_chinese_boxes_only_warns(forge):
    """BDM switched on with both Chinese boxes empty (nothing asked of it): a failure is a warning."""
    r = forge.txt2img(**BASE, **bdm([True, WRONG_MODEL, 1.0, "", ""]))
    assert same(r, forge.baseline) and "this is a LoRA" in bdm_error(r)


def test_args_as_a_dict_are_not_the_webuis_api(forge):
    """Forge copies `args` position by position, as A1111 does; a dict there is an error, never ignored."""
    code, body = forge.call("POST", "/sdapi/v1/txt2img", dict(BASE, alwayson_scripts={"BDM": {"args": {
        "enabled": True, "prompt": PROMPT}}}))
    assert code != 200, str(body)[:300]


# -- a Forge with --api-auth and no BDM model installed ----------------------------------------------
def test_models_route_honours_api_auth(bare_forge):
    code, _ = bare_forge.call("GET", "/bdm/models", headers={})
    assert code == 401
    code, _ = bare_forge.call("GET", "/bdm/models", headers={"Authorization": "Basic Ym9ndXM6Ym9ndXM="})
    assert code == 401
    body = bare_forge.get("/bdm/models")  # with the right credentials
    assert body["models"] == [] and body["selected"] is None and body["folders"] == ["models/bdm"]
    assert "/tmp" not in json.dumps(body) and AUTH[1] not in json.dumps(body)


def test_models_route_lists_file_names_not_paths(forge):
    body = forge.get("/bdm/models")
    toy = next(m for m in body["models"] if m["name"] == TOY)
    assert toy["file"] == f"models/bdm/{TOY}.safetensors" and body["folders"] == ["models/bdm"]
    assert str(forge.dir) not in json.dumps(body)


def test_no_model_installed_says_where_to_put_one(bare_forge):
    code, body = bare_forge.call("POST", "/sdapi/v1/txt2img", dict(BASE, **bdm([True, "", 1.0, PROMPT, ""])))
    assert code == 422, (code, str(body)[:500])
    message = json.loads(body)[MESSAGE]
    for part in ("no BDM model is installed: put a BDM .safetensors file into models/bdm",
                 "qihoo360/BDM1.0", "OFA-Sys/chinese-clip-vit-huge-patch14", "python -m bdm.convert"):
        assert part in message, message
    plain = bare_forge.post("/sdapi/v1/txt2img", dict(BASE))  # without BDM Forge works as ever
    assert len(plain["images"]) == BASE["batch_size"]
