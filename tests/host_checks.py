"""The checks both host suites make (tests/webui/: AUTOMATIC1111, tests/forge/: Forge), written once so
that "the same behaviour in Forge as in A1111" is literally the same test body: the API contract
(infotext, PNG info, failures, strict arguments), an interrupt over HTTP, and what a person meets in the
browser. Each suite calls them with its own server, model names and base request.

A server is a `tests.host_util.WebUI`; `server.state()` is the suite's test-only diagnostics route
(`started`, `last.unet_calls`, `runs`)."""
from __future__ import annotations

import json
import threading
import time
from functools import partial

import pytest

from bdm.webui.session import CONTINUE, FAILURE_CHOICES, STOP
from tests.host_util import Page, info, same, wait_for

PROMPT = "红色的圆形"


def bdm(args) -> dict:
    """`alwayson_scripts` of a request: BDM's `args` list."""
    return {"alwayson_scripts": {"BDM": {"args": args}}}


# -- the API contract ----------------------------------------------------------------------------------
def check_infotext_fields(server, response, model: str, prompt: str, negative: str) -> None:
    text = info(response)["infotexts"][0]
    h = next(m["hash"] for m in server.get("/bdm/models")["models"] if m["name"] == model)
    for field in (f"BDM model: {model}", f"BDM model hash: {h}", f"BDM prompt: {prompt}",
                  f"BDM negative prompt: {negative}", "BDM strength: 1.0"):
        assert field in text, text


def check_png_info_round_trip(server, response, base: dict, model: str, prompt: str, negative: str) -> None:
    """PNG info parses the fields back, also a prompt the quoting must protect."""
    params = server.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + response["images"][0]})["parameters"]
    assert params["BDM model"] == model and params["BDM prompt"] == prompt
    assert params["BDM negative prompt"] == negative and float(params["BDM strength"]) == 1.0
    tricky = '"引号", (红色:1.2)\n第二行'
    r = server.txt2img(**dict(base, batch_size=1), **bdm([True, model, 0.5, tricky, ""]))
    params = server.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + r["images"][0]})["parameters"]
    assert params["BDM prompt"] == tricky and "BDM negative prompt" not in params


def failure_cases(model: str) -> list[tuple[str, list, int, list[str]]]:
    """(case, BDM args, HTTP status, parts of the message) of a request BDM cannot serve, with `model`
    an installed BDM model; the broken files are tests/webui/models.py `make_broken_files`'s."""
    from tests.webui.models import CRAFTED_MODEL, CRAFTED_VOCAB, TRUNCATED_MODEL, WRONG_MODEL
    return [
        ("wrong file", [True, WRONG_MODEL, 1.0, PROMPT, ""], 500,
         [f"cannot load the BDM model '{WRONG_MODEL}' (models/bdm/{WRONG_MODEL}.safetensors)",
          "this is a LoRA, not a BDM file"]),
        ("truncated file", [True, TRUNCATED_MODEL, 1.0, PROMPT, ""], 500,
         [f"models/bdm/{TRUNCATED_MODEL}.safetensors: not a readable safetensors file (truncated or corrupt?)"]),
        ("crafted config", [True, CRAFTED_MODEL, 1.0, PROMPT, ""], 500,
         [f"models/bdm/{CRAFTED_MODEL}.safetensors: text_encoder_config['vocab_size'] is {CRAFTED_VOCAB}, but "
          "the file's tensor 'text_encoder.embeddings.word_embeddings.weight' gives 21128"]),
        ("unknown model", [True, "no-such-model", 1.0, PROMPT, ""], 422,
         ["no BDM model 'no-such-model' (installed: ", f"{model} ["]),
        ("hash mismatch", [True, f"{model} [0000000000]", 1.0, PROMPT, ""], 422,
         [f"the BDM model '{model}' installed here has hash", "not 0000000000 as asked"]),
        ("AND in the Chinese prompt", [True, model, 1.0, f"{PROMPT} AND 蓝色的背景", ""], 422, ["AND"]),
        ("unknown key", [{"promt": PROMPT}], 422,
         ["unknown BDM argument 'promt'; the known ones are: enabled, model, strength, prompt, negative_prompt"]),
        ("strength as a string", [True, model, "0.5", PROMPT, ""], 422,
         ["BDM argument 'strength' must be a number from 0 to 2 (a JSON number), got '0.5'"]),
        ("strength as a bool", [{"model": model, "prompt": PROMPT, "strength": True}], 422,
         ["BDM argument 'strength' must be a number from 0 to 2 (a JSON number), got True"]),
        ("enabled as a string", [{"enabled": "yes", "prompt": PROMPT}], 422,
         ["BDM argument 'enabled' must be true or false (a JSON boolean), got 'yes'"]),
    ]


