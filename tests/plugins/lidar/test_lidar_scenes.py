"""The synthetic scenes, the detector's input handling, the CenterHead targets and the BEV metrics."""

from __future__ import annotations

import math

import pytest
import torch

from polyquant.plugins.lidar.metrics import average_precision, evaluate
from polyquant.plugins.lidar.model import CenterPointPillar, GridConfig, check_points, pad_clouds, scene_batch
from polyquant.plugins.lidar.synthetic import Scene, SceneConfig, empty_fraction, make_scene, make_scenes
from polyquant.plugins.lidar.targets import Detections, decode, render_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_scenes_are_seeded_sparse_and_far_reaching() -> None:
    a, b = make_scene(7), make_scene(7)
    assert torch.equal(a.points, b.points) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(make_scene(8).points[:10], a.points[:10])
    scenes = make_scenes(range(40))
    assert empty_fraction(scenes, 40.0, 64) >= 0.85  # the paper's ~90% empty BEV
    assert max(float(s.points[:, 0].max()) for s in scenes) > 38.0  # raw x up to 40 m
    # points per object fall off with range (~1/r^2): near objects hold many times the points of far ones
    near, far = [], []
    for s in scenes:
        for box in s.boxes:
            inside = ((s.points[:, :2] - box[:2]).norm(dim=1) < 0.5 * math.hypot(float(box[3]), float(box[4])) + 0.1)
            (near if float(box[:2].norm()) < 10 else far if float(box[:2].norm()) > 20 else []).append(
                int(inside.sum()))
    assert near and far and sum(near) / len(near) > 4 * sum(far) / len(far)
    with pytest.raises(ValueError, match="extent"):
        SceneConfig(extent=2.0)


def test_padding_rows_leave_a_scene_output_unchanged() -> None:
    torch.manual_seed(0)
    model = CenterPointPillar(GridConfig(channels=(8, 8, 8), pfn_channels=8, neck_channels=8, head_channels=8)).eval()
    small, big = make_scenes([1, 2])
    small = Scene(small.points[:50], small.boxes, small.labels)
    with torch.no_grad():
        alone = model(**scene_batch([small]))
        padded = model(**scene_batch([small, big]))[:1]
    assert padded.shape == alone.shape == (1, 10, 32, 32)
    assert torch.allclose(alone, padded, atol=1e-5)


def test_bad_clouds_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="5 features"):
        check_points(torch.zeros(10, 5))
    with pytest.raises(ValueError, match="empty"):
        check_points(torch.zeros(0, 4))
    cloud = torch.zeros(3, 4)
    cloud[1, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        pad_clouds([torch.ones(2, 4), cloud])


def test_average_precision_by_hand() -> None:
    # scores 0.9 (TP), 0.8 (FP), 0.7 (TP), 2 ground-truth boxes: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Envelope 1 for recall <= 0.5 (51 of the 101 points), 2/3 above (50 points).
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1.0, 0.0, 1.0]), 2)
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)
    # heading weights scale the TPs' credit in precision and recall: weights 0.5 -> precision 0.5, 0.25, 1/3 at
    # recall 0.25, 0.25, 0.5; envelope 0.5 up to recall 0.25 (26 points), 1/3 up to 0.5 (25 points), then 0.
    aph = average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1.0, 0.0, 1.0]), 2,
                            torch.tensor([0.5, 0.0, 0.5]))
    assert aph == pytest.approx((26 * 0.5 + 25 / 3) / 101)
    assert math.isnan(average_precision(torch.tensor([0.5]), torch.tensor([0.0]), 0))


def test_targets_decode_back_to_the_boxes_and_metrics_score_them() -> None:
    grid = GridConfig()
    scenes = [s for s in make_scenes(range(6)) if s.labels.numel()]
    t = render_targets([s.boxes for s in scenes], [s.labels for s in scenes], grid)
    assert float(t.heatmap.max()) == 1.0 and int(t.centres.sum()) <= sum(s.labels.numel() for s in scenes)
    logits = torch.logit(t.heatmap.clamp(1e-4, 1 - 1e-4))
    out = torch.cat([logits, t.regression], 1)
    dets = decode(out, grid, threshold=0.5)
    for d, s in zip(dets, scenes):
        assert d.boxes.shape[0] <= s.boxes.shape[0]
        dist = torch.cdist(d.boxes[:, :2], s.boxes[:, :2]).min(1).values
        assert float(dist.max()) < 1e-3  # the centre offsets give the exact centre back
    result = evaluate(dets, scenes)
    assert result["mAP"] > 0.9  # only boxes sharing a centre cell are lost
    flipped = [Detections(torch.cat([d.boxes[:, :6], d.boxes[:, 6:] + math.pi], 1), d.labels, d.scores)
               for d in dets]
    r2 = evaluate(flipped, scenes)
    assert r2["mAP"] == pytest.approx(result["mAP"]) and r2["mAPH"] < 0.05  # heading wrong by pi: APH ~ 0
    assert set(result["range"]) == {"near", "mid", "far"}
