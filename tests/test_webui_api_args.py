"""The script's arguments from the UI (positional) and from API clients (one JSON object)."""
from __future__ import annotations

import asyncio
import json

import pytest

from bdm.webui.api_args import ARG_NAMES, ArgsError, BdmArgs, parse_script_args, to_positional
from bdm.webui.asgi import ArgsObjectMiddleware, rewrite_body

OBJ = {"enabled": True, "prompt": "红色的圆形", "negative_prompt": "", "model": "bdm-toy", "strength": 1.0}
WANT = BdmArgs(enabled=True, model="bdm-toy", strength=1.0, prompt="红色的圆形", negative_prompt="")


def test_positional_order_is_the_ui_order():
    assert ARG_NAMES == ("enabled", "model", "strength", "prompt", "negative_prompt")
    assert parse_script_args([True, "bdm-toy", 1.0, "红色的圆形", ""]) == WANT
    assert to_positional(WANT) == [True, "bdm-toy", 1.0, "红色的圆形", ""]


def test_object_forms_give_the_same_args():
    assert parse_script_args(OBJ) == WANT
    assert parse_script_args([OBJ]) == WANT
    # the API fills the remaining positions with the UI defaults: ignored
    assert parse_script_args([OBJ, "None", 1.0, "", ""]) == WANT


def test_omitted_keys_take_defaults():
    a = parse_script_args([{"prompt": "红色的圆形"}])
    assert a == BdmArgs(enabled=True, prompt="红色的圆形")  # an object means "use BDM"
    assert parse_script_args([{"enabled": False, "prompt": "x"}]).enabled is False
    assert parse_script_args([]) == BdmArgs()
    assert parse_script_args([True]) == BdmArgs(enabled=True)
    assert parse_script_args([True, None, None, "红"]) == BdmArgs(enabled=True, prompt="红")


def test_aliases_types_and_lists():
    a = parse_script_args({"cn_prompt": ["红色", "蓝色"], "weight": "0.5", "enabled": "true"})
    assert a.prompt == ("红色", "蓝色") and a.strength == 0.5 and a.enabled
    assert a.prompts(3) == (["红色", "蓝色", "红色"], ["", "", ""])
    assert parse_script_args([1, "m", 2, "x", "y"]).strength == 2.0


@pytest.mark.parametrize("bad, message", [
    ({"promt": "x"}, "unknown argument 'promt'"),
    ({"strength": "strong"}, "must be a number"),
    ({"strength": 5}, "between 0.0 and 2.0"),
    ({"enabled": "maybe"}, "true or false"),
    ({"prompt": 3}, "must be a string"),
    ({"model": 3}, "'model' must be a string"),
])
def test_errors_are_clear(bad, message):
    with pytest.raises(ArgsError, match=message):
        parse_script_args([bad])


def test_body_rewrite():
    body = json.dumps({"prompt": "", "alwayson_scripts": {"BDM": {"args": OBJ}}}).encode()
    assert json.loads(rewrite_body(body))["alwayson_scripts"]["BDM"]["args"] == [OBJ]
    bare = json.dumps({"alwayson_scripts": {"bdm": {"prompt": "红"}}}).encode()
    assert json.loads(rewrite_body(bare))["alwayson_scripts"]["bdm"] == {"args": [{"prompt": "红"}]}
    for unchanged in (json.dumps({"alwayson_scripts": {"BDM": {"args": [True]}}}).encode(),
                      json.dumps({"alwayson_scripts": {"controlnet": {"args": {"x": 1}}}}).encode(),
                      b"not json"):
        assert rewrite_body(unchanged) is unchanged


def test_middleware_rewrites_only_generation_requests():
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen[scope["path"]] = (message["body"], dict(scope["headers"]).get(b"content-length"))

    mw = ArgsObjectMiddleware(app)
    body = json.dumps({"alwayson_scripts": {"BDM": {"args": OBJ}}}).encode()

    async def run(path):
        parts = [body[:10], body[10:]]

        async def receive():
            chunk = parts.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
        scope = {"type": "http", "method": "POST", "path": path,
                 "headers": [(b"content-length", str(len(body)).encode())]}
        await mw(scope, receive, None)

    asyncio.run(run("/sdapi/v1/txt2img"))
    new, length = seen["/sdapi/v1/txt2img"]
    assert json.loads(new)["alwayson_scripts"]["BDM"]["args"] == [OBJ] and int(length) == len(new)
    asyncio.run(run("/sdapi/v1/options"))
    assert seen["/sdapi/v1/options"][0] == body[:10]  # passed through untouched (first chunk)
