"""The branch and its injection equal diffusers' ControlNetModel + UNet2DConditionModel residual path,
on weights in the official BDM1.0 (diffusers) format; injection also works on the original ldm UNet."""
import pytest
import torch

import bdm
from bdm.formats.controlnet import load_controlnet, save_controlnet
from bdm.formats.diffusers_names import (diffusers_unet2d_config, diffusers_unet_config, ldm_to_diffusers)
from bdm.unet import SMALL, UNetModel

from .util import CN_DIM, build_random, ldm_unet, load_assigned, make_official_dir, max_diff, oracle, randomize_

diffusers = oracle("diffusers")
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("official")
    directory, peer_cn = make_official_dir(tmp)
    unet = build_random(lambda: UNetModel(SMALL), seed=2)
    peer_unet = load_assigned(lambda: diffusers.UNet2DConditionModel(**diffusers_unet2d_config(SMALL)),
                              ldm_to_diffusers(unet.state_dict(), SMALL))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([800, 30])
    en = torch.randn(2, 7, SMALL.context_dim, generator=g)
    cn = torch.randn(2, 52, CN_DIM, generator=g)
    return dict(dir=directory, peer_cn=peer_cn, unet=unet, peer_unet=peer_unet, x=x, t=t, en=en, cn=cn)


@torch.no_grad()
def peer_residuals(w, cn=None, scale=1.0):
    hint = torch.zeros(w["x"].shape[0], 3, 128, 128)
    return w["peer_cn"](w["x"], w["t"], encoder_hidden_states=w["cn"] if cn is None else cn,
                        controlnet_cond=hint, conditioning_scale=scale, return_dict=False)


@torch.no_grad()
def test_official_branch_residuals_equal_diffusers_controlnet(world):
    bridge = bdm.load_bridge(world["dir"])
    assert not bridge.is_controlnet and bridge.context_dim == CN_DIM
    down, mid = bridge(world["x"], world["t"], world["cn"])
    peer_down, peer_mid = peer_residuals(world)
    assert len(down) == len(peer_down) == len(SMALL.channel_mult) * (SMALL.num_res_blocks + 1)
    for ours, theirs in zip(down, peer_down):
        assert theirs.abs().mean() > 1e-3 and max_diff(ours, theirs) <= 1e-4
    assert max_diff(mid, peer_mid) <= 1e-4


@torch.no_grad()
def test_full_bdm_eps_equals_diffusers_unet_with_additional_residuals(world):
    bridge = bdm.load_bridge(world["dir"])
    unet, x, t, en = world["unet"], world["x"], world["t"], world["en"]
    plain = unet(x, t, context=en)
    with bdm.attach(unet, bridge, world["cn"], strength=0.7):
        ours = unet(x, t, context=en)
    peer_down, peer_mid = peer_residuals(world, scale=0.7)
    expected = world["peer_unet"](x, t, encoder_hidden_states=en, down_block_additional_residuals=peer_down,
                                  mid_block_additional_residual=peer_mid).sample
    assert max_diff(ours, plain) > 1e-2  # the branch does something
    assert max_diff(ours, expected) <= 1e-4
    assert torch.equal(unet(x, t, context=en), plain)  # detached: exactly the backbone again


@torch.no_grad()
def test_fresh_branch_from_backbone_leaves_output_bit_identical(world):
    unet, x, t, en = world["unet"], world["x"], world["t"], world["en"]
    bridge = bdm.from_backbone(unet, CN_DIM)
    sd, own = unet.state_dict(), bridge.state_dict()
    copied = [k for k in own if k in sd and sd[k].shape == own[k].shape]
    assert all(torch.equal(own[k], sd[k]) for k in copied)
    fresh = sorted(k for k in own if k not in copied)
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k or k.startswith(("zero_convs", "middle_block_out"))
               for k in fresh)
    assert any(".attn2.to_k." in k for k in fresh)
    assert all(bridge.state_dict()[k].abs().sum() == 0 for k in fresh if "zero_convs" in k)
    assert not any(p is q for p in bridge.parameters() for q in unet.parameters())
    plain = unet(x, t, context=en)
    with bdm.attach(unet, bridge, world["cn"]):
        assert torch.equal(unet(x, t, context=en), plain)


