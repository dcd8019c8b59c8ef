"""X/Y/Z plot axes for BDM: `[BDM] Prompt S/R`, `[BDM] Strength`, `[BDM] Model`.

The WebUI's X/Y/Z script applies an axis value to a copy of `p` before `process_images`; these axes
store it in `p.bdm_xyz` and the BDM script applies it to its arguments in `process` (choosing a BDM
axis enables BDM for the cells). Prompt S/R works like the WebUI's own: the first value is searched in
the Chinese prompt and negative prompt and each value replaces it.
"""
from __future__ import annotations

from dataclasses import replace

from .api_args import BdmArgs, strength_value

PROMPT_SR, STRENGTH, MODEL = "[BDM] Prompt S/R", "[BDM] Strength", "[BDM] Model"
LABELS = (PROMPT_SR, STRENGTH, MODEL)
ATTR = "bdm_xyz"


def store(p, key: str, value) -> None:
    """Record one axis value on the (copied) processing object."""
    values = dict(getattr(p, ATTR, None) or {})
    values[key] = value
    setattr(p, ATTR, values)


def _replace(text, old: str, new: str):
    if isinstance(text, str):
        return text.replace(old, new)
    return tuple(t.replace(old, new) for t in text)


def _contains(text, old: str) -> bool:
    return old in text if isinstance(text, str) else any(old in t for t in text)


def check_prompt_sr(args: BdmArgs, search: str) -> None:
    if not (_contains(args.prompt, search) or _contains(args.negative_prompt, search)):
        raise RuntimeError(f"[BDM] Prompt S/R did not find {search!r} in the Chinese prompt or negative prompt.")


def apply(args: BdmArgs, values: dict | None) -> BdmArgs:
    """`args` with the X/Y/Z values of this cell applied."""
    if not values:
        return args
    out = replace(args, enabled=True)
    if "prompt_sr" in values:
        search, value = values["prompt_sr"]
        check_prompt_sr(out, search)
        out = replace(out, prompt=_replace(out.prompt, search, value),
                      negative_prompt=_replace(out.negative_prompt, search, value))
    if "strength" in values:
        out = replace(out, strength=strength_value(values["strength"]))
    if "model" in values:
        out = replace(out, model=str(values["model"]).strip())
    return out


def axis_options(xyz_grid, model_choices, current_args=None) -> list:
    """The AxisOptions for the WebUI's `xyz_grid` module. `current_args(p)` gives the BDM args of `p`
    (to check Prompt S/R at grid time, like the WebUI's own Prompt S/R)."""

    def apply_prompt_sr(p, x, xs):
        if current_args is not None:
            a = current_args(p)
            if a is not None:
                check_prompt_sr(a, xs[0])
        store(p, "prompt_sr", (xs[0], x))

    def apply_strength(p, x, xs):
        store(p, "strength", x)

    def apply_model(p, x, xs):
        store(p, "model", x)

    def confirm_models(p, xs):
        names = set(model_choices())
        for x in xs:
            if x not in names and x.split(" [")[0] not in names:
                raise RuntimeError(f"[BDM] Model: unknown BDM model {x!r} (available: {', '.join(sorted(names))})")

    A = xyz_grid.AxisOption
    return [A(PROMPT_SR, str, apply_prompt_sr, format_value=xyz_grid.format_value),
            A(STRENGTH, float, apply_strength),
            A(MODEL, str, apply_model, format_value=xyz_grid.format_value, confirm=confirm_models,
              choices=lambda: list(model_choices()), cost=0.5)]


def install(xyz_grid, model_choices, current_args=None) -> None:
    """Add (or replace, after a script reload) the BDM axes in `xyz_grid.axis_options`."""
    options = xyz_grid.axis_options
    options[:] = [o for o in options if getattr(o, "label", None) not in LABELS]
    options.extend(axis_options(xyz_grid, model_choices, current_args))
