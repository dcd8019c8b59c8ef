"""Shared by the tests of the WebUI batch layout (tests/test_webui_layout.py, tests/test_webui_schedule.py):
the CFG-denoiser calls recorded from a real WebUI v1.10.1 and a tiny backbone, branch and encoder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import bdm
from bdm.unet import UNetConfig, UNetModel

from .util import build_random

# One level, every block type: enough for hooks and residuals, fast on a CPU.
TINY = UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                  num_heads=1, context_dim=64)
FIXTURES = sorted((Path(__file__).parent / "fixtures" / "webui_layouts").glob("*.json"))


def recorded_calls(path):
    doc = json.loads(path.read_text())
    return doc, doc["denoiser_calls"]


def tiny_parts():
    torch.manual_seed(0)
    unet = build_random(lambda: UNetModel(TINY), seed=1)
    bridge = bdm.from_backbone(unet, 64).eval()
    with torch.no_grad():
        for p in list(bridge.zero_convs.parameters()) + list(bridge.middle_block_out.parameters()):
            p.normal_(0, 0.05)
    from bdm.text.chinese import ChineseTextEncoder
    return unet, bridge, ChineseTextEncoder.tiny(seed=0)


class KDiffusionLikeInner(nn.Module):
    """Like k-diffusion's CompVisDenoiser: the UNet gets `x * c_in`, a new tensor (no row view)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, sigma, cond):
        return self.unet(x * 0.5, sigma, context=cond)