@torch.no_grad()
def test_explicit_residuals_equal_the_hooks_and_diffusers(world):
    """The UNet the project owns takes the residuals as an argument; `bdm.attach`'s hooks (for UNets it
    does not own) give the same numbers bit for bit — a BDM branch with a strength, a ControlNet with its
    hint reading the English context at per-row strengths — and both equal diffusers' additional residuals.
    With the encoder half shared by equal rows the explicit path gives the same ε; hooks refuse it."""
    bridge = bdm.load_bridge(world["dir"])
    unet, x, t, en, cn = world["unet"], world["x"], world["t"], world["en"], world["cn"]
    explicit = unet(x, t, en, residuals=bridge.residuals(x, t, cn, 0.7))
    with bdm.attach(unet, bridge, cn, strength=0.7):
        hooked = unet(x, t, context=en)
    assert torch.equal(explicit, hooked)
    peer_down, peer_mid = peer_residuals(world, scale=0.7)
    expected = world["peer_unet"](x, t, encoder_hidden_states=en, down_block_additional_residuals=peer_down,
                                  mid_block_additional_residual=peer_mid).sample
    assert max_diff(explicit, expected) <= 1e-4 and max_diff(explicit, unet(x, t, en)) > 1e-2
    control = randomize_(bdm.Bridge(bdm.BridgeConfig(SMALL, hint_channels=3)), 6)
    hint, strength = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)), torch.tensor([0.5, 1.0])
    explicit = unet(x, t, en, residuals=control.residuals(x, t, en, strength, hint))
    with bdm.attach(unet, control, lambda x_, t_, en_: en_, strength, hint=hint):
        hooked = unet(x, t, context=en)
    assert torch.equal(explicit, hooked) and max_diff(explicit, unet(x, t, en)) > 1e-2
    pair_x, pair_t, pair_en = x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2), en[:1].repeat(2, 1, 1)
    residuals = bridge.residuals(pair_x, pair_t, cn)
    shared = unet(pair_x, pair_t, pair_en, residuals=residuals, encoder_copies=2)
    assert max_diff(shared, unet(pair_x, pair_t, pair_en, residuals=residuals)) <= 1e-5
    assert max_diff(shared[0], shared[1]) > 1e-2  # the rows' Chinese contexts differ
    with bdm.attach(unet, bridge, cn), pytest.raises(RuntimeError, match="without encoder_copies"):
        unet(pair_x, pair_t, pair_en, encoder_copies=2)


@torch.no_grad()
def test_attach_on_original_ldm_unet_matches_ours_and_detaches_exactly(world):
    bridge = bdm.load_bridge(world["dir"])
    unet, x, t, en, cn = world["unet"], world["x"], world["t"], world["en"], world["cn"]
    ldm = load_assigned(lambda: ldm_unet(SMALL), unet.state_dict())
    before = ldm(x, t, context=en)
    with bdm.attach(unet, bridge, cn):
        ours = unet(x, t, context=en)
    with bdm.attach(ldm, bridge, cn) as attachment:
        assert attachment.attached
        theirs = ldm(x, t, context=en)
    assert max_diff(ours, theirs) <= 1e-4 and max_diff(theirs, before) > 1e-2
    assert torch.equal(ldm(x, t, context=en), before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ldm.modules())


@torch.no_grad()
def test_attach_works_when_forward_was_replaced_by_a_wrapper(world):
    """The ControlNet extension sets an instance `forward`; hooks must still apply, before or after."""
    bridge = bdm.load_bridge(world["dir"])
    unet, x, t, en, cn = world["unet"], world["x"], world["t"], world["en"], world["cn"]
    with bdm.attach(unet, bridge, cn):
        expected = unet(x, t, context=en)
    original = unet.forward
    calls = []

    def wrapper(x, timesteps=None, context=None, **kwargs):
        calls.append(x.shape[0])
        return original(x, timesteps, context=context, **kwargs)

    unet.forward = wrapper
    try:
        with bdm.attach(unet, bridge, cn):
            got = unet(x, t, context=en)
    finally:
        del unet.forward
    assert calls == [2] and torch.equal(got, expected)


