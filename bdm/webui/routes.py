"""The extension's HTTP route, placed beside the WebUI's own API and protected like it.

The WebUI registers `/sdapi/v1/*` with `dependencies=[Depends(api.auth)]` when started with
`--api-auth`; the extension reuses exactly those dependencies (read from one of the WebUI's routes)
instead of checking credentials itself, and adds no route when the WebUI's API is off.
"""
from __future__ import annotations

from typing import Sequence

from .models import ModelEntry

API_PROBE = "/sdapi/v1/sd-models"  # a route every WebUI API (A1111, Forge) has


def api_dependencies(app) -> list | None:
    """The dependencies (authentication) of the WebUI's API routes on `app`; None without an API."""
    for route in getattr(app, "routes", []):
        if getattr(route, "path", None) == API_PROBE:
            return list(getattr(route, "dependencies", []) or [])
    return None


def models_listing(entries: Sequence[ModelEntry], default_setting: str, selected: str | None,
                   folders: Sequence[str]) -> dict:
    """The body of `GET /bdm/models`: names, hashes and file names relative to the models folders, never
    an absolute path of the server."""
    return {"models": [{"name": e.name, "title": e.title, "hash": e.hash, "file": e.where, "kind": e.kind,
                        "chinese_clip": e.chinese_clip is not None} for e in entries],
            "default": default_setting, "selected": selected, "folders": list(folders)}
