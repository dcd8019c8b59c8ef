"""BDM for the AUTOMATIC1111 WebUI and for Forge: a Chinese prompt beside the English one.

Thin wiring only: everything that needs no WebUI lives in `bdm/webui/` (row mapping, context bank,
infotext, model discovery, API args, hooking). This file builds the UI, reads settings, and connects
the WebUI's callbacks to a `bdm.webui.BdmRun` per generation. The host is detected at import: in
AUTOMATIC1111 the branch is hooked into the ldm UNet (`bdm.attach`, rows from `on_cfg_denoiser`); in
Forge it joins Forge's ControlNet chain before every sampling pass (`bdm_forge/`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import traceback

# The extension root (this repository) holds the `bdm` package beside `scripts/`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402

from modules import devices, paths, script_callbacks, scripts, shared  # noqa: E402

FORGE = importlib.util.find_spec("modules_forge") is not None  # Stable Diffusion WebUI Forge
if FORGE:
    import bdm_forge  # noqa: E402

from bdm.webui import debug as bdm_debug  # noqa: E402
from bdm.webui import infotext as bdm_infotext  # noqa: E402
from bdm.webui import xyz as bdm_xyz  # noqa: E402
from bdm.webui.api_args import ArgsError, parse_script_args  # noqa: E402
from bdm.webui.context import ContextBank, EncodingCache  # noqa: E402
from bdm.webui.hooking import BdmRun  # noqa: E402
from bdm.webui.layout import cond_counts  # noqa: E402
from bdm.webui.manager import BdmModelError, ModelManager, bridge_refusal, unet_refusal  # noqa: E402
from bdm.webui.models import discover_models, find_model  # noqa: E402
from bdm.text.prompt_schedule import PromptSyntaxError, schedule_prompts  # noqa: E402

try:  # v1.7+
    from modules.ui_components import InputAccordion
except ImportError:  # v1.6
    InputAccordion = None

TITLE = "BDM"
NONE = "None"
HINT = ("英文提示词可以留空（论文的默认做法），也可以只写 LoRA 触发词和风格词；内容写在中文提示词里。<br>"
        "The English prompts may stay empty (the paper's default) or carry LoRA trigger words and style "
        "words; the content goes into the Chinese prompt.")
ON_ERROR = ("Continue without BDM / 不用 BDM 继续", "Stop the generation / 停止生成")


def log(message: str) -> None:
    print(message if message.startswith("BDM") else f"BDM: {message}", flush=True)


# -- state shared by the txt2img and img2img scripts -------------------------------------------------
_cache = EncodingCache(64)
_manager = ModelManager(1)
_runs: dict[int, tuple[object, BdmRun]] = {}  # id(p) -> (p, run)
_entries: list = []
_debug = bdm_debug.Faults() if bdm_debug.enabled() else None  # test-only (BDM_WEBUI_DEBUG=1)


def opt(name, default):
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


def model_dirs() -> list[str]:
    dirs = [os.path.join(paths.models_path, "bdm")]
    extra = getattr(shared.cmd_opts, "bdm_models_path", None)
    if extra:
        dirs.append(extra)
    return dirs


def hasher(path):
    """The WebUI's own sha256 cache (cache.json) where it can be used; short hash like checkpoints."""
    try:
        from modules import hashes
        full = hashes.sha256(str(path), f"bdm/{os.path.basename(str(path))}")
        return full[:10] if full else None
    except Exception:  # noqa: BLE001
        from bdm.webui.models import cached_short_hash
        return cached_short_hash(path)


def refresh_models() -> list:
    global _entries
    _entries = discover_models(model_dirs(), hasher, opt("bdm_chinese_clip_path", "") or None)
    return _entries


def model_titles() -> list[str]:
    return [NONE] + [e.title for e in (_entries or refresh_models())]


def attach_run(run, unet) -> None:
    if _debug is not None and not (run.attached and run.attachment.unet is unet):
        _debug.note_attach(unet)
    run.ensure_attached(unet)


def close_all_runs() -> None:
    for _, run in list(_runs.values()):
        run.close()


def settings_value_title(value):
    if not value or value == NONE:
        return NONE
    try:
        entry = find_model(value, _entries or refresh_models())
    except LookupError:
        return NONE
    return entry.title if entry else NONE