@torch.no_grad()
def test_two_branches_sum_and_rows_get_their_own_context(world, tmp_path):
    unet, x, t, en, cn = world["unet"], world["x"], world["t"], world["en"], world["cn"]
    a = bdm.load_bridge(world["dir"])
    other_dir, other_peer = make_official_dir(tmp_path, seed=12)
    b = bdm.load_bridge(other_dir)
    cn2 = cn.flip(0)
    with bdm.attach(unet, a, cn), bdm.attach(unet, b, cn2):
        both = unet(x, t, context=en)
    da, ma = peer_residuals(world)
    db, mb = other_peer(x, t, encoder_hidden_states=cn2, controlnet_cond=torch.zeros(2, 3, 128, 128),
                        return_dict=False)
    expected = world["peer_unet"](x, t, encoder_hidden_states=en,
                                  down_block_additional_residuals=[p + q for p, q in zip(da, db)],
                                  mid_block_additional_residual=ma + mb).sample
    assert max_diff(both, expected) <= 1e-4
    # per-row: a batch of two rows equals each row run alone with its own context
    with bdm.attach(unet, a, cn):
        batched = unet(x, t, context=en)
    for i in range(2):
        with bdm.attach(unet, a, cn[i:i + 1]):
            alone = unet(x[i:i + 1], t[i:i + 1], context=en[i:i + 1])
        assert max_diff(batched[i:i + 1], alone) <= 1e-5


@torch.no_grad()
def test_strength_zero_is_bit_exact_and_per_row_strength(world):
    bridge = bdm.load_bridge(world["dir"])
    unet, x, t, en, cn = world["unet"], world["x"], world["t"], world["en"], world["cn"]
    plain = unet(x, t, context=en)
    with bdm.attach(unet, bridge, cn, strength=0.0):
        assert torch.equal(unet(x, t, context=en), plain)
    with bdm.attach(unet, bridge, cn, strength=torch.tensor([0.0, 1.0])):
        mixed = unet(x, t, context=en)
    with bdm.attach(unet, bridge, cn):
        full = unet(x, t, context=en)
    assert torch.equal(mixed[0], plain[0]) and max_diff(mixed[1], full[1]) <= 1e-6


@torch.no_grad()
def test_per_call_context_function_and_row_mismatch_error(world):
    bridge = bdm.load_bridge(world["dir"])
    unet, x, t, en, cn = world["unet"], world["x"], world["t"], world["en"], world["cn"]
    seen = []

    def rows_context(x_, t_, en_):
        seen.append((x_.shape[0], en_.shape))
        return cn[: x_.shape[0]]

    with bdm.attach(unet, bridge, rows_context):
        unet(x, t, context=en)
    assert seen == [(2, en.shape)]
    with bdm.attach(unet, bridge, cn[:2].repeat(2, 1, 1)):
        with pytest.raises(ValueError, match="4 rows but the UNet call has 2"):
            unet(x, t, context=en)


@torch.no_grad()
def test_blocks_run_outside_a_unet_call_get_nothing_stale(world):
    """ControlNet's reference-only pass runs blocks without the UNet's hooks: nothing may be added."""
    bridge = bdm.load_bridge(world["dir"])
    unet, x, t, en, cn = world["unet"], world["x"], world["t"], world["en"], world["cn"]
    h = torch.randn(2, unet.middle_block[0].in_layers[0].num_channels, 4, 4)
    emb = unet.time_embed(torch.randn(2, SMALL.model_channels))
    clean = unet.middle_block(h, emb, en)
    with bdm.attach(unet, bridge, cn):
        unet(x, t, context=en)
        assert torch.equal(unet.middle_block(h, emb, en), clean)
        original = unet.forward

        def failing(*args, **kwargs):
            raise RuntimeError("boom")

        unet.forward = failing
        with pytest.raises(RuntimeError, match="boom"):
            unet(x, t, context=en)
        del unet.forward
        if bdm.inject._ALWAYS_CALL:
            assert torch.equal(unet.middle_block(h, emb, en), clean)
        assert unet.forward == original


@torch.no_grad()
def test_ldm_controlnet_file_loads_into_the_same_class_and_equals_diffusers(tmp_path):
    cfg = SMALL
    cn = build_random(lambda: bdm.Bridge(bdm.BridgeConfig(cfg, hint_channels=3)), seed=4)
    path = save_controlnet(tmp_path / "control_tiny.safetensors", cn)
    loaded = load_controlnet(path)
    assert loaded.is_controlnet and isinstance(loaded, bdm.Bridge)
    peer = load_assigned(lambda: diffusers.ControlNetModel(**diffusers_unet_config(cfg)),
                         ldm_to_diffusers(cn.state_dict(), cfg, decoder=False, controlnet=True))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])
    ctx, hint = torch.randn(1, 5, cfg.context_dim, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    down, mid = loaded(x, t, ctx, hint=hint)
    peer_down, peer_mid = peer(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    assert all(max_diff(a, b) <= 1e-4 for a, b in zip(down, peer_down)) and max_diff(mid, peer_mid) <= 1e-4
    with pytest.raises(ValueError, match="needs a hint"):
        loaded(x, t, ctx)