def check_failure_stops_the_generation(server, base: dict, args, status: int, parts: list[str]) -> None:
    """The generation stops: the host's API error body (error type `BdmError`, or `ArgsError` for bad
    arguments) names what is wrong, without a path of the server; the server serves on, and its next
    plain image is bit-identical to the one made before BDM was used."""
    code, body = server.txt2img_status(**dict(base, **bdm(args)))
    assert code == status, (args, code, str(body)[:600])
    body = json.loads(body)
    assert body["error"] == ("ArgsError" if "argument" in parts[0] else "BdmError"), body
    message = server.error_message(body)
    for part in parts:
        assert part in message, (part, body)
    assert str(server.dir) not in message  # no absolute server path in what a client sees
    assert server.alive()
    assert same(server.txt2img(**base), server.baseline)


def check_continue_without_bdm_warns(server, base: dict, wrong_model: str) -> None:
    """"Continue without BDM": the plain image, the reason in its parameters and in the console; a
    request's own mistake (bad arguments) stays an error."""
    server.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[CONTINUE]})
    try:
        r = server.txt2img(**base, **bdm([True, wrong_model, 1.0, PROMPT, ""]))
        code, body = server.txt2img_status(**base, **bdm([{"promt": PROMPT}]))
    finally:
        server.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP]})
    assert same(r, server.baseline)
    assert "this is a LoRA, not a BDM file" in info(r)["extra_generation_params"]["BDM error"]
    assert "BDM error: " in info(r)["infotexts"][0]
    assert "BDM was not applied: cannot load the BDM model" in server.log.read_text()
    assert code == 422 and "unknown BDM argument 'promt'" in body


def check_empty_chinese_boxes_only_warn(server, base: dict, wrong_model: str) -> None:
    """BDM switched on with both Chinese boxes empty (nothing asked of it): a failure is a warning."""
    r = server.txt2img(**base, **bdm([True, wrong_model, 1.0, "", ""]))
    assert same(r, server.baseline) and "this is a LoRA" in info(r)["extra_generation_params"]["BDM error"]


def check_args_dict_refused(server, base: dict) -> None:
    """The host copies `args` position by position; a dict there is an error, never ignored."""
    code, body = server.txt2img_status(**base, alwayson_scripts={"BDM": {"args": {"enabled": True, "prompt": PROMPT}}})
    assert code != 200, str(body)[:300]


def failure_checks(model: str) -> list:
    """Every failure check a host suite runs, as pytest params of `check(server, base request)`: each
    request BDM cannot serve (`failure_cases(model)`: the generation stops with the error), the failures
    that only warn (a LoRA file as the BDM model), `args` sent as a dict."""
    from tests.webui.models import WRONG_MODEL
    checks = [pytest.param(partial(check_failure_stops_the_generation, args=args, status=status, parts=parts), id=case)
              for case, args, status, parts in failure_cases(model)]
    checks += [pytest.param(partial(check, wrong_model=WRONG_MODEL), id=check.__name__.removeprefix("check_"))
               for check in (check_continue_without_bdm_warns, check_empty_chinese_boxes_only_warn)]
    return checks + [pytest.param(check_args_dict_refused, id="args as a dict")]


