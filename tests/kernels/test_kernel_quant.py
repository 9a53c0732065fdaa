"""quantize / dequantize / quantize_dynamic: references against hand-computed values, Triton against references."""

from __future__ import annotations

import pytest
import torch

from polyquant.formats import FloatFormat, IntFormat, get_format
from polyquant.kernels import quant

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
    codes = quant.quantize_reference(x, scale, zp, fmt="uint8", block_size=(1, 3))
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[10, 12, 8], [1, 2, 150]]
    back = quant.dequantize_reference(codes, scale, zp, fmt="uint8", block_size=(1, 3))
    assert back.tolist() == [[0.0, 1.0, -1.0], [2.0, 4.0, 300.0]]


def test_zero_point_is_added_before_rounding() -> None:
    # the core rounds x / scale + zero_point: 0.5 + 1 = 1.5 -> 2 (ties to even), not round(0.5) + 1 = 1
    codes = quant.quantize_reference(torch.tensor([0.5, 1.5]), 1.0, 1.0, fmt="uint4")
    assert codes.tolist() == [2, 2]


def test_per_group_and_per_column_scales() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # K = 6, block (1, 2) -> 3 groups per row
    s = torch.tensor([[1.0, 2.0, 4.0], [1.0, 0.5, 0.25]])
    codes = quant.quantize_reference(x, s, fmt="int8", block_size=(1, 2))
    assert codes.tolist() == [[0, 1, 1, 2, 1, 1], [6, 7, 16, 18, 40, 44]]
    per_col = quant.quantize_reference(x, torch.tensor([1.0, 1, 1, 1, 1, 2]), fmt="int8", block_size=(2, 1))
    assert per_col.tolist() == [[0, 1, 2, 3, 4, 2], [6, 7, 8, 9, 10, 6]]


def test_block_size_errors() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quant.quantize_reference(torch.ones(2, 5), torch.ones(2, 3), fmt="int8", block_size=(1, 2))
    with pytest.raises(ValueError, match="one entry per dimension"):
        quant.quantize_reference(torch.ones(2, 6), torch.ones(2, 3), fmt="int8", block_size=(2,))
    with pytest.raises(ValueError, match="scale shape"):
        quant.quantize_reference(torch.ones(4, 6), torch.ones(5), fmt="int8", block_size=(1, 2))
    with pytest.raises(ValueError, match="last dim"):
        quant.quantize_dynamic_reference(torch.ones(4, 6), fmt="int8", block_size=(2, 3))


def test_e2m1_grid_round_trip() -> None:
    fmt = get_format("e2m1")
    values = quant.dequantize_reference(torch.arange(16, dtype=torch.uint8), 1.0, fmt=fmt)
    assert values.tolist() == E2M1_VALUES + [-v for v in E2M1_VALUES]
    # midpoints round to the even mantissa; beyond max saturates; -0 -> code 0
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -100.0, -0.1])
    q = quant.dequantize_reference(quant.quantize_reference(x, 1.0, fmt="fp4"), 1.0, fmt=fmt)
    assert q.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -6.0, 0.0]
    assert quant.quantize_reference(torch.tensor([-0.1]), 1.0, fmt="e2m1").item() == 0


@pytest.mark.parametrize("name, torch_dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_matches_torch_float8(name: str, torch_dtype: torch.dtype) -> None:
    fmt = get_format(name)
    x = torch.cat([torch.randn(4000) * 10 ** torch.empty(4000).uniform_(-8, 5), torch.tensor([0.0, fmt.max_value])])
    x = x.clamp(-fmt.max_value, fmt.max_value)  # torch's cast gives NaN / inf beyond max; ours saturates
    codes = quant.quantize_reference(x, 1.0, fmt=name)
    assert torch.equal(codes.view(torch_dtype).float(), x.to(torch_dtype).float())
    assert torch.equal(quant.dequantize_reference(codes, 1.0, fmt=name), x.to(torch_dtype).float())
    big = quant.quantize_reference(torch.tensor([1e9, -1e9]), 1.0, fmt=name)
    assert quant.dequantize_reference(big, 1.0, fmt=name).tolist() == [fmt.max_value, -fmt.max_value]


@pytest.mark.parametrize("name", ["e2m1", "e2m3", "e3m2", "e4m3", "e5m2"])
def test_fp_round_is_nearest_on_grid(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, FloatFormat)
    grid = fmt.grid()
    x = torch.empty(5000).uniform_(-1.2 * fmt.max_value, 1.2 * fmt.max_value)
    q = quant.dequantize_reference(quant.quantize_reference(x, 1.0, fmt=fmt), 1.0, fmt=fmt)
    assert torch.isin(q, grid).all()
    clamped = x.clamp(-fmt.max_value, fmt.max_value)
    best = (grid[None, :] - clamped[:, None]).abs().min(dim=1).values
    assert torch.equal((q - clamped).abs(), best)


def test_dynamic_per_token_hand() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 63.5, -0.49]])
    codes, scale = quant.quantize_dynamic_reference(x, fmt="int8")
    assert scale.shape == (3, 1)
    torch.testing.assert_close(scale, torch.tensor([[2 / 127], [1.0], [1.0]]))
    assert codes.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, 0]]  # 63.5 ties to even


