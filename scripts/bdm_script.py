"""BDM for the AUTOMATIC1111 WebUI and for Forge: a Chinese prompt beside the English one.

Thin wiring only: everything that needs no WebUI lives in `bdm/webui/` (the session of runs and
models, row mapping, context bank, infotext, model discovery, API arguments, hooking). This file builds
the UI, reads the settings and the loaded model, and connects the WebUI's callbacks to the session.
The host is detected at import: in AUTOMATIC1111 the branch is hooked into the ldm UNet (`bdm.attach`,
rows from `on_cfg_denoiser`); in Forge it joins Forge's ControlNet chain before every sampling pass
(`bdm_forge/`, the only Forge-specific code). Everything the user sees is the same in both.
"""
from __future__ import annotations

import html
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

from bdm.text.prompt_schedule import schedule_prompts  # noqa: E402
from bdm.webui import infotext as bdm_infotext  # noqa: E402
from bdm.webui import xyz as bdm_xyz  # noqa: E402
from bdm.webui.api_args import ArgsError, parse_script_args  # noqa: E402
from bdm.webui.counter import counter_html  # noqa: E402
from bdm.webui.errors import BdmError  # noqa: E402
from bdm.webui.layout import rows_of  # noqa: E402
from bdm.webui.manager import unet_refusal  # noqa: E402
from bdm.webui.models import discover_models, find_model, no_models_message, pick_model  # noqa: E402
from bdm.webui.routes import api_dependencies, models_listing  # noqa: E402
from bdm.webui.session import FAILURE_CHOICES, STOP, Session, Settings, failure_mode, truncation_warnings  # noqa: E402

TITLE = "BDM"
NONE = "None"
MODELS_LABEL = "models/bdm"


def log(message: str) -> None:
    print(message if message.startswith("BDM") else f"BDM: {message}", flush=True)


# -- state shared by the txt2img and img2img scripts (public: read by diagnostics and tests) -----------
session = Session(log)
_entries: list = []


def opt(name, default):
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


def model_dirs() -> list[str]:
    dirs = [os.path.join(paths.models_path, "bdm")]
    extra = getattr(shared.cmd_opts, "bdm_models_path", None)
    if extra:
        dirs.append(extra)
    return dirs


def folder_labels() -> dict:
    return {model_dirs()[0]: MODELS_LABEL}


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
    _entries = discover_models(model_dirs(), hasher, opt("bdm_chinese_clip_path", "") or None, folder_labels())
    return _entries


def entries() -> list:
    return _entries or refresh_models()


def model_titles() -> list[str]:
    return [e.title for e in entries()]


def default_model_title():
    """What the model dropdown shows first: the default of the settings, else the last used, else the
    first found (None when no model is installed)."""
    try:
        return pick_model(None, entries(), opt("bdm_default_model", NONE), opt("bdm_last_model", "")).title
    except LookupError:
        return None


def settings_value_title(value):
    """The title of an installed model for a setting's or pasted value ("None" when not installed)."""
    try:
        entry = find_model(value, entries())
    except LookupError:
        return NONE
    return entry.title if entry else NONE


def current_settings() -> Settings:
    extra = getattr(shared.cmd_opts, "bdm_models_path", None)
    return Settings(default_model=opt("bdm_default_model", NONE),
                    on_error=failure_mode(opt("bdm_on_failure", FAILURE_CHOICES[STOP])),
                    encoder_on_cpu=bool(opt("bdm_encoder_on_cpu", True)), cache_size=int(opt("bdm_cache_size", 64)),
                    models_in_memory=int(opt("bdm_models_in_memory", 1)),
                    model_folders=(MODELS_LABEL, *(["--bdm-models-path"] if extra else [])))


def model_refusal(sd_model):
    """Why BDM cannot run on the WebUI's loaded model (None: it can)."""
    if FORGE:
        return bdm_forge.refusal(sd_model)
    try:
        from modules import sd_unet
        custom = getattr(sd_unet, "current_unet", None) is not None
    except Exception:  # noqa: BLE001
        custom = False
    return unet_refusal(host_unet(sd_model),
                        is_sdxl=getattr(sd_model, "is_sdxl", False), is_sd2=getattr(sd_model, "is_sd2", False),
                        is_sd3=getattr(sd_model, "is_sd3", False), custom_unet=custom)


def host_unet(sd_model):
    """The loaded checkpoint's LDM-layout UNet (None when there is none)."""
    if FORGE:
        return bdm_forge.diffusion_model(sd_model)
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


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