def check_no_model_installed(bare, base: dict) -> None:
    """A server without any BDM model: the error says where to put one and where BDM1.0 comes from;
    without BDM it works as ever."""
    code, body = bare.txt2img_status(**base, **bdm([True, "", 1.0, PROMPT, ""]))
    assert code == 422, (code, str(body)[:500])
    message = bare.error_message(json.loads(body))
    for part in ("no BDM model is installed: put a BDM .safetensors file into models/bdm",
                 "qihoo360/BDM1.0", "OFA-Sys/chinese-clip-vit-huge-patch14", "python -m bdm.convert"):
        assert part in message, message
    assert len(bare.txt2img(**base)["images"]) == base["batch_size"]


def check_models_route_auth(bare, auth: tuple[str, str]) -> None:
    """`GET /bdm/models` behind `--api-auth` like the host's own API; no server path in the listing."""
    assert bare.call("GET", "/bdm/models", headers={})[0] == 401
    assert bare.call("GET", "/bdm/models", headers={"Authorization": "Basic Ym9ndXM6Ym9ndXM="})[0] == 401
    body = bare.get("/bdm/models")  # with the right credentials
    assert body["models"] == [] and body["selected"] is None and body["folders"] == ["models/bdm"]
    assert "/tmp" not in json.dumps(body) and auth[1] not in json.dumps(body)


def interrupt_mid_sampling(server, payload: dict) -> tuple[int, object]:
    """Post `payload` (a long BDM generation) and interrupt it over HTTP once the branch has run 3
    times; returns the generation's (status, body)."""
    result = {}

    def run():
        result["r"] = server.txt2img_status(**payload)

    started = server.state()["started"]
    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        st = server.state()
        if st["started"] > started and st["last"].get("unet_calls", 0) >= 3:
            break
        time.sleep(0.2)
    server.post("/sdapi/v1/interrupt")
    t.join(300)
    return result["r"]


# -- in the browser ------------------------------------------------------------------------------------
LONG = "红色的圆形" * 60  # 300 tokens: more than the 250 the encoder takes


def check_prompt_area(page: Page) -> None:
    """Chinese boxes under the English ones, BDM's controls above the image canvas, in the prompt area
    (not under the generation settings), in both tabs; a picture of img2img."""
    for tab, canvas in (("img2img", "img2img_image"), ("txt2img", "txt2img_gallery")):
        page.d.execute_script(f"switch_to_{tab}()")
        time.sleep(1)
        y = {k: page.y(k) for k in (f"{tab}_prompt", f"bdm_{tab}_cn_prompt", f"{tab}_neg_prompt",
                                     f"bdm_{tab}_cn_neg_prompt")}
        assert y[f"{tab}_prompt"][0] < y[f"bdm_{tab}_cn_prompt"][0] < y[f"{tab}_neg_prompt"][0] \
            < y[f"bdm_{tab}_cn_neg_prompt"][0], y
        for elem in (f"bdm_{tab}_enabled", f"bdm_{tab}_model", f"bdm_{tab}_strength"):
            # above the end of the image canvas: reachable without scrolling past it
            assert 0 < page.y(elem)[1] < page.y(canvas)[1], (elem, page.y(elem), canvas, page.y(canvas))
        if tab == "txt2img":
            assert page.y("bdm_txt2img_strength")[1] < page.y("txt2img_settings")[1]
        else:
            page.shot("img2img.png")


