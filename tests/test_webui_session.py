"""The WebUI session (starting a generation's run, its failures), the token counter and the model
route's body — everything the script only wires up, tested without a WebUI."""
from __future__ import annotations

import re
import types

import pytest
import torch

import bdm
from bdm.formats import bdm_file
from bdm.unet import UNetConfig, UNetModel
from bdm.webui.api_args import BdmArgs
from bdm.webui.counter import counter_html
from bdm.webui.errors import BdmError
from bdm.webui.models import discover_models
from bdm.webui.routes import api_dependencies, models_listing
from bdm.webui.session import CONTINUE, STOP, Session, Settings, truncation_warnings
from tests.util import build_random

TINY = UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                  num_heads=1, context_dim=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from bdm.text.chinese import ChineseTextEncoder
    root = tmp_path_factory.mktemp("webui")
    folder = root / "models" / "bdm"
    unet = build_random(lambda: UNetModel(TINY), seed=1)
    bdm_file.save_bdm(folder / "tiny.safetensors", bdm.from_backbone(unet, 64), ChineseTextEncoder.tiny(seed=0))
    (folder / "lora.safetensors").parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(folder / "lora.safetensors"))
    entries = discover_models([folder], labels={folder: "models/bdm"})
    return types.SimpleNamespace(root=root, unet=unet, entries=entries)


def _begin(session, world, args, **kw):
    p = object()
    run = session.begin(p, args, world.entries, world.unet, kw.pop("refusal", None), kw.pop("n", 2),
                        kw.pop("settings", Settings()), **kw)
    return p, run


def test_begin_opens_a_run_with_infotext_and_remembers_the_model(world):
    s = Session(log=lambda m: None)
    p, run = _begin(s, world, BdmArgs(enabled=True, model="tiny", prompt="红色的圆形", negative_prompt="模糊"))
    assert s.run_for(p) is run and s.open_runs() == 1 and s.run_for(object()) is None
    tiny = next(e for e in world.entries if e.name == "tiny")
    assert run.entry == tiny and s.last_used == tiny.title
    assert run.infotext == {"BDM model": "tiny", "BDM model hash": tiny.hash, "BDM prompt": "红色的圆形",
                            "BDM negative prompt": "模糊", "BDM strength": 1.0}
    assert [e for e, _ in s.manager.loaded()] == [tiny]
    run.ensure_attached(world.unet)
    assert s.end(p) is run and s.open_runs() == 0 and not world.unet._forward_pre_hooks
    # without a model name: the last used (here: the only BDM file besides the LoRA, sorted after it)
    _, again = _begin(s, world, BdmArgs(enabled=True, prompt="红色"))
    assert again.entry == tiny
    s.close_all()
    assert s.open_runs() == 0


@pytest.mark.parametrize("args, kw, status, message", [
    (BdmArgs(enabled=True, model="nope"), {}, 422, r"no BDM model 'nope' \(installed: lora \[.*tiny \["),
    (BdmArgs(enabled=True, model="lora"), {}, 500,
     r"cannot load the BDM model 'lora' \(models/bdm/lora.safetensors\): models/bdm/lora.safetensors: this is a LoRA"),
    (BdmArgs(enabled=True, model="tiny"), {"refusal": "the loaded checkpoint is SDXL; BDM needs an SD1.x checkpoint"},
     409, "BDM is not applied: the loaded checkpoint is SDXL"),
    (BdmArgs(enabled=True, model="tiny [0000000000]"), {}, 422, "has hash .*, not 0000000000"),
])
def test_begin_failures_are_bdm_errors_naming_what_is_wrong(world, args, kw, status, message):
    s = Session(log=lambda m: None)
    with pytest.raises(BdmError, match=message) as e:
        _begin(s, world, args, **kw)
    assert e.value.status_code == status and str(world.root) not in str(e.value)
    assert s.open_runs() == 0


