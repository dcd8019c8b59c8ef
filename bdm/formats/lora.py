"""LoRA files in the kohya / A1111 format, merged into the backbone — never into the branch.

Keys are `lora_unet_<module path, '.'→'_'>` (diffusers module names as kohya's trainer writes them,
or LDM names as older files do) and `lora_te_<CLIP text module>` for the English text encoder, each
with `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`. The change to a weight is
`weight · alpha/rank · up @ down` (LoCon convs: the same on flattened kernels). Applying keeps a copy
of every touched tensor, so removing restores the model bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..unet import UNetConfig, UNetModel
from .diffusers_names import _block_prefixes, ldm_to_diffusers_key
from .files import FormatError, read_state_dict

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass
class LoraLayer:
    """One layer's low-rank change, kohya's parametrisation: `up @ down · alpha/rank` (1×1 convs: the
    same on flattened kernels). The toy build trains these too (`bdm.toy.models.LoraLinear`)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The change to `weight` at multiplier 1."""
        rank = self.down.shape[0]
        scale = (self.alpha / rank) if self.alpha is not None else 1.0
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * scale).reshape(weight.shape)


def read_lora(path: str | os.PathLike) -> dict[str, LoraLayer]:
    """The layers of a kohya/A1111 LoRA file, by key base (`lora_unet_…`, `lora_te_…`)."""
    tensors = read_state_dict(path)
    layers: dict[str, dict] = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            if key.endswith((".lora_mid.weight", ".hada_w1_a", ".lokr_w1")):
                raise FormatError(f"{path}: {key!r} is a LyCORIS variant (LoHa/LoKr/LoCon-mid) that is not "
                                  "supported; use a plain LoRA")
            raise FormatError(f"{path}: {key!r} is not a kohya/A1111 LoRA key (expected lora_unet_*/lora_te_* "
                              f"with {', '.join(SUFFIXES)})")
        layers.setdefault(key[: -len(suffix)], {})[suffix] = value
    if not layers:
        raise FormatError(f"{path}: holds no LoRA layers")
    out = {}
    for base, parts in layers.items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise FormatError(f"{path}: layer {base!r} lacks lora_down or lora_up")
        alpha = parts.get(".alpha")
        out[base] = LoraLayer(parts[".lora_down.weight"], parts[".lora_up.weight"],
                              None if alpha is None else float(alpha))
    return out


def unet_lora_base(name: str, prefixes=None) -> str:
    """The key base of the UNet module `name` (its LDM path): in the diffusers spelling kohya's trainer
    writes when given the UNet's block `prefixes` (`_block_prefixes`), else in the LDM spelling."""
    if prefixes is not None:
        name = ldm_to_diffusers_key(name + ".weight", prefixes)[: -len(".weight")]
    return "lora_unet_" + name.replace(".", "_")


def lora_tensors(unet_config: UNetConfig, layers: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """The tensors of a kohya/A1111 LoRA file for UNet layers keyed by their LDM module paths (diffusers
    spelling, as kohya writes it; `read_lora` reads them back)."""
    prefixes = _block_prefixes(unet_config, decoder=True, controlnet=False)
    tensors = {}
    for name, layer in layers.items():
        base = unet_lora_base(name, prefixes)
        tensors[base + ".lora_down.weight"] = layer.down.detach().float().contiguous()
        tensors[base + ".lora_up.weight"] = layer.up.detach().float().contiguous()
        if layer.alpha is not None:
            tensors[base + ".alpha"] = torch.tensor(float(layer.alpha))
    return tensors


def lora_targets(unet: UNetModel, text_transformer: nn.Module | None) -> dict[str, nn.Module]:
    """Every module a LoRA key may name → the module: LDM and diffusers spellings for the UNet,
    transformers' spelling for the CLIP text model."""
    targets: dict[str, nn.Module] = {}
    prefixes = _block_prefixes(unet.config, decoder=True, controlnet=False)
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            targets[unet_lora_base(name)] = module
            targets[unet_lora_base(name, prefixes)] = module
    if text_transformer is not None:
        for name, module in text_transformer.named_modules():
            if isinstance(module, nn.Linear):
                name = name if name.startswith("text_model.") else "text_model." + name
                targets["lora_te_" + name.replace(".", "_")] = module
    return targets


class LoraPatch:
    """LoRAs merged into the backbone's weights; `remove()` puts the exact original tensors back."""

    def __init__(self):
        self._backup: dict[nn.Module, torch.Tensor] = {}

    def apply(self, layers: dict[str, LoraLayer], multiplier: float, targets: dict[str, nn.Module],
              source: str) -> "LoraPatch":
        unknown = [base for base in layers if base not in targets]
        if unknown:
            family = " (an SDXL LoRA)" if any(b.startswith(("lora_te1_", "lora_te2_")) for b in unknown) else ""
            raise FormatError(f"{source}: {len(unknown)} of {len(layers)} LoRA layers name no module of this "
                              f"SD1.x model{family}, e.g. {unknown[0]!r}: made for another architecture")
        for base, layer in layers.items():
            module = targets[base]
            expected = (layer.up.shape[0], layer.down[0].numel())
            if (module.weight.shape[0], module.weight[0].numel()) != expected:
                raise FormatError(f"{source}: {base!r} changes a weight of shape {tuple(layer.up.shape[:1])}×"
                                  f"{tuple(layer.down.shape[1:])}, but the model's is {tuple(module.weight.shape)}:"
                                  " made for another architecture")
        with torch.no_grad():
            for base, layer in layers.items():
                module = targets[base]
                if module not in self._backup:
                    self._backup[module] = module.weight.detach().clone()
                delta = layer.delta(module.weight).to(module.weight.device)
                module.weight.add_((multiplier * delta).to(module.weight.dtype))
        return self

    def remove(self) -> None:
        with torch.no_grad():
            for module, original in self._backup.items():
                module.weight.copy_(original)
        self._backup.clear()


def apply_loras(unet: UNetModel, text_encoder, loras: list[tuple[str | os.PathLike, float]]) -> LoraPatch:
    """Merge `(file, multiplier)` LoRAs into the backbone UNet and English text encoder."""
    transformer = getattr(text_encoder, "transformer", None)
    targets = lora_targets(unet, transformer)
    patch = LoraPatch()
    try:
        for path, multiplier in loras:
            patch.apply(read_lora(path), multiplier, targets, str(Path(path)))
    except Exception:
        patch.remove()
        raise
    return patch
