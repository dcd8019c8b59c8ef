"""BDM's branch inside Forge's sampling, as one link of Forge's ControlNet chain.

Forge adds ControlNet-like residuals through `UnetPatcher.add_patched_controlnet`: a linked list of
`ControlBase` objects, each asked once per UNet call (`get_control`) for `{'input', 'middle', 'output'}`
residuals. `output[i]` is added to skip connection i when the decoder takes it and `middle` to the
middle block's output: the places `bdm.attach` uses in A1111, so the branch means the same in both hosts.
The branch joins the chain of a clone of each sampling pass's UNet patcher, asks the previous link first
(the built-in ControlNet stays on), and lives in a `ModelPatcher` that `get_models()` hands to Forge's
memory manager: moved to the UNet's device for sampling, offloaded like every other model.

A run that must stop its generation (`BdmRun.error`) puts a link in that raises the error at the first
UNet call: Forge, like A1111, only logs exceptions of scripts and callbacks, but one inside sampling ends
the generation and reaches the user (the UI's error box; the API's error response, with the error's
status code). A pass that runs without the branch ("continue without BDM") gets a link that only passes
the previous links' residuals on, so that the branch is known to be settled for that UNet.
"""
from __future__ import annotations

from backend import memory_management
from backend.patcher.base import ModelPatcher
from backend.patcher.controlnet import ControlBase
from backend.sampling.sampling_function import sampling_prepare

from bdm.webui.layout import chunked_row_roles
from bdm.webui.manager import bridge_refusal, unet_refusal

# Forge's engines (backend/diffusion_engine) other than SD1.x, as users know them.
FAMILIES = {"StableDiffusion2": "SD2.x", "StableDiffusionXL": "SDXL", "StableDiffusionXLRefiner": "an SDXL refiner",
            "StableDiffusion3": "SD3", "Flux": "Flux", "Chroma": "Chroma"}


def diffusion_model(engine):
    """The LDM-layout UNet (`IntegratedUNet2DConditionModel`) of a Forge engine, or None."""
    try:
        return engine.forge_objects.unet.model.diffusion_model
    except AttributeError:
        return None


def refusal(engine) -> str | None:
    """Why BDM cannot run on the loaded Forge model (None: it can)."""
    if engine is None:
        return "no checkpoint is loaded"
    family = None
    if not getattr(engine, "is_sd1", False):
        name = type(engine).__name__
        family = FAMILIES.get(name, f"a {name} model")
    return unet_refusal(diffusion_model(engine), family=family)


class BranchControl(ControlBase):
    """The branch as a control: per UNet call, the rows' Chinese contexts (from the chunk roles Forge
    gives in `transformer_options["cond_or_uncond"]`), the branch on the UNet's own input and
    timesteps, and its residuals scaled by the strength and merged with the previous links'. Without a
    `patcher` (no branch in this pass) it passes the previous links' residuals on, or raises the run's
    error."""

    def __init__(self, run, patcher: ModelPatcher | None):
        super().__init__()
        self.run, self.patcher = run, patcher
        self.strength = run.strength
        self.predictor = None

    def get_control(self, x_noisy, t, cond, batched_number):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number)
        if self.run.error is not None:  # BDM cannot be applied: stop the generation with the error
            raise self.run.error
        if self.patcher is None:
            return previous
        chunks = self.transformer_options.get("cond_or_uncond")
        if chunks is None:  # not Forge's sampler (calc_cond_uncond_batch) calling: rows unknown
            self.run.warn("outside", "BDM: a UNet call without Forge's row roles ran without the branch")
            return previous
        context = self.run.contexts(chunked_row_roles(chunks, x_noisy.shape[0]))
        bridge = self.patcher.model
        weight = next(bridge.parameters())
        x = self.predictor.calculate_input(t, x_noisy)  # what the UNet sees (KModel.apply_model)
        timesteps = self.predictor.timestep(t).float()
        down, middle = bridge(x.to(weight.device, weight.dtype), timesteps.to(weight.device),
                              context.to(weight.device, weight.dtype))
        return self.control_merge(None, [*down, middle], previous, x_noisy.dtype)

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.predictor = model.predictor

    def cleanup(self):
        self.predictor = None
        super().cleanup()

    def get_models(self):
        return super().get_models() + ([self.patcher] if self.patcher is not None else [])

    def copy(self):
        c = BranchControl(self.run, self.patcher)
        self.copy_to(c)
        return c