def test_dynamic_per_group_shapes() -> None:
    x = torch.randn(2, 3, 96)
    codes, scale = quant.quantize_dynamic_reference(x, fmt="e2m1", block_size=(1, 1, 32))
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and scale.shape == (2, 3, 3)
    back = quant.dequantize_reference(codes, scale, fmt="e2m1", block_size=(1, 1, 32))
    assert ((back - x).abs() <= scale.repeat_interleave(32, -1) + 1e-6).all()


def test_formats_are_the_core_formats() -> None:
    x = torch.randn(4, 6)
    assert torch.equal(quant.quantize_reference(x, 0.1, fmt=IntFormat(4)), quant.quantize_reference(x, 0.1, fmt="int4"))
    custom = FloatFormat(3, 2, bias=2)  # any core FloatFormat of at most 8 bits has a kernel
    codes = quant.quantize_reference(x, 0.1, fmt=custom)
    torch.testing.assert_close(quant.dequantize_reference(codes, 0.1, fmt=custom), custom.round(x / 0.1) * 0.1)
    for bad in ("log2_4", "binary", FloatFormat(5, 4)):
        with pytest.raises(ValueError, match="no kernel"):
            quant.quantize_reference(x, 1.0, fmt=bad)
    with pytest.raises(ValueError, match="unknown format"):
        quant.quantize_reference(x, 1.0, fmt="int9")
    with pytest.raises(ValueError, match="zero point"):
        quant.quantize_reference(torch.ones(2), 1.0, 0.0, fmt="e4m3")
    with pytest.raises(ValueError, match="symmetric"):
        quant.quantize_dynamic_reference(torch.ones(4, 6), fmt="uint8")


def test_dispatch_reference_on_cpu(torch_path: None) -> None:
    x = torch.randn(5, 7)
    assert torch.equal(quant.quantize(x, 0.1, fmt="int4"), quant.quantize_reference(x, 0.1, fmt="int4"))
    codes, scale = quant.quantize_dynamic(x)
    assert torch.equal(codes, quant.quantize_dynamic_reference(x)[0])


