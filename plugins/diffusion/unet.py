"""The shipped class-conditional digits UNet (diffusers ``UNet2DModel``, 2 levels): CacheQuant's tiny real task
(issue 26), beside the digits DiT of FP4DiT.

    build_unet({"name": "digits-unet"}) -> UNet2DModel    the shipped checkpoint (assets/digits_unet.safetensors)
    build_unet({"block_out_channels": [16, 32], ...})    seeded random weights of an architecture
    build_unet_denoiser({"name": "digits-unet"}) -> UNetDenoiser    eps = model(x_t, t, labels), as the DiT's

Same data, noise schedule, label dropout and sampling as the DiT (``models.sample``, ``models.noise_prediction``
work on it unchanged): 8 x 8 digits in [-1, 1], epsilon prediction, 10 classes plus the null class (index 10) for
classifier-free guidance. ``python -m polyquant.plugins.diffusion.train --unet`` trains it (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import ASSET_DIR, NUM_CLASSES, Denoiser, named_or_arch

__all__ = ["UNET_SHIPPED", "UNET_PATH", "UNET_ARCH", "check_unet_config", "is_unet_config", "unet_from_arch",
           "build_unet", "UNetDenoiser", "build_unet_denoiser", "save_unet"]

UNET_SHIPPED = "digits-unet"
UNET_PATH = ASSET_DIR / "digits_unet.safetensors"
UNET_ARCH: dict[str, Any] = {"sample_size": 8, "block_out_channels": [32, 64], "layers_per_block": 1,
                             "norm_num_groups": 8, "seed": 0}
_META_MODEL = "polyquant_model"
_META_TRAIN = "train"


def check_unet_config(model_config: Any) -> dict[str, Any]:
    """``{"name": "digits-unet"}`` or an architecture (``UNET_ARCH``' keys) with its defaults filled in."""
    cfg = named_or_arch(model_config, UNET_SHIPPED, UNET_ARCH, "UNet")
    if "name" in cfg:
        return cfg
    channels = cfg["block_out_channels"]
    if not (isinstance(channels, list) and 2 <= len(channels) <= 4
            and all(isinstance(c, int) and 4 <= c <= 512 and c % cfg["norm_num_groups"] == 0 for c in channels)):
        raise ValueError(f"block_out_channels must be 2..4 widths in [4, 512], multiples of norm_num_groups, got "
                         f"{channels!r}")
    for key, (lo, hi) in {"sample_size": (4, 64), "layers_per_block": (1, 4), "norm_num_groups": (1, 32),
                          "seed": (0, 2**31 - 1)}.items():
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"UNet config: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    if cfg["sample_size"] % 2 ** (len(channels) - 1):
        raise ValueError(f"UNet config: sample_size {cfg['sample_size']} does not halve {len(channels) - 1} times")
    return cfg


def is_unet_config(model_config: Any) -> bool:
    """Whether a model config names the shipped UNet or describes a UNet architecture (not a DiT's)."""
    return isinstance(model_config, dict) and (model_config.get("name") == UNET_SHIPPED
                                               or "block_out_channels" in model_config)


def unet_from_arch(arch: dict[str, Any]) -> nn.Module:
    """A class-conditional ``UNet2DModel`` (1 channel, 11 class rows: 10 digits and the null class), weights from the
    current global RNG."""
    from diffusers import UNet2DModel

    levels = len(arch["block_out_channels"])
    return UNet2DModel(sample_size=arch["sample_size"], in_channels=1, out_channels=1,
                       block_out_channels=tuple(arch["block_out_channels"]), layers_per_block=arch["layers_per_block"],
                       down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                       norm_num_groups=arch["norm_num_groups"], num_class_embeds=NUM_CLASSES + 1)


def build_unet(model_config: dict[str, Any] | None = None) -> nn.Module:
    """The float UNet a config describes, in eval mode, recorded with ``describe_model``; the global RNG untouched."""
    from polyquant.api import describe_model
    from polyquant.checkpoint import read_checkpoint

    cfg = check_unet_config({"name": UNET_SHIPPED} if model_config is None else model_config)
    if "name" in cfg:
        tensors, meta = read_checkpoint(UNET_PATH)
        arch = check_unet_config(json.loads(meta[_META_MODEL]))
        with torch.random.fork_rng(devices=[]):
            model = unet_from_arch(arch)
        if model.conv_in.weight.device.type != "meta":  # the core sizes a config on the meta device first
            model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = unet_from_arch(cfg)
    return describe_model(model.eval(), cfg)


class UNetDenoiser(Denoiser):
    """A diffusers UNet as a ``models.Denoiser`` (``forward(x_t, t, labels) -> eps``, a batch dict alone too); the
    UNet is ``.unet``, as in a diffusers pipeline (``cache.FeatureCache`` finds it there)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def net(self) -> nn.Module:
        return self.unet


def build_unet_denoiser(model_config: dict[str, Any] | None = None) -> UNetDenoiser:
    """``build_unet``'s UNet as a ``UNetDenoiser``, recorded with ``describe_model`` (the same config)."""
    from polyquant.api import describe_model, model_description

    unet = build_unet(model_config)
    return describe_model(UNetDenoiser(unet).eval(), model_description(unet) or {})


def save_unet(model: nn.Module, arch: dict[str, Any], record: dict[str, Any], path: str | Path = UNET_PATH) -> Path:
    """Write the UNet checkpoint (float32 state dict, the architecture and the training record as JSON metadata)."""
    from polyquant.checkpoint import save_checkpoint

    state = {k: v.to(torch.float32) for k, v in model.state_dict().items()}
    return save_checkpoint(state, path, {_META_MODEL: json.dumps(arch), _META_TRAIN: json.dumps(record)})