def remember_last_used(title: str) -> None:
    """The model dropdown starts at the last used model, also after a restart (a hidden setting)."""
    if opt("bdm_last_model", "") != title and hasattr(shared, "opts"):
        shared.opts.set("bdm_last_model", title, run_callbacks=False)
        try:
            shared.opts.save(shared.config_filename)
        except Exception as e:  # noqa: BLE001 - a read-only settings file only loses this convenience
            log(f"BDM: could not save the last used model to the settings: {e}")


def warn_user(p, message: str) -> None:
    """A warning the user sees: under the image (like the WebUI's own warnings), as a notification in
    the UI, and in the console."""
    log(message)
    if p is not None:
        p.comment(message)
    try:
        gr.Warning(message)
    except Exception:  # noqa: BLE001 - outside a UI request (API): the comment and the console carry it
        pass


def no_models_html() -> str:
    if entries():
        return ""
    return ("<div class='bdm-no-models'>"
            f"{html.escape(no_models_message((MODELS_LABEL,)))}<br>"
            f"没有 BDM 模型：把 BDM 模型文件（.safetensors）放进 {MODELS_LABEL}，再点 🔄。"
            "BDM1.0 来自 Hugging Face：qihoo360/BDM1.0 与 OFA-Sys/chinese-clip-vit-huge-patch14，"
            "用 <code>python -m bdm.convert</code> 转成一个文件。</div>")


def refresh_controls():
    refresh_models()
    return gr.update(choices=model_titles(), value=default_model_title()), gr.update(value=no_models_html())


