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
from tests.host_checks import (check_args_dict_refused, check_continue_without_bdm_warns,
                               check_empty_chinese_boxes_only_warn, check_failure_stops_the_generation,
                               check_models_route_auth, check_no_model_installed, failure_cases)
from tests.webui.models import WRONG_MODEL

FAILURES = failure_cases(TOY)


@pytest.mark.parametrize("case, args, status, parts", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failure_stops_the_generation_with_the_error(forge, case, args, status, parts):
    check_failure_stops_the_generation(forge, BASE, args, status, parts)
    assert forge.state()["runs"] == 0


def test_continue_without_bdm_warns_visibly(forge):
    check_continue_without_bdm_warns(forge, BASE, WRONG_MODEL)


def test_enabled_with_empty_chinese_boxes_only_warns(forge):
    check_empty_chinese_boxes_only_warn(forge, BASE, WRONG_MODEL)


def test_args_as_a_dict_are_not_the_webuis_api(forge):
    check_args_dict_refused(forge, BASE)


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
