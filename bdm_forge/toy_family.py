"""The toy world's model family, so that Forge loads the toy checkpoints and ControlNet.

Forge does not read a `.yaml`: `backend/loader.py` asks huggingface_guess which family a checkpoint's
UNet shapes belong to (`model_list.models`, first match wins) and builds the text encoder, tokenizer, VAE
and scheduler from that family's config folder (`huggingface_repo`); ControlNets are sized by the same
guess. The toy UNet (model_channels 32, two levels, context 32) matches no family of Forge's. This
registers one: a subclass of SD1.5 (so Forge's SD1 engine, LoRA key maps and ControlNet apply) keyed on
the toy shapes, whose config folder `python -m bdm.toy export-webui FORGE_DIR` writes beside the
checkpoints. Only checkpoints of exactly the toy shapes match it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from huggingface_guess import model_list

from bdm.toy.models import UNET_CONFIG
from bdm.toy.paths import FORGE_CONFIG_DIR_NAME

NAME = "BdmToySD1"


class BdmToySD1(model_list.SD15):
    """SD1.5 with the toy world's shapes."""

    unet_config = {"model_channels": UNET_CONFIG.model_channels, "context_dim": UNET_CONFIG.context_dim,
                   "channel_mult": list(UNET_CONFIG.channel_mult),
                   "num_res_blocks": [UNET_CONFIG.num_res_blocks] * len(UNET_CONFIG.channel_mult),
                   "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": UNET_CONFIG.num_heads, "num_head_channels": UNET_CONFIG.num_head_channels}
    checkpoint_folders: Callable[[], Iterable[str]] = staticmethod(lambda: ())

    @property
    def huggingface_repo(self) -> str:
        """The config folder (an absolute path: the loader's os.path.join then ignores Forge's own)."""
        folders = [f for f in self.checkpoint_folders() if f]
        for folder in folders:
            path = os.path.join(folder, FORGE_CONFIG_DIR_NAME)
            if os.path.isfile(os.path.join(path, "model_index.json")):
                return os.path.abspath(path)
        raise FileNotFoundError(f"BDM toy family: no {FORGE_CONFIG_DIR_NAME}/model_index.json in "
                                f"{', '.join(folders) or 'the checkpoint folders'}; run `python -m bdm.toy "
                                "export-webui FORGE_DIR` to write the toy models with it")


def register(checkpoint_folders: Callable[[], Iterable[str]]) -> None:
    """Put the toy family first in huggingface_guess's list (replacing an earlier copy: scripts are
    re-imported on a UI reload). `checkpoint_folders()` gives the folders to look for its configs in."""
    BdmToySD1.checkpoint_folders = staticmethod(checkpoint_folders)
    model_list.models[:] = [m for m in model_list.models if getattr(m, "__name__", "") != NAME]
    model_list.models.insert(0, BdmToySD1)
