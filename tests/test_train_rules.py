"""The paper's rule, enforced by the trainer: frozen backbone/VAE/encoders, "" English context, only the
branch learns; the fast path equals bdm.attach; the CLI's minimal call, config files, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from tests.train_util import config, shared_backbone, write_colour_set

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (conftest.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rules")
    return tmp, shared_backbone(tmp_path_factory), write_colour_set(tmp / "data", per_colour=2, size=16)


def test_only_the_branch_learns_and_the_english_context_is_empty(setup, tmp_path):
    from bdm.formats.files import read_state_dict
    from bdm.text.chinese import ChineseTextEncoder
    from bdm.train import Trainer
    _, ckpt, data = setup
    trainer = Trainer(config(tmp_path, ckpt, data, resolution=16, max_steps=2)).prepare()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
             for name, m in trainer.unet.named_modules() if name.endswith("attn2")]
    it = iter(trainer.loader)
    trainer.micro_step(trainer._take(it), sync=True)
    for h in hooks:
        h.remove()
    # every backbone cross-attention saw exactly the embedding of "" (one per row)
    english = trainer_english = load_english(ckpt)
    assert seen and all(torch.equal(ctx, english.expand(ctx.shape[0], -1, -1)) for ctx in seen)
    assert torch.equal(trainer.english, trainer_english)
    # gradients: every branch parameter has one, nothing frozen has one or asks for one
    assert all(p.grad is not None for p in trainer.bridge.parameters())
    for module in (trainer.unet, trainer.vae, trainer.chinese):
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    trainer.optimizer.zero_grad(set_to_none=True)
    result = trainer.run()
    assert result["step"] == 2
    # the backbone and VAE are bit-identical to the file, the Chinese encoder to the toy one
    original = read_state_dict(ckpt)
    for prefix, module in (("model.diffusion_model.", trainer.unet), ("first_stage_model.", trainer.vae)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, original[prefix + k]), k
    toy = ChineseTextEncoder.tiny(0).model.state_dict()
    assert all(torch.equal(v, toy[k]) for k, v in trainer.chinese.model.state_dict().items())
    # …and the branch did move
    from bdm.bridge import Bridge
    from bdm.formats.checkpoint import load_unet
    fresh = Bridge.from_backbone(load_unet(ckpt).float(), 64)
    moved = [k for k, v in trainer.bridge.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any(k.startswith("zero_convs") for k in moved)


def test_long_captions_train_on_the_official_layout(setup, tmp_path):
    from bdm.train import Trainer
    _, ckpt, data = setup
    trainer = Trainer(config(tmp_path, ckpt, data, resolution=16, batch_size=2, max_steps=1,
                             caption_dropout=0.0)).prepare()
    batch = trainer._take(iter(trainer.loader))
    batch["text"] = ["红色的圆形，" * 10, "蓝色"]  # 60 tokens: two chunks, the short caption padded to two
    _, _, chinese, _ = trainer.batch_inputs(batch)
    assert chinese.shape[1] == 102  # 50*k + 2
    torch.testing.assert_close(chinese, trainer.chinese.encode(batch["text"]).to(chinese))


def load_english(ckpt):
    from bdm.formats.checkpoint import load_checkpoint
    return load_checkpoint(ckpt).text_encoder.encode([""])


def frozen_backbone_and_branch(setup):
    """The tiny backbone (frozen), a branch from it with random weights, and inputs for two rows:
    latents, timesteps, an English context [1, 77, 64] and Chinese contexts."""
    from bdm.bridge import Bridge
    from bdm.formats.checkpoint import load_unet
    from tests.util import randomize_
    _, ckpt, _ = setup
    unet = load_unet(ckpt).requires_grad_(False)
    bridge = randomize_(Bridge.from_backbone(unet, 32), 3)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    en, cn = torch.randn(1, 77, 64, generator=g), torch.randn(2, 52, 32, generator=g)
    return unet, bridge, x, t, en, cn


@pytest.mark.parametrize("checkpoint_decoder", [(), (0, 2, 3)])
def test_training_forward_equals_attach_and_records_only_the_decoder(setup, checkpoint_decoder):
    """The trainer's forward — the UNet's own, residuals given, decoder blocks recomputed in backward or
    not — equals the hooks of bdm.attach, values and branch gradients; the frozen backbone's encoder half
    records nothing for backward, and the backbone gets no gradients either way."""
    import bdm
    unet, bridge, x, t, en, cn = frozen_backbone_and_branch(setup)
    recorded = {}
    hooks = [unet.middle_block.register_forward_hook(lambda m, a, out: recorded.setdefault("middle", out)),
             unet.input_blocks[0].register_forward_hook(lambda m, a, out: recorded.setdefault("input", out))]
    ours = unet(x, t, en.expand(2, -1, -1), residuals=bridge(x, t, cn), checkpoint_decoder=checkpoint_decoder)
    for hook in hooks:
        hook.remove()
    assert all(v.grad_fn is None and not v.requires_grad for v in recorded.values())
    assert ours.requires_grad
    ours.square().sum().backward()
    grads = [p.grad.clone() for p in bridge.parameters()]
    assert all(p.grad is None for p in unet.parameters())
    bridge.zero_grad()
    with bdm.attach(unet, bridge, cn):
        ref = unet(x, t, context=en.expand(2, -1, -1))
    ref.square().sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4) for a, p in zip(grads, bridge.parameters()))


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_convolutions_save_less_for_the_same_gradients(setup, autocast):
    """The frozen decoder's convolutions, made lean, keep less for backward and give the same values and
    gradients for the branch's residuals (fp32, and under CPU bf16 autocast)."""
    from bdm.bench.train import SavedBytes
    from bdm.train.lean import LeanConv2d, lean_convolutions
    unet, bridge, x, t, en, cn = frozen_backbone_and_branch(setup)
    en = en.expand(2, -1, -1)
    with torch.no_grad():
        down, mid = bridge(x, t, cn)

    def step():
        residuals = [r.clone().requires_grad_(True) for r in down + [mid]]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast), SavedBytes() as saved:
            eps = unet(x, t, en, residuals=(residuals[:-1], residuals[-1]))
        eps.float().square().sum().backward()
        return eps.detach().float(), [r.grad for r in residuals], saved.total
    plain = step()
    n = lean_convolutions(unet.output_blocks) + lean_convolutions(unet.out)
    assert n > 0 and isinstance(unet.out[-1], LeanConv2d) and not isinstance(bridge.input_blocks[0][0], LeanConv2d)
    lean = step()
    tol = dict(atol=1e-2, rtol=1e-2) if autocast else dict(atol=1e-6, rtol=1e-5)
    assert torch.allclose(plain[0], lean[0], **tol)
    assert all(torch.allclose(a.float(), b.float(), **tol) for a, b in zip(plain[1], lean[1]))
    assert lean[2] < 0.95 * plain[2], (lean[2], plain[2])  # here 7 % less: this decoder is mostly attention
    assert all(p.grad is None for p in unet.parameters())


