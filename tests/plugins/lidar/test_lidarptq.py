"""LiDAR-PTQ's components on the shipped detector: the occupancy weights, the sparsity-aware search, the
pseudo-labels and TGPL, and one fast accuracy check of the method and of the entropy baseline's failure."""

from __future__ import annotations

import pytest
import torch

import polyquant as pq
from polyquant.nn import QuantWeightModule, calibrate
from polyquant.plugins.lidar.baselines import EntropyConfig, MinMaxConfig
from polyquant.plugins.lidar.data import calib_scenes, held_out_scenes
from polyquant.plugins.lidar.lidarptq import (CenterHeadTGPL, LidarPTQConfig, TGPLLoss, layer_weights,
                                              pseudo_labels, search_activation_ranges)
from polyquant.plugins.lidar.methods import build_model, evaluate_detector
from polyquant.plugins.lidar.model import GridConfig, scene_batch
from polyquant.plugins.lidar.placement import prepare_detector, uniform_batches
from polyquant.plugins.lidar.targets import focal_loss
from polyquant.reconstruct import ReconContext, mse_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    return build_model()


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return uniform_batches([s.points for s in calib_scenes(n, seed)], 4)


def test_layer_weights_mark_real_points_and_non_empty_cells() -> None:
    grid = GridConfig()
    points = torch.tensor([[[0.1, -19.9, 0.0, 0.5], [39.9, 19.9, 0.0, 0.5], [0.1, -19.9, 0.0, 0.5],
                            [45.0, 0.0, 0.0, 0.5]]])
    mask = torch.tensor([[True, True, False, True]])  # the third row is padding, the fourth lies beyond 40 m
    pfn = layer_weights(points, mask, torch.zeros(1, 32, 4), grid)
    assert pfn.tolist() == [[[1.0, 1.0, 0.0, 0.0]]]
    bev = layer_weights(points, mask, torch.zeros(1, 8, 16, 16), grid)  # a stride-4 map
    # (y, x) corners of the area, each with its neighbours inside the map: 2 x 2 cells per corner
    assert bev.shape == (1, 1, 16, 16) and float(bev.sum()) == 8.0
    assert float(bev[0, 0, :2, :2].sum()) == 4.0 and float(bev[0, 0, 14:, 14:].sum()) == 4.0


def test_sparsity_search_never_loses_to_max_min_on_the_occupied_cells(detector: torch.nn.Module) -> None:
    import copy

    from polyquant.capture import capture
    from polyquant.nn import set_state

    batches = _batches(8)
    q = calibrate(prepare_detector(copy.deepcopy(detector), 8, 4, float_pfn=False), batches, progress=False)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantWeightModule)}
    before = {n: m.input_quantizer.scale.clone() for n, m in layers.items()}
    set_state(q, "raw")
    caps = capture(q, list(layers), batches, inputs=True, outputs=True)
    set_state(q, "quantized")

    def masked_error(name: str) -> float:  # the search's own objective, evaluated on the frozen quantizer
        m = layers[name]
        total = 0.0
        with torch.no_grad():
            for call in caps[name].calls:
                batch = batches[call.batch]
                x = call.args[0]
                w = layer_weights(batch["points"], batch["mask"], call.output, q.grid)
                ref = m.conv_forward(x, m.quant_weight())
                total += float(((m.conv_forward(m.input_quantizer(x), m.quant_weight()) - ref).pow(2) * w).sum())
        return total

    max_min = {n: masked_error(n) for n in layers}
    ratios = search_activation_ranges(q, batches, grid=20)
    assert set(ratios) == set(before) and all(0.0 < r <= 1.0 for r in ratios.values())
    assert min(ratios.values()) < 1.0  # at 4 bits the search clips somewhere
    for name in layers:  # ratio 1 (the max-min range) is a candidate: the search can only lower the error
        assert masked_error(name) <= max_min[name] * (1 + 1e-5) + 1e-9
        assert float(layers[name].input_quantizer.scale) == pytest.approx(float(before[name]) * ratios[name],
                                                                         rel=1e-4)


def test_pseudo_labels_and_tgpl_loss(detector: torch.nn.Module) -> None:
    batches = _batches(8)  # two batches of 4
    targets = pseudo_labels(detector, batches, score_threshold=0.3, top_k=32)
    assert targets.heatmap.shape == (8, 2, 32, 32) and targets.regression.shape == (8, 8, 32, 32)
    assert int(targets.centres.sum()) > 0 and float(targets.heatmap.max()) == 1.0
    # every pseudo-label centre is a peak of the float heatmap (decode's cells), where the target heatmap is 1
    assert bool((targets.heatmap.amax(1)[targets.centres] == 1.0).all())
    task = CenterHeadTGPL(targets, box_weight=0.25)
    points = torch.cat([b["points"] for b in batches])
    mask = torch.cat([b["mask"] for b in batches])
    index = torch.tensor([0, 5])  # scene 5 is row 1 of the second batch
    with torch.no_grad():
        pred = detector(points=points[index], mask=mask[index])
    # TGPL at the float model's own outputs: the focal loss of its heatmap against the pseudo-labels (by hand:
    # the regression target is the float regression, so its L1 is 0)
    assert float(task(pred, index)) == pytest.approx(float(focal_loss(pred[:, :2], targets.heatmap[index])), rel=1e-5)
    # run from a middle block: with the block's true output the prediction is the float model's own
    from polyquant.capture import capture

    out = capture(detector, ["backbone.1"], [{"points": points[index], "mask": mask[index]}])["backbone.1"].output()
    out_q = out.clone().requires_grad_(True)
    ctx = ReconContext("backbone.1", 0, 1, index=index)
    assert torch.equal(TGPLLoss(detector, batches, task, weight=0.0)(out_q, out, ctx), mse_loss(out_q, out, ctx))
    value = TGPLLoss(detector, batches, task, weight=2.0)(out_q, out, ctx)
    assert float(value.detach()) == pytest.approx(2.0 * float(task(pred, index)), rel=1e-4)
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
