"""quantize / dequantize / quantize_dynamic: references against hand-computed values, Triton against references."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from polyquant.kernels import quant
from polyquant.kernels.quant import FP_FORMATS, FPSpec, IntSpec

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# ------------------------------------------------------------------------------------------------ references


def test_int4_per_tensor_hand() -> None:
    x = torch.tensor([0.0, 0.24, 0.25, 0.26, -0.75, 1.4, -2.0, 100.0])
    codes = quant.quantize_reference(x, 0.5, fmt="int4")
    # x / 0.5 = 0, .48, .5 (tie -> 0), .52, -1.5 (tie -> -2), 2.8, -4, 200 (saturates at 7)
    assert codes.tolist() == [0, 0, 0, 1, -2, 3, -4, 7]
    assert codes.dtype == torch.int8
    assert quant.dequantize_reference(codes, 0.5, fmt="int4").tolist() == [0, 0, 0, 0.5, -1, 1.5, -2, 3.5]


def test_uint8_zero_point_per_row() -> None:
    x = torch.tensor([[0.0, 1.0, -1.0], [2.0, 4.0, 300.0]])
    scale = torch.tensor([[0.5], [2.0]])
    zp = torch.tensor([[10.0], [0.0]])
    codes = quant.quantize_reference(x, scale, zp, fmt="uint8")
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[10, 12, 8], [1, 2, 150]]
    back = quant.dequantize_reference(codes, scale, zp, fmt="uint8")
    assert back.tolist() == [[0.0, 1.0, -1.0], [2.0, 4.0, 300.0]]


def test_per_group_and_per_column_scales() -> None:
    x = torch.arange(10, dtype=torch.float32).reshape(2, 5)  # K = 5, group 2 -> G = 3 (last group partial)
    s = torch.tensor([[1.0, 2.0, 4.0], [1.0, 0.5, 0.25]])
    codes = quant.quantize_reference(x, s, fmt="int8", group_size=2)
    assert codes.tolist() == [[0, 1, 1, 2, 1], [5, 6, 14, 16, 36]]
    per_col = quant.quantize_reference(x, torch.tensor([1.0, 1, 1, 1, 2]), fmt="int8", group_size=1)
    assert per_col.tolist() == [[0, 1, 2, 3, 2], [5, 6, 7, 8, 4]]


def test_e2m1_grid_round_trip() -> None:
    fmt = FP_FORMATS["e2m1"]
    values = quant.fp_decode_reference(torch.arange(16, dtype=torch.uint8), fmt)
    assert values.tolist() == E2M1_VALUES + [-v for v in E2M1_VALUES]
    # midpoints round to the even mantissa; beyond max saturates; -0 -> code 0
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -100.0, -0.1])
    q = quant.fp_decode_reference(quant.quantize_reference(x, 1.0, fmt="fp4"), fmt)
    assert q.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -6.0, 0.0]
    assert quant.quantize_reference(torch.tensor([-0.1]), 1.0, fmt="e2m1").item() == 0


@pytest.mark.parametrize("name, torch_dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_matches_torch_float8(name: str, torch_dtype: torch.dtype) -> None:
    fmt = FP_FORMATS[name]
    x = torch.cat([torch.randn(4000) * 10 ** torch.empty(4000).uniform_(-8, 5), torch.tensor([0.0, fmt.max_value])])
    x = x.clamp(-fmt.max_value, fmt.max_value)  # torch's cast gives NaN / inf beyond max; ours saturates
    codes = quant.quantize_reference(x, 1.0, fmt=name)
    assert torch.equal(codes.view(torch_dtype).float(), x.to(torch_dtype).float())
    assert torch.equal(quant.dequantize_reference(codes, 1.0, fmt=name), x.to(torch_dtype).float())
    big = quant.quantize_reference(torch.tensor([1e9, -1e9]), 1.0, fmt=name)
    assert quant.dequantize_reference(big, 1.0, fmt=name).tolist() == [fmt.max_value, -fmt.max_value]


@pytest.mark.parametrize("name", sorted(FP_FORMATS))
def test_fp_round_is_nearest_on_grid(name: str) -> None:
    fmt = FP_FORMATS[name]
    grid = quant.fp_decode_reference(torch.arange(2**fmt.bits, dtype=torch.uint8), fmt)
    grid = torch.unique(grid[grid.abs() <= fmt.max_value])  # sorted
    x = torch.empty(5000).uniform_(-1.2 * fmt.max_value, 1.2 * fmt.max_value)
    q = quant.fp_round_reference(x, fmt)
    assert torch.isin(q, grid).all()
    err = (q - x.clamp(-fmt.max_value, fmt.max_value)).abs()
    best = (grid[None, :] - x.clamp(-fmt.max_value, fmt.max_value)[:, None]).abs().min(dim=1).values
    assert torch.equal(err, best)
    codes = quant.fp_encode_reference(grid, fmt)
    assert torch.equal(quant.fp_decode_reference(codes, fmt), grid)


def test_dynamic_per_token_hand() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 63.5, -0.49]])
    codes, scale = quant.quantize_dynamic_reference(x, fmt="int8")
    assert scale.shape == (3, 1)
    torch.testing.assert_close(scale, torch.tensor([[2 / 127], [1.0], [1.0]]))
    assert codes.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, 0]]  # 63.5 ties to even


def test_dynamic_per_group_shapes() -> None:
    x = torch.randn(2, 3, 100)
    codes, scale = quant.quantize_dynamic_reference(x, fmt="e2m1", group_size=32)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and scale.shape == (2, 3, 4)
    back = quant.dequantize_reference(codes, scale, fmt="e2m1", group_size=32)
    assert ((back - x).abs() <= scale.repeat_interleave(32, -1)[..., :100] + 1e-6).all()


def test_formats_resolve() -> None:
    assert quant.resolve_format("int4") == IntSpec(4)
    assert quant.resolve_format("UINT8") == IntSpec(8, signed=False)
    assert quant.resolve_format("fp8") is FP_FORMATS["e4m3"]
    assert quant.resolve_format(SimpleNamespace(exp_bits=2, man_bits=1, exponent_bias=1, max_value=6.0)) == FPSpec(
        2, 1, 1, 6.0)
    assert quant.resolve_format(SimpleNamespace(bits=3, signed=False)) == IntSpec(3, False)
    with pytest.raises(ValueError):
        quant.resolve_format("int9")
    with pytest.raises(ValueError):
        quant.resolve_format("e9m9")
    with pytest.raises(ValueError, match="zero point"):
        quant.quantize_reference(torch.ones(2), 1.0, 0.0, fmt="e4m3")
    with pytest.raises(ValueError, match="broadcast"):
        quant.quantize_reference(torch.ones(4, 6), torch.ones(5), fmt="int8", group_size=2)
    with pytest.raises(ValueError, match="symmetric"):
        quant.quantize_dynamic_reference(torch.ones(4, 6), fmt="uint8")


def test_dispatch_reference_on_cpu(torch_path: None) -> None:
    x = torch.randn(5, 7)
    assert torch.equal(quant.quantize(x, 0.1, fmt="int4"), quant.quantize_reference(x, 0.1, fmt="int4"))
    codes, scale = quant.quantize_dynamic(x)
    assert torch.equal(codes, quant.quantize_dynamic_reference(x)[0])


# ------------------------------------------------------------------------------------------------ Triton


FORMATS = ["int8", "int4", "uint4", "e2m1", "e4m3", "e5m2", "e3m2", "e2m3"]
SHAPES = [(37, 300), (3, 5, 64), (1, 1), (0, 16), (4, 0)]


def _scales(shape: tuple[int, ...], group_size: int | None, device: str) -> torch.Tensor:
    k = shape[-1]
    g = 1 if group_size is None else -(-k // group_size)
    return torch.rand(*shape[:-1], g, device=device) + 0.05


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [None, 32, 1])
def test_quantize_triton_matches_reference(triton_path: str, fmt: str, group_size: int | None) -> None:
    spec = quant.resolve_format(fmt)
    for shape in SHAPES:
        x = torch.randn(*shape, device=triton_path) * 3
        s = _scales(shape, group_size, triton_path) if shape[-1] else 1.0
        zp = None
        if isinstance(spec, IntSpec) and not spec.signed:
            zp = torch.randint(0, 16, s.shape if isinstance(s, torch.Tensor) else (), device=triton_path).float()
        ref = quant.quantize_reference(x, s, zp, fmt=fmt, group_size=group_size)
        out = quant.quantize(x, s, zp, fmt=fmt, group_size=group_size)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.equal(out, ref), (shape, (out != ref).sum())
        back = quant.dequantize(ref, s, zp, fmt=fmt, group_size=group_size, dtype=torch.float32)
        assert torch.equal(back, quant.dequantize_reference(ref, s, zp, fmt=fmt, group_size=group_size))


@pytest.mark.parametrize("fmt", ["int8", "int4", "e4m3", "e2m1"])
@pytest.mark.parametrize("group_size", [None, 32, 48])
def test_quantize_dynamic_triton_matches_reference(triton_path: str, fmt: str, group_size: int | None) -> None:
    for shape in [(37, 300), (2, 3, 128), (5, 1), (0, 64)]:
        x = torch.randn(*shape, device=triton_path) * 4
        if x.numel():
            x[0] = 0  # an all-zero row gets scale 1
        codes, scale = quant.quantize_dynamic(x, fmt=fmt, group_size=group_size)
        ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt=fmt, group_size=group_size)
        assert torch.equal(scale, ref_scale)
        assert torch.equal(codes, ref_codes)


def test_quantize_dynamic_triton_long_rows(triton_path: str) -> None:
    """Rows longer than one block take the two-pass loop."""
    x = torch.randn(3, 20000, device=triton_path)
    codes, scale = quant.quantize_dynamic(x, fmt="int8")
    ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt="int8")
    assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_half_inputs(triton_path: str, dtype: torch.dtype) -> None:
    x = (torch.randn(16, 96, device=triton_path) * 2).to(dtype)
    for fmt in ("int8", "e4m3"):
        codes, scale = quant.quantize_dynamic(x, fmt=fmt, group_size=32)
        ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt=fmt, group_size=32)
        assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes)
    back = quant.dequantize(codes, scale, fmt="e4m3", group_size=32, dtype=dtype)
    assert back.dtype == dtype


@pytest.mark.gpu
def test_quantize_gpu_large() -> None:
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    codes, scale = quant.quantize_dynamic(x, fmt="int8")
    ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt="int8")
    assert torch.equal(scale, ref_scale)
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 1e-5
