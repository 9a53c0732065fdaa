"""Pure quantization functions against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from polyquant.formats import FloatFormat, get_format
from polyquant.primitives import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    block_size_for,
    choose_qparams,
    dequantize,
    fake_quantize,
    qparams_from_minmax,
    quantize_tensor,
    scale_shape,
)


def test_block_sizes() -> None:
    shape = (4, 6)
    assert block_size_for(PerTensor(), shape) == (4, 6)
    assert block_size_for(PerChannel(0), shape) == (1, 6)
    assert block_size_for(PerChannel(1), shape) == (4, 1)
    assert block_size_for(PerChannel(-1), shape) == (4, 1)
    assert block_size_for(PerGroup(3), shape) == (1, 3)
    assert block_size_for(PerToken(), (2, 5, 6)) == (1, 1, 6)
    assert scale_shape(shape, (1, 3)) == (4, 2)


def test_bad_granularity() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        block_size_for(PerGroup(4), (4, 6))
    with pytest.raises(ValueError, match="axis"):
        block_size_for(PerChannel(2), (4, 6))
    with pytest.raises(ValueError, match="group_size"):
        PerGroup(0)


def test_symmetric_int8_per_tensor_hand_computed() -> None:
    x = torch.tensor([[-1.27, 0.5], [0.635, 1.0]])
    scale, zp = choose_qparams(x, "int8", (2, 2))
    assert torch.allclose(scale, torch.tensor([[0.01]]))
    assert zp.item() == 0
    q = quantize_tensor(x, "int8", scale, zp, (2, 2))
    assert q.tolist() == [[-127, 50], [64, 100]]  # 63.5 -> 64 (half to even)
    assert torch.allclose(dequantize(q, scale, zp, (2, 2)), torch.tensor([[-1.27, 0.5], [0.64, 1.0]]))


def test_asymmetric_uint4_per_channel_hand_computed() -> None:
    x = torch.tensor([[0.0, 1.5, 3.0], [-1.0, 0.0, 2.0]])
    bs = block_size_for(PerChannel(0), x.shape)
    scale, zp = choose_qparams(x, "uint4", bs, symmetric=False)
    # row 0: range [0, 3] -> scale 3/15 = 0.2, zp 0; row 1: range [-1, 2] -> scale 0.2, zp = round(1/0.2) = 5
    assert torch.allclose(scale.flatten(), torch.tensor([0.2, 0.2]))
    assert zp.flatten().tolist() == [0, 5]
    q = quantize_tensor(x, "uint4", scale, zp, bs)
    assert q.tolist() == [[0, 8, 15], [0, 5, 15]]  # 7.5 -> 8 (half to even)
    assert torch.allclose(dequantize(q, scale, zp, bs), torch.tensor([[0.0, 1.6, 3.0], [-1.0, 0.0, 2.0]]))


def test_asymmetric_range_includes_zero() -> None:
    scale, zp = qparams_from_minmax(torch.tensor(2.0), torch.tensor(4.0), "uint8", symmetric=False)
    assert torch.allclose(scale, torch.tensor(4.0 / 255))
    assert zp.item() == 0


def test_per_group_scales() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    bs = block_size_for(PerGroup(2), x.shape)
    scale, _ = choose_qparams(x, "int4", bs)
    assert torch.allclose(scale, torch.tensor([[2.0 / 7, 4.0 / 7]]))


def test_per_token_scales() -> None:
    x = torch.tensor([[[1.0, -3.0], [0.5, 0.25]]])
    scale, _ = choose_qparams(x, "int8", block_size_for(PerToken(), x.shape))
    assert scale.shape == (1, 2, 1)
    assert torch.allclose(scale.flatten(), torch.tensor([3.0 / 127, 0.5 / 127]))


def test_fp4_scale_uses_format_max() -> None:
    x = torch.tensor([[12.0, -3.0]])
    scale, zp = choose_qparams(x, "e2m1", (1, 2))
    assert scale.item() == pytest.approx(2.0)
    q = quantize_tensor(x, "e2m1", scale, None, (1, 2))
    assert q.tolist() == [[6.0, -1.5]]


def test_zero_range_channel_dequantizes_to_zero() -> None:
    x = torch.zeros(2, 4)
    x[1] = torch.tensor([1.0, -1.0, 0.5, 0.0])
    bs = block_size_for(PerChannel(0), x.shape)
    scale, zp = choose_qparams(x, "int8", bs)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    y = dequantize(quantize_tensor(x, "int8", scale, zp, bs), scale, zp, bs)
    assert torch.equal(y[0], torch.zeros(4))


def test_nan_inf_and_empty_rejected() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        choose_qparams(torch.tensor([1.0, float("nan")]), "int8", (2,))
    with pytest.raises(ValueError, match="NaN or Inf"):
        choose_qparams(torch.tensor([1.0, float("inf")]), "int8", (2,))
    with pytest.raises(ValueError, match="empty"):
        choose_qparams(torch.empty(0), "int8", (0,))


def test_asymmetric_float_rejected() -> None:
    with pytest.raises(ValueError, match="integer format"):
        qparams_from_minmax(torch.tensor(-1.0), torch.tensor(1.0), "e4m3", symmetric=False)


def test_fake_quantize_matches_quantize_dequantize_and_has_ste_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    bs = block_size_for(PerChannel(0), x.shape)
    scale, zp = choose_qparams(x, "uint4", bs, symmetric=False)
    ref = dequantize(quantize_tensor(x, "uint4", scale, zp, bs), scale, zp, bs)
    xg = x.clone().requires_grad_(True)
    out = fake_quantize(xg, "uint4", scale, zp, bs)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    # Min-max range: nothing is clipped, so the gradient is 1 (the range ends may sit a rounding error outside).
    inside = (x > x.amin(dim=1, keepdim=True)) & (x < x.amax(dim=1, keepdim=True))
    assert torch.equal(xg.grad[inside], torch.ones_like(x)[inside])


def test_fake_quantize_gradient_reaches_scale() -> None:
    x = torch.tensor([0.26, -0.74, 3.0])
    s = torch.tensor([0.5], requires_grad=True)
    fake_quantize(x, "int4", s, None, (3,)).sum().backward()
    assert s.grad is not None and s.grad.item() != 0


def test_sqnr_improves_with_bits() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    errs = []
    for bits in (2, 4, 6, 8):
        bs = block_size_for(PerChannel(0), x.shape)
        scale, zp = choose_qparams(x, f"int{bits}", bs)
        errs.append((fake_quantize(x, f"int{bits}", scale, zp, bs) - x).pow(2).mean().item())
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt, symmetric", [("int4", True), ("int8", False), ("e2m1", True), ("e4m3", True)])
def test_fake_quantize_equals_quantize_dequantize_in_every_dtype(dtype: torch.dtype, fmt: str, symmetric: bool) -> None:
    # Issue 10, case 8: qparams and rounding are float32 for every input dtype, so fake-quant and the packed path
    # (quantize_tensor -> dequantize) agree exactly; the output keeps the input dtype.
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(64, 64, generator=g)).to(dtype)
    bs = block_size_for(PerGroup(16), x.shape)
    scale, zp = choose_qparams(x, fmt, bs, symmetric=symmetric)
    zp_arg = None if symmetric else zp
    fq = fake_quantize(x, fmt, scale, zp_arg, bs)
    dq = dequantize(quantize_tensor(x, fmt, scale, zp_arg, bs), scale, zp_arg, bs, dtype=dtype)
    assert fq.dtype == dtype
    assert torch.equal(fq, dq)


def test_fake_quantize_half_keeps_gradients() -> None:
    x = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
    scale = torch.full((4, 1), 0.05, requires_grad=True)
    fake_quantize(x, "int8", scale, None, (1, 8)).float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16 and scale.grad is not None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8])
def test_fake_quantize_promotes_integer_inputs(dtype: torch.dtype) -> None:
    # Issue 10, case 10: an integer input was computed with an integer scale (all zeros); it is promoted to float32,
    # as quantize_tensor does.
    x = torch.arange(0, 10).to(dtype)
    scale = torch.tensor([0.5])
    out = fake_quantize(x, "int8", scale, None, (10,))
    assert out.dtype == torch.float32
    assert torch.equal(out, fake_quantize(x.float(), "int8", scale, None, (10,)))
    assert torch.equal(out, dequantize(quantize_tensor(x, "int8", scale, None, (10,)), scale, None, (10,)))
    assert torch.equal(out, x.float())  # multiples of the step come back unchanged


def test_fake_quantize_empty_input() -> None:
    # Issue 10, case 11: blocks of an empty batch have size 0 (ZeroDivisionError before); the result is empty too.
    x = torch.empty(0, 8, dtype=torch.float16)
    out = fake_quantize(x, "int8", torch.ones(1, 1), None, block_size_for(PerTensor(), x.shape))
    assert out.shape == (0, 8) and out.dtype == torch.float16


# --- issue 21, class 5: silently wrong numbers ------------------------------------------------------------------


def test_huge_range_gives_a_finite_scale() -> None:
    # max - min overflowed float32 for a [-3e38, 3e38] range: an infinite scale, so every value quantized to 0.
    x = torch.tensor([[-3e38, 0.0, 3e38]])
    scale, zp = choose_qparams(x, "int8", (1, 3), symmetric=False)
    assert torch.isfinite(scale).all() and scale.item() == pytest.approx(6e38 / 255, rel=1e-6)
    y = fake_quantize(x, "int8", scale, zp, (1, 3))
    torch.testing.assert_close(y, x, rtol=1e-2, atol=scale.item())
    s2, _ = qparams_from_minmax(torch.tensor(-1.0), torch.tensor(2.0), "int8", symmetric=False)
    assert torch.equal(s2, (torch.tensor(2.0) - torch.tensor(-1.0)) / 255)  # bits unchanged where max - min is finite


def test_scale_that_overflows_is_refused() -> None:
    tiny_max = FloatFormat(2, 1, bias=10)  # largest value 2^-7 * 1.5: a 3e38 range needs a scale of 2.6e40
    with pytest.raises(ValueError, match="too large for e2m1_b10: its scale overflows"):
        qparams_from_minmax(torch.tensor(-3e38), torch.tensor(3e38), tiny_max)
    with pytest.raises(ValueError, match="too large for int1"):
        qparams_from_minmax(torch.tensor(-3e38), torch.tensor(3e38), "int1", symmetric=False)


@pytest.mark.parametrize("eps", [0.0, -1e-8, float("nan"), float("inf")])
def test_eps_must_be_positive(eps: float) -> None:
    # eps=0 gave an all-zero block scale 0, and fake-quant NaN.
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        choose_qparams(torch.zeros(2, 2), "int8", (1, 2), eps=eps)


def test_min_max_of_different_shapes_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        qparams_from_minmax(torch.zeros(3, 1), torch.ones(1, 3), "int8")  # broadcast to (3, 3) before


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_scale_must_be_positive_and_finite(bad: float) -> None:
    # scale 0 gave NaN (quantize_tensor, fake_quantize); -0.5 mirrored the grid; Inf gave 0 everywhere.
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    scale = torch.tensor([[0.1], [bad]])
    with pytest.raises(ValueError, match="scales must be positive and finite"):
        quantize_tensor(x, "int4", scale, None, (1, 2))
    with pytest.raises(ValueError, match="scales must be positive and finite"):
        fake_quantize(x, "int4", scale, None, (1, 2))
    with pytest.raises(ValueError, match="scales must be positive and finite"):
        fake_quantize(x, "int4", torch.tensor(bad), None, (2, 2))  # the one-element fast path


def test_zero_point_must_be_finite() -> None:
    x = torch.tensor([[0.0, 1.0]])
    with pytest.raises(ValueError, match="zero points must be finite"):
        quantize_tensor(x, "uint4", torch.ones(1, 1), torch.tensor([[float("nan")]]), (1, 2))


@pytest.mark.parametrize("fmt", ["int4", "uint8", "e2m1", "e4m3", "log2_4", "nf4", "binary"])
def test_quantize_refuses_nan_and_saturates_inf(fmt: str) -> None:
    # NaN was returned as NaN (int: then code 8 after encode) or as a grid value (log: 0, nf4: 1.0, binary: -1);
    # Inf gave NaN for FP formats.
    one = torch.ones(1, 1)
    with pytest.raises(ValueError, match="input contains NaN"):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]), fmt, one, None, (1, 2))
    q = quantize_tensor(torch.tensor([[float("inf"), 3e38]]), fmt, torch.full((1, 1), 1e-3), None, (1, 2))
    grid = get_format(fmt).grid()
    assert q.tolist() == [[grid.max().item()] * 2]


def test_fake_quantize_nan_propagates() -> None:
    out = fake_quantize(torch.tensor([1.0, float("nan")]), "int8", torch.tensor([0.1]), None, (2,))
    assert out[0] == pytest.approx(1.0) and torch.isnan(out[1])


def test_empty_tensor_per_tensor() -> None:
    # quantize_tensor and dequantize of an empty tensor raised ZeroDivisionError (block size 0).
    x = torch.empty(0, 4)
    bs = block_size_for(PerTensor(), x.shape)
    q = quantize_tensor(x, "int8", torch.ones(1, 1), None, bs)
    assert q.shape == (0, 4) and q.dtype == torch.float32
    y = dequantize(q, torch.ones(1, 1), torch.zeros(1, 1), bs, dtype=torch.float16)
    assert y.shape == (0, 4) and y.dtype == torch.float16
    with pytest.raises(ValueError, match="an empty tensor has no blocks"):
        scale_shape(x.shape, bs)


def test_per_token_scales_of_another_batch_refused() -> None:
    # PerToken scales are (B, T, 1): a batch of another size raised a raw RuntimeError from reshape.
    x2, x3 = torch.randn(2, 5, 8), torch.randn(3, 5, 8)
    scale, zp = choose_qparams(x2, "int8", block_size_for(PerToken(), x2.shape))
    bs3 = block_size_for(PerToken(), x3.shape)
    match = r"scale of shape \(2, 5, 1\) has 10 entries, .* has 15 blocks: expected the scale shape \(3, 5, 1\)"
    for call in (lambda: fake_quantize(x3, "int8", scale, None, bs3),
                 lambda: quantize_tensor(x3, "int8", scale, None, bs3),
                 lambda: dequantize(x3, scale, None, bs3)):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="zero point of shape"):
        quantize_tensor(x3, "int8", torch.ones(3, 5, 1), zp, bs3)


def test_wrong_rank_block_size_and_wrong_size_scale_refused() -> None:
    x = torch.randn(3, 4)
    for call in (lambda: quantize_tensor(x, "int4", torch.ones(1, 1), None, (3,)),
                 lambda: fake_quantize(x, "int4", torch.ones(1, 1), None, (3,)),
                 lambda: dequantize(x, torch.ones(1, 1), None, (3,))):
        with pytest.raises(ValueError, match=r"one entry per dimension .* \(1 entries for 2 dimensions\)"):
            call()
    with pytest.raises(ValueError, match=r"scale of shape \(5, 1\) .* expected the scale shape \(3, 1\)"):
        quantize_tensor(x, "int4", torch.ones(5, 1), None, (1, 4))
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(x, "int4", torch.ones(3, 1), None, (1, 3))
    # Any shape with one entry per block is still read in the scale shape's order.
    assert torch.equal(fake_quantize(x, "int4", torch.full((3,), 0.1), None, (1, 4)),
                       fake_quantize(x, "int4", torch.full((3, 1), 0.1), None, (1, 4)))


def test_pow2_scale_rounds_up_to_powers_of_two() -> None:
    from polyquant.primitives import pow2_scale

    s = torch.tensor([0.3, 0.25, 1.0, 1.0001, 6.0, 2.0**-20])
    assert pow2_scale(s).tolist() == [0.5, 0.25, 1.0, 2.0, 8.0, 2.0**-20]
    # fixed exponent bias: E2M1's top code (6) times a pow2 scale covers the group max, never clips
    absmax = torch.rand(100, generator=torch.Generator().manual_seed(0)) * 10 + 1e-3
    p = pow2_scale(absmax / 6)
    assert bool((p * 6 >= absmax).all()) and bool((p * 3 < absmax).all())
    with pytest.raises(ValueError, match="positive"):
        pow2_scale(torch.tensor([0.0, 1.0]))