def has_branch(engine, run) -> bool:
    """Whether the engine's current UNet patcher carries `run`'s link. Forge's refiner switch (inside
    sampling) loads the refiner with a fresh patcher: without the links of BDM and of its own ControlNet."""
    try:
        return any(isinstance(c, BranchControl) and c.run is run for c in engine.forge_objects.unet.list_controlnets())
    except AttributeError:
        return False


# One ModelPatcher per loaded branch (id(bridge) -> (bridge, patcher)), so Forge sees the same model
# every generation ("already loaded") instead of a new one to load.
_patchers: dict[int, tuple[object, ModelPatcher]] = {}


def _patcher(bridge, unet: ModelPatcher) -> ModelPatcher:
    entry = _patchers.get(id(bridge))
    if entry is not None and entry[0] is bridge and entry[1].load_device == unet.load_device \
            and entry[1].offload_device == unet.offload_device:
        return entry[1]
    if entry is not None:
        release(entry[0])
    patcher = ModelPatcher(bridge, load_device=unet.load_device, offload_device=unet.offload_device,
                           current_device=next(bridge.parameters()).device)
    _patchers[id(bridge)] = (bridge, patcher)
    return patcher


def release(bridge) -> None:
    """Take a branch out of Forge's loaded models (moved to its offload device) and forget its patcher."""
    entry = _patchers.pop(id(bridge), None)
    if entry is None:
        return
    loaded = memory_management.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        if loaded[i].model is entry[1]:
            loaded.pop(i).model_unload()


def release_all_but(bridges) -> None:
    """Release every branch that is not in `bridges` (the ones the extension keeps loaded)."""
    keep = {id(b) for b in bridges}
    for bridge, _ in [e for k, e in _patchers.items() if k not in keep]:
        release(bridge)


def join_pass(engine, run, loaded_bridges=()) -> None:
    """Put `run`'s link into the engine's UNet patcher for the coming sampling pass (a clone: call from
    `process_before_every_sampling`, Forge rebuilds `forge_objects` before every pass). A pass whose model
    cannot take the branch goes through `run.pass_refused` (stop, or continue with a warning)."""
    patcher = None
    if run.bridge is not None and run.error is None:
        reason = refusal(engine) or bridge_refusal(run.bridge, diffusion_model(engine))
        if reason:
            run.pass_refused(reason)
        else:
            release_all_but(loaded_bridges)
            unet = engine.forge_objects.unet
            dtype = unet.model.computation_dtype
            if next(run.bridge.parameters()).dtype != dtype:
                run.bridge.to(dtype=dtype)
            patcher = _patcher(run.bridge, unet)
    unet = engine.forge_objects.unet.clone()
    unet.add_patched_controlnet(BranchControl(run, patcher))
    engine.forge_objects.unet = unet


def rejoin(engine, run, x, loaded_bridges=()) -> bool:
    """Join the engine's UNet inside sampling when the link is missing: Forge's refiner switch loads the
    refiner with a fresh patcher, without the links of extensions (its built-in ControlNet's too). The
    link is prepared as Forge prepares a pass (`sampling_prepare`: its models loaded, `pre_run`). Call
    from `on_cfg_denoiser` (after the switch, before the UNet runs). Returns whether it joined."""
    if has_branch(engine, run):
        return False
    join_pass(engine, run, loaded_bridges)
    sampling_prepare(engine.forge_objects.unet, x)
    return True
