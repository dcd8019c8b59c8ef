"""The extension in a real Forge: installed from the same folder as in AUTOMATIC1111, the same API
contract (`alwayson_scripts`, `/bdm/models`, infotext, PNG info), the same controls in the prompt area,
the branch in Forge's ControlNet chain under its memory management, Forge's row order, and SD1.x only.
What a failure looks like in Forge: tests/forge/test_forge_failures.py."""
from __future__ import annotations

import json

import pytest

from bdm.webui.session import CONTINUE, FAILURE_CHOICES, STOP
from tests.forge.conftest import BASE, CHECKPOINT, TOY
from tests.forge.support import INPAINTING
from tests.host_checks import PROMPT, bdm, check_infotext_fields, check_png_info_round_trip
from tests.host_util import ToyJudge, bdm_error, info, mean_diff, rate, same
from tests.webui.models import WRONG_MODEL

OBJ = {"enabled": True, "prompt": PROMPT, "negative_prompt": "模糊", "model": TOY, "strength": 1.0}
POSITIONAL = [True, TOY, 1.0, PROMPT, "模糊"]


@pytest.fixture(scope="module")
def on(forge):
    return forge.txt2img(**BASE, **bdm(POSITIONAL))


@pytest.fixture(scope="module")
def judge():
    return ToyJudge()


def test_installer_ran_cleanly(forge):
    out = forge.installer_output
    assert "exit code 0" in out and "Error running install.py" not in out, out
    assert "Installing" not in out, f"install.py installed something into a complete venv:\n{out}"


def test_toy_checkpoint_loads_through_the_registered_family(forge):
    current = forge.get("/sdapi/v1/options")["sd_model_checkpoint"]
    assert current.split(" [")[0].removesuffix(".safetensors") == CHECKPOINT, current
    assert len(forge.baseline["images"]) == BASE["batch_size"]
    assert "Failed to recognize model type" not in forge.log.read_text()


def test_models_route(forge):
    names = {m["name"]: m for m in forge.get("/bdm/models")["models"]}
    assert TOY in names and names[TOY]["kind"] == "bdm" and len(names[TOY]["hash"]) == 10
    assert names[TOY]["title"] == f"{TOY} [{names[TOY]['hash']}]"
    assert WRONG_MODEL in names


def test_script_is_registered_for_both_tabs(forge):
    scripts = forge.get("/sdapi/v1/scripts")
    assert "bdm" in scripts["txt2img"] and "bdm" in scripts["img2img"]
    infos = [s for s in forge.get("/sdapi/v1/script-info") if s["name"] == "bdm"]
    assert len(infos) == 2 and all(s["is_alwayson"] for s in infos)
    assert [a["label"] for a in infos[0]["args"]] == ["启用 BDM / Enable BDM", "BDM 模型 / BDM model",
                                                      "强度 / Strength", "中文提示词 / Chinese prompt",
                                                      "中文反向提示词 / Chinese negative prompt"]


def test_bdm_gives_the_requested_colour(forge, on, judge):
    assert not bdm_error(on)
    assert mean_diff(on, forge.baseline) > 0.5
    assert rate(judge(on)["colour"], "red") == 1.0, judge(on)


def test_infotext_has_bdm_fields(forge, on):
    check_infotext_fields(forge, on, TOY, PROMPT, "模糊")


def test_png_info_parses_the_fields_back(forge, on):
    check_png_info_round_trip(forge, on, BASE, TOY, PROMPT, "模糊")


def test_api_infotext_restores_the_script_args(forge, on):
    status, body = forge.call("POST", "/sdapi/v1/txt2img", dict(BASE, infotext=info(forge.baseline)["infotexts"][0]))
    if status == 500 and "parameterized generic" in str(body):  # Forge dfdcbab6, api.py get_field_value
        pytest.skip("Forge's own API `infotext` fails for every infotext (also without BDM): "
                    f"{str(body)[:160]}; the UI paste is tested below")
    text = info(on)["infotexts"][0]
    assert same(forge.txt2img(**dict(BASE, infotext=f"\n{text}")), on)


def _ui(forge):
    config = forge.get("/config")
    return config, {c["id"]: c for c in config["components"]}


def _elem(components, elem_id):
    return next(i for i, c in components.items() if c["props"].get("elem_id") == elem_id)


