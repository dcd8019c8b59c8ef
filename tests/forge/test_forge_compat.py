"""BDM in Forge with the toy world, judged by the toy judge: the Chinese prompt's colour and shape, Forge's
built-in LoRA and built-in ControlNet together with BDM, hires fix, img2img, batches with per-image
prompts, the X/Y/Z plot, a fine-tuned checkpoint; interrupts and failures leave nothing behind; 30
alternating requests do not leak."""
from __future__ import annotations

import numpy as np
import pytest

from bdm.toy import domain as D
from tests.forge.conftest import BASE, CHECKPOINT
from tests.host_checks import interrupt_mid_sampling
from tests.host_util import ToyJudge, bdm_error, hint, info, mean_diff, pixels, png_b64, rate, same

TOY, LORA, CONTROLNET, OUTLINE = "bdm-toy", "bdm-toy-striped", "bdm-toy-bbox", "bdm-toy-sd1-outline"
SPECS = [("red", "circle"), ("blue", "triangle"), ("green", "square"), ("yellow", "circle")]
PROMPTS = [(D.chinese_caption(D.Spec(c, s, 4, "large"), D.held_out_templates("zh")[0]), c, s) for c, s in SPECS]


def bdm(prompt=PROMPTS[0][0], **kw) -> dict:
    return {"BDM": {"args": [dict({"enabled": True, "prompt": prompt, "model": TOY}, **kw)]}}


def generate(forge, scripts=None, route="txt2img", **kw):
    payload = dict(BASE, **kw)
    if scripts:
        payload["alwayson_scripts"] = scripts
    return forge.post(f"/sdapi/v1/{route}", payload)


def controlnet(position: int, weight: float = 1.0) -> dict:
    return {"ControlNet": {"args": [{"enabled": True, "module": "None", "model": CONTROLNET_TITLE[0], "weight": weight,
                                     "image": hint(position, True), "resize_mode": "Just Resize"}]}}


CONTROLNET_TITLE = [""]


@pytest.fixture(scope="module")
def judge():
    return ToyJudge()


@pytest.fixture(scope="module")
def refs(forge):
    models = forge.get("/controlnet/model_list")["model_list"]
    CONTROLNET_TITLE[0] = next(m for m in models if m.split(" [")[0] == CONTROLNET)
    return {"plain": generate(forge), "bdm": generate(forge, bdm())}


def _judged(forge, judge, scripts_for, batch=4, **kw):
    """(verdict, prompt tuple) per Chinese prompt of PROMPTS, `batch` images each."""
    out = []
    for i, (prompt, colour, shape) in enumerate(PROMPTS):
        r = generate(forge, scripts_for(i, prompt), batch_size=batch, **kw)
        assert not bdm_error(r), bdm_error(r)
        out.append((judge(r, batch), (prompt, colour, shape), r))
    return out


def test_chinese_prompt_gives_colour_and_shape(forge, judge, refs):
    """16 images (4 prompts × 4 seeds): colour ≥ 90 %, shape ≥ 75 %; the English prompt is empty."""
    runs = _judged(forge, judge, lambda i, p: bdm(p))
    colour = np.mean([rate(v["colour"], c) for v, (_, c, _), _ in runs])
    shape = np.mean([rate(v["shape"], s) for v, (_, _, s), _ in runs])
    print(f"BDM in Forge: colour {colour:.1%}, shape {shape:.1%} over {4 * len(runs)} images")
    assert colour >= 0.9 and shape >= 0.75, [(v["colour"], v["shape"], p) for v, p, _ in runs]
    plain = judge(generate(forge, batch_size=4))
    assert rate(plain["colour"], "red") < 1.0  # the backbone alone does not draw red by itself