# -- the Script --------------------------------------------------------------------------------------
class BdmScript(scripts.Script):
    sorting_priority = 15

    def __init__(self):
        super().__init__()
        self.cn_prompt = self.cn_negative = None
        self.enabled = self.model = self.strength = None
        self._hooked = False

    def title(self):
        return TITLE

    def show(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        if not self._hooked:
            self._hooked = True
            self.on_after_component(lambda c: self._make_box(tab, negative=False), elem_id=f"{tab}_prompt")
            self.on_after_component(lambda c: self._make_box(tab, negative=True), elem_id=f"{tab}_neg_prompt")
        return scripts.AlwaysVisible

    def _make_box(self, tab: str, negative: bool):
        """A Chinese box under the English one (javascript/bdm.js moves it there); under the negative one
        also the controls BDM needs (on/off, model, strength), so all of it is at hand in the prompt area."""
        kind = "neg_prompt" if negative else "prompt"
        what = "中文反向提示词 / Chinese negative prompt" if negative else "中文提示词 / Chinese prompt"
        placeholder = (f"{what}\n(BDM; Ctrl+Enter 生成 / to generate)" if negative else
                       f"{what}：内容写在这里，英文提示词可留空或只写风格词 / the content goes here; the English "
                       "prompt may stay empty or carry style words\n(BDM; Ctrl+Enter 生成 / to generate)")
        if not negative and not entries():
            placeholder += "\n⚠ 没有 BDM 模型，见下方说明 / no BDM model is installed: see below"
        with gr.Column(elem_id=f"bdm_{tab}_cn_{kind}_container", elem_classes=["bdm-cn-container"]):
            box = gr.Textbox(label=what, show_label=False, lines=2, elem_id=f"bdm_{tab}_cn_{kind}",
                             elem_classes=["prompt", "bdm-cn-prompt"], placeholder=placeholder)
            counter = gr.HTML(value="<span>0/50</span>", elem_id=f"bdm_{tab}_cn_{kind}_token_counter",
                              elem_classes=["token-counter", "bdm-token-counter"])
            button = gr.Button(visible=False, elem_id=f"bdm_{tab}_cn_{kind}_token_button")
            button.click(fn=counter_html, inputs=[box], outputs=[counter], show_progress=False)
            if negative:
                self._make_controls(tab)
        if negative:
            self.cn_negative = box
        else:
            self.cn_prompt = box

    def _make_controls(self, tab: str):
        from modules.ui_components import ToolButton
        with gr.Row(elem_id=f"bdm_{tab}_controls", elem_classes=["bdm-controls"]):
            self.enabled = gr.Checkbox(False, label="启用 BDM / Enable BDM", elem_id=f"bdm_{tab}_enabled",
                                       elem_classes=["bdm-enabled"])
            self.model = gr.Dropdown(label="BDM 模型 / BDM model", choices=model_titles(), value=default_model_title,
                                     elem_id=f"bdm_{tab}_model", elem_classes=["bdm-model"])
            refresh = ToolButton(value="\U0001f504", elem_id=f"bdm_{tab}_model_refresh",
                                 tooltip="Refresh the BDM models / 刷新 BDM 模型列表")
            self.strength = gr.Slider(0.0, 2.0, value=float(opt("bdm_default_strength", 1.0)), step=0.05,
                                      label="强度 / Strength", elem_id=f"bdm_{tab}_strength",
                                      elem_classes=["bdm-strength"])
        hint = gr.HTML(no_models_html(), elem_id=f"bdm_{tab}_no_models")
        refresh.click(fn=refresh_controls, inputs=[], outputs=[self.model, hint])

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        if self.cn_prompt is None or self.cn_negative is None:  # the top-row hooks did not run: boxes here
            with gr.Group():
                self._make_box(tab, negative=False)
                self._make_box(tab, negative=True)

        def paste_model(d):
            if bdm_infotext.PROMPT not in d and bdm_infotext.MODEL not in d:
                return gr.update()
            query = bdm_infotext.model_query(d)
            title = settings_value_title(query)
            return title if title != NONE else query  # not installed: generating then says so

        def paste_text(key):
            return lambda d: d.get(key, "") if (bdm_infotext.PROMPT in d or bdm_infotext.MODEL in d) else gr.update()

        self.infotext_fields = [
            (self.enabled, lambda d: bdm_infotext.PROMPT in d or bdm_infotext.MODEL in d),
            (self.model, paste_model),
            (self.strength, bdm_infotext.STRENGTH),
            (self.cn_prompt, paste_text(bdm_infotext.PROMPT)),
            (self.cn_negative, paste_text(bdm_infotext.NEGATIVE)),
        ]
        self.paste_field_names = list(bdm_infotext.FIELDS)
        return [self.enabled, self.model, self.strength, self.cn_prompt, self.cn_negative]

    # -- generation ------------------------------------------------------------------------------
    def process(self, p, *args):
        session.close_all()
        try:
            a = bdm_xyz.apply(parse_script_args(args), getattr(p, bdm_xyz.ATTR, None))
        except ArgsError as e:
            return self._failed(p, e, stop=True)
        except RuntimeError as e:  # an X/Y/Z value that does not apply
            return self._failed(p, BdmError(str(e), 422), stop=True)
        if not a.enabled or a.strength == 0:
            return None
        settings = current_settings()
        sd_model = p.sd_model or shared.sd_model
        try:
            run = session.begin(p, a, refresh_models(), host_unet(sd_model), model_refusal(sd_model),
                                max(1, len(getattr(p, "all_prompts", None) or [""])), settings, devices.device,
                                devices.dtype_unet, log=lambda m: warn_user(p, m),
                                schedules=lambda positive, negative: chinese_schedules(p, positive, negative),
                                place_branch=not FORGE)  # Forge's memory manager places the branch
        except BdmError as e:
            return self._failed(p, e, stop=session.stops(a, settings))
        except Exception as e:  # noqa: BLE001 - an unexpected failure is still a failure the user must see
            traceback.print_exc()
            return self._failed(p, BdmError(f"BDM failed: {type(e).__name__}: {e}"), stop=session.stops(a, settings))
        run.stop_on_failure = session.stops(a, settings)
        remember_last_used(run.entry.title)
        p.extra_generation_params.update(run.infotext)
        for warning in truncation_warnings(run):
            p.comment(warning)
        log(f"BDM: {run.entry.title}, strength {a.strength}, {len(run.bank.prompts)} Chinese prompt(s), "
            f"{run.bank.chunks} chunk(s)")
        return None

    @staticmethod
    def _failed(p, error: BdmError, stop: bool):
        if stop:
            log(f"BDM: the generation stops: {error}")
            session.fail(p, error)
        else:
            warn_user(p, f"BDM was not applied: {error}")
            p.extra_generation_params["BDM error"] = str(error)
        return None

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Forge: the branch's link into this sampling pass's UNet (Forge rebuilds it before every pass)."""
        run = session.run_for(p)
        if FORGE and run is not None:
            forge_join(p, run, lambda: bdm_forge.join_pass(p.sd_model, run, loaded_bridges()))

    def postprocess(self, p, processed, *args):
        run = session.end(p)
        if run is None or run.bridge is None:
            return
        if run.unet_calls == 0 and not getattr(shared.state, "interrupted", False):
            message = "BDM: warning: the branch never ran in this generation (another extension replaced the UNet?)"
            warn_user(None, message)
            processed.comments += message + "\n"
        if opt("bdm_offload", False) or getattr(shared.cmd_opts, "lowvram", False) or \
                getattr(shared.cmd_opts, "medvram", False):
            if FORGE:
                bdm_forge.release(run.bridge)  # through Forge's memory manager
            else:
                run.bridge.to("cpu")
            run.bridge.text_encoder.to("cpu")


def loaded_bridges() -> list:
    return [bridge for _, bridge in session.manager.loaded()]


def forge_join(p, run, join) -> None:
    """Forge: `join()` puts the branch's link into the UNet. Forge only logs an exception of a script or
    a callback, so an unexpected one is this pass's failure here (stop with it, or continue warned)."""
    try:
        join()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        run.pass_refused(f"{type(e).__name__}: {e}")
        if run.error is not None:
            bdm_forge.join_pass(p.sd_model, run)  # the link that stops the generation with the error


# -- global callbacks --------------------------------------------------------------------------------
def denoiser_run(params):
    """The denoiser of an `on_cfg_denoiser` call, its generation `p` and that generation's BDM run (None
    without BDM), the run told which images of the job the batch holds."""
    d = getattr(params, "denoiser", None)
    p = getattr(d, "p", None)
    run = session.run_for(p) if p is not None else None
    if run is not None:
        run.image_offset = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
    return d, p, run


def on_cfg_denoiser(params):
    d, p, run = denoiser_run(params)
    if run is None:
        return
    sd_model = shared.sd_model
    cond = getattr(d.sampler, "sampler_extra_args", {}).get("cond")
    run.denoiser_call(params.x, rows_of(params.text_cond), rows_of(params.text_uncond), getattr(cond, "batch", None),
                      d.inner_model, host_unet(sd_model), model_refusal(sd_model),
                      step=getattr(d, "step", params.sampling_step), hires=bool(getattr(p, "is_hr_pass", False)))


def on_cfg_denoiser_forge(params):
    """Forge: the denoiser's step, pass and batch for the Chinese prompts (the branch's link reads them
    per UNet call); after a refiner switch (a fresh UNet without the links of extensions) the branch
    joins the refiner's UNet."""
    d, p, run = denoiser_run(params)
    if run is None:
        return
    run.step, run.hires = int(getattr(d, "step", params.sampling_step)), bool(getattr(p, "is_hr_pass", False))
    forge_join(p, run, lambda: bdm_forge.rejoin(shared.sd_model, run, params.x, loaded_bridges()))


def on_ui_settings():
    section = ("bdm", "BDM")
    add = shared.opts.add_option
    add("bdm_default_model", shared.OptionInfo(
        NONE, "Default BDM model (None: the last used, else the first found) / 默认 BDM 模型（None：上次使用的）",
        gr.Dropdown, lambda: {"choices": [NONE] + model_titles()}, refresh=refresh_models, section=section))
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
    add("bdm_on_failure", shared.OptionInfo(FAILURE_CHOICES[STOP], "When BDM is enabled with a Chinese prompt and "
                                            "cannot be applied / 启用了 BDM 且有中文提示词但无法使用时", gr.Radio,
                                            {"choices": list(FAILURE_CHOICES.values())}, section=section))
    add("bdm_last_model", shared.OptionInfo("", "BDM: the last used model", section=(None, "Hidden options")))


def on_infotext_pasted(infotext, params):
    if bdm_infotext.MODEL in params:
        query = bdm_infotext.model_query(params)
        if settings_value_title(query) == NONE:
            log(f"BDM: the model {query!r} of the pasted parameters is not installed here")


def on_app_started(demo, app):
    """`GET /bdm/models` beside the WebUI's API, behind the same authentication (`--api-auth`), only
    when the API is on (`--api`); it lists file names relative to the models folders, no absolute paths."""
    dependencies = api_dependencies(app)
    if dependencies is None:
        return

    def bdm_models():
        return models_listing(refresh_models(), opt("bdm_default_model", NONE), default_model_title(),
                              current_settings().model_folders)

    app.add_api_route("/bdm/models", bdm_models, methods=["GET"], dependencies=dependencies)


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
    session.close_all()


def _register(register, fn):
    try:
        register(fn, name="bdm")
    except TypeError:  # WebUI < 1.9: no callback names
        register(fn)


if FORGE:
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
