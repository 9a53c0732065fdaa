"""Observers: running statistics, percentile clipping and MSE clipping search."""

from __future__ import annotations

import pytest
import torch

from polyquant.observers import MinMaxObserver, MSEObserver, PercentileObserver, make_observer
from polyquant.primitives import PerChannel, PerTensor, PerToken, block_size_for, fake_quantize


def test_minmax_running_across_batches() -> None:
    obs = MinMaxObserver("int8", PerTensor())
    obs.update(torch.tensor([[0.5, -1.0]]))
    obs.update(torch.tensor([[2.54, 0.0], [0.1, 0.2]]))  # different batch size: fine for per-tensor
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(2.54 / 127)


def test_minmax_ema() -> None:
    obs = MinMaxObserver("int8", PerTensor(), averaging=0.5, symmetric=False)
    obs.update(torch.tensor([0.0, 4.0]))
    obs.update(torch.tensor([0.0, 2.0]))
    assert obs.max_val.item() == pytest.approx(3.0)


def test_per_channel_activation_statistics() -> None:
    obs = MinMaxObserver("int8", PerChannel(-1))
    obs.update(torch.tensor([[[1.0, -2.0]], [[0.5, 4.0]]]))  # (B, T, C)
    assert obs.max_val.shape == (1, 1, 2)
    assert obs.max_val.flatten().tolist() == [1.0, 4.0]


def test_percentile_clips_outlier() -> None:
    x = torch.cat([torch.linspace(-1, 1, 9999), torch.tensor([100.0])])
    mm, pc = MinMaxObserver("int8", PerTensor()), PercentileObserver("int8", PerTensor(), percentile=99.9)
    mm.update(x)
    pc.update(x)
    assert mm.calculate_qparams()[0].item() == pytest.approx(100 / 127)
    assert pc.calculate_qparams()[0].item() < 1.01 / 127


def test_percentile_hand_computed() -> None:
    obs = PercentileObserver("int8", PerTensor(), percentile=90.0)
    obs.update(torch.arange(1.0, 11.0))  # 10 values: 90th -> 9th smallest = 9, lower -> 2nd smallest = 2
    assert obs.max_val.item() == 9.0 and obs.min_val.item() == 2.0


def test_mse_observer_beats_minmax_on_heavy_tails() -> None:
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((20000,))
    mm, mse = MinMaxObserver("int4", PerTensor()), MSEObserver("int4", PerTensor())
    mm.update(x)
    mse.update(x)
    errs = []
    for obs in (mm, mse):
        s, z = obs.calculate_qparams()
        errs.append((fake_quantize(x, "int4", s, z, (x.numel(),)) - x).pow(2).mean().item())
    assert errs[1] < 0.75 * errs[0]  # measured: 2.90 vs 4.13


def test_mse_observer_per_channel_shape() -> None:
    w = torch.randn(8, 32)
    obs = MSEObserver("int4", block_size_for(PerChannel(0), w.shape))
    obs.update(w)
    s, z = obs.calculate_qparams()
    assert s.shape == (8, 1)


def test_observer_errors() -> None:
    obs = make_observer("minmax", "int8", PerTensor(), name="blocks.0.fc1.input")
    with pytest.raises(ValueError, match="seen no data"):
        obs.calculate_qparams()
    with pytest.raises(ValueError, match="NaN or Inf in blocks.0.fc1.input"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("kl", "int8", PerTensor())
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver("int8", PerTensor(), percentile=10.0)


@pytest.mark.parametrize("kind", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("averaging", [None, 0.5])
def test_per_token_batches_of_another_size_refused(kind: str, averaging: float | None) -> None:
    # Issue 21, class 5: per-token statistics of batches of 2 then 3 raised a raw RuntimeError (broadcast), and a
    # batch of 1 after 2 was broadcast silently into statistics of the wrong tokens.
    for second in (3, 1):
        obs = make_observer(kind, "int8", PerToken(), averaging=averaging, name="blocks.0.attn.input")
        obs.update(torch.randn(2, 5, 8))
        with pytest.raises(ValueError, match=r"blocks.0.attn.input: a batch of shape \(%d, 5, 8\) has blocks "
                                              r"\(%d, 5, 1\), the earlier batches \(2, 5, 1\)" % (second, second)):
            obs.update(torch.randn(second, 5, 8))
        obs.update(torch.randn(2, 5, 8))  # the same blocks still merge
        assert obs.calculate_qparams()[0].shape == (2, 5, 1)


@pytest.mark.parametrize("kind", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_huge_values_give_finite_scales(kind: str, symmetric: bool) -> None:
    # Issue 21, class 5: a [-3e38, 3e38] range gave an infinite asymmetric scale (max - min overflowed), and the
    # percentile mean over batches (mean * n) overflowed too.
    obs = make_observer(kind, "int8", PerTensor(), symmetric=symmetric, percentile=100.0)
    for _ in range(3):
        obs.update(torch.tensor([[-3e38, 1.0, 3e38]]))
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zp).all()
    assert obs.min_val.item() == pytest.approx(-3e38) and obs.max_val.item() == pytest.approx(3e38)


# --- abs_percentile (Quamba's running percentile of |x|) ---------------------------------------------------------


def test_quantile_matches_torch_quantile() -> None:
    from polyquant.observers import quantile

    x = torch.randn(3, 1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.9, 0.99999, 1.0):
        torch.testing.assert_close(quantile(x, q, dim=1), torch.quantile(x, q, dim=1), rtol=1e-5, atol=1e-5)


def test_abs_percentile_running_update_by_hand() -> None:
    from polyquant.observers import AbsPercentileObserver

    obs = AbsPercentileObserver("int8", PerTensor(), percentile=75.0)  # quantile 0.75 of |x|
    # |x| = 0..4: quantile(0.75) = 3.0 (position 3 of 0..4); then |x| = 0..8 step 2: position 3 -> 6.0
    obs.update(torch.tensor([0.0, -1.0, 2.0, -3.0, 4.0]))
    assert float(obs.max_val) == pytest.approx(3.0) and float(obs.min_val) == pytest.approx(-3.0)  # w = cur
    obs.update(torch.tensor([0.0, 2.0, -4.0, 6.0, -8.0]))
    assert float(obs.max_val) == pytest.approx(3.0 + 0.01 * (6.0 - 3.0))  # w <- w + 0.01 (cur - w) = 3.03
    obs.update(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]))
    assert float(obs.max_val) == pytest.approx(3.03 + 0.01 * (1.0 - 3.03))  # 3.0097
    scale, zp = obs.calculate_qparams()
    assert float(scale) == pytest.approx((3.03 + 0.01 * (1.0 - 3.03)) / 127) and float(zp) == 0.0


