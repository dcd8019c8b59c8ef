"""On a CUDA GPU: half-precision numerics against fp32 and against the diffusers peer, the trainer's AMP,
generation on the GPU against the CPU. Skipped without a GPU (CI has none: run on a GPU machine with
`python -m pytest tests/test_cuda.py -v -s`; the printed errors go into the closing notes)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.fixture(scope="module")
def sd15_on_gpu():
    """A SD1.5-architecture UNet and a branch from it (random weights, non-zero zero-convs), fp32 on the GPU,
    with the diffusers UNet holding the same weights; 512×512 latents, batch 2."""
    from diffusers import UNet2DConditionModel

    from bdm.bridge import Bridge
    from bdm.formats.diffusers_names import diffusers_unet2d_config, ldm_to_diffusers
    from bdm.unet import SD15, UNetModel
    from tests.util import build_random, load_assigned
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    unet = build_random(lambda: UNetModel(SD15), seed=3)
    peer = load_assigned(lambda: UNet2DConditionModel(**diffusers_unet2d_config(SD15)),
                         ldm_to_diffusers(unet.state_dict(), SD15))
    bridge = Bridge.from_backbone(unet, 1024)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in list(bridge.zero_convs.parameters()) + list(bridge.middle_block_out.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.tensor([900, 150])
    english = torch.randn(2, 77, 768, generator=g)
    chinese = torch.randn(2, 52, 1024, generator=g)
    dev = torch.device("cuda")
    return (unet.to(dev), peer.to(dev), bridge.eval().to(dev),
            (x.to(dev), t.to(dev), english.to(dev), chinese.to(dev)))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@torch.no_grad()
def test_half_precision_unet_is_as_accurate_as_diffusers(sd15_on_gpu, precision):
    """Ours in fp16/bf16 vs ours in fp32: no worse than diffusers' UNet in the same dtype vs fp32."""
    import copy
    unet, peer, _, (x, t, en, _) = sd15_on_gpu
    reference = unet(x, t, context=en)
    assert torch.allclose(reference, peer(x, t, encoder_hidden_states=en).sample, atol=2e-3, rtol=1e-3)
    dtype = HALF[precision]
    ours = relative_error(copy.deepcopy(unet).to(dtype)(x.to(dtype), t, context=en.to(dtype)), reference)
    theirs = relative_error(copy.deepcopy(peer).to(dtype)(x.to(dtype), t, encoder_hidden_states=en.to(dtype)).sample,
                            reference)
    print(f"\n{precision}: relative L2 error vs fp32  ours {ours:.2e}  diffusers {theirs:.2e}")
    assert ours <= 1.25 * theirs + 1e-4, (ours, theirs)
    assert ours < (1e-2 if precision == "fp16" else 5e-2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@torch.no_grad()
def test_half_precision_bridge_through_hooks(sd15_on_gpu, precision):
    """`bdm.attach` in fp16/bf16 (backbone and branch in that dtype) stays close to fp32, and the branch's
    contribution (attached − plain) is reproduced, not drowned in rounding."""
    import copy

    import bdm
    unet, _, bridge, (x, t, en, zh) = sd15_on_gpu
    plain = unet(x, t, context=en)
    with bdm.attach(unet, bridge, zh):
        reference = unet(x, t, context=en)
    dtype = HALF[precision]
    u, b = copy.deepcopy(unet).to(dtype), copy.deepcopy(bridge).to(dtype)
    with bdm.attach(u, b, zh.to(dtype)):
        got = u(x.to(dtype), t, context=en.to(dtype))
    err = relative_error(got, reference)
    delta_err = relative_error(got.float() - plain, reference - plain)
    print(f"\n{precision}: attached relative error {err:.2e}, branch contribution relative error {delta_err:.2e}")
    assert (reference - plain).norm() > 0.05 * reference.norm()  # the branch matters
    assert err < (1e-2 if precision == "fp16" else 5e-2)
    assert delta_err < (3e-2 if precision == "fp16" else 1.5e-1)


def test_generate_on_gpu_in_fp16_matches_the_cpu(tmp_path):
    """The README's main job on a GPU in fp16 draws what the CPU in fp32 draws: same seeds, the toy judge
    agrees on the prompt's colour and shape. (Where the object sits is not asked by the prompt and is chaotic
    in the sampler's first steps: on an H200 2 of 4 positions moved, mean pixel difference 0.078.)"""
    import numpy as np
    from PIL import Image

    from bdm.formats.files import read_state_dict
    from bdm.generate import main
    from bdm.toy import paths
    from bdm.toy.models import Judge
    prompts = ["红色的圆形", "蓝色的正方形", "绿色的三角形", "黄色的五角星"]
    images = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp16")):
        for i, prompt in enumerate(prompts):
            out = tmp_path / f"{device}-{i}.png"
            assert main(["--prompt", prompt, "-o", str(out), "--seed", str(10 + i), "--device", device,
                         "--dtype", dtype]) == 0
            images.setdefault(device, []).append(np.asarray(Image.open(out).convert("RGB"), dtype=np.float32))
    cpu, gpu = (torch.from_numpy(np.stack(images[d])).permute(0, 3, 1, 2) / 127.5 - 1 for d in ("cpu", "cuda"))
    mean_abs = (cpu - gpu).abs().mean().item() / 2
    judge = Judge()
    judge.load_state_dict(read_state_dict(paths.judge_file()))
    with torch.no_grad():
        a, b = judge.eval().predict(cpu), judge.predict(gpu)
    print(f"\nmean |cpu fp32 − cuda fp16| = {mean_abs:.4f} of the pixel range; judge cpu {a} cuda {b}")
    assert mean_abs < 0.15  # a broken half-precision path (NaN, black, noise) is far above this
    assert torch.equal(a["colour"], b["colour"]) and torch.equal(a["shape"], b["shape"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_amp_on_gpu_learns(tmp_path, tmp_path_factory, precision):
    """The learning test of `test_train_learns`, trained on the GPU under autocast (fp16 with loss scaling)."""
    from tests.train_util import train_and_check_steering
    first, last, steer = train_and_check_steering(tmp_path, tmp_path_factory, device="cuda",
                                                  mixed_precision=precision)
    print(f"\n{precision} on cuda: loss {first:.4f} → {last:.4f}, red−blue steering {steer:.2f}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_step_equals_the_eager_step(sd15_on_gpu, precision):
    """`bdm.train.graphs.GraphedStep` replays the same kernels: loss and branch gradients as eager (within
    the eager step's own run-to-run spread: flash attention's backward accumulates in varying order), on two
    batches through one graph (inputs copied in, not frozen at capture); accumulating micro-steps add."""
    import copy

    from bdm.train.graphs import GraphedStep
    from bdm.train.model import BridgeTrainingModel
    unet, _, bridge, (x, t, en, cn) = sd15_on_gpu
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    model = BridgeTrainingModel(copy.deepcopy(unet).to(dtype or torch.float32), copy.deepcopy(bridge).train(),
                                en[:1])
    model.bridge.requires_grad_(True)
    step = GraphedStep(model, dtype)
    half = torch.tensor(0.5, device="cuda")

    def eager(*args):
        loss = step.loss(*args)
        (loss * half).backward()
        return loss

    def loss_and_grads(fn, *args):
        model.bridge.zero_grad(set_to_none=False)
        loss = fn(*args) if fn is eager else fn(*args, half)
        return loss.detach().clone(), [p.grad.clone() for p in model.bridge.parameters()]

    def worst(a, b):
        return max(relative_error(u, v) for u, v in zip(a, b) if v.norm() > 0)

    g = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(2):
        args = (torch.randn(x.shape, generator=g, device="cuda"), torch.randint(0, 1000, t.shape, generator=g,
                device="cuda"), torch.randn(cn.shape, generator=g, device="cuda"),
                torch.randn(x.shape, generator=g, device="cuda"))
        loss_e, grads_e = loss_and_grads(eager, *args)
        _, grads_e2 = loss_and_grads(eager, *args)
        loss_g, grads_g = loss_and_grads(step, *args)
        spread, diff = worst(grads_e2, grads_e), worst(grads_g, grads_e)
        print(f"\n{precision}: graphed vs eager loss {loss_g.item():.6f} / {loss_e.item():.6f}; worst gradient "
              f"relative difference graphed-eager {diff:.2e}, eager-eager {spread:.2e}")
        assert torch.allclose(loss_g, loss_e, rtol=1e-5, atol=0), (loss_g, loss_e)
        assert diff <= 3 * spread + (1e-5 if dtype is None else 1e-3), (diff, spread)
    step(*args, half)  # writes the gradients afresh (the first graph)
    step(*args, half, accumulate=True)  # adds (a second graph): twice the gradient of one
    assert worst([p.grad / 2 for p in model.bridge.parameters()], grads_g) <= 3 * spread + 1e-3
    step(*args, half)
    assert worst([p.grad for p in model.bridge.parameters()], grads_g) <= 3 * spread + 1e-3
    assert len(step.graphs) == 2


def test_trainer_with_cuda_graphs_equals_without(tmp_path, tmp_path_factory):
    """The trainer's default on CUDA (graphed steps, fp32) trains the same weights as `--no-cuda-graphs`,
    with gradient accumulation (graphs that write and graphs that add) and a short batch (a shape of its own)."""
    from safetensors.torch import load_file

    from bdm.train import Trainer
    from tests.train_util import config, shared_backbone, write_colour_set
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ckpt = shared_backbone(tmp_path_factory, pretrain_size=16)
    data = write_colour_set(tmp_path / "data", per_colour=3, size=16)  # 12 pictures: batches of 5, 5, 2
    results = {}
    for graphs in (True, False):
        out = tmp_path / f"graphs-{graphs}"
        trainer = Trainer(config(out, ckpt, data, resolution=16, batch_size=5, epochs=3, cache_latents=True,
                                 gradient_accumulation=2, device="cuda", cuda_graphs=graphs, learning_rate=1e-3,
                                 save_dtype="fp32"))
        trainer.run()
        assert (trainer.graphed is not None) == graphs
        results[graphs] = load_file(str(out / "out" / "bdm.safetensors"))
    worst = max(relative_error(results[True][k], v) for k, v in results[False].items()
                if v.is_floating_point() and v.float().norm() > 0)
    print(f"\ntrainer graphed vs eager, fp32: worst relative weight difference {worst:.2e}")
    assert worst < 1e-4, worst
