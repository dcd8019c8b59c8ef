"""An ASGI middleware that lets API clients send the BDM script's arguments as one JSON object.

The WebUI's API copies `alwayson_scripts[title]["args"]` position by position, so only a list works
there. This rewrites, in `/sdapi/v1/txt2img` and `/sdapi/v1/img2img` requests only:
`{"BDM": {"args": {...}}}` and `{"BDM": {...keys...}}` → `{"BDM": {"args": [{...}]}}`, which the
script reads as one object. Every other request passes through untouched.
"""
from __future__ import annotations

import json

from .api_args import ALIASES, ARG_NAMES

PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def rewrite_body(body: bytes, title: str = "BDM") -> bytes:
    """The request body with the BDM args object wrapped in a list (unchanged if nothing to do)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    scripts = data.get("alwayson_scripts") if isinstance(data, dict) else None
    if not isinstance(scripts, dict):
        return body
    changed = False
    for key, value in scripts.items():
        if key.lower() != title.lower() or not isinstance(value, dict):
            continue
        if isinstance(value.get("args"), dict):
            value["args"] = [value["args"]]
            changed = True
        elif "args" not in value and value and all(k in ARG_NAMES or k in ALIASES for k in value):
            scripts[key] = {"args": [dict(value)]}
            changed = True
    return json.dumps(data).encode() if changed else body


class ArgsObjectMiddleware:
    def __init__(self, app, title: str = "BDM"):
        self.app, self.title = app, title

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                not str(scope.get("path", "")).rstrip("/").endswith(PATHS):
            return await self.app(scope, receive, send)
        chunks, more, other = [], True, None
        while more:
            message = await receive()
            if message.get("type") != "http.request":
                other = message
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        new = rewrite_body(body, self.title)
        if new is not body:
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = dict(scope, headers=headers + [(b"content-length", str(len(new)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                if other is not None and not chunks:
                    return other
                return {"type": "http.request", "body": new, "more_body": False}
            return other if other is not None else await receive()

        return await self.app(scope, replay, send)


def install_args_middleware(app, title: str = "BDM") -> None:
    """Add the middleware to a Starlette/FastAPI app, also one that already serves (the WebUI's gradio
    app is started before `on_app_started`): reset and rebuild the stack as the WebUI's own
    `initialize_util.setup_middleware` does."""
    if getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = None
    app.add_middleware(ArgsObjectMiddleware, title=title)
    app.middleware_stack = app.build_middleware_stack()