def test_ui_paste_fills_the_bdm_controls(forge, on):
    """The txt2img paste button (gradio 4, the real UI event over gradio's API) fills the BDM panel and
    the Chinese boxes from an infotext, a prompt with a comma included."""
    config, components = _ui(forge)
    paste = next(d for d in config["dependencies"]
                 if d["api_name"] == "paste_func" and d["inputs"] == [_elem(components, "txt2img_prompt")])
    text = info(on)["infotexts"][0].replace(f"BDM prompt: {PROMPT}", 'BDM prompt: "红色的圆形, 大的"')
    text = text.replace("BDM strength: 1.0", "BDM strength: 0.7")
    values = dict(zip(paste["outputs"], forge.post("/run/paste_func", {"data": [text]})["data"]))
    got = {e: values[_elem(components, e)].get("value") for e in (
        "bdm_txt2img_enabled", "bdm_txt2img_model", "bdm_txt2img_strength", "bdm_txt2img_cn_prompt",
        "bdm_txt2img_cn_neg_prompt")}
    title = next(m["title"] for m in forge.get("/bdm/models")["models"] if m["name"] == TOY)
    assert got == {"bdm_txt2img_enabled": True, "bdm_txt2img_model": title, "bdm_txt2img_strength": 0.7,
                   "bdm_txt2img_cn_prompt": "红色的圆形, 大的", "bdm_txt2img_cn_neg_prompt": "模糊"}, got
    plain = dict(zip(paste["outputs"], forge.post("/run/paste_func", {"data": [info(forge.baseline)["infotexts"][0]]})["data"]))
    assert "value" not in plain[_elem(components, "bdm_txt2img_cn_prompt")]  # no BDM fields: the boxes stay


def test_ui_boxes_sit_in_the_prompt_rows_with_counters(forge):
    """Both tabs: each Chinese box is built inside the WebUI's prompt row right after the English box
    (javascript/bdm.js then moves it under that row), BDM's switch, model and strength beside the Chinese
    negative box, and the token counter counts in 50-token chunks, marked over the limit."""
    config, components = _ui(forge)

    def children(node):
        return [c["id"] for c in node.get("children", [])]

    def path_to(node, cid):
        """The nodes from `node` down to the one whose id is `cid` ([] when it is not below)."""
        if node.get("id") == cid:
            return [node]
        for c in node.get("children", []):
            below = path_to(c, cid)
            if below:
                return [node, *below]
        return []

    for tab in ("txt2img", "img2img"):
        for kind, english in (("prompt", "prompt"), ("neg_prompt", "neg_prompt")):
            container = _elem(components, f"bdm_{tab}_cn_{kind}_container")
            row = path_to(config["layout"], container)[-2]
            assert components[row["id"]]["props"].get("elem_id") == f"{tab}_{english}_row"
            before = row["children"][children(row).index(container) - 1]  # gradio wraps a textbox in a form
            assert _elem(components, f"{tab}_{english}") in [before["id"], *children(before)]
        negative = path_to(config["layout"], _elem(components, f"bdm_{tab}_cn_neg_prompt_container"))[-1]
        for control in ("enabled", "model", "strength"):
            assert path_to(negative, _elem(components, f"bdm_{tab}_{control}")), (tab, control)
    button = _elem(components, "bdm_txt2img_cn_prompt_token_button")
    count = next(d for d in config["dependencies"] if d["targets"] == [[button, "click"]])
    import re
    counts, html = [], {}
    for text in ("车水马龙的街道，红色的灯笼", "车水马龙的街道，红色的灯笼" * 6, "红色的圆形" * 60):
        html[text] = forge.post(f"/run/{count['api_name']}", {"data": [text]})["data"][0]
        counts.append(tuple(int(n) for n in re.search(r">(\d+)/(\d+)<", html[text]).groups()))
    assert counts[:2] == [(13, 50), (78, 100)] and counts[2] == (300, 250), counts
    over = [text for text, h in html.items() if "bdm-over" in h]
    assert over == ["红色的圆形" * 60], html


def test_json_object_and_positional_args_give_the_same_image(forge, on):
    assert same(forge.txt2img(**BASE, **bdm([OBJ])), on)
    rest = {k: v for k, v in OBJ.items() if k != "enabled"}  # an object means "enabled" unless it says otherwise
    assert same(forge.txt2img(**BASE, **bdm([dict(rest, model=f"{TOY}.safetensors")])), on)


def test_next_request_without_bdm_is_bit_identical(forge, on):
    assert same(forge.txt2img(**BASE), forge.baseline)
    off = forge.txt2img(**BASE, **bdm([False, TOY, 1.0, PROMPT, ""]))  # present but off
    assert same(off, forge.baseline) and "BDM" not in info(off)["infotexts"][0]


