"""LiDAR-PTQ and its baselines on an mmdet3d pillar detector built from a config (PointPillars ``VoxelNet``,
``CenterPoint`` with a ``PillarFeatureNet``): the optional extra (``scripts/install-lidar-extra.sh`` builds mmcv's
ops and installs mmengine, mmdet, mmdet3d).

``MMDet3DPillars(detector)`` runs the detector as this plugin's methods expect a model to run:
``model(points=(B, N, F), mask=(B, N)) -> Tensor``, the head's outputs flattened into one (B, C, H, W) tensor
(``unflatten`` gives mmdet3d's nested structure back). Voxelization is the detector's own data preprocessor
(mmcv's hard voxelization). Then, as on the shipped detector:

- every Linear / Conv / ConvTranspose gets the plugin's rules (``placement.rules``); the PFN's BatchNorm1d and the
  backbone's BatchNorms stay as they are (not folded);
- the grid search weighs each BEV layer's output error by the non-empty pillars of the scatter canvas, max-pooled
  to the layer's resolution (the PFN's own layer counts every point slot);
- the reconstruction blocks are the scene-batched parts: ``backbone.blocks.*``, ``neck.deblocks.*``, and the head's
  shared conv and task convs (CenterHead) or its output convs (anchor heads);
- TGPL needs a CenterHead: the float detector's confident predictions (``predict_by_feat``) become the pseudo
  ground truth, and the task term is mmdet3d's own CenterHead loss (Gaussian focal loss on the heatmap, L1 on the
  boxes at the centres) of the quantized prediction against them. Another head with ``tgpl=True`` is a
  ``UsageError``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.config import QuantConfig, UsageError
from polyquant.nn import calibrate, prepare

from .lidarptq import occupancy_weights
from .placement import rules

__all__ = ["available", "build_mmdet3d", "MMDet3DPillars", "prepare_mmdet3d", "quantize_mmdet3d", "scene_clouds"]

PARTS = ("voxel_encoder", "middle_encoder", "backbone", "neck", "bbox_head")


def available() -> str | None:
    """None when mmdet3d and mmcv's compiled ops import; else why not (one line)."""
    try:
        import mmcv._ext  # noqa: F401
        import mmdet3d.models  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        return f"mmdet3d with mmcv's ops is not installed ({type(e).__name__}: {e}); run scripts/install-lidar-extra.sh"
    return None


def build_mmdet3d(config: str | Path | dict[str, Any], checkpoint: str | Path | None = None) -> nn.Module:
    """An mmdet3d detector from a config file (or a config dict with a ``model`` key), in eval mode on the CPU;
    with ``checkpoint`` its weights are loaded, else it keeps mmdet3d's initialisation."""
    reason = available()
    if reason is not None:
        raise UsageError(reason)
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.runner import load_checkpoint
    from mmdet3d.registry import MODELS

    cfg = Config.fromfile(str(config)) if isinstance(config, (str, Path)) else Config(config)
    if "model" not in cfg:
        raise UsageError(f"{config}: an mmdet3d config has a 'model' entry")
    if not DefaultScope.check_instance_created("polyquant-lidar"):
        DefaultScope.get_instance("polyquant-lidar", scope_name="mmdet3d")
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_checkpoint(model, str(checkpoint), map_location="cpu")
    else:
        model.init_weights()
    return model.eval()


def _flatten(out: Any) -> tuple[list[Tensor], Any]:
    """The tensors of a nested tuple / list / dict output in order, and its layout (channels per tensor)."""
    if isinstance(out, Tensor):
        return [out], out.shape[1]
    if isinstance(out, dict):
        parts = {k: _flatten(v) for k, v in out.items()}
        return [t for ts, _ in parts.values() for t in ts], {k: lay for k, (_, lay) in parts.items()}
    if isinstance(out, (tuple, list)):
        parts = [_flatten(v) for v in out]
        return [t for ts, _ in parts for t in ts], (type(out), [lay for _, lay in parts])
    raise TypeError(f"the head returned a {type(out).__name__}; expected tensors in tuples, lists and dicts")


def _unflatten(x: Tensor, layout: Any, start: int = 0) -> tuple[Any, int]:
    if isinstance(layout, int):  # a copy, not a view: mmdet3d's losses change some outputs in place
        return x[:, start:start + layout].clone(), start + layout
    if isinstance(layout, dict):
        out = {}
        for k, lay in layout.items():
            out[k], start = _unflatten(x, lay, start)
        return out, start
    kind, items = layout
    values = []
    for lay in items:
        v, start = _unflatten(x, lay, start)
        values.append(v)
    return kind(values), start


_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _plain_layers(model: nn.Module) -> None:
    """mmcv's ``Conv2d`` / ``ConvTranspose2d`` / ``Linear`` wrappers (``mmcv.cnn.bricks.wrappers``) are torch's
    layers plus a branch for empty inputs; they become the torch class they extend (same weights, same output on
    any non-empty input), so ``polyquant.nn.prepare``, which wraps exact torch types, quantizes them too."""
    for module in model.modules():
        base = next((cls for cls in _PLAIN if isinstance(module, cls)), None)
        if base is not None and type(module) is not base and type(module).__module__.startswith("mmcv.cnn.bricks"):
            module.__class__ = base