@pytest.mark.parametrize("fmt", ["e2m1", "e4m3"])
def test_fp_reference_stays_on_the_device(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """The FP code conversion runs on the input's device: no copy to the CPU and back around the core's
    ``FloatFormat.encode`` / ``decode`` (a CUDA input stays on the GPU)."""
    x = torch.randn(8, 64) * 3
    scale = torch.rand(8, 2) + 0.1
    codes = quant.quantize_reference(x, scale, fmt=fmt, block_size=(1, 32))
    back = quant.dequantize_reference(codes, scale, fmt=fmt, block_size=(1, 32))

    def no_host_copy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("Tensor.cpu() called: a host round trip")

    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    assert torch.equal(quant.quantize_reference(x, scale, fmt=fmt, block_size=(1, 32)), codes)
    assert torch.equal(quant.dequantize_reference(codes, scale, fmt=fmt, block_size=(1, 32)), back)
    meta = quant.dequantize_reference(codes.to("meta"), scale.to("meta"), fmt=fmt, block_size=(1, 32))
    assert meta.device.type == "meta" and meta.shape == codes.shape  # decoded where the codes are


def test_reference_refuses_nan_inputs_and_bad_scales(torch_path: None) -> None:
    # Issue 21, class 5: NaN became code 0 (the int8 cast of NaN) and scale 0 gave codes of x / 0 (0 or qmax).
    with pytest.raises(ValueError, match="input contains NaN"):
        quant.quantize(torch.tensor([1.0, float("nan")]), 0.5, fmt="int4")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scales must be positive and finite"):
            quant.quantize(torch.tensor([1.0, 2.0]), bad, fmt="int8")
        with pytest.raises(ValueError, match="scales must be positive and finite"):
            quant.quantize(torch.tensor([[1.0, 2.0]]), torch.tensor([[bad]]), fmt="e2m1", block_size=(1, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize_dynamic(torch.tensor([[1.0, float("inf")]]), fmt="int8")
    inf = torch.tensor([float("inf"), -float("inf")])
    assert quant.quantize(inf, 1.0, fmt="int4").tolist() == [7, -8]  # +-Inf saturate
    assert quant.quantize(inf, 1.0, fmt="e2m1").tolist() == [0b0111, 0b1111]  # +-6 (a ValueError before)


# ------------------------------------------------------------------------------------------------ Triton


FORMATS = ["int8", "int4", "uint4", "e2m1", "e4m3", "e5m2", "e3m2", "e2m3"]
SHAPES = [(37, 288), (3, 5, 64), (1, 32), (0, 16), (4, 0)]


def _block(shape: tuple[int, ...], kind: str) -> tuple[int, ...] | None:
    """The core block_size of a granularity for x of ``shape``."""
    if kind == "tensor":
        return None
    if kind == "row":
        return (*(1 for _ in shape[:-1]), shape[-1])
    if kind == "column":
        return (*shape[:-1], 1)
    return (*(1 for _ in shape[:-1]), 32)  # groups of 32 along K


def _scales(shape: tuple[int, ...], block: tuple[int, ...] | None, device: str) -> torch.Tensor:
    blocks = [1] * len(shape) if block is None else [s // b for s, b in zip(shape, block)]
    return torch.rand(*blocks, device=device) + 0.05


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["tensor", "row", "column", "group"])
def test_quantize_triton_matches_reference(triton_path: str, fmt: str, kind: str) -> None:
    spec = get_format(fmt)
    for shape in SHAPES:
        if 0 in shape and kind != "tensor":
            continue
        block = _block(shape, kind)
        x = torch.randn(*shape, device=triton_path) * 3
        s = _scales(shape, block, triton_path) if x.numel() else 1.0
        zp = None
        if isinstance(spec, IntFormat) and not spec.signed and x.numel():
            zp = torch.randint(0, 16, s.shape, device=triton_path).float()
        ref = quant.quantize_reference(x, s, zp, fmt=fmt, block_size=block)
        out = quant.quantize(x, s, zp, fmt=fmt, block_size=block)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.equal(out, ref), (shape, (out != ref).sum())
        back = quant.dequantize(ref, s, zp, fmt=fmt, block_size=block, dtype=torch.float32)
        assert torch.equal(back, quant.dequantize_reference(ref, s, zp, fmt=fmt, block_size=block))


@pytest.mark.parametrize("fmt", ["int8", "int4", "e4m3", "e2m1"])
@pytest.mark.parametrize("group", [None, 32, 48])
def test_quantize_dynamic_triton_matches_reference(triton_path: str, fmt: str, group: int | None) -> None:
    for shape in [(37, 288), (2, 3, 96), (5, 96), (0, 96)]:
        x = torch.randn(*shape, device=triton_path) * 4
        if x.numel():
            x[0] = 0  # an all-zero row gets scale 1
        block = None if group is None else (*(1 for _ in shape[:-1]), group)
        codes, scale = quant.quantize_dynamic(x, fmt=fmt, block_size=block)
        ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt=fmt, block_size=block)
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
        codes, scale = quant.quantize_dynamic(x, fmt=fmt, block_size=(1, 32))
        ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt=fmt, block_size=(1, 32))
        assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes)
    back = quant.dequantize(codes, scale, fmt="e4m3", block_size=(1, 32), dtype=dtype)
    assert back.dtype == dtype


@pytest.mark.gpu
def test_quantize_gpu_large() -> None:
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    codes, scale = quant.quantize_dynamic(x, fmt="int8")
    ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt="int8")
    assert torch.equal(scale, ref_scale)
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 1e-5


@pytest.mark.gpu
def test_quantize_fp_gpu_matches_reference() -> None:
    x = torch.randn(1024, 512, device="cuda")
    for fmt in ("e2m1", "e4m3"):
        codes, scale = quant.quantize_dynamic(x, fmt=fmt, block_size=(1, 32))
        ref_codes, ref_scale = quant.quantize_dynamic_reference(x, fmt=fmt, block_size=(1, 32))
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
        back = quant.dequantize(codes, scale, fmt=fmt, block_size=(1, 32))
        assert torch.equal(back, quant.dequantize_reference(codes, scale, fmt=fmt, block_size=(1, 32)))


def test_triton_checks_a_number_scale(triton_path: str) -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scales must be positive and finite"):
            quant.quantize(torch.ones(2, 4, device=triton_path), bad, fmt="int8")
