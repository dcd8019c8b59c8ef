"""BDM under the WebUI's memory and precision flags: `--medvram`, `--lowvram`, half precision
(`--precision half`, and `--upcast-sampling` with a half model). One WebUI per configuration, with a
private copy of config.json, compared with the main test server (`--no-half --precision full`).

On a CPU: `--medvram`/`--lowvram` install the WebUI's module-moving hooks (moves are CPU→CPU), which is
what BDM must coexist with; images must equal the main server's bit for bit. Half precision runs the
UNet (and the branch, in the UNet's dtype) in float16 on the CPU; images must be close to the float32
ones and BDM must still have its effect.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.host_util import bdm_error, info, mean_diff, same, stop_server
from tests.webui.compat import generate, make_world, probe_state
from tests.webui.conftest import BASE, start_server

CONFIGS = {
    "medvram": ["--medvram"],
    "lowvram": ["--lowvram"],
    "precision-half": ["--precision", "half"],
    "upcast-sampling": ["--upcast-sampling", "--precision", "autocast"],
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def flagged(request, webui):
    name = request.param
    settings = Path(f"/tmp/bdm-webui-{name}-config.json")
    shutil.copyfile(webui.dir / "config.json", settings)
    server = start_server(webui.dir, CONFIGS[name], log_path=Path(f"/tmp/bdm-webui-{name}.log"),
                          settings_file=settings, skip_install=True)
    server.name = name
    try:
        yield server
    finally:
        stop_server(server)


def test_bdm_under_flags(webui, flagged):
    world = make_world(webui.dir)
    try:  # (a skip must also switch the checkpoints back: the next test module shares the main server)
        if world.toy:
            for s in (webui, flagged):
                s.post("/sdapi/v1/options", {"sd_model_checkpoint": world.checkpoint})
        status, body = flagged.call("POST", "/sdapi/v1/txt2img", dict(BASE))
        if status != 200 and "NVIDIA" in str(body):
            pytest.skip(f"{flagged.name}: the WebUI itself cannot generate on a CPU with these flags "
                        f"(plain generation fails: {str(body)[:160]})")
        ref_plain = generate(webui, world)
        ref_on = generate(webui, world, world.bdm_args())
        plain = generate(flagged, world)
        on = generate(flagged, world, world.bdm_args())
        again = generate(flagged, world, world.bdm_args())
        after = generate(flagged, world)
    finally:
        if world.toy:
            for s in (webui, flagged):
                s.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
    assert not bdm_error(on), f"{flagged.name}: {bdm_error(on)}"
    assert "BDM prompt" in info(on)["infotexts"][0], info(on)["infotexts"][0]
    assert same(on, again), "BDM is not deterministic under these flags"
    assert same(after, plain), "a plain generation changed after BDM was used"
    st = probe_state(flagged)
    assert st["last"]["unet_calls"] > 0 and st["runs"] == 0
    if flagged.name in ("medvram", "lowvram"):
        assert same(plain, ref_plain) and same(on, ref_on), f"{flagged.name} changed the images"
    else:
        assert st["bridges"][0]["dtype"] == "torch.float16", st["bridges"]
        # float16 vs float32: close, and BDM's effect is still there
        d = mean_diff(on, ref_on)
        assert d < 0.25 * mean_diff(ref_on, ref_plain) + 2.0, (d, mean_diff(ref_on, ref_plain))
        assert mean_diff(on, plain) > 0.5
    if world.judge:
        v = world.judge(on, BASE["batch_size"])
        assert sum(c == world.prompts[0][1]["colour"] for c in v["colour"]) >= 1, v