def check_typing_counter_and_generation(page: Page, title: str, model: str, prompt: str, negative: str) -> None:
    """The model is the last one used, BDM off until asked for; typing Chinese switches it on; the
    counter turns red over the limit and the cut prompt is reported under the image; then Ctrl+Enter
    in the Chinese box makes the image with the BDM fields (picture: txt2img.png, counter-over-limit.png)."""
    assert page.one("#bdm_txt2img_model input").get_attribute("value") == title
    assert not page.enabled().is_selected()
    page.small_settings()
    page.type("#txt2img_prompt textarea", "masterpiece, best quality")
    page.type("#bdm_txt2img_cn_prompt textarea", LONG)
    wait_for(lambda: page.enabled().is_selected(), 10, what="BDM switched on by typing")

    def counter():  # the span is replaced at each count
        return page.one("#bdm_txt2img_cn_prompt_token_counter span")

    wait_for(lambda: counter().text.strip() == "300/250", 30, what="the counter to show 300/250",
             seen=lambda: counter().get_attribute("outerHTML"))
    assert "bdm-over" in counter().get_attribute("class")  # one class attribute, the over-limit class applied
    red, green, blue = [int(float(v)) for v in page.d.execute_script(
        "return getComputedStyle(arguments[0]).color", counter()).split("(")[1].split(")")[0].split(",")[:3]]
    assert red > 150 and green < 80 and blue < 80, (red, green, blue)
    page.shot("counter-over-limit.png")
    page.generate()
    log = page.one("#html_log_txt2img").text
    assert "Warning: too many input tokens in the BDM Chinese prompt; some (50) have been truncated" in log, log
    page.type("#bdm_txt2img_cn_prompt textarea", prompt)
    page.type("#bdm_txt2img_cn_neg_prompt textarea", negative)
    wait_for(lambda: counter().text.strip().endswith("/50"), 30, what="the counter")
    assert "bdm-over" not in counter().get_attribute("class")
    page.generate()
    assert page.css("#txt2img_gallery img"), "no image"
    text = page.one("#html_info_txt2img").text
    for field in (f"BDM model: {model}", f'BDM prompt: "{prompt}"', f"BDM negative prompt: {negative}",
                  "BDM strength: 1"):  # (the WebUI quotes a value with ":")
        assert field in text, text
    assert not page.css("#html_log_txt2img .error")
    page.shot("txt2img.png")


def check_failure_and_continue_in_the_page(page: Page, server, wrong_model: str, notification: bool) -> None:
    """A BDM model that cannot be loaded: the host's error box names it, its file and the reason
    (error.png); with "continue without BDM" the image comes with a highlighted warning under it,
    `BDM error` in its parameters and, where the host can show one (`notification`), a notification
    in the corner (continue-warning.png); switched off by hand, the Chinese box says its text is not used."""
    page.small_settings()
    page.type("#bdm_txt2img_cn_prompt textarea", PROMPT)
    wait_for(lambda: page.enabled().is_selected(), 10, what="BDM switched on by typing")
    page.choose_model(wrong_model)
    assert page.one("#bdm_txt2img_model input").get_attribute("value").startswith(wrong_model)
    page.generate()
    errors = page.css("#html_log_txt2img .error")
    assert errors, page.one("#html_log_txt2img").text
    text = errors[0].text
    assert text.startswith(f"BdmError: cannot load the BDM model '{wrong_model}' "
                           f"(models/bdm/{wrong_model}.safetensors)"), text
    assert "this is a LoRA, not a BDM file" in text
    page.shot("error.png")
    server.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[CONTINUE]})
    try:
        page.generate()
        comments = page.one("#html_log_txt2img .comments")
        assert f"BDM was not applied: cannot load the BDM model '{wrong_model}'" in comments.text, comments.text
        assert "bdm-warning" in comments.get_attribute("class")  # highlighted, not a grey line
        if notification:
            toasts = page.css(".toast-body")
            assert any("BDM was not applied" in t.text for t in toasts), [t.text for t in toasts]
        assert page.css("#txt2img_gallery img")
        assert "BDM error:" in page.one("#html_info_txt2img").text
        page.shot("continue-warning.png")
    finally:
        server.post("/sdapi/v1/options", {"bdm_on_failure": FAILURE_CHOICES[STOP]})
    page.enabled().click()
    note = wait_for(lambda: [n for n in page.css("#bdm_txt2img_cn_prompt_container .bdm-off-note") if n.is_displayed()],
                    10, what="the off note")
    assert "BDM is off" in note[0].text


def check_no_models_hint(page: Page) -> None:
    hint = page.one("#bdm_txt2img_no_models").text
    for part in ("models/bdm", "qihoo360/BDM1.0", "OFA-Sys/chinese-clip-vit-huge-patch14", "python -m bdm.convert"):
        assert part in hint, hint
    assert page.y("bdm_txt2img_no_models")[1] < page.y("txt2img_gallery")[1]
    page.shot("no-models.png")
