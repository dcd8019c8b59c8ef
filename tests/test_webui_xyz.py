"""X/Y/Z plot axes (no WebUI needed)."""
from __future__ import annotations

import types

import pytest
from bdm.webui import xyz
from bdm.webui.api_args import BdmArgs


def test_apply_overrides():
    a = BdmArgs(enabled=False, prompt="红色的圆形", negative_prompt="红色模糊", strength=1.0, model="a")
    assert xyz.apply(a, None) is a
    out = xyz.apply(a, {"prompt_sr": ("红色", "蓝色"), "strength": 0.5, "model": " b "})
    assert out.enabled and out.prompt == "蓝色的圆形" and out.negative_prompt == "蓝色模糊"
    assert out.strength == 0.5 and out.model == "b"
    lists = BdmArgs(prompt=("红色的圆形", "绿色"), negative_prompt="")
    assert xyz.apply(lists, {"prompt_sr": ("红色", "黄色")}).prompt == ("黄色的圆形", "绿色")
    with pytest.raises(RuntimeError, match="did not find"):
        xyz.apply(a, {"prompt_sr": ("绿色", "蓝色")})


def test_install_axes_is_idempotent():
    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices

    module = types.SimpleNamespace(AxisOption=AxisOption, format_value=lambda p, o, x: x,
                                   axis_options=[AxisOption("Nothing", str, None)])
    xyz.install(module, lambda: ["m1", "m2"])
    xyz.install(module, lambda: ["m1", "m2"])  # a script reload must not duplicate the axes
    labels = [o.label for o in module.axis_options]
    assert labels == ["Nothing", *xyz.LABELS]
    p = types.SimpleNamespace()
    by = {o.label: o for o in module.axis_options}
    by[xyz.STRENGTH].apply(p, 0.5, [0.5])
    by[xyz.MODEL].apply(p, "m2", ["m2"])
    assert p.bdm_xyz == {"strength": 0.5, "model": "m2"}
    by[xyz.MODEL].confirm(p, ["m1", "m2 [abc]"])
    with pytest.raises(RuntimeError, match="unknown BDM model"):
        by[xyz.MODEL].confirm(p, ["nope"])
    assert by[xyz.MODEL].choices() == ["m1", "m2"]
