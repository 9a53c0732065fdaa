"""Where every lidar method quantizes, and the calibration data layout they share.

Every Conv1d / Conv2d / ConvTranspose2d of the (BatchNorm-folded) detector gets a symmetric INT weight quantizer
with one scale per row of its weight (a conv's output channels; a transposed conv's input channels, as the core
packs its rows) and a symmetric per-tensor INT input quantizer, as TensorRT deploys INT8 (the paper's
target): the PFN's 1x1 conv over the points, the backbone's and the neck's convs, the head's shared conv and its
output convs. ``float_pfn`` keeps the first PFN layer float (NVIDIA keeps the first layers FP16). The scatter,
the max per pillar and the ReLUs stay float; they act on values already on a grid.

The reconstruction blocks, in forward order, are ``BLOCKS`` (each batched by scene).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polyquant.config import UsageError
from polyquant.nn import Calibration, QuantRule, QuantSpec, prepare
from polyquant.primitives import PerChannel, PerTensor

from .model import CenterPointPillar, check_points, pad_clouds

__all__ = ["BLOCKS", "PFN", "rules", "prepare_detector", "clouds_of", "uniform_batches", "check_detector",
           "detector_blocks", "reconstruct_blocks"]

BLOCKS = ("pfn", "backbone.0", "backbone.1", "backbone.2", "neck", "head")
PFN = "pfn.linear"


def rules(w_bits: int, a_bits: int, *, weight_observer: str = "minmax", act_observer: str = "minmax",
          percentile: float = 99.99) -> list[QuantRule]:
    """One rule for every conv: INT``w_bits`` per-channel weights, INT``a_bits`` per-tensor inputs."""
    weight = QuantSpec(f"int{w_bits}", PerChannel(0), symmetric=True, observer=weight_observer)
    act = QuantSpec(f"int{a_bits}", PerTensor(), symmetric=True, observer=act_observer, percentile=percentile)
    return [QuantRule((nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d), weight=weight, input=act)]


def check_detector(model: nn.Module) -> CenterPointPillar:
    """The model as a CenterPoint-Pillar (the head's heatmap + regression layout TGPL and the metrics read);
    ``UsageError`` otherwise."""
    if not isinstance(model, CenterPointPillar):
        raise UsageError(f"the lidar methods quantize this plugin's CenterPointPillar (a CenterHead with heatmap, "
                         f"offset, z, size and yaw outputs); got a {type(model).__name__}")
    return model


def prepare_detector(model: nn.Module, w_bits: int, a_bits: int, *, float_pfn: bool, weight_observer: str = "minmax",
                     act_observer: str = "minmax", percentile: float = 99.99) -> nn.Module:
    """The detector with its quant layers (in place)."""
    return prepare(model, rules(w_bits, a_bits, weight_observer=weight_observer, act_observer=act_observer,
                                percentile=percentile), ignore=[PFN] if float_pfn else [], inplace=True)


def clouds_of(calib: Calibration, features: int = 4) -> list[Tensor]:
    """Every scene of the calibration batches (dicts of ``points`` (B, N, features) and ``mask`` (B, N)), in
    order."""
    clouds: list[Tensor] = []
    for batch in calib:
        if not isinstance(batch, dict) or set(batch) != {"points", "mask"}:
            raise UsageError("lidar calibration batches are dicts {'points': (B, N, 4), 'mask': (B, N)} "
                             "(polyquant.plugins.lidar.model.scene_batch)")
        points, mask = batch["points"], batch["mask"]
        if points.dim() != 3 or mask.shape != points.shape[:2]:
            raise UsageError(f"calibration points must be (B, N, {features}) with a (B, N) mask, got "
                             f"{tuple(points.shape)} and {tuple(mask.shape)}")
        for i in range(points.shape[0]):
            cloud = points[i][mask[i].bool()]
            try:
                check_points(cloud, f"calibration scene {len(clouds)}", features)
            except ValueError as e:
                raise UsageError(str(e)) from None
            clouds.append(cloud.cpu())
    if not clouds:
        raise UsageError("the calibration set is empty")
    return clouds


def uniform_batches(clouds: list[Tensor], batch_size: int, device: torch.device | None = None) -> list[dict[str, Any]]:
    """The clouds padded to one common length and cut into batches (block reconstruction concatenates the
    captured inputs of every batch, so every batch must have the same number of point rows)."""
    points, mask = pad_clouds(clouds, features=clouds[0].shape[1] if clouds and clouds[0].dim() == 2 else 4)
    return [{"points": points[i:i + batch_size].to(device), "mask": mask[i:i + batch_size].to(device)}
            for i in range(0, len(clouds), batch_size)]


def detector_blocks(float_pfn: bool) -> list[str]:
    """The shipped detector's reconstruction blocks (``pfn`` left out when it stays float)."""
    return [b for b in BLOCKS if not (float_pfn and b == "pfn")]


def reconstruct_blocks(qmodel: nn.Module, fp_model: nn.Module, batches: list[dict[str, Any]], config: Any, *,
                       blocks: list[str], progress: bool) -> nn.Module:
    """``polyquant.reconstruct`` over ``blocks``, every parameter frozen meanwhile (a task loss that runs the whole
    model then computes no weight gradient outside the block)."""
    from polyquant.reconstruct import reconstruct

    flags = [(p, p.requires_grad) for p in qmodel.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        reconstruct(qmodel, blocks, batches, config, fp_model=fp_model, progress=progress)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return qmodel