def test_no_model_installed_says_where_to_put_one(world):
    s = Session(log=lambda m: None)
    with pytest.raises(BdmError, match=r"no BDM model is installed: put a BDM .safetensors file into models/bdm "
                                       r"or --bdm-models-path.*qihoo360/BDM1.0"):
        s.begin(object(), BdmArgs(enabled=True, prompt="红"), [], world.unet, None, 1,
                Settings(model_folders=("models/bdm", "--bdm-models-path")))


def test_a_branch_for_another_unet_is_refused(world):
    s = Session(log=lambda m: None)
    wider = build_random(lambda: UNetModel(UNetConfig(**{**TINY.to_dict(), "model_channels": 64})), seed=0)
    with pytest.raises(BdmError, match="'tiny' .*does not fit the loaded checkpoint: .*model_channels 32") as e:
        s.begin(object(), BdmArgs(enabled=True, model="tiny"), world.entries, wider, None, 1, Settings())
    assert e.value.status_code == 409


def test_what_stops_a_generation():
    with_text = BdmArgs(enabled=True, prompt="红色")
    assert Session.stops(with_text, Settings(on_error=STOP))
    assert Session.stops(BdmArgs(enabled=True, negative_prompt="模糊"), Settings())
    assert not Session.stops(with_text, Settings(on_error=CONTINUE))  # the user's choice: a warning
    assert not Session.stops(BdmArgs(enabled=True), Settings())  # enabled, both boxes empty: a warning
    assert not Session.stops(BdmArgs(enabled=False, prompt="红色"), Settings())


def test_fail_registers_a_run_that_stops_the_generation():
    s = Session(log=lambda m: None)
    p = object()
    run = s.fail(p, BdmError("no BDM model 'x'", 422))
    assert s.run_for(p) is run and run.error is not None and run.bridge is None
    s.close_all()


def test_truncation_is_reported_like_the_webuis_english_warning(world):
    s = Session(log=lambda m: None)
    long = "红色的圆形" * 60  # 300 tokens: 5 chunks of 50 are kept
    _, run = _begin(s, world, BdmArgs(enabled=True, model="tiny", prompt=long), n=1)
    warnings = truncation_warnings(run)
    assert len(warnings) == 1
    assert re.match(r"Warning: too many input tokens in the BDM Chinese prompt; some \(50\) have been truncated",
                    warnings[0]), warnings
    _, short = _begin(s, world, BdmArgs(enabled=True, model="tiny", prompt="红色"), n=1)
    assert truncation_warnings(short) == []
    s.close_all()


def test_counter_marks_an_over_long_prompt_with_one_class_attribute():
    under = counter_html("红色的圆形")
    assert under == "<span class='gr-box gr-text-input'>5/50</span>"
    over = counter_html("红色的圆形" * 60)
    assert len(re.findall(r"\bclass=", over)) == 1
    assert "class='gr-box gr-text-input bdm-over'" in over and ">300/250<" in over


def test_counter_counts_the_longest_text_of_a_prompt_edit():
    assert ">5/50<" in counter_html("[红色:蓝色的圆形:0.5]")  # 蓝色的圆形, not the 11 characters typed
    assert ">2/50<" in counter_html("[红色|蓝色]")
    assert ">5/50<" in counter_html("[红色:蓝色")  # still being typed: counted as it stands, ":" included


def test_route_dependencies_come_from_the_webuis_api():
    auth = object()
    app = types.SimpleNamespace(routes=[types.SimpleNamespace(path="/docs"),
                                        types.SimpleNamespace(path="/sdapi/v1/sd-models", dependencies=[auth])])
    assert api_dependencies(app) == [auth]
    assert api_dependencies(types.SimpleNamespace(routes=[types.SimpleNamespace(path="/")])) is None


def test_models_listing_has_no_absolute_paths(world):
    body = models_listing(world.entries, "None", world.entries[1].title, ("models/bdm",))
    assert [m["file"] for m in body["models"]] == ["models/bdm/lora.safetensors", "models/bdm/tiny.safetensors"]
    assert str(world.root) not in repr(body)
