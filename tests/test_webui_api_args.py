"""The script's arguments as the WebUI hands them over: positional (the UI's values, the API's `args`
list) or one JSON object as the first entry; strict about types, since an API client's mistake must
end in an error that says what was expected, never in an image made without BDM."""
from __future__ import annotations

import pytest

from bdm.webui.api_args import ARG_NAMES, ArgsError, BdmArgs, parse_script_args, strength_value, to_positional
from bdm.webui.errors import BdmError

OBJ = {"enabled": True, "prompt": "红色的圆形", "negative_prompt": "", "model": "bdm-toy", "strength": 1.0}
WANT = BdmArgs(enabled=True, model="bdm-toy", strength=1.0, prompt="红色的圆形", negative_prompt="")


def test_positional_order_is_the_ui_order():
    assert ARG_NAMES == ("enabled", "model", "strength", "prompt", "negative_prompt")
    assert parse_script_args([True, "bdm-toy", 1.0, "红色的圆形", ""]) == WANT
    assert to_positional(WANT) == [True, "bdm-toy", 1.0, "红色的圆形", ""]


def test_the_ui_values_pass():
    """What the gradio components give: bool, str (or None from a dropdown without choices), int or
    float from the slider, str."""
    assert parse_script_args([False, None, 1, "", ""]) == BdmArgs()
    assert parse_script_args([True, "m [0123456789]", 0.35, "红", "绿"]).strength == 0.35
    assert parse_script_args([True, "m", 2, "x", "y"]).strength == 2.0


def test_object_as_first_entry():
    assert parse_script_args([OBJ]) == WANT
    # the WebUI fills the remaining positions with the UI defaults: ignored
    assert parse_script_args([OBJ, "None", 1.0, "", ""]) == WANT


def test_omitted_values_take_defaults():
    a = parse_script_args([{"prompt": "红色的圆形"}])
    assert a == BdmArgs(enabled=True, prompt="红色的圆形")  # an object means "use BDM"
    assert parse_script_args([{"enabled": False, "prompt": "x"}]).enabled is False
    assert parse_script_args([]) == BdmArgs()
    assert parse_script_args([True]) == BdmArgs(enabled=True)
    assert parse_script_args([True, None, None, "红"]) == BdmArgs(enabled=True, prompt="红")


def test_per_image_prompt_lists():
    a = parse_script_args([{"prompt": ["红色", "蓝色"]}])
    assert a.prompt == ("红色", "蓝色")
    assert a.prompts(3) == (["红色", "蓝色", "红色"], ["", "", ""])
    assert parse_script_args([True, "", 1.0, ["a", "b"], ""]).prompt == ("a", "b")


def test_has_chinese_text():
    assert not BdmArgs(enabled=True).has_chinese_text
    assert not BdmArgs(prompt=" ").has_chinese_text
    assert BdmArgs(negative_prompt="模糊").has_chinese_text
    assert BdmArgs(prompt=("", "红")).has_chinese_text


@pytest.mark.parametrize("bad, message", [
    ([{"promt": "x"}], "unknown BDM argument 'promt'; the known ones are: enabled, model, strength"),
    ([{"cn_prompt": "x"}], "unknown BDM argument 'cn_prompt'"),
    ([{"strength": "0.5"}], r"'strength' must be a number from 0 to 2 \(a JSON number\), got '0.5'"),
    ([{"strength": True}], r"'strength' must be a number .* got True"),
    ([True, "m", "0.5", "x", ""], r"'strength' must be a number .* got '0.5'"),
    ([{"strength": 5}], "'strength' must be from 0 to 2, got 5"),
    ([{"strength": -0.1}], "from 0 to 2"),
    ([{"enabled": "true"}], r"'enabled' must be true or false \(a JSON boolean\), got 'true'"),
    ([1, "m", 1.0, "x", ""], "'enabled' must be true or false"),
    ([{"prompt": 3}], "'prompt' must be a string"),
    ([{"prompt": []}], "'prompt' must be a string"),
    ([{"negative_prompt": ["a", 2]}], "'negative_prompt' must be a string"),
    ([{"model": 3}], "'model' must be a string"),
    ([True, "m", 1.0, "x", "", "extra"], "takes 5 arguments"),
])
def test_errors_say_what_was_expected(bad, message):
    with pytest.raises(ArgsError, match=message) as e:
        parse_script_args(bad)
    assert isinstance(e.value, BdmError) and e.value.status_code == 422


def test_strength_value():
    assert strength_value(0) == 0.0 and strength_value(1.5) == 1.5
    with pytest.raises(ArgsError):
        strength_value(None)