def test_lora_style_with_the_chinese_colour(forge, judge, refs):
    lora = f"<lora:{LORA}:1> {D.LORA_TRIGGER}"
    before = forge.state()["branches"][0]["digest"]
    plain_lora = generate(forge, prompt=lora)
    assert "Lora hashes" in info(plain_lora)["infotexts"][0]
    runs = _judged(forge, judge, lambda i, p: bdm(p), prompt=lora)
    stripes = np.mean([rate(v["background"], "striped") for v, _, _ in runs])
    colour = np.mean([rate(v["colour"], c) for v, (_, c, _), _ in runs])
    print(f"BDM + LoRA in Forge: striped {stripes:.1%}, colour {colour:.1%} over {4 * len(runs)} images")
    assert stripes >= 0.8 and colour >= 0.8, [(v["background"], v["colour"], p) for v, p, _ in runs]
    assert forge.state()["branches"][0]["digest"] == before, "the LoRA changed the branch's weights"
    zero = generate(forge, bdm(strength=0.0), prompt=lora)  # strength 0: plain + LoRA, bit for bit
    assert same(zero, plain_lora) and same(generate(forge, prompt=lora), plain_lora)


def test_builtin_controlnet_with_bdm(forge, judge, refs):
    """Position from the built-in ControlNet's hint, colour and shape from the Chinese prompt: both links
    of Forge's control chain apply."""
    cn_only = generate(forge, controlnet(0))
    assert len(cn_only["images"]) == BASE["batch_size"] + 1, "the ControlNet did not run (no control map)"
    both = generate(forge, {**controlnet(0), **bdm()})
    assert len(both["images"]) == BASE["batch_size"] + 1 and not bdm_error(both)
    assert mean_diff(both, cn_only, 2) > 0.5 and mean_diff(both, refs["bdm"], 2) > 0.5
    runs = []
    for pos, (prompt, colour, shape) in zip((0, 2, 6, 8), PROMPTS):
        v = judge(generate(forge, {**controlnet(pos), **bdm(prompt)}, batch_size=4), 4)
        runs.append((rate(v["position"], pos), rate(v["colour"], colour), rate(v["shape"], shape)))
    position, colour, shape = (float(np.mean([r[i] for r in runs])) for i in range(3))
    print(f"BDM + ControlNet in Forge: position {position:.1%}, colour {colour:.1%}, shape {shape:.1%} over 16 images")
    assert position >= 0.8 and colour >= 0.8 and shape >= 0.6, runs
    assert same(generate(forge, controlnet(0)), cn_only), "ControlNet alone changed after BDM was used"


def test_prompt_editing_in_the_chinese_box_follows_forges_steps(forge, judge, refs):
    """`[A:B:n]` in the Chinese box switches the context at the denoiser's step n of Forge's sampler: early
    switch → B's colour, late switch → A's (the composition is fixed in the first steps)."""
    edit = "[红色的圆形:蓝色的三角形:{}]"
    early = judge(generate(forge, bdm(edit.format(1)), batch_size=4), 4)
    late = judge(generate(forge, bdm(edit.format(BASE["steps"] - 1)), batch_size=4), 4)
    assert rate(early["colour"], "blue") >= 0.75 and rate(late["colour"], "red") >= 0.75, (early, late)


def test_hires_fix_both_passes_get_the_branch(forge, judge, refs):
    # (Forge's API needs hr_additional_modules for a hires pass: it fails on None)
    hr = dict(enable_hr=True, hr_scale=2, hr_second_pass_steps=4, hr_upscaler="Latent", denoising_strength=0.6,
              hr_additional_modules=["Use same choices"])
    plain = generate(forge, **hr)
    on = generate(forge, bdm(PROMPTS[1][0]), batch_size=4, **hr)
    calls = forge.state()["last"]["unet_calls"]
    assert calls > BASE["steps"], f"{calls} branch calls: the hires pass did not get the branch"
    assert pixels(on)[0].shape[:2] == (128, 128) and mean_diff(on, plain, 2) > 0.5
    v = judge({"images": [png_b64(a[::2, ::2, :3]) for a in pixels(on)]}, 4)  # the judge sees 64 × 64
    print(f"hires: {calls} branch calls, colour {v['colour']}")
    assert rate(v["colour"], PROMPTS[1][1]) >= 0.75, v


