"""BEV detection metrics: centre-distance AP (nuScenes style), heading-aware APH (Waymo style), range bins.

A detection matches the nearest unmatched ground-truth box of its class whose BEV centre lies within the
threshold, detections taken in descending score order over the whole set. AP is the 101-point interpolated area
under precision-recall; APH weighs each true positive by its heading accuracy 1 - |dyaw| / pi (dyaw wrapped to
[0, pi]). A range bin keeps the ground truth whose centre range from the sensor falls in it and the detections
whose centre does (as nuScenes filters both sides by distance).

    evaluate(detections, scenes) -> {"mAP", "mAPH", "AP": {class: {threshold: ap}}, "APH": ..., "range": {...}}
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .synthetic import CLASSES, Scene
from .targets import Detections

__all__ = ["THRESHOLDS", "RANGE_BINS", "average_precision", "match", "evaluate"]

THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # metres, BEV centre distance
RANGE_BINS = {"near": (0.0, 10.0), "mid": (10.0, 20.0), "far": (20.0, math.inf)}  # metres from the sensor


def average_precision(scores: Tensor, tp: Tensor, num_gt: int, weights: Tensor | None = None) -> float:
    """101-point interpolated AP of detections with ``scores`` and true-positive flags ``tp`` (0 / 1).

    ``weights``: each true positive counts this much (heading accuracy, for APH, as Waymo's metric weighs TPs in
    both precision and recall); false positives count 1 either way. NaN when there is no ground truth.
    """
    if num_gt == 0:
        return math.nan
    if scores.numel() == 0:
        return 0.0
    order = scores.argsort(descending=True, stable=True)
    hits = tp[order].double()
    credit = hits if weights is None else hits * weights[order].double()
    tpw = credit.cumsum(0)
    seen = torch.arange(1, hits.numel() + 1, dtype=torch.float64)
    recall = tpw / num_gt
    precision = tpw / seen
    # Monotone precision envelope, sampled at recall 0, 0.01, ..., 1.
    envelope = precision.flip(0).cummax(0).values.flip(0)
    ap = 0.0
    for r in torch.linspace(0, 1, 101, dtype=torch.float64):
        above = (recall >= r - 1e-12).nonzero()
        ap += float(envelope[above[0, 0]]) if above.numel() else 0.0
    return ap / 101


def _wrap(d: Tensor) -> Tensor:
    d = torch.remainder(d, 2 * math.pi)
    return torch.minimum(d, 2 * math.pi - d)


def match(dets: Detections, boxes: Tensor, labels: Tensor, cls: int, threshold: float) -> tuple[Tensor, Tensor,
                                                                                                  Tensor]:
    """Greedy matching of one scene and class: (scores, TP flags, heading accuracies) of the class's detections."""
    pick = dets.labels == cls
    scores, pred = dets.scores[pick], dets.boxes[pick]
    gt = boxes[labels == cls]
    tp = torch.zeros(scores.shape[0])
    heading = torch.zeros(scores.shape[0])
    if gt.shape[0] and scores.numel():
        dist = torch.cdist(pred[:, :2].double(), gt[:, :2].double())  # (P, G)
        used = torch.zeros(gt.shape[0], dtype=torch.bool)
        for p in scores.argsort(descending=True, stable=True).tolist():
            d = dist[p].masked_fill(used, math.inf)
            j = int(d.argmin())
            if float(d[j]) <= threshold:
                used[j] = True
                tp[p] = 1.0
                heading[p] = 1.0 - float(_wrap(pred[p, 6] - gt[j, 6])) / math.pi
    return scores, tp, heading


def _in_bin(xy: Tensor, lo: float, hi: float) -> Tensor:
    r = xy.norm(dim=1)
    return (r >= lo) & (r < hi)


def _ap_table(dets: Sequence[Detections], scenes: Sequence[Scene], thresholds: Sequence[float]
              ) -> tuple[dict[str, dict[float, float]], dict[str, dict[float, float]]]:
    ap: dict[str, dict[float, float]] = {}
    aph: dict[str, dict[float, float]] = {}
    for cls, name in enumerate(CLASSES):
        ap[name], aph[name] = {}, {}
        num_gt = sum(int((s.labels == cls).sum()) for s in scenes)
        for t in thresholds:
            parts = [match(d, s.boxes, s.labels, cls, t) for d, s in zip(dets, scenes)]
            scores = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0)
            tp = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
            heading = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0)
            ap[name][t] = average_precision(scores, tp, num_gt)
            aph[name][t] = average_precision(scores, tp, num_gt, heading)
    return ap, aph


def _mean(table: dict[str, dict[float, float]]) -> float:
    values = [v for row in table.values() for v in row.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _filter(dets: Detections, lo: float, hi: float) -> Detections:
    keep = _in_bin(dets.boxes[:, :2], lo, hi)
    return Detections(dets.boxes[keep], dets.labels[keep], dets.scores[keep])


def evaluate(dets: Sequence[Detections], scenes: Sequence[Scene], thresholds: Sequence[float] = THRESHOLDS
             ) -> dict[str, object]:
    """mAP / mAPH over classes and thresholds, the per-class tables, and mAP / mAPH per range bin."""
    if len(dets) != len(scenes):
        raise ValueError(f"{len(dets)} detection sets for {len(scenes)} scenes")
    ap, aph = _ap_table(dets, scenes, thresholds)
    ranges: dict[str, dict[str, float]] = {}
    for name, (lo, hi) in RANGE_BINS.items():
        binned = [Scene(s.points, s.boxes[_in_bin(s.boxes[:, :2], lo, hi)], s.labels[_in_bin(s.boxes[:, :2], lo, hi)])
                  for s in scenes]
        r_ap, r_aph = _ap_table([_filter(d, lo, hi) for d in dets], binned, thresholds)
        ranges[name] = {"mAP": _mean(r_ap), "mAPH": _mean(r_aph),
                        "objects": sum(int(s.labels.numel()) for s in binned)}
    return {"mAP": _mean(ap), "mAPH": _mean(aph), "AP": ap, "APH": aph, "range": ranges}
