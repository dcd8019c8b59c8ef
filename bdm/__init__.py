"""BDM — the Bridge Diffusion Model (arXiv 2309.00952) for SD1.x backbones.

A frozen English SD1.x UNet (the backbone) plus a trainable branch that reads a Chinese text
encoder (`ChineseTextEncoder`); the branch's residuals are added to the backbone's skips and middle block.
"""
from .bridge import Bridge, BridgeConfig, from_backbone
from .inject import Attachment, attach
from .load import load_bridge
from .text.chinese import ChineseTextEncoder
from .unet import SD15, SMALL, UNetConfig, UNetModel

__all__ = ["Attachment", "Bridge", "BridgeConfig", "ChineseTextEncoder", "SD15", "SMALL", "UNetConfig", "UNetModel",
           "attach", "from_backbone", "load_bridge"]