def test_img2img_and_inpainting_mask(forge, judge, refs):
    init = refs["plain"]["images"][0]
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    i2i = dict(init_images=[init], denoising_strength=0.75, batch_size=1, mask=png_b64(mask), mask_blur=0,
               inpainting_fill=1, inpaint_full_res=False, inpainting_mask_invert=0)
    off = generate(forge, route="img2img", **i2i)
    on = generate(forge, bdm(), route="img2img", **i2i)
    assert forge.state()["last"]["unet_calls"] > 0 and not bdm_error(on)
    src = pixels(refs["plain"])[0][..., :3]
    a, b = pixels(on)[0][..., :3], pixels(off)[0][..., :3]
    assert (a[:, :32] == src[:, :32]).all(), "the unmasked half changed"
    assert np.abs(a[:, 32:].astype(int) - b[:, 32:].astype(int)).mean() > 0.5, "BDM had no effect inside the mask"
    full = generate(forge, bdm(PROMPTS[1][0]), route="img2img", init_images=[init], denoising_strength=0.9, batch_size=4)
    assert rate(judge(full, 4)["colour"], "blue") >= 0.75, judge(full, 4)


def test_batch_4x2_per_image_prompts(forge, judge, refs):
    """Image k of a 4 × 2 job with per-image Chinese prompts is the image made alone with seed 1+k and
    prompt k: every row of every batch got its own Chinese context."""
    prompts = [p for p, _, _ in PROMPTS] * 2
    job = generate(forge, bdm(prompts), batch_size=4, n_iter=2)
    images = pixels(job)[-8:]
    assert info(job)["all_seeds"] == list(range(1, 9)) and len(images) == 8
    for k in (0, 3, 5):
        alone = generate(forge, bdm(prompts[k]), batch_size=1, seed=1 + k)
        d = np.abs(images[k].astype(int) - pixels(alone)[0].astype(int))
        assert d.max() <= 3, f"image {k}: max diff {d.max()} to the same request alone"
    texts = info(job)["infotexts"]
    assert all(f"BDM prompt: {prompts[k]}" in texts[k] for k in range(8))
    colours = judge({"images": job["images"][-8:]}, 8)["colour"]
    assert sum(c == PROMPTS[k % 4][1] for k, c in enumerate(colours)) >= 7, colours