def chinese_schedules(p, positive, negative):
    """The Chinese prompts' schedules (prompt editing, alternation) for the first pass and, with hires
    fix, the second: the WebUI's own parser with the step counts it uses for the English prompt
    (`StableDiffusionProcessing.setup_conds`, `StableDiffusionProcessingTxt2Img.calculate_hr_conds`)."""
    from modules import prompt_parser, sd_samplers

    def total_steps(sampler_name, steps):
        config = sd_samplers.find_sampler_config(sampler_name)
        return config.total_steps(steps) if config else steps

    old = bool(opt("use_old_scheduling", False))
    steps = total_steps(p.sampler_name, p.steps)
    first = schedule_prompts(positive, negative, steps, None, old, parser=prompt_parser)
    hires = None
    if getattr(p, "enable_hr", False):
        hires_steps = total_steps(p.hr_sampler_name or p.sampler_name, p.hr_second_pass_steps or p.steps)
        hires = schedule_prompts(positive, negative, steps, hires_steps, old, parser=prompt_parser)
    if old and first != schedule_prompts(positive, negative, steps, None, False, parser=prompt_parser):
        p.extra_generation_params["Old prompt editing timelines"] = True  # as the WebUI marks English ones
    return first, hires


# -- token counter -----------------------------------------------------------------------------------
class _TokenCounter:
    """Counts like `ChineseTextEncoder.token_count` with the tokenizer only (no model needed)."""

    def __init__(self):
        from bdm.text.chinese import DEFAULT_MAX_CHUNKS, ChineseTextEncoder
        from bdm.text.tokenizer import BertChineseTokenizer
        self.tokenizer = BertChineseTokenizer()
        self.max_chunks = DEFAULT_MAX_CHUNKS
        self._count = ChineseTextEncoder.token_count
        self.prompt_chunks = ChineseTextEncoder.prompt_chunks.__get__(self)

    def __call__(self, text: str) -> str:
        used, capacity = self._count(self, text or "")
        style = " class='bdm-over'" if used > capacity else ""
        return f"<span class='gr-box gr-text-input'{style}>{used}/{capacity}</span>"


_counter = None


def count_tokens(text: str) -> str:
    global _counter
    try:
        if _counter is None:
            _counter = _TokenCounter()
        return _counter(text)
    except Exception as e:  # noqa: BLE001
        return f"<span title='{e}'>?</span>"


