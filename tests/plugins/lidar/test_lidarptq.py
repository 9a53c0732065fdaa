"""LiDAR-PTQ's components on the shipped detector: the occupancy weights, the sparsity-aware search, the
pseudo-labels and TGPL, and one fast accuracy check of the method and of the entropy baseline's failure."""

from __future__ import annotations

import pytest
import torch

import polyquant as pq
from polyquant.nn import QuantWeightModule, calibrate
from polyquant.plugins.lidar.baselines import EntropyConfig, MinMaxConfig
from polyquant.plugins.lidar.data import calib_scenes, held_out_scenes
from polyquant.plugins.lidar.lidarptq import (LidarPTQConfig, TGPLLoss, layer_weights, pseudo_labels,
                                              search_activation_ranges)
from polyquant.plugins.lidar.methods import build_model, evaluate_detector
from polyquant.plugins.lidar.model import GridConfig, scene_batch
from polyquant.plugins.lidar.placement import prepare_detector, uniform_batches
from polyquant.reconstruct import ReconContext, mse_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    return build_model()


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return uniform_batches([s.points for s in calib_scenes(n, seed)], 4)


def test_layer_weights_mark_real_points_and_non_empty_cells() -> None:
    grid = GridConfig()
    points = torch.tensor([[[0.1, -19.9, 0.0, 0.5], [39.9, 19.9, 0.0, 0.5], [0.1, -19.9, 0.0, 0.5]]])
    mask = torch.tensor([[True, True, False]])  # the third row is padding
    pfn = layer_weights(points, mask, torch.zeros(1, 32, 3), grid)
    assert pfn.tolist() == [[[1.0, 1.0, 0.0]]]
    bev = layer_weights(points, mask, torch.zeros(1, 8, 16, 16), grid)  # a stride-4 map
    assert bev.shape == (1, 1, 16, 16) and float(bev.sum()) == 2.0
    assert float(bev[0, 0, 0, 0]) == 1.0 and float(bev[0, 0, 15, 15]) == 1.0  # (y, x) corners of the area


def test_sparsity_search_never_loses_to_max_min_on_the_occupied_cells(detector: torch.nn.Module) -> None:
    import copy

    batches = _batches(8)
    q = calibrate(prepare_detector(copy.deepcopy(detector), 8, 4, float_pfn=False), batches, progress=False)
    before = {n: m.input_quantizer.scale.clone() for n, m in q.named_modules() if isinstance(m, QuantWeightModule)}
    ratios = search_activation_ranges(q, batches, grid=20)
    assert set(ratios) == set(before) and all(0.0 < r <= 1.0 for r in ratios.values())
    assert min(ratios.values()) < 1.0  # at 4 bits the search clips somewhere
    for name, m in q.named_modules():
        if isinstance(m, QuantWeightModule):  # the scale is the max-min one times the chosen ratio
            assert float(m.input_quantizer.scale) == pytest.approx(float(before[name]) * ratios[name], rel=1e-4)


def test_pseudo_labels_and_tgpl_loss(detector: torch.nn.Module) -> None:
    batches = _batches(4)
    targets = pseudo_labels(detector, batches, score_threshold=0.3, top_k=32)
    assert targets.heatmap.shape == (4, 2, 32, 32) and targets.regression.shape == (4, 8, 32, 32)
    assert int(targets.centres.sum()) > 0 and float(targets.heatmap.max()) == 1.0
    out_fp = torch.randn(2, 10, 32, 32)
    out_q = (out_fp + 0.1 * torch.randn_like(out_fp)).requires_grad_(True)
    ctx = ReconContext("head", 0, 1, index=torch.tensor([0, 2]))
    plain = TGPLLoss(detector, batches, targets, weight=0.0, box_weight=0.25)
    assert torch.equal(plain(out_q, out_fp, ctx), mse_loss(out_q, out_fp, ctx))
    loss = TGPLLoss(detector, batches, targets, weight=1.0, box_weight=0.25)
    value = loss(out_q, out_fp, ctx)
    pred_index = torch.tensor([0, 2])
    assert float(value.detach()) == pytest.approx(float(mse_loss(out_q, out_fp, ctx) + loss.task_loss(out_q, pred_index)),
                                         rel=1e-5)  # the head block: the prediction is its output
    value.backward()
    assert out_q.grad is not None and float(out_q.grad.abs().sum()) > 0


def test_lidarptq_beats_max_min_and_entropy_fails(detector: torch.nn.Module) -> None:
    # W4A8 with the PFN float (INT8 is near lossless for max-min here): the searched, reconstructed model keeps
    # the head output closer to the float one than max-min; entropy calibration of the sparse BEV maps loses AP.
    calib = [scene_batch(calib_scenes(16, 0)[i:i + 8]) for i in (0, 8)]
    held_out = scene_batch(held_out_scenes(8))
    with torch.no_grad():
        ref = detector(**held_out)

    def error(config: pq.QuantConfig) -> float:
        qm = pq.quantize(detector, config, calib=calib, progress=False)
        with torch.no_grad():
            return float((qm.model(**held_out) - ref).pow(2).mean())

    base = error(MinMaxConfig(w_bits=4, a_bits=8, float_pfn=True))
    ours = error(LidarPTQConfig(w_bits=4, a_bits=8, float_pfn=True, iters=20, grid=20, search_scenes=8))
    assert ours < 0.8 * base
    scenes = held_out_scenes(40)
    fp = evaluate_detector(detector, scenes)["mAP"]
    entropy = pq.quantize(detector, EntropyConfig(float_pfn=True), calib=calib, progress=False).model
    assert evaluate_detector(entropy, scenes)["mAP"] < fp - 0.05
