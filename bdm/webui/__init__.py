"""The WebUI extension's logic that needs no WebUI: the session of runs and models, batch-row mapping,
Chinese context bank and cache, infotext fields, model discovery, API-args parsing, the per-generation
hooking of the branch, and the token counter.

Nothing here imports the WebUI (`modules.*`) or gradio, so CI tests all of it; `scripts/bdm_script.py`
only wires it into the WebUI's callbacks.
"""
from .api_args import ARG_NAMES, ArgsError, BdmArgs, parse_script_args
from .context import ContextBank, EncodingCache
from .errors import BdmError
from .hooking import BdmRun
from .infotext import FIELDS, infotext_params, params_to_args
from .layout import CallRows, RowRole, cfg_rows, cond_counts, row_roles
from .models import ModelEntry, discover_models, find_model, pick_model
from .session import Session, Settings

__all__ = ["ARG_NAMES", "ArgsError", "BdmArgs", "BdmError", "BdmRun", "CallRows", "ContextBank", "EncodingCache",
           "FIELDS", "ModelEntry", "RowRole", "Session", "Settings", "cfg_rows", "cond_counts", "discover_models",
           "find_model", "infotext_params", "params_to_args", "parse_script_args", "pick_model", "row_roles"]