def test_abs_percentile_interpolates_and_is_symmetric_only() -> None:
    from polyquant.nn import QuantSpec
    from polyquant.observers import AbsPercentileObserver, make_observer

    obs = make_observer("abs_percentile", "int8", PerTensor(), percentile=90.0, averaging=0.5)
    assert isinstance(obs, AbsPercentileObserver) and obs.averaging == 0.5
    obs.update(torch.tensor([1.0, -2.0]))  # |x| = 1, 2: position 0.9 -> 1.9
    assert float(obs.max_val) == pytest.approx(1.9)
    with pytest.raises(ValueError, match="symmetric"):
        AbsPercentileObserver("int8", PerTensor(), symmetric=False)
    assert QuantSpec("int8", observer="abs_percentile", percentile=99.999).observer == "abs_percentile"
    with pytest.raises(ValueError, match="abs_percentile"):
        QuantSpec("int8", observer="nope")


def test_kl_threshold_by_hand() -> None:
    import math

    from polyquant.observers import kl_threshold

    hist = torch.tensor([4.0, 2.0, 3.0, 1.0])  # no empty bin: no smoothing
    # i bins kept, outliers folded into bin i - 1; Q: bins merged into 2 groups, spread over P's non-empty bins
    cands = {2: ([4, 6], [4, 2]), 3: ([4, 2, 4], [4, 2.5, 2.5]), 4: ([4, 2, 3, 1], [3, 3, 2, 2])}

    def kl(p: list[float], q: list[float]) -> float:
        sp, sq = sum(p), sum(q)
        return sum(a / sp * math.log((a / sp) / (b / sq)) for a, b in zip(p, q))

    want = min(cands, key=lambda i: kl(*cands[i]))
    assert kl_threshold(hist, 2) == want
    assert kl_threshold(torch.tensor([1.0, 2.0]), 2) == 2  # no longer than the levels: keep everything


def test_entropy_observer_clips_outliers_and_zero_heavy_data() -> None:
    from polyquant.observers import EntropyObserver

    g = torch.Generator().manual_seed(0)

    def threshold(*batches: torch.Tensor) -> float:
        o = EntropyObserver("int8", PerTensor())
        for b in batches:
            o.update(b)
        scale, zp = o.calculate_qparams()
        assert float(zp) == 0
        return float(scale) * 127  # symmetric int8: T / 127

    gauss = torch.randn(100_000, generator=g)
    assert 3.0 < threshold(gauss) < float(gauss.abs().max())  # TensorRT clips a Gaussian near 4 sigma
    outlier = gauss.clone()
    outlier[0] = 100.0
    assert threshold(outlier) < 20  # one far value does not set the range
    uniform = torch.rand(100_000, generator=g) * 2 - 1
    assert threshold(uniform) > 0.95  # nothing to clip
    sparse = torch.zeros(100_000)  # 90% zeros, a long tail: the zeros pull the threshold down (LiDAR-PTQ's case)
    hit = torch.rand(100_000, generator=g) < 0.1
    sparse[hit] = torch.rand(int(hit.sum()), generator=g).pow(3) * 40
    t = threshold(sparse)
    assert t < 0.25 * float(sparse.max())
    # two batches, the second with a larger max: the first histogram is re-binned, no count lost
    o = EntropyObserver("int8", PerTensor())
    o.update(sparse[:50_000] * 0.5)
    o.update(sparse[50_000:])
    assert float(o.hist.sum()) == 100_000
    assert abs(float(o.calculate_qparams()[0]) * 127 - threshold(torch.cat([sparse[:50_000] * 0.5, sparse[50_000:]]))) \
        < 4 * 40 / 2048  # within a few bins of one pass over both


def test_entropy_observer_errors_and_spec() -> None:
    from polyquant.nn import QuantRule, QuantSpec, calibrate, prepare
    from polyquant.observers import EntropyObserver

    for kwargs, fmt, gran in [({"symmetric": False}, "int8", PerTensor()), ({}, "uint8", PerTensor()),
                              ({}, "e4m3", PerTensor()), ({}, "int8", PerChannel(0))]:
        with pytest.raises(ValueError, match="entropy calibration"):
            EntropyObserver(fmt, gran, **kwargs)
    model = prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                    [QuantRule(torch.nn.Linear, weight=QuantSpec("int8"), input=QuantSpec("int8", observer="entropy"))])
    calibrate(model, [torch.randn(64, 4)], progress=False)
    assert model[0].input_quantizer.scale.numel() == 1