def test_settings_and_the_default_model(forge, on):
    """Settings → BDM exists in Forge's settings UI (Forge's GET options lists only values that were set)."""
    _, components = _ui(forge)
    for key in ("bdm_default_model", "bdm_default_strength", "bdm_encoder_on_cpu", "bdm_cache_size",
                "bdm_models_in_memory", "bdm_offload", "bdm_chinese_clip_path", "bdm_on_failure"):
        assert _elem(components, f"setting_{key}") is not None, key
    forge.post("/sdapi/v1/options", {"bdm_default_model": TOY})
    try:
        assert same(forge.txt2img(**BASE, **bdm([True, "None", 1.0, PROMPT, "模糊"])), on)
    finally:
        forge.post("/sdapi/v1/options", {"bdm_default_model": "None"})
    # no model asked for, no default set: the model used last
    assert same(forge.txt2img(**BASE, **bdm([True, "", 1.0, PROMPT, "模糊"])), on)


def test_branch_is_in_forges_memory_management(forge, on):
    """The branch is a model Forge loads for sampling (a ModelPatcher in its loaded models), on the UNet's
    device and dtype; one patcher per loaded branch."""
    forge.txt2img(**BASE, **bdm(POSITIONAL))
    st = forge.state()
    assert st["loaded_models"].count("Bridge") == 1 and "KModel" in st["loaded_models"], st
    assert st["patchers"] == 1 and st["branches"][0]["device"] == "cpu" and st["branches"][0]["dtype"] == "torch.float32"
    forge.post("/sdapi/v1/options", {"bdm_offload": True})  # unload after each generation, through Forge
    try:
        again = forge.txt2img(**BASE, **bdm(POSITIONAL))
        st = forge.state()
        assert "Bridge" not in st["loaded_models"] and same(again, on), st
    finally:
        forge.post("/sdapi/v1/options", {"bdm_offload": False})
    assert same(forge.txt2img(**BASE, **bdm(POSITIONAL)), on) and forge.state()["loaded_models"].count("Bridge") == 1


@pytest.mark.parametrize("cfg,first_call", [(7, ["uncond0", "uncond1", "cond0", "cond1"]), (1, ["cond0", "cond1"])])
def test_row_roles_uncond_first_and_cfg1(forge, judge, cfg, first_call):
    """Forge's rows: uncond chunk first at CFG > 1; at CFG 1 no uncond rows at all. The Chinese context of
    each row follows its role (the requested colour at both scales)."""
    r = forge.txt2img(**dict(BASE, cfg_scale=cfg), **bdm(POSITIONAL))
    last = forge.state()["last"]
    assert last["roles"][0] == first_call and last["unet_calls"] == BASE["steps"], last
    assert rate(judge(r)["colour"], "red") == 1.0, judge(r)


def test_and_prompt_gives_one_cond_chunk_per_subprompt(forge):
    r = forge.txt2img(**dict(BASE, prompt="a AND b :0.5"), **bdm(POSITIONAL))
    assert not bdm_error(r)
    roles = forge.state()["last"]["roles"][0]
    assert roles == ["uncond0", "uncond1", "cond0", "cond1", "cond0", "cond1"], roles


FOREIGN = [("bdm-test-sd2", "SD2.x"), ("bdm-test-sdxl", "SDXL"), (INPAINTING, "inpainting")]


@pytest.mark.parametrize("name,family", FOREIGN, ids=["sd2", "sdxl", "inpainting"])
def test_foreign_checkpoint_is_refused_and_plain_generation_unaffected(forge, on, name, family):
    """By default the generation stops (HTTP 409, the message names the family); with "continue without
    BDM" the plain image comes, with the reason in its parameters."""
    if not (forge.dir / "models" / "Stable-diffusion" / f"{name}.safetensors").is_file():
        pytest.skip(f"{name} was not built: {forge.prepared[-500:]}")
    forge.post("/sdapi/v1/options", {"sd_model_checkpoint": name})
    try:
        current = forge.get("/sdapi/v1/options")["sd_model_checkpoint"]
        assert current.split(" [")[0].removesuffix(".safetensors") == name, current
        plain = forge.txt2img(**BASE)
        status, body = forge.call("POST", "/sdapi/v1/txt2img", dict(BASE, **bdm(POSITIONAL)))
        assert status == 409, (status, str(body)[:500])
        error = json.loads(body)
        assert error["error"] == "BdmError" and family in error["message"] and "SD1.x" in error["message"], error
        forge.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[CONTINUE]})
        try:
            refused = forge.txt2img(**BASE, **bdm(POSITIONAL))
        finally:
            forge.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP]})
        assert family in bdm_error(refused) and "SD1.x" in bdm_error(refused), bdm_error(refused)
        assert same(refused, plain), "a refused BDM request must give the plain image"
        assert same(forge.txt2img(**BASE), plain)
    finally:
        forge.post("/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINT})
    assert same(forge.txt2img(**BASE, **bdm(POSITIONAL)), on)
