"""Infotext: BDM fields written the way the WebUI writes them, parsed the way it parses them, and
turned back into the script's arguments unchanged."""
from __future__ import annotations

import json
import re

import pytest

from bdm.webui import infotext as it
from bdm.webui.api_args import BdmArgs

# -- the WebUI's own code (v1.10.1 modules/infotext_utils.py and processing.create_infotext), copied --
re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def webui_quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def webui_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:  # noqa: BLE001
        return text


def webui_infotext(params: dict, index: int = 0) -> str:
    params = {k: (v[index] if isinstance(v, list) else v) for k, v in params.items()}
    text = ", ".join([k if k == v else f'{k}: {webui_quote(v)}' for k, v in params.items() if v is not None])
    return f"a photo\nNegative prompt: ugly\n{text}"


def webui_parse(x: str) -> dict:
    res = {}
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for k, v in re_param.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = webui_unquote(v)
        res[k] = v
    return res


BASE = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "64x64"}

PROMPTS = [
    "红色的圆形",
    "",
    "红色的圆形，蓝色的背景。",             # Chinese punctuation: no quoting needed
    "红色的圆形, 蓝色的背景",               # ASCII comma: the WebUI quotes
    "(红色:1.3) 的圆形",                    # colon: quoted
    "第一行\n第二行",                       # newline: quoted
    '"引号"',                               # starts and ends with a quote: we pre-quote
    '  前后有空格  ',                        # leading/trailing spaces: we pre-quote
    'a "b" c',
    "车水马龙 BREAK 井底之蛙",
]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("negative", ["", "模糊, 低质量", '"坏"'])
def test_round_trip(prompt, negative):
    fields = it.infotext_params("test-bdm", "7fa7297400", [prompt], [negative], 0.75)
    text = webui_infotext({**BASE, **fields, "Version": "v1.10.1"})
    parsed = webui_parse(text)
    args = it.params_to_args(parsed)
    assert args == BdmArgs(enabled=True, model="test-bdm [7fa7297400]", strength=0.75, prompt=prompt,
                           negative_prompt=negative)
    assert parsed["Steps"] == "20" and parsed["Version"] == "v1.10.1"  # neighbours intact
    assert (it.NEGATIVE in parsed) == bool(negative)


def test_field_names_and_values():
    fields = it.infotext_params("bdm-toy", "0123456789", ["红色的圆形"], [""], 1.0)
    assert list(fields) == ["BDM model", "BDM model hash", "BDM prompt", "BDM strength"]
    text = webui_infotext({**BASE, **fields})
    assert "BDM model: bdm-toy, BDM model hash: 0123456789, BDM prompt: 红色的圆形, BDM strength: 1.0" in text


def test_per_image_prompts_are_lists():
    fields = it.infotext_params("m", None, ["红色", "蓝色", "红色"], ["", "", ""], 1.0)
    assert fields[it.PROMPT] == ["红色", "蓝色", "红色"] and it.HASH not in fields
    for i, want in enumerate(["红色", "蓝色", "红色"]):
        assert it.params_to_args(webui_parse(webui_infotext({**BASE, **fields}, i))).prompt == want


def test_no_bdm_fields():
    assert it.params_to_args(webui_parse(webui_infotext(BASE))) is None
    assert it.params_to_positional({"BDM prompt": "红", "BDM strength": "x"}) == [True, "", 1.0, "红", ""]
