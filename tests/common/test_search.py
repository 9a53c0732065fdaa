"""polyquant.search: hand-computed searches, chunking, tie-breaking, the progressive loop's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from polyquant.formats import IntFormat
from polyquant.primitives import fake_quantize
from polyquant.search import (
    SearchResult,
    chunked,
    grid_search,
    lowest,
    progressive_search,
    quantile_rows,
    uniform_grid,
)


def _quadratic(target: torch.Tensor):
    """Loss (s - target_g)^2 per group: the best candidate is the one closest to each group's target."""

    def evaluate(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return (s - target[None]).pow(2)

    return evaluate


def test_grid_search_picks_the_known_best_per_group() -> None:
    scales = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])  # (K=4, G=2)
    zps = torch.tensor([[0.0, 5.0], [1.0, 6.0], [2.0, 7.0], [3.0, 8.0]])
    res = grid_search(scales, zps, _quadratic(torch.tensor([2.2, 3.9])))
    assert isinstance(res, SearchResult)
    assert res.scale.tolist() == [2.0, 4.0]
    assert res.zero_point.tolist() == [1.0, 8.0]  # the zero point of the chosen candidate
    assert res.index.tolist() == [1, 3]
    assert torch.allclose(res.loss, torch.tensor([0.04, 0.01]))
    assert res.evaluations == 4