# -- the Script --------------------------------------------------------------------------------------
class BdmScript(scripts.Script):
    sorting_priority = 15

    def __init__(self):
        super().__init__()
        self.cn_prompt = None
        self.cn_negative = None

    def title(self):
        return TITLE

    def show(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        self.on_after_component(lambda c: self._make_box(tab, negative=False), elem_id=f"{tab}_prompt")
        self.on_after_component(lambda c: self._make_box(tab, negative=True), elem_id=f"{tab}_neg_prompt")
        return scripts.AlwaysVisible

    def _make_box(self, tab: str, negative: bool):
        kind = "neg_prompt" if negative else "prompt"
        what = ("中文反向提示词 / Chinese negative prompt" if negative else "中文提示词 / Chinese prompt")
        with gr.Column(elem_id=f"bdm_{tab}_cn_{kind}_container", elem_classes=["bdm-cn-container"]):
            box = gr.Textbox(label=what, show_label=False, lines=2, elem_id=f"bdm_{tab}_cn_{kind}",
                             elem_classes=["prompt", "bdm-cn-prompt"],
                             placeholder=f"{what}\n(Ctrl+Enter 生成 / to generate; 需启用下方 BDM · enable BDM below)")
            counter = gr.HTML(value="<span>0/50</span>", elem_id=f"bdm_{tab}_cn_{kind}_token_counter",
                              elem_classes=["token-counter", "bdm-token-counter"])
            button = gr.Button(visible=False, elem_id=f"bdm_{tab}_cn_{kind}_token_button")
            button.click(fn=count_tokens, inputs=[box], outputs=[counter], show_progress=False)
        if negative:
            self.cn_negative = box
        else:
            self.cn_prompt = box

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        label = "BDM 中文桥接 / Chinese bridge (BDM)"
        if InputAccordion is not None:
            with InputAccordion(False, label=label, elem_id=f"bdm_{tab}_enabled") as enabled:
                model, strength = self._controls(tab)
        else:
            with gr.Accordion(label, open=False):
                enabled = gr.Checkbox(False, label="启用 / Enable", elem_id=f"bdm_{tab}_enabled")
                model, strength = self._controls(tab)
        if self.cn_prompt is None or self.cn_negative is None:  # top-row hook did not run: boxes here
            with gr.Group():
                self._make_box(tab, negative=False)
                self._make_box(tab, negative=True)
        prompt, negative = self.cn_prompt, self.cn_negative

        def paste_model(d):
            if bdm_infotext.PROMPT not in d and bdm_infotext.MODEL not in d:
                return gr.update()
            return settings_value_title(bdm_infotext.model_query(d))

        def paste_text(key):
            return lambda d: d.get(key, "") if (bdm_infotext.PROMPT in d or bdm_infotext.MODEL in d) else gr.update()

        self.infotext_fields = [
            (enabled, lambda d: bdm_infotext.PROMPT in d or bdm_infotext.MODEL in d),
            (model, paste_model),
            (strength, bdm_infotext.STRENGTH),
            (prompt, paste_text(bdm_infotext.PROMPT)),
            (negative, paste_text(bdm_infotext.NEGATIVE)),
        ]
        self.paste_field_names = list(bdm_infotext.FIELDS)
        return [enabled, model, strength, prompt, negative]

    def _controls(self, tab):
        gr.HTML(f"<div class='bdm-hint'>{HINT}</div>")
        with gr.Row():
            default = settings_value_title(opt("bdm_default_model", NONE))
            model = gr.Dropdown(label="BDM 模型 / BDM model", choices=model_titles(), value=default,
                                elem_id=f"bdm_{tab}_model")
            try:
                from modules.ui_common import create_refresh_button
                create_refresh_button(model, refresh_models, lambda: {"choices": model_titles()},
                                      f"bdm_{tab}_model_refresh")
            except Exception:  # noqa: BLE001
                pass
        strength = gr.Slider(0.0, 2.0, value=float(opt("bdm_default_strength", 1.0)), step=0.05,
                             label="强度 / Strength", elem_id=f"bdm_{tab}_strength")
        return model, strength

    # -- generation ------------------------------------------------------------------------------
    def before_process(self, p, *args):
        if _debug is not None and _debug.bdm_first:  # test-only: hook before ControlNet's `process`
            self.process(p, *args)
            entry = _runs.get(id(p))
            if entry is not None and entry[1].bridge is not None and self._refusal(shared.sd_model) is None:
                attach_run(entry[1], shared.sd_model.model.diffusion_model)
            p._bdm_started = True

    def process(self, p, *args):
        if getattr(p, "_bdm_started", False):
            p._bdm_started = False
            return None
        # The WebUI runs one generation at a time: a run still here belongs to a generation that failed
        # (exception, no postprocess). Remove its hooks and forget it (it holds that generation's `p`).
        close_all_runs()
        _runs.clear()
        try:
            a = bdm_xyz.apply(parse_script_args(args), getattr(p, bdm_xyz.ATTR, None))
        except (ArgsError, RuntimeError) as e:
            return self._fail(p, str(e))
        if not a.enabled or a.strength == 0:
            return None
        try:
            run = self._start(p, a)
        except BdmModelError as e:
            return self._fail(p, str(e))
        except PromptSyntaxError as e:
            return self._fail(p, f"BDM: {e}")
        except Exception as e:  # noqa: BLE001 - never break the WebUI
            traceback.print_exc()
            return self._fail(p, f"BDM: {type(e).__name__}: {e}")
        if run is not None:
            if _debug is not None:
                _debug.install(run, lambda: getattr(getattr(shared.sd_model, "model", None), "diffusion_model", None),
                               shared.state.interrupt, shared.state.skip)
            _runs[id(p)] = (p, run)
        return None

    def _start(self, p, a):
        sd_model = p.sd_model or shared.sd_model
        refusal = self._refusal(sd_model)
        if refusal:
            raise BdmModelError(f"BDM: not applied: {refusal}")
        query = a.model if a.model and a.model != NONE else opt("bdm_default_model", NONE)
        try:
            entry = find_model(query, refresh_models())
        except LookupError as e:
            raise BdmModelError(str(e)) from None
        if entry is None:
            raise BdmModelError("BDM: enabled but no BDM model is selected (choose one, or set a default "
                                "in Settings → BDM)")
        _manager.resize(int(opt("bdm_models_in_memory", 1)))
        bridge = _manager.load(entry)
        refusal = bridge_refusal(bridge, host_unet(sd_model))
        if refusal:
            raise BdmModelError(f"BDM: model '{entry.name}' does not fit the loaded checkpoint: {refusal}")
        if not FORGE:  # Forge moves and casts the branch itself (bdm_forge.add_branch)
            bridge.to(devices.device, devices.dtype_unet)
        encoder = bridge.text_encoder
        if not opt("bdm_encoder_on_cpu", True):
            encoder.to(devices.device)
        elif encoder.device.type != "cpu":
            encoder.to("cpu")
        _cache.resize(int(opt("bdm_cache_size", 64)))
        n = max(1, len(getattr(p, "all_prompts", None) or [""]))
        positive, negative = a.prompts(n)
        first, hires = chinese_schedules(p, positive, negative)
        bank = ContextBank(encoder, first.all() + (hires.all() if hires else []), _cache,
                           model_key=f"{entry.path}|{entry.hash}", device=devices.device, dtype=devices.dtype_unet)
        run = BdmRun(bridge, bank, first.positive, first.negative, a.strength, log=log,
                     hires=(hires.positive, hires.negative) if hires else None)
        run.entry = entry
        p.extra_generation_params.update(bdm_infotext.infotext_params(
            entry.name, entry.hash, positive, negative, a.strength))
        log(f"BDM: {entry.title}, strength {a.strength}, {len(bank.prompts)} Chinese prompt(s), "
            f"{bank.chunks} chunk(s)")
        return run

    @staticmethod
    def _refusal(sd_model):
        if FORGE:
            return bdm_forge.refusal(sd_model)
        try:
            from modules import sd_unet
            custom = getattr(sd_unet, "current_unet", None) is not None
        except Exception:  # noqa: BLE001
            custom = False
        return unet_refusal(getattr(getattr(sd_model, "model", None), "diffusion_model", None),
                            is_sdxl=getattr(sd_model, "is_sdxl", False), is_sd2=getattr(sd_model, "is_sd2", False),
                            is_sd3=getattr(sd_model, "is_sd3", False), custom_unet=custom)

    def _fail(self, p, message):
        log(message)
        p.comment(message)
        p.extra_generation_params["BDM error"] = message
        if opt("bdm_on_error", ON_ERROR[0]) == ON_ERROR[1]:
            _runs[id(p)] = (p, BdmRun(None, None, [], [], log=log, error=message))
        return None

    def process_before_every_sampling(self, p, *args, **kwargs):
        entry = _runs.get(id(p))
        if FORGE and entry is not None:
            self._forge_pass(p, entry[1])
            return
        if entry is None or entry[1].bridge is None:
            return
        if self._refusal(shared.sd_model) is None:
            attach_run(entry[1], shared.sd_model.model.diffusion_model)

    def _forge_pass(self, p, run):
        """Forge: the branch into this sampling pass (its own errors are caught here, where Forge would
        only log them, so that the user sees them like every other BDM error)."""
        run.image_offset = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
        try:
            reason = bdm_forge.add_branch(p, run, _manager.bridges())
        except Exception as e:  # noqa: BLE001 - never break the WebUI
            traceback.print_exc()
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return
        message = f"BDM: not applied to this pass: {reason}"
        if run.error is None and message not in p.extra_generation_params.get("BDM error", ""):
            self._fail(p, message)
            if opt("bdm_on_error", ON_ERROR[0]) == ON_ERROR[1]:  # stop: a link that raises in sampling
                bdm_forge.add_branch(p, _runs[id(p)][1])

    def postprocess(self, p, processed, *args):
        entry = _runs.pop(id(p), None)
        if entry is None:
            return
        run = entry[1]
        run.close()
        if run.bridge is not None:
            if run.unet_calls == 0:
                log("BDM: warning: the branch never ran in this generation")
            if opt("bdm_offload", False) or getattr(shared.cmd_opts, "lowvram", False) or \
                    getattr(shared.cmd_opts, "medvram", False):
                if FORGE:
                    bdm_forge.release(run.bridge)  # through Forge's memory manager
                else:
                    run.bridge.to("cpu")
                run.bridge.text_encoder.to("cpu")


# -- global callbacks --------------------------------------------------------------------------------
def on_cfg_denoiser(params):
    d = getattr(params, "denoiser", None)
    entry = _runs.get(id(getattr(d, "p", None))) if d is not None else None
    if entry is None or entry[0] is not d.p:
        return
    p, run = entry
    if run.bridge is None:  # "stop the generation" mode: raise from inside sampling
        run.hook_inner(d.inner_model)
        return
    sd_model = shared.sd_model
    refusal = BdmScript._refusal(sd_model)
    if refusal or bridge_refusal(run.bridge, sd_model.model.diffusion_model):
        run._warn("refused", f"BDM: not applied to this pass: {refusal or 'the branch does not fit this UNet'}")
        run.detach_unet()
        return
    attach_run(run, sd_model.model.diffusion_model)
    n_cond = int(params.text_cond.shape[0])
    batch = int(params.text_uncond.shape[0])
    cond = getattr(d.sampler, "sampler_extra_args", {}).get("cond")
    try:
        counts = cond_counts(getattr(cond, "batch", None), n_cond, batch)
    except ValueError as e:
        run._warn("counts", str(e))
        run.begin_call(params.x, [], d.inner_model)
        return
    rows = int(params.x.shape[0])
    uncond_blocks = 2 if rows == n_cond + 2 * len(counts) else 1
    run.image_offset = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
    run.begin_call(params.x, counts, d.inner_model, uncond_blocks, step=getattr(d, "step", params.sampling_step),
                   hires=bool(getattr(p, "is_hr_pass", False)))


def host_unet(sd_model):
    """The loaded checkpoint's LDM-layout UNet."""
    if FORGE:
        return bdm_forge.diffusion_model(sd_model)
    return sd_model.model.diffusion_model


def on_cfg_denoiser_forge(params):
    """Forge: the denoiser's step and pass for the Chinese prompts' schedules (the branch's link reads
    them per UNet call); and say so when the branch disappears mid-sampling (a refiner switch loads the
    refiner without the controls of extensions) instead of going on without it silently."""
    d = getattr(params, "denoiser", None)
    p = getattr(d, "p", None)
    entry = _runs.get(id(p))
    if entry is None or entry[1].bridge is None:
        return
    run = entry[1]
    run.step, run.hires = int(getattr(d, "step", params.sampling_step)), bool(getattr(p, "is_hr_pass", False))
    if run.unet_calls == 0 or bdm_forge.has_branch(shared.sd_model, run):
        return
    if not p.extra_generation_params.get("BDM error"):
        message = "BDM: not applied after the refiner switch (Forge loads the refiner without extensions' controls)"
        log(message)
        p.extra_generation_params["BDM error"] = message


def on_ui_settings():
    section = ("bdm", "BDM")
    add = shared.opts.add_option
    add("bdm_default_model", shared.OptionInfo(NONE, "Default BDM model / 默认 BDM 模型", gr.Dropdown,
                                               lambda: {"choices": model_titles()}, refresh=refresh_models,
                                               section=section))
    add("bdm_default_strength", shared.OptionInfo(1.0, "Default strength / 默认强度", gr.Slider,
                                                  {"minimum": 0.0, "maximum": 2.0, "step": 0.05}, section=section))
    add("bdm_encoder_on_cpu", shared.OptionInfo(True, "Keep the Chinese text encoder on the CPU / 中文文本编码器留在 CPU",
                                                section=section))
    add("bdm_cache_size", shared.OptionInfo(64, "Encoded Chinese prompts kept in memory / 缓存的中文提示词编码数",
                                            gr.Number, {"precision": 0}, section=section))
    add("bdm_models_in_memory", shared.OptionInfo(1, "BDM models kept in memory / 内存中保留的 BDM 模型数",
                                                  gr.Number, {"precision": 0}, section=section))
    add("bdm_offload", shared.OptionInfo(False, "Move the branch to the CPU after each generation (always with "
                                                "--lowvram/--medvram) / 生成后把分支移到 CPU", section=section))
    add("bdm_chinese_clip_path", shared.OptionInfo("", "Chinese CLIP folder for official diffusers BDM models "
                                                       "/ 官方 diffusers 模型的 Chinese CLIP 目录", section=section))
    add("bdm_on_error", shared.OptionInfo(ON_ERROR[0], "When BDM cannot be applied / BDM 无法使用时", gr.Radio,
                                          {"choices": list(ON_ERROR)}, section=section))


def on_infotext_pasted(infotext, params):
    if bdm_infotext.MODEL in params:
        title = settings_value_title(bdm_infotext.model_query(params))
        if title == NONE:
            log(f"BDM: the model {bdm_infotext.model_query(params)!r} of the pasted parameters is not installed")


def on_app_started(demo, app):
    @app.get("/bdm/models")
    def bdm_models():
        entries = refresh_models()
        return {"models": [{"name": e.name, "title": e.title, "hash": e.hash, "filename": e.path.name,
                            "path": str(e.path), "kind": e.kind,
                            "chinese_clip": str(e.chinese_clip) if e.chinese_clip else None} for e in entries],
                "default": opt("bdm_default_model", NONE), "folders": model_dirs()}

    if _debug is not None:
        _add_debug_routes(app)
    try:
        from bdm.webui.asgi import install_args_middleware
        install_args_middleware(app, TITLE)
    except Exception as e:  # noqa: BLE001
        log(f"BDM: args-object middleware not installed ({e}); use \"args\": [{{...}}]")


def _add_debug_routes(app):
    from fastapi import Body

    @app.get("/bdm/debug/state")
    def bdm_debug_state():
        unet = getattr(getattr(shared.sd_model, "model", None), "diffusion_model", None)
        bridges = [{"path": key[0], "digest": bdm_debug.digest(b), "encoder_digest": bdm_debug.digest(b.text_encoder),
                    "network_named_modules": bdm_debug.network_named_modules(b),
                    "dtype": str(next(b.parameters()).dtype), "device": str(next(b.parameters()).device)}
                   for key, b in _manager._loaded.items()]
        return {"runs": len(_runs), "unet_hooks": bdm_debug.hook_counts(unet), "bridges": bridges,
                "last": _debug.last, "started": _debug.started, "bdm_first": _debug.bdm_first,
                "cache": {"size": len(_cache), "hits": _cache.hits, "misses": _cache.misses}}

    @app.post("/bdm/debug/arm")
    def bdm_debug_arm(body: dict = Body(...)):
        _debug.arm(body.get("action", "raise"), int(body.get("at_call", 1)))
        return {"armed": list(_debug.armed)}

    @app.post("/bdm/debug/order")
    def bdm_debug_order(body: dict = Body(...)):
        _debug.bdm_first = bool(body.get("bdm_first", False))
        return {"bdm_first": _debug.bdm_first}


# -- X/Y/Z plot ----------------------------------------------------------------------------------------
def _args_of(p):
    """The BDM arguments of `p` (None when they cannot be read)."""
    try:
        for s in p.scripts.alwayson_scripts:
            if isinstance(s, BdmScript):
                return parse_script_args(p.script_args[s.args_from:s.args_to])
    except Exception:  # noqa: BLE001
        return None
    return None


def install_xyz_axes() -> bool:
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(data, "module"):
            try:
                bdm_xyz.install(data.module, lambda: [e.name for e in refresh_models()], _args_of)
                return True
            except Exception as e:  # noqa: BLE001
                log(f"BDM: X/Y/Z plot axes not added: {type(e).__name__}: {e}")
                return False
    return False


def on_script_unloaded():
    close_all_runs()
    _runs.clear()


def _register(register, fn):
    try:
        register(fn, name="bdm")
    except TypeError:  # WebUI < 1.9: no callback names
        register(fn)


if FORGE:  # Forge says each UNet call's rows itself (bdm_forge.branch)
    bdm_forge.register_toy_family(lambda: [getattr(shared.cmd_opts, "ckpt_dir", None),
                                          os.path.join(paths.models_path, "Stable-diffusion")])
    _register(script_callbacks.on_cfg_denoiser, on_cfg_denoiser_forge)
else:
    _register(script_callbacks.on_cfg_denoiser, on_cfg_denoiser)
_register(script_callbacks.on_ui_settings, on_ui_settings)
_register(script_callbacks.on_infotext_pasted, on_infotext_pasted)
_register(script_callbacks.on_app_started, on_app_started)
_register(script_callbacks.on_script_unloaded, on_script_unloaded)
if not install_xyz_axes():  # the X/Y/Z script is normally loaded before extensions; else before the UI
    _register(script_callbacks.on_before_ui, lambda: install_xyz_axes())