class MMDet3DPillars(nn.Module):
    """An mmdet3d pillar detector called as ``model(points=(B, N, F), mask=(B, N)) -> (B, C, H, W)``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        prefix = "pts_" if hasattr(detector, "pts_voxel_encoder") else ""
        self.names = {p: f"detector.{prefix}{p}" for p in PARTS}
        for p in PARTS:
            if not hasattr(detector, prefix + p):
                raise UsageError(f"the mmdet3d model has no {prefix + p}: the adapter takes pillar detectors "
                                 "(voxel_encoder, middle_encoder, backbone, neck, bbox_head)")
        self.layout: Any = None
        _plain_layers(detector)

    def part(self, name: str) -> nn.Module:
        return self.get_submodule(self.names[name])

    @property
    def features(self) -> int:
        """Point features the PFN reads (4 for KITTI's x, y, z, intensity; 5 with nuScenes' time)."""
        enc = self.part("voxel_encoder")  # its in_channels already counts the decorations it adds
        added = 3 * bool(getattr(enc, "_with_cluster_center", False)) + 3 * bool(
            getattr(enc, "_with_voxel_center", False)) + int(bool(getattr(enc, "_with_distance", False)))
        return int(enc.in_channels) - added

    @property
    def center_head(self) -> bool:
        return type(self.part("bbox_head")).__name__ == "CenterHead"

    def voxelize(self, points: Tensor, mask: Tensor | None) -> tuple[dict[str, Tensor], int]:
        clouds = [points[i] if mask is None else points[i][mask[i]] for i in range(points.shape[0])]
        return self.detector.data_preprocessor.voxelize(clouds, []), len(clouds)

    def canvas(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, 1, ny, nx) 1.0 on the non-empty pillars of the scatter canvas."""
        vd, b = self.voxelize(points, mask)
        scatter = self.part("middle_encoder")
        ones = torch.ones(vd["coors"].shape[0], int(scatter.in_channels), device=points.device)
        return (scatter(ones, vd["coors"], b) != 0).amax(1, keepdim=True).float()

    def head_outputs(self, points: Tensor, mask: Tensor | None = None) -> Any:
        vd, b = self.voxelize(points, mask)
        x = self.part("voxel_encoder")(vd["voxels"], vd["num_points"], vd["coors"])
        x = self.part("middle_encoder")(x, vd["coors"], b)
        return self.part("bbox_head")(self.part("neck")(self.part("backbone")(x)))

    def forward(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        flat, self.layout = _flatten(self.head_outputs(points, mask))
        return torch.cat(flat, 1)

    def unflatten(self, x: Tensor) -> Any:
        """The head's nested outputs from ``forward``'s tensor (copies of its channel slices)."""
        if self.layout is None:
            raise RuntimeError("unflatten needs one forward first (it records the head's layout)")
        return _unflatten(x, self.layout)[0]

    def blocks(self) -> list[str]:
        """The scene-batched reconstruction blocks, in forward order."""
        names = [n for n, _ in self.named_modules()]
        head = self.names["bbox_head"]
        found = [n for n in names if n.startswith(self.names["backbone"] + ".blocks.") and n.count(".") ==
                 self.names["backbone"].count(".") + 2]
        found += [n for n in names if n.startswith(self.names["neck"] + ".deblocks.") and n.count(".") ==
                  self.names["neck"].count(".") + 2]
        if self.center_head:
            found.append(f"{head}.shared_conv")
            for task in self.part("bbox_head").task_heads:
                index = list(self.part("bbox_head").task_heads).index(task)
                found += [f"{head}.task_heads.{index}.{key}" for key in task.heads]
        else:
            found += [f"{head}.{n}" for n in ("conv_cls", "conv_reg", "conv_dir_cls") if f"{head}.{n}" in names]
        return found


def _weights_fn(model: MMDet3DPillars, batches: list[dict[str, Tensor]]):
    canvases = [model.canvas(b["points"], b["mask"]).cpu() for b in batches]  # once per batch

    def weights(name: str, index: int, output: Tensor) -> Tensor | None:
        if output.dim() != 4:
            return None  # the PFN: every point slot counts
        return occupancy_weights(canvases[index], output)  # as on the shipped detector: dilated by one cell

    return weights


class MMDetCenterHeadTGPL:
    """TGPL's task term on an mmdet3d CenterHead: its own loss against pseudo ground truth per calibration scene."""

    def __init__(self, model: MMDet3DPillars, pseudo: list[Any]) -> None:
        self.model = model
        self.pseudo = pseudo

    def __call__(self, pred: Tensor, index: Tensor) -> Tensor:
        preds = self.model.unflatten(pred)  # copies: loss_by_feat applies an in-place sigmoid to the heatmap
        losses = self.model.part("bbox_head").loss_by_feat(preds, [self.pseudo[int(i)] for i in index])
        return sum(losses.values())  # type: ignore[return-value]


def _pseudo_labels(model: MMDet3DPillars, batches: list[dict[str, Tensor]], score_threshold: float,
                   top_k: int) -> list[Any]:
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmengine.structures import InstanceData

    head = model.part("bbox_head")
    out = []
    with torch.no_grad():
        for batch in batches:
            preds = model.head_outputs(batch["points"], batch["mask"])
            metas = [{"box_type_3d": LiDARInstance3DBoxes} for _ in range(batch["points"].shape[0])]
            for r in head.predict_by_feat(preds, metas):
                keep = (r.scores_3d > score_threshold).nonzero()[:, 0][:top_k]
                out.append(InstanceData(bboxes_3d=r.bboxes_3d[keep], labels_3d=r.labels_3d[keep]))
    return out


def scene_clouds(scenes: list[Any], features: int) -> list[Tensor]:
    """The plugin's synthetic scenes in an mmdet3d LiDAR frame: the origin at the sensor (z - 1.8 m) and zero
    columns up to ``features`` (nuScenes' time)."""
    from .synthetic import SENSOR_HEIGHT

    clouds = []
    for s in scenes:
        p = s.points.clone()
        p[:, 2] -= SENSOR_HEIGHT
        clouds.append(torch.cat([p, p.new_zeros(p.shape[0], max(0, features - p.shape[1]))], 1)[:, :features])
    return clouds


def prepare_mmdet3d(model: MMDet3DPillars, config: QuantConfig, *, weight_observer: str = "minmax",
                    act_observer: str = "minmax", percentile: float = 99.99) -> MMDet3DPillars:
    """The plugin's quant layers on the wrapped detector (in place): every Linear (the PFN's), Conv and
    ConvTranspose, the first PFN layer left float with ``float_pfn``."""
    layer_rules = rules(config.w_bits, config.a_bits, weight_observer=weight_observer,  # type: ignore[attr-defined]
                        act_observer=act_observer, percentile=percentile)
    layer_rules[0].pattern = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
    pfn = f"{model.names['voxel_encoder']}.pfn_layers.0.linear"
    prepare(model, layer_rules, ignore=[pfn] if config.float_pfn else [], inplace=True)  # type: ignore[attr-defined]
    return model


def quantize_mmdet3d(model: MMDet3DPillars, config: QuantConfig, batches: list[dict[str, Tensor]], *,
                     progress: bool = False) -> MMDet3DPillars:
    """One of the plugin's methods (its config) on the wrapped detector, in place; ``batches`` of
    ``{"points", "mask"}`` with one common number of rows (``placement.uniform_batches``)."""
    from polyquant.reconstruct import ReconstructConfig

    from .baselines import BRECQConfig, EntropyConfig, PercentileConfig, QDropConfig
    from .lidarptq import LidarPTQConfig, TGPLLoss, search_activation_ranges
    from .placement import reconstruct_blocks

    fp = copy.deepcopy(model).eval()
    is_ptq = isinstance(config, LidarPTQConfig)
    brecq = isinstance(config, BRECQConfig)
    if is_ptq and config.tgpl and not model.center_head:
        raise UsageError(f"TGPL renders pseudo-labels as CenterHead targets; this detector's head is a "
                         f"{type(model.part('bbox_head')).__name__}: set tgpl=False (--no-tgpl)")
    act = "mse" if brecq else {EntropyConfig: "entropy", PercentileConfig: "percentile"}.get(type(config), "minmax")
    weight_obs = "mse" if brecq or (is_ptq and config.grid_search) else "minmax"
    percentile = config.percentile if isinstance(config, PercentileConfig) else 99.99
    prepare_mmdet3d(model, config, weight_observer=weight_obs, act_observer=act, percentile=percentile)
    calibrate(model, batches, progress=progress)
    if is_ptq and config.grid_search:
        search = batches[: max(1, config.search_scenes // 8)]
        search_activation_ranges(model, search, grid=config.grid, weights=_weights_fn(model, search), progress=progress)
    rc = None
    if is_ptq and (config.tgpl or config.adaptive_rounding):
        loss: Any = "mse"
        if config.tgpl:
            pseudo = _pseudo_labels(fp, batches, config.score_threshold, config.top_k)
            loss = TGPLLoss(model, batches, MMDetCenterHeadTGPL(model, pseudo), weight=config.tgpl_weight)
        rc = ReconstructConfig(rounding="adaround" if config.adaptive_rounding else "nearest", iters=config.iters,
                               batch_size=config.batch_size, loss=loss, learn_act_scale=True, seed=config.seed)
    elif brecq:
        rc = ReconstructConfig("adaround", iters=config.iters, batch_size=config.batch_size,
                               drop_prob=config.drop_prob if isinstance(config, QDropConfig) else 0.0,
                               learn_act_scale=True, seed=config.seed)
    if rc is not None:
        reconstruct_blocks(model, fp, batches, rc, blocks=model.blocks(), progress=progress)
    return model.eval()