def test_grid_search_of_the_mse_of_a_tiny_tensor() -> None:
    # x = [0, 1, 2, 3] on uint2 (0..3) with zero point 0: scale 1 is exact, 0.5 clips, 2 rounds.
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    fmt = IntFormat(2, signed=False)

    def mse(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        assert z is not None
        out = [(fake_quantize(x, fmt, s[i], z[i], (4,)) - x).pow(2).mean() for i in range(s.shape[0])]
        return torch.stack(out)[:, None]

    scales = torch.tensor([[0.5], [1.0], [2.0]])
    res = grid_search(scales, torch.zeros_like(scales), mse)
    assert float(res.scale) == 1.0 and float(res.loss) == 0.0
    # by hand: scale 0.5 gives [0, 1, 1.5, 1.5] (MSE 0.625); scale 2 gives [0, 0, 2, 4] (round half to even)
    assert mse(torch.tensor([[0.5], [2.0]]), torch.zeros(2, 1)).flatten().tolist() == [0.625, 0.5]


def test_chunking_gives_the_unchunked_result() -> None:
    torch.manual_seed(0)
    scales = torch.rand(37, 5) + 0.1
    zps = torch.randint(0, 8, (37, 5)).float()
    target = torch.rand(5)
    calls: list[int] = []

    def evaluate(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        calls.append(s.shape[0])
        return (s - target[None]).pow(2) + 0.01 * z

    full = grid_search(scales, zps, evaluate)
    assert calls == [37]
    calls.clear()
    part = grid_search(scales, zps, evaluate, chunk=8)
    assert calls == [8, 8, 8, 8, 5]
    for a, b in zip((full.scale, full.zero_point, full.loss, full.index), (part.scale, part.zero_point, part.loss,
                                                                          part.index)):
        assert torch.equal(a, b)
    calls.clear()
    prog = progressive_search(scales, zps, torch.full((5,), 0.05), evaluate, rounds=3, width=4, new_per=6, chunk=7)
    calls_chunked = list(calls)
    calls.clear()
    ref = progressive_search(scales, zps, torch.full((5,), 0.05), evaluate, rounds=3, width=4, new_per=6)
    assert max(calls_chunked) <= 7 and calls == [37, 24, 24]
    assert torch.equal(prog.scale, ref.scale) and torch.equal(prog.zero_point, ref.zero_point)


def test_chunked_splits_by_element_budget() -> None:
    seen: list[slice] = []

    def fn(sl: slice) -> torch.Tensor:
        seen.append(sl)
        return torch.arange(sl.start, sl.stop)

    out = chunked(fn, 10, per_candidate=100, max_elements=300)  # 3 candidates per chunk
    assert out.tolist() == list(range(10))
    assert [(s.start, s.stop) for s in seen] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with pytest.raises(ValueError, match="at least one candidate"):
        chunked(fn, 0, 1)


def test_lowest_ranks_nan_last_and_breaks_ties() -> None:
    loss = torch.tensor([[3.0], [float("nan")], [1.0], [1.0], [2.0]])
    top = lowest(loss, 3)[:, 0].tolist()
    assert top[0] in (2, 3) and set(top) == {2, 3, 4}
    assert lowest(loss, 1, tie_break="first").tolist() == [[2]]  # the first of the two 1.0s
    assert lowest(torch.tensor([[float("nan")], [5.0]]), 1).tolist() == [[1]]
    with pytest.raises(ValueError, match="k=1"):
        lowest(loss, 2, tie_break="first")
    with pytest.raises(ValueError, match="shape"):
        lowest(torch.zeros(3), 1)


def test_progressive_search_refines_towards_the_optimum_and_counts() -> None:
    # One group, optimum at 0.7364; the coarse grid has 0.5 and 1.0 only.
    target = torch.tensor([0.7364])
    scales = torch.tensor([[0.5], [1.0]])
    res = progressive_search(scales, None, 0.5, _quadratic(target), rounds=6, width=2, new_per=8)
    assert res.zero_point is None
    assert res.evaluations == 2 + 5 * 2 * 8
    assert abs(float(res.scale) - 0.7364) < 1e-3
    # first refinement round by hand: around 0.5 and 1.0 with d = 0.5: offsets (linspace(0, 1, 8) - 0.5) * 0.5
    one = progressive_search(scales, None, 0.5, _quadratic(target), rounds=2, width=2, new_per=8)
    cand = torch.cat([s + (torch.linspace(0, 1, 8) - 0.5) * 0.5 for s in (1.0, 0.5)])
    assert float(one.scale) == float(cand[torch.argmin((cand - 0.7364).abs())])


def test_progressive_search_keeps_zero_points_of_survivors_and_clamps_scales() -> None:
    scales = torch.tensor([[0.1], [0.2]])
    zps = torch.tensor([[7.0], [3.0]])

    def evaluate(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        assert z is not None and bool((s >= 0.05).all())
        return (s - 0.0).abs() + (z - 3.0).abs()  # wants zero point 3 and the smallest scale

    res = progressive_search(scales, zps, 1.0, evaluate, rounds=3, width=1, new_per=4, min_scale=0.05)
    assert float(res.zero_point) == 3.0 and float(res.scale) == pytest.approx(0.05)


def test_search_validation() -> None:
    ev = _quadratic(torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(K, G\)"):
        grid_search(torch.zeros(3), None, ev)
    with pytest.raises(ValueError, match="must match"):
        grid_search(torch.ones(3, 2), torch.ones(3, 1), ev)
    with pytest.raises(ValueError, match="evaluate returned"):
        grid_search(torch.ones(3, 2), None, lambda s, z: s.sum(1))
    with pytest.raises(ValueError, match="positive"):
        progressive_search(torch.ones(3, 2), None, 0.1, ev, rounds=0)


def test_uniform_grid_and_quantile_rows() -> None:
    rows = torch.arange(0.0, 11.0)[None]  # one group, values 0..10: P0.9 - P0.1 = 8, P1 - P0 = 10
    scales, zps, step = uniform_grid(rows, 3, eq_n=16, zp_levels=4)
    # 4 zero points (2, 3, 4, 5) x 4 scales from 8 / 7 to 10 / 7
    assert scales.shape == (16, 1) and zps.shape == (16, 1)
    assert torch.allclose(scales[:4, 0], torch.tensor([8.0, 8 + 2 / 3, 8 + 4 / 3, 10.0]) / 7)
    assert zps[:, 0].tolist() == [2.0] * 4 + [3.0] * 4 + [4.0] * 4 + [5.0] * 4
    assert torch.allclose(step, torch.tensor([2 / 3 / 7]))
    x = torch.randn(3, 101)
    assert torch.allclose(quantile_rows(x, [0.1, 0.9, 1.0]), torch.quantile(x, torch.tensor([0.1, 0.9, 1.0]), dim=1),
                          atol=1e-6)


# --- searched quantizers (polyquant.nn) ---------------------------------------------------------------------------


def test_searched_quantizer_states_and_freeze() -> None:
    from polyquant.nn import QuantSpec, SearchedQuantizer, quantizers
    from polyquant.primitives import PerChannel

    q = SearchedQuantizer(QuantSpec("uint4", PerChannel(0), symmetric=False), name="w")
    x = torch.tensor([[0.0, 0.3, 1.1], [-1.0, 0.2, 2.0]])
    assert torch.equal(q(x), x) and not q.searched
    q.set_state("calibrating")  # a pass-through: no observer, the search reads captured tensors
    assert q.observer is None and torch.equal(q(x), x)
    with pytest.raises(ValueError, match="calibrate the model first"):
        q.set_state("quantized")
    scale, zp = torch.tensor([[0.1], [0.2]]), torch.tensor([[0.0], [5.0]])
    q.freeze(scale, zp)
    assert q.searched and q.state == "calibrating"  # freeze leaves the state alone
    q.set_state("quantized")
    # by hand: row 0 codes round(x / 0.1) = 0, 3, 11 -> clamp 15; row 1: round(x / 0.2) + 5 = 0, 6, 15 -> -5, 1, 10
    assert torch.allclose(q(x), torch.tensor([[0.0, 0.3, 1.1], [-1.0, 0.2, 2.0]]))
    assert torch.allclose(q(x * 2), torch.tensor([[0.0, 0.6, 1.5], [-1.0, 0.4, 2.0]]))
    scale.mul_(10)  # freeze stored copies
    assert float(q.scale[1]) == pytest.approx(0.2)
    assert quantizers(torch.nn.Sequential(q)) == [q]


def test_quantizer_freeze_sets_spec_and_survives_calibration() -> None:
    from polyquant.formats import IntFormat
    from polyquant.nn import Quantizer, QuantSpec

    q = Quantizer(QuantSpec("int8"), name="a")
    q.freeze(torch.tensor(0.5), torch.tensor(1.0), spec=QuantSpec(IntFormat(3, signed=False), symmetric=False))
    assert q.fmt == IntFormat(3, signed=False) and q.state == "raw"
    q.set_state("calibrating")
    q(torch.full((4,), 100.0))  # the observer sees data, but frozen parameters win
    q.set_state("quantized")
    assert float(q.scale) == 0.5 and float(q.zero_point) == 1.0
    # codes round(x / 0.5) + 1 clamped to [0, 7]: -1 -> -1, 0.7 -> round(1.4) + 1 = 2 -> 0.5, 9 -> 7 -> 3.0
    assert q(torch.tensor([-1.0, 0.7, 9.0])).tolist() == [-0.5, 0.5, 3.0]
    with pytest.raises(TypeError, match="Tensor"):
        q.freeze(0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="QuantSpec"):
        q.freeze(torch.tensor(0.5), spec="int4")  # type: ignore[arg-type]


def test_output_error_search_weights_the_output_error() -> None:
    # A 1x1 conv on a map whose "empty" cells hold one huge value: with every cell counted the search keeps the
    # whole range; counting only the occupied cells, it clips and the occupied cells' error drops.
    from torch import nn

    from polyquant.nn import QuantRule, QuantSpec, calibrate, prepare
    from polyquant.primitives import PerChannel, PerTensor
    from polyquant.search import output_error_search

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1)
    rule = QuantRule(nn.Conv2d, weight=QuantSpec("int8", PerChannel(0)), input=QuantSpec("int4", PerTensor()))
    x = torch.randn(4, 2, 8, 8)
    x[:, :, 0, 0] = 60.0  # an outlier in a cell that does not count
    occupied = torch.ones(4, 1, 8, 8)
    occupied[:, :, 0, 0] = 0.0

    def searched(weights: list[torch.Tensor] | None) -> tuple[float, float]:
        layer = calibrate(prepare(nn.Sequential(conv), [rule]), [x], progress=False)[0]
        result = output_error_search(layer, [x], weights=weights, grid=50)
        with torch.no_grad():
            ref = layer.conv_forward(x, layer.quant_weight())
            err = float(((layer(x) - ref).pow(2) * occupied).sum())
        return float(result.scale[0]), err

    ratio_all, err_all = searched(None)
    ratio_occ, err_occ = searched([occupied])
    assert ratio_occ < 0.3 < ratio_all  # the occupied cells' values are ~N(0, 1): a tight range
    assert err_occ < 0.2 * err_all
    # the start is the calibrated (max-min) range: ratio 1 reproduces the calibrated scale exactly; with all-zero
    # weights every loss ties and the largest ratio (the max-min range) is kept
    layer = calibrate(prepare(nn.Sequential(conv), [rule]), [x, 2 * x], progress=False)[0]  # range of 2x
    calibrated = layer.input_quantizer.scale.clone()
    tie = output_error_search(layer, [x], weights=[torch.zeros_like(occupied)], grid=50)
    assert float(tie.scale[0]) == 1.0 and torch.allclose(layer.input_quantizer.scale, calibrated)
    # several batches: the loss is the sum over them, so the pick is the best over both (by hand: evaluate every
    # candidate's total and compare)
    best = output_error_search(layer, [x, 2 * x], weights=[occupied, occupied], grid=10)
    from polyquant.primitives import fake_quantize, qparams_from_minmax

    hi = calibrated.reshape(()) * 7  # int4 symmetric: the calibrated range is scale * qmax
    w = layer.quant_weight().detach()
    totals = []
    for r in torch.linspace(0.01, 1.0, 10).tolist():
        s, _ = qparams_from_minmax((-r * hi).reshape(1), (r * hi).reshape(1), "int4", symmetric=True)
        totals.append(sum(float(((layer.conv_forward(fake_quantize(b, "int4", s, None, tuple(b.shape)), w)
                                  - layer.conv_forward(b, w)).pow(2) * occupied).sum()) for b in (x, 2 * x)))
    assert int(best.index[0]) == min(range(10), key=lambda k: (totals[k], -k))
    assert float(best.loss[0]) == pytest.approx(min(totals), rel=1e-4)
    with pytest.raises(ValueError, match="input quantizer"):
        output_error_search(prepare(nn.Sequential(conv), [QuantRule(nn.Conv2d, weight=QuantSpec())])[0], [x])