def test_finetuned_checkpoint_and_back(forge, judge, refs):
    forge.post("/sdapi/v1/options", {"sd_model_checkpoint": OUTLINE})
    try:
        v = judge(generate(forge, bdm(), batch_size=4), 4)
        assert rate(v["drawing"], "outline") >= 0.75 and rate(v["colour"], PROMPTS[0][1]) >= 0.75, v
    finally:
        forge.post("/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINT})
    assert same(generate(forge), refs["plain"]) and same(generate(forge, bdm()), refs["bdm"])


def test_refiner_switch_the_branch_joins_the_refiner(forge, judge, refs):
    """Forge loads a refiner mid-sampling with a fresh UNet patcher, without the links of extensions: the
    branch joins the refiner's UNet at the switch and runs every step; the refiner's outline drawing and
    the Chinese prompt's colour are both in the images."""
    plain = generate(forge, refiner_checkpoint=OUTLINE, refiner_switch_at=0.5, batch_size=4)
    r = generate(forge, bdm(), refiner_checkpoint=OUTLINE, refiner_switch_at=0.5, batch_size=4)
    calls = forge.state()["last"]["unet_calls"]
    assert "Refiner" in info(r)["infotexts"][0], info(r)["infotexts"][0]
    assert not bdm_error(r) and calls == BASE["steps"], (bdm_error(r), calls)
    v = judge(r, 4)
    print(f"refiner: {calls} branch calls, colour {v['colour']}, drawing {v['drawing']}")
    assert rate(v["colour"], PROMPTS[0][1]) >= 0.75 and mean_diff(r, plain, 4) > 0.5, v
    assert same(generate(forge, bdm()), refs["bdm"])  # and the next generation is as before


def test_two_controlnet_units_with_bdm(forge, judge, refs):
    units = controlnet(0, 0.8)["ControlNet"]["args"] + controlnet(8, 0.8)["ControlNet"]["args"]
    two = generate(forge, {"ControlNet": {"args": units}, **bdm()})
    two_plain = generate(forge, {"ControlNet": {"args": units}})
    assert len(two["images"]) == BASE["batch_size"] + 2, "two control maps expected"
    assert mean_diff(two, two_plain, 2) > 0.5 and forge.state()["last"]["unet_calls"] == BASE["steps"]
    assert rate(judge(two, 2)["colour"], PROMPTS[0][1]) == 1.0


def test_xyz_plot_axes(forge, refs):
    infos = [s for s in forge.get("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"]]
    choices = next(a["choices"] for a in infos[0]["args"] if a["label"] == "X type")
    p0 = PROMPTS[0][0]
    search, replacement = "红色", "蓝色"
    assert search in p0
    xs, ys = [search, replacement], ["0.5", "1"]
    args = [choices.index("[BDM] Prompt S/R"), ",".join(xs), [], choices.index("[BDM] Strength"), ",".join(ys), [],
            choices.index("[BDM] Model"), "", [TOY], True, True, False, False, False, False, False, 0, False]
    r = generate(forge, bdm(p0, enabled=False), script_name="x/y/z plot", script_args=args, batch_size=1)
    lone = pixels(r)[-4:]  # grids first, then the cells in z, y, x order
    k = 0
    for y in ys:
        for x in xs:
            direct = generate(forge, bdm(p0.replace(search, x), strength=float(y)), batch_size=1)
            assert np.abs(lone[k].astype(int) - pixels(direct)[0].astype(int)).max() <= 1, (x, y)
            k += 1
    texts = info(r)["infotexts"]
    assert any("BDM strength: 0.5" in t for t in texts) and any(f"BDM prompt: {p0.replace(search, replacement)}" in t
                                                                  for t in texts)


@pytest.mark.parametrize("action", ["raise", "interrupt"])
def test_fault_inside_the_branch_then_everything_is_clean(forge, refs, action):
    forge.post("/bdm-test/arm", {"action": action, "at_call": 3})
    status, body = forge.call("POST", "/sdapi/v1/txt2img", dict(BASE, alwayson_scripts=bdm()))
    last = forge.state()["last"]
    assert last.get("fired") == action, last
    if action == "raise":
        assert status == 500 and "BDM test fault" in str(body), (status, str(body)[:500])
    else:
        assert status == 200 and last["unet_calls"] < BASE["steps"], (status, last)
    assert forge.alive()
    # a plain generation is bit-identical to the one made before BDM was ever used in this server
    assert same(forge.txt2img(**BASE), forge.baseline)
    assert forge.state()["runs"] == 0
    assert same(generate(forge, bdm()), refs["bdm"])


def test_interrupt_over_http_mid_sampling(forge, refs):
    status, body = interrupt_mid_sampling(forge, dict(BASE, steps=400, alwayson_scripts=bdm()))
    assert status == 200, str(body)[:500]
    assert 3 <= forge.state()["last"]["unet_calls"] < 400
    assert same(forge.txt2img(**BASE), forge.baseline)
    assert same(generate(forge, bdm()), refs["bdm"])


def test_30_alternating_requests_without_a_leak(forge, refs):
    small = dict(batch_size=1, steps=4)
    offs = [dict(seed=3), dict(prompt="a red thing", seed=4)]
    ons = [(bdm(PROMPTS[0][0]), 5), (bdm(PROMPTS[1][0], negative_prompt="模糊"), 6), (bdm(PROMPTS[2][0], strength=0.7), 7)]
    off_refs = [generate(forge, **small, **v) for v in offs]
    on_refs = []
    for args, seed in ons:  # each one "alone": after a plain request
        generate(forge, **small, **offs[0])
        on_refs.append(generate(forge, args, seed=seed, **small))
    before = forge.state()
    mismatches = []
    for i in range(30):
        if i % 2 == 0:
            k = (i // 2) % len(offs)
            if not same(generate(forge, **small, **offs[k]), off_refs[k]):
                mismatches.append(("off", i, k))
        else:
            k = (i // 2) % len(ons)
            r = generate(forge, ons[k][0], seed=ons[k][1], **small)
            if not same(r, on_refs[k]) or bdm_error(r):
                mismatches.append(("on", i, k, bdm_error(r)))
    after = forge.state()
    assert not mismatches, mismatches
    print(f"30 requests: RSS {before['rss_mb']:.0f} → {after['rss_mb']:.0f} MB; loaded models {after['loaded_models']}")
    assert after["runs"] == 0 and after["patchers"] == 1 and after["manager"] == 1
    assert after["bridge_objects"] == before["bridge_objects"] and after["controls"] <= 1
    assert sorted(after["loaded_models"]) == sorted(before["loaded_models"])
    assert after["rss_mb"] - before["rss_mb"] < 100, (before["rss_mb"], after["rss_mb"])
