"""The WebUI extension's logic that needs no WebUI: batch-row mapping, Chinese context bank and cache,
infotext fields, model discovery, API-args parsing, and the per-generation hooking of the branch.

Nothing here imports the WebUI (`modules.*`) or gradio, so CI tests all of it; `scripts/bdm_script.py`
only wires it into the WebUI's callbacks.
"""
from .api_args import ARG_NAMES, BdmArgs, ArgsError, parse_script_args
from .context import ContextBank, EncodingCache
from .hooking import BdmRun, BdmRunError
from .infotext import FIELDS, infotext_params, params_to_args
from .layout import CallRows, RowRole, cond_counts, row_roles
from .models import ModelEntry, discover_models, find_model

__all__ = ["ARG_NAMES", "ArgsError", "BdmArgs", "BdmRun", "BdmRunError", "CallRows", "ContextBank",
           "EncodingCache", "FIELDS", "ModelEntry", "RowRole", "cond_counts", "discover_models", "find_model",
           "infotext_params", "params_to_args", "parse_script_args", "row_roles"]
