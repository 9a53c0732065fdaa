"""AdaLog: quantizer formulas, hardware tables, bias fold, LayerNorm reparameterization, FPCS (model-size free)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("timm")

from polyquant.nn import QuantLinear  # noqa: E402
from polyquant.plugins.vit import fpcs as fp  # noqa: E402
from polyquant.plugins.vit.adalog import (  # noqa: E402
    GELU_SHIFT,
    Q_MAX,
    Q_MIN,
    R,
    AdaLogConfig,
    AdaLogQuantizer,
    adalog_activation_fpcs,
    adalog_codes,
    adalog_dequant_float,
    adalog_dequant_lut,
    adalog_fq,
    adalog_levels,
    adalog_tables,
    fold_shift,
    lut_error_bound,
    search_log_base,
)
from polyquant.plugins.vit.harness import reparam_layernorm  # noqa: E402
from polyquant.plugins.vit.quantizers import UniformQuantizer, log_fq, uniform_fq  # noqa: E402

ONE = torch.ones(1)


# --- the quantizer -------------------------------------------------------------------------------------------


def test_q_equal_r_is_the_log2_quantizer_by_hand() -> None:
    x = torch.tensor([1.0, 0.5, 0.3, 0.01, 1e-6, 0.0, 2.0])
    # -log2 x = 0, 1, 1.737, 6.644, 19.9 (flushed at 3 bits), inf (flushed), clamped to 1 -> 0
    k, keep = adalog_codes(x, ONE, float(R), 3)
    assert k.tolist() == [0, 1, 2, 7, 7, 7, 0]
    assert keep.tolist() == [True, True, True, True, False, False, True]
    expected = torch.tensor([1.0, 0.5, 0.25, 2.0**-7, 0.0, 0.0, 1.0])
    for lut in (True, False):
        assert torch.equal(adalog_fq(x, ONE, float(R), 3, lut=lut), expected)
    assert torch.equal(log_fq(x, ONE, 3, 1.0), expected)  # the log2 baseline: same values


def test_adalog_base_2_to_18_over_37_by_hand() -> None:
    # base 2^(18/37): x = 0.3 -> -log2(0.3) * 37 / 18 = 3.571 -> k = 4; float 2^(-72/37) = 0.2596
    x = torch.tensor([0.3])
    k, keep = adalog_codes(x, ONE, 18.0, 3)
    assert int(k) == 4 and bool(keep)
    assert adalog_fq(x, ONE, 18.0, 3, lut=False).item() == pytest.approx(2 ** (-72 / 37), rel=1e-6)
    # LUT: T1[4] = floor(72 / 37) = 1, T2[4] = round(2^(-35/37) * 14) / 14 = 7 / 14 -> 0.5 * 2^-1 = 0.25
    assert adalog_fq(x, ONE, 18.0, 3, lut=True).item() == pytest.approx(0.25, abs=1e-7)


def test_hardware_tables_exact_entries() -> None:
    t1, t2 = adalog_tables(18, 3)
    assert t1.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]  # floor(18 k / 37)
    assert (t2 * 14).round().tolist() == [14, 10, 7, 10, 7, 10, 7, 11]  # step 1 / (2^(n+1) - 2) = 1/14
    assert torch.allclose(t2 * 14, (t2 * 14).round(), atol=1e-5)
    t1, t2 = adalog_tables(R, 4)  # base 2: pure shifts
    assert t1.tolist() == list(range(16)) and torch.equal(t2, torch.ones(16))
    # the level table used by the searches agrees with T1 / T2
    levels = adalog_levels(18.0, 3)
    t1, t2 = adalog_tables(18, 3)
    assert torch.allclose(levels[:-1], t2 * torch.exp2(-t1.float())) and levels[-1] == 0


@pytest.mark.parametrize("bits,observed_max", [(3, 0.060), (4, 0.029), (6, 0.0071)])
def test_lut_dequant_error_within_documented_bound(bits: int, observed_max: float) -> None:
    x = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for q in range(Q_MIN, Q_MAX + 1):
        k, keep = adalog_codes(x, ONE, float(q), bits)
        exact = adalog_dequant_float(k, keep, ONE, float(q))
        lut = adalog_dequant_lut(k, keep, ONE, float(q), bits)
        assert torch.equal(lut == 0, exact == 0)
        m = exact > 0
        worst = max(worst, float(((lut - exact).abs() / exact)[m].max()))
    assert worst <= lut_error_bound(bits)
    assert worst == pytest.approx(observed_max, abs=0.002)  # the spec's numpy check: 6.0 %, 2.9 %, 0.7 %
    # the fused path (level table + gather) gives the same values as the elementwise formula
    k, keep = adalog_codes(x, ONE, 23.0, bits)
    assert torch.equal(adalog_fq(x, ONE, 23.0, bits, lut=True), adalog_dequant_lut(k, keep, ONE, 23.0, bits))


def test_codes_at_or_above_2n_are_flushed_to_zero() -> None:
    x = torch.tensor([2.0**-15, 2.0**-16, 2.0**-17])  # k = 15 kept, 16 and 17 flushed at 4 bits, base 2
    out = adalog_fq(x, ONE, float(R), 4)
    assert out.tolist() == [2.0**-15, 0.0, 0.0]


def test_candidates_broadcast_like_single_calls() -> None:
    x = torch.rand(3, 5)
    qs = torch.tensor([12.0, 37.0, 90.0])
    scales = torch.tensor([0.5, 1.0, 2.0])
    batched = adalog_fq(x[None], scales.reshape(3, 1, 1), qs.reshape(3, 1, 1), 4, shift=0.1)
    for i in range(3):
        assert torch.equal(batched[i], adalog_fq(x, scales[i : i + 1], qs[i : i + 1], 4, shift=0.1))


def test_float_path_is_differentiable_and_table_path_matches_forward() -> None:
    x = torch.rand(64, requires_grad=True)
    s = torch.tensor([1.2], requires_grad=True)
    adalog_fq(x, s, 20.0, 4, lut=False).sum().backward()
    assert x.grad is not None and s.grad is not None and torch.isfinite(x.grad).all()


def test_quantizer_module_states_and_validation() -> None:
    q = AdaLogQuantizer(4, name="t")
    x = torch.rand(10)
    assert torch.equal(q(x), x)  # raw
    with pytest.raises(ValueError, match="calibrate"):
        q.set_state("quantized")
    with pytest.raises(ValueError, match=r"\[10, 138\]"):
        q.set_params(1.0, 200)
    q.set_params(1.0, 25)
    q.set_state("quantized")
    assert torch.equal(q(x), adalog_fq(x, ONE, 25.0, 4))
    assert "2^(25/37)" in repr(q)


# --- bias reparameterization for post-GELU ----------------------------------------------------------------------


def _shifted_fc2(bits: int = 4, dtype: torch.dtype = torch.float64) -> QuantLinear:
    torch.manual_seed(3)
    fc2 = QuantLinear(nn.Linear(16, 8), name="fc2")
    fc2.weight_quantizer = UniformQuantizer(4, (8, 1), weight=True, name="fc2.weight")
    w = fc2.weight.detach()
    fc2.weight_quantizer.set_params((w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 15,
                                    torch.full((8, 1), 8.0))
    fc2.input_quantizer = AdaLogQuantizer(bits, shift=GELU_SHIFT, name="fc2.input")
    fc2.input_quantizer.set_params(2.5, 17)
    for q in (fc2.weight_quantizer, fc2.input_quantizer):
        q.set_state("quantized")
    return fc2.to(dtype)


def test_bias_fold_equivalence() -> None:
    fc2 = _shifted_fc2()
    x = torch.nn.functional.gelu(torch.randn(4, 7, 16, dtype=torch.float64) * 2)
    before = fc2(x)
    # by hand: fc2(Q(x + s) - s) with the unfolded quantizer
    q = fc2.input_quantizer
    xq = adalog_fq(x, q.scale, q.q, 4, shift=GELU_SHIFT)
    assert torch.allclose(before, torch.nn.functional.linear(xq, fc2.quant_weight(), fc2.bias), atol=1e-12)
    assert fold_shift(fc2) and bool(q.bias_folded)
    after = fc2(x)  # fc2'(Q(x + s)) with b' = b - s W_q 1
    assert torch.allclose(before, after, rtol=0, atol=1e-12)
    assert float(q(x).min()) >= 0.0  # the folded quantizer outputs non-negative log levels only
    assert fold_shift(fc2)  # idempotent
    assert torch.allclose(fc2(x), after, atol=0)


def test_bias_fold_float32_close() -> None:
    fc2 = _shifted_fc2(dtype=torch.float32)
    x = torch.nn.functional.gelu(torch.randn(32, 16) * 2)
    before = fc2(x)
    fold_shift(fc2)
    assert torch.allclose(before, fc2(x), atol=1e-5)


# --- LayerNorm reparameterization -------------------------------------------------------------------------------


def test_layernorm_reparam_keeps_float_outputs_and_aligns_ranges() -> None:
    torch.manual_seed(4)
    norm, lin = nn.LayerNorm(12), nn.Linear(12, 20)
    with torch.no_grad():
        norm.weight.uniform_(0.2, 3.0)
        norm.bias.normal_(0, 0.5)
    x = torch.randn(6, 9, 12)
    ref = lin(norm(x))
    xn = norm(x).detach()
    scale = torch.rand(12) * 0.2 + 0.01
    zp = torch.randint(4, 12, (12,)).float()
    r, b, s_t, z_t = reparam_layernorm(norm, lin, scale, zp)
    assert torch.allclose(lin(norm(x)), ref, atol=1e-5)
    assert torch.allclose(norm(x), xn / r - b, atol=1e-5)  # the new LayerNorm output
    # every channel's quantization range [-z_c s_c, (15 - z_c) s_c] maps onto the common layer-wise range
    assert torch.allclose(-zp * scale / r - b, torch.full((12,), float(-z_t * s_t)), atol=1e-6)
    assert torch.allclose(scale / r, s_t.expand(12), atol=1e-7)
    # so per-channel quantization of the old input == layer-wise quantization of the new one (before rounding z)
    xq_old = uniform_fq(xn, scale, zp, 4)
    xq_new = uniform_fq(xn / r - b, s_t, -(-zp * scale / r - b) / s_t, 4)
    assert torch.allclose(xq_new, xq_old / r - b, atol=1e-5)


# --- FPCS --------------------------------------------------------------------------------------------------------


def _weight_problem() -> tuple[torch.Tensor, fp.Evaluate]:
    torch.manual_seed(5)
    w = torch.randn(24, 40) * torch.rand(24, 1)
    w[0, 0] = 6.0  # an outlier: min-max is far from optimal

    def evaluate(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (uniform_fq(w[None], s[:, :, None], z[:, :, None], 4) - w[None]).pow(2).mean(-1)

    return w, evaluate


def test_fpcs_evaluates_768_candidates_and_beats_its_initial_grid() -> None:
    w, evaluate = _weight_problem()
    scales, zps, step = fp.uniform_grid(w, 4, eq_n=128, zp_levels=8)
    assert scales.shape == (128, 24)  # 8 zero points x 16 scales
    assert sorted(set(zps[:, 0].tolist())) == list(range(4, 12))  # min(16, 2^(n-1)) centred on 2^(n-1)
    res = fp.fpcs(scales, zps, step, evaluate)
    assert res.evaluations == 6 * 128 == 768
    grid_best = evaluate(scales, zps).min(0).values
    assert torch.all(res.loss <= grid_best + 1e-12)
    assert torch.allclose(res.loss, evaluate(res.scale[None], res.zero_point[None])[0])
    flat = fp.flat_grid_search(scales, zps, evaluate)
    assert float(res.loss.sum()) < float(flat.loss.sum())
    # better than min-max overall (not on every row: the reference only tries zero points near 2^(n-1), so a
    # strongly one-sided row such as row 0 keeps a min-max zero point out of reach)
    mm_s = (w.amax(1) - w.amin(1)) / 15
    mm_z = torch.round(-w.amin(1) / mm_s)
    assert float(res.loss.sum()) < float(evaluate(mm_s[None], mm_z[None])[0].sum())


def test_log_base_search_and_adalog_fpcs() -> None:
    torch.manual_seed(6)
    p = torch.softmax(torch.randn(8, 33) * 3, dim=-1)  # long-tailed probabilities

    def eval_q(qs: torch.Tensor) -> torch.Tensor:
        xq = adalog_fq(p[None], ONE, qs.reshape(-1, 1, 1), 3)
        return (xq - p[None]).pow(2).mean((1, 2))

    best_q, best_loss = search_log_base(eval_q, topk=3)
    all_losses = eval_q(torch.arange(Q_MIN, Q_MAX + 1).float())
    assert float(best_loss[0]) == pytest.approx(float(all_losses.min()))
    assert float(best_loss[0]) <= float(eval_q(torch.tensor([float(R)]))[0])  # no worse than log2

    x = torch.nn.functional.gelu(torch.randn(500) * 2)

    def eval_sq(scales: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        xq = adalog_fq(x[None], scales[:, None], qs[:, None], 4, shift=GELU_SHIFT)
        return (xq - x[None]).pow(2).mean(1)

    start = float(x.max() + GELU_SHIFT)
    scale, q, loss, n = adalog_activation_fpcs(x, eval_sq, start, shift=GELU_SHIFT)
    assert n == 128 + 6 * 128  # the reference scores q = 10..137, then 6 rounds of 128
    assert Q_MIN <= q <= Q_MAX
    assert loss <= float(eval_sq(torch.tensor([start]), torch.tensor([float(R)]))[0]) + 1e-12
    assert loss == pytest.approx(float(eval_sq(torch.tensor([scale]), torch.tensor([float(q)]))[0]))


def test_quantile_rows_matches_torch() -> None:
    x = torch.randn(3, 101)
    ours = fp.quantile_rows(x, [0.1, 0.9, 1.0])
    ref = torch.quantile(x, torch.tensor([0.1, 0.9, 1.0]), dim=1)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert fp.positive_quantile(torch.tensor([-1.0, 1.0, 2.0, 3.0, 4.0]), [0.5, 1.0]).tolist() == [2.0, 4.0]


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("wbits", 1), ("abits", 9), ("wbits", 4.0), ("calib_size", 0),
                                         ("steps", 0), ("softmax_bits", 1), ("eq_n", 32), ("lut", 1)])
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AdaLogConfig(**{field: value})


def test_config_round_trips_as_dict() -> None:
    cfg = AdaLogConfig(wbits=3, abits=3)
    assert AdaLogConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="version"):
        AdaLogConfig.from_dict({**cfg.to_dict(), "version": 2})
    assert math.isclose(lut_error_bound(4), 2 ** (36 / 37) / 60)
