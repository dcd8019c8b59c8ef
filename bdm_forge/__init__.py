"""Forge-only glue of the BDM extension, imported by `scripts/bdm_script.py` when it runs inside Stable
Diffusion WebUI Forge (its `backend` rewrite, 2024-08 on); AUTOMATIC1111 never imports it.

- `branch`: the branch as a link of Forge's ControlNet chain, under Forge's memory management (also
  after a refiner switch), the link that stops a generation BDM cannot serve, and the SD1.x check of
  Forge's model families;
- `toy_family`: the toy world's model family for Forge's checkpoint detection.
Everything that needs no Forge stays in `bdm/webui/` and is shared with the A1111 path.
"""
import importlib.util

if importlib.util.find_spec("backend.patcher.controlnet") is None:
    raise ImportError("BDM: this Forge has no `backend/` (the 2024-08 rewrite); BDM supports Forge from that "
                      "version on: update Forge (git pull), or use AUTOMATIC1111")

from .branch import diffusion_model, join_pass, refusal, rejoin, release  # noqa: E402
from .toy_family import register as register_toy_family  # noqa: E402

__all__ = ["diffusion_model", "join_pass", "refusal", "register_toy_family", "rejoin", "release"]
