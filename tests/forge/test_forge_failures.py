"""A BDM request that cannot be applied never looks like a result, in Forge as in AUTOMATIC1111: the
same checks as tests/webui/test_webui_failures.py (tests/host_checks.py). By default the generation
stops and Forge's API answers non-200 with its error body naming BDM, the model, its file (relative to
models/bdm) and what is wrong; the API arguments are checked strictly; "continue without BDM" makes the
plain image and says why; the model route honours `--api-auth` and discloses no server path. The UI's
error box and warning: tests/forge/test_forge_browser.py."""
from __future__ import annotations

import json

import pytest

from tests.forge.conftest import AUTH, BASE, TOY
from tests.host_checks import check_models_route_auth, check_no_model_installed, failure_checks


@pytest.mark.parametrize("check", failure_checks(TOY))
def test_a_failure_is_an_error_or_a_visible_warning(forge, check):
    check(forge, BASE)
    forge.txt2img(**BASE)  # a generation that failed leaves its run to the next one, which closes it
    assert forge.state()["runs"] == 0


def test_models_route_lists_file_names_not_paths(forge):
    body = forge.get("/bdm/models")
    toy = next(m for m in body["models"] if m["name"] == TOY)
    assert toy["file"] == f"models/bdm/{TOY}.safetensors" and body["folders"] == ["models/bdm"]
    assert str(forge.dir) not in json.dumps(body)


# -- a Forge with --api-auth and no BDM model installed ----------------------------------------------
def test_models_route_honours_api_auth(bare_forge):
    check_models_route_auth(bare_forge, AUTH)


def test_no_model_installed_says_where_to_put_one(bare_forge):
    check_no_model_installed(bare_forge, BASE)