def test_minimal_cli_call_and_config_files(setup, tmp_path, capsys):
    import bdm
    from bdm.cli import run
    from bdm.train.__main__ import main
    from bdm.train.config import parse_args
    _, ckpt, data = setup
    out = tmp_path / "out"
    rc = run(main, ["--checkpoint", str(ckpt), "--text-encoder", "toy", "--data", str(data), "--output", str(out),
                    "--max-steps", "2", "--resolution", "16", "--batch-size", "2", "--num-workers", "0",
                    "--progress", "false", "--device", "cpu", "--ema", "--lr-schedule", "cosine",
                    "--lr-warmup-steps", "1", "--log-every", "1"])
    assert rc == 0
    bridge = bdm.load_bridge(out / "bdm.safetensors")
    assert bridge.context_dim == 64 and bridge.text_encoder is not None
    assert bridge.meta["bdm.step"] == "2" and bridge.meta["bdm.ema"] == "true"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    # continue from a BDM file, encoder taken from it
    rc = run(main, ["--checkpoint", str(ckpt), "--init-bdm", str(out / "bdm.safetensors"), "--data", str(data),
                    "--output", str(tmp_path / "again"), "--max-steps", "1", "--resolution", "16",
                    "--num-workers", "0", "--progress", "false", "--device", "cpu"])
    assert rc == 0 and (tmp_path / "again" / "bdm.safetensors").is_file()
    # config files: YAML and TOML, flags win, typos refused
    (tmp_path / "c.yaml").write_text(f"checkpoint: {ckpt}\ntext-encoder: toy\ndata: {data}\noutput: o\n"
                                     "max_steps: 7\nlearning_rate: 3.0e-5\nema: true\n")
    c = parse_args(["--config", str(tmp_path / "c.yaml"), "--max-steps", "9"])
    assert (c.max_steps, c.learning_rate, c.ema, c.text_encoder) == (9, 3e-5, True, "toy")
    (tmp_path / "c.toml").write_text(f'checkpoint = "{ckpt}"\ntext_encoder = "toy"\ndata = "{data}"\n'
                                     'output = "o"\nepochs = 2\nmixed_precision = "bf16"\n')
    c = parse_args(["--config", str(tmp_path / "c.toml")])
    assert (c.epochs, c.mixed_precision, c.max_steps) == (2.0, "bf16", None)
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    assert run(main, ["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown option 'learning_rat'" in capsys.readouterr().err


def _error(argv, capsys) -> str:
    from bdm.cli import run
    from bdm.train.__main__ import main
    assert run(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_clear_errors_before_any_work(setup, tmp_path, capsys):
    from bdm.formats.files import read_state_dict, save_safetensors
    tmp, ckpt, data = setup
    out = tmp_path / "out"
    base = ["--text-encoder", "toy", "--output", str(out), "--max-steps", "1", "--resolution", "16",
            "--num-workers", "0", "--device", "cpu"]
    assert "no such backbone" in _error(["--checkpoint", str(tmp / "nope.safetensors"), "--data", str(data)] + base, capsys)
    assert "no such data" in _error(["--checkpoint", str(ckpt), "--data", str(tmp / "nope.jsonl")] + base, capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"image": "a.png"}\n')
    assert "dataset is empty" in _error(["--checkpoint", str(ckpt), "--data", str(empty)] + base, capsys)
    (tmp_path / "empty_dir").mkdir()
    assert "dataset is empty" in _error(["--checkpoint", str(ckpt), "--data", str(tmp_path / "empty_dir")] + base, capsys)
    assert "no such Chinese text encoder" in _error(
        ["--checkpoint", str(ckpt), "--data", str(data), "--text-encoder", str(tmp / "nope")] + base[2:], capsys)
    sdxl = read_state_dict(ckpt)
    sdxl["conditioner.embedders.0.x"] = torch.zeros(1)
    save_safetensors(tmp_path / "xl.safetensors", sdxl)
    err = _error(["--checkpoint", str(tmp_path / "xl.safetensors"), "--data", str(data)] + base, capsys)
    assert "SDXL" in err and "SD1.x" in err
    assert "--max-steps or --epochs" in _error(["--checkpoint", str(ckpt), "--data", str(data), "--text-encoder",
                                                "toy", "--output", str(out)], capsys)
    assert not out.exists()  # nothing was written


def test_amp_checkpointing_ema_and_validation_images(setup, tmp_path):
    from PIL import Image

    from bdm.train import Trainer
    _, ckpt, data = setup
    result = Trainer(config(tmp_path, ckpt, data, resolution=16, batch_size=2, max_steps=2, mixed_precision="fp16",
                            gradient_checkpointing=True, ema=True, validation_every=2, validation_steps=3,
                            validation_prompts=["红色", "蓝色的方形" * 12])).run()  # 1 and 2 chunks
    assert result["step"] == 2 and all(h["loss"] == h["loss"] for h in result["history"])  # finite
    grid = Image.open(tmp_path / "out" / "validation" / "step-0000002.png")
    assert grid.size == (32, 16)  # two 16×16 images in a row


def test_cuda_graphs_are_used_only_where_they_can_work(setup, tmp_path):
    """`--cuda-graphs` (default on) graphs the step only on one CUDA device without checkpointing; on the
    CPU the trainer runs eagerly (the graphed step itself is checked against eager in tests/test_cuda.py)."""
    from bdm.train import Trainer
    from bdm.train.graphs import graphs_possible
    _, ckpt, data = setup
    trainer = Trainer(config(tmp_path, ckpt, data, resolution=16, max_steps=1)).prepare()
    assert trainer.config.cuda_graphs and trainer.graphed is None
    model, cuda = trainer.model, torch.device("cuda")
    assert "CUDA device" in graphs_possible(model, torch.device("cpu"), False)
    assert graphs_possible(model, cuda, False) is None
    assert "DistributedDataParallel" in graphs_possible(model, cuda, True)
    model.checkpoint_backbone = 3
    assert "checkpointing" in graphs_possible(model, cuda, False)
    model.checkpoint_backbone, model.bridge.gradient_checkpointing = 0, True
    assert "checkpointing" in graphs_possible(model, cuda, False)
