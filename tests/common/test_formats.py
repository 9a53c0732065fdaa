"""Number formats against hand-computed grids and rounding."""

from __future__ import annotations

import pytest
import torch

from polyquant.formats import BinaryFormat, FloatFormat, IntFormat, LogFormat, _fp_tables, get_format, list_formats


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_ranges(bits: int) -> None:
    s, u = IntFormat(bits), IntFormat(bits, signed=False)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    assert s.grid().numel() == u.grid().numel() == 2**bits


def test_int_round_half_even_and_clamp() -> None:
    f = IntFormat(4)
    x = torch.tensor([-9.0, -8.4, -0.5, 0.5, 1.5, 2.5, 6.6, 7.5, 100.0])
    assert f.round(x).tolist() == [-8, -8, 0, 0, 2, 2, 7, 7, 7]


def test_int_encode_decode_roundtrip() -> None:
    f = IntFormat(3)
    q = f.grid()
    codes = f.encode(q)
    assert codes.tolist() == list(range(8))
    assert torch.equal(f.decode(codes), q)


# Hand-derived grids (positive half): 2^(e-bias) * (1 + m/2^M), subnormals 2^(1-bias) * m/2^M.
GRIDS = {
    "e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "e3m0": [0, 0.25, 0.5, 1, 2, 4, 8, 16],
    "e1m2": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5],
    "e2m3": [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
             2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5],
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_float_grids(name: str) -> None:
    grid = get_format(name).grid()
    pos = grid[grid >= 0].tolist()
    assert pos == GRIDS[name]
    assert torch.equal(grid[grid < 0], -grid[grid > 0].flip(0))


@pytest.mark.parametrize(
    ("name", "max_value", "count"),
    [("e3m2", 28.0, 32), ("e3m4", 31.0, 128), ("e4m3", 448.0, 127), ("e5m2", 57344.0, 124)],
)
def test_float_max_and_grid_size(name: str, max_value: float, count: int) -> None:
    f = get_format(name)
    assert f.max_value == max_value
    # distinct finite non-negative values
    assert int((f.grid() >= 0).sum()) == count


def test_float_configurable_bias() -> None:
    f = FloatFormat(2, 1, bias=2)  # every value of e2m1 halved
    assert f.grid()[f.grid() >= 0].tolist() == [0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3]
    assert f.name == "e2m1_b2"


def test_e2m1_round_ties_to_even_mantissa() -> None:
    f = get_format("fp4")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -100.0, 0.3])
    assert f.round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -6.0, 0.5]


@pytest.mark.parametrize(("name", "dtype"), [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_round_matches_torch_cast(name: str, dtype: torch.dtype) -> None:
    f = get_format(name)
    x = torch.randn(20000) * f.max_value / 8
    x = x.clamp(-f.max_value, f.max_value)
    assert torch.equal(f.round(x), x.to(dtype).float())


@pytest.mark.parametrize("name", ["e2m1", "e3m0", "e1m2", "e2m3", "e3m2", "e4m3", "e5m2"])
def test_float_round_is_nearest_grid_point(name: str) -> None:
    f = get_format(name)
    grid = f.grid()
    x = torch.linspace(-1.2 * f.max_value, 1.2 * f.max_value, 5001)
    got = f.round(x)
    dist = (x[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.isin(got, grid).all()
    assert torch.allclose((got - x).abs(), best, atol=1e-6 * f.max_value)


@pytest.mark.parametrize("name", ["e2m1", "e3m2", "e4m3", "e5m2"])
def test_float_encode_decode(name: str) -> None:
    f = get_format(name)
    grid = f.grid()
    codes = f.encode(grid)
    assert codes.unique().numel() == grid.numel()
    assert torch.equal(f.decode(codes), grid)
    with pytest.raises(ValueError, match="not on the grid"):
        f.encode(torch.tensor([0.3]))


@pytest.mark.parametrize("name", ["e2m1", "e4m3"])
def test_float_tables_follow_the_input_device(name: str) -> None:
    """encode / decode look their tables up on the input's device (built once per device), not on the CPU."""
    f = get_format(name)
    meta = torch.device("meta")  # no data: decode still runs, and a CPU table indexed by meta codes gives a CPU tensor
    assert f.decode(torch.arange(2**f.bits, dtype=torch.uint8, device=meta)).device == meta
    tables = _fp_tables(f, meta)
    assert all(t.device == meta for t in tables)
    assert _fp_tables(f, meta) is tables  # cached per (format, device)
    grid = f.grid()
    assert torch.equal(f.decode(f.encode(grid)), grid)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["e2m1", "e3m2", "e4m3", "e5m2"])
def test_float_encode_decode_on_cuda(name: str) -> None:
    f = get_format(name)
    grid = f.grid().cuda()
    codes = f.encode(grid)
    assert codes.device == grid.device and torch.equal(codes.cpu(), f.encode(grid.cpu()))
    values = f.decode(codes)
    assert values.device == grid.device and torch.equal(values, grid)
    with pytest.raises(ValueError, match="not on the grid"):
        f.encode(torch.tensor([0.3], device="cuda"))


def test_e2m1_codes_are_ocp_bit_patterns() -> None:
    f = get_format("e2m1")
    # 0.5 = 0|00|1, 1.0 = 0|01|0, 6.0 = 0|11|1, -6.0 = 1|11|1
    assert f.encode(torch.tensor([0.5, 1.0, 6.0, -6.0])).tolist() == [0b0001, 0b0010, 0b0111, 0b1111]


def test_log2_grid_and_flush_to_zero() -> None:
    f = LogFormat(2)  # k = 0..3 -> 1, 1/2, 1/4, 1/8
    assert f.grid().tolist() == [0, 0.125, 0.25, 0.5, 1]
    x = torch.tensor([1.0, 0.7, 0.3, 0.1, 0.05, 0.0, -0.5, 2.0])
    # -log2: 0, 0.51->1, 1.74->2, 3.32->3, 4.32->4 (>=4: flushed), 0 -> 0, negative -> 0 (unsigned), 2 -> clamp k=0
    assert f.round(x).tolist() == [1.0, 0.5, 0.25, 0.125, 0.0, 0.0, 0.0, 1.0]


def test_logsqrt2_and_adaptive_base() -> None:
    f = get_format("logsqrt2_3")
    assert f.base_log2 == 0.5
    x = torch.tensor([2 ** -0.5, 0.5, 2 ** -1.5])
    assert torch.allclose(f.round(x), x)
    ada = LogFormat(4, base_log2=37 / 37)
    assert torch.equal(ada.round(x), LogFormat(4).round(x))


def test_signed_log() -> None:
    f = LogFormat(2, signed=True)
    assert f.round(torch.tensor([-0.5, 0.5, -0.01])).tolist() == [-0.5, 0.5, 0.0]


def test_binary() -> None:
    f = BinaryFormat()
    x = torch.tensor([-0.3, 0.0, 2.0])
    assert f.round(x).tolist() == [-1, 1, 1]
    assert f.encode(f.round(x)).tolist() == [0, 1, 1]


def test_round_ste_gradients() -> None:
    x = torch.tensor([0.3, 1.7, 100.0], requires_grad=True)
    IntFormat(4).round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped outside [qmin, qmax]


@pytest.mark.parametrize("name", ["int9", "int0", "uint12", "e9m9x", "float4", "log2_9", ""])
def test_unknown_or_out_of_range_formats(name: str) -> None:
    with pytest.raises(ValueError):
        get_format(name)


def test_unknown_format_suggests() -> None:
    with pytest.raises(ValueError, match="did you mean"):
        get_format("in8")


@pytest.mark.parametrize("bits", [0, 9, 2.5])
def test_bits_out_of_range(bits) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="bits"):
        IntFormat(bits)


def test_every_listed_format_resolves() -> None:
    for name in list_formats():
        f = get_format(name)
        assert f.grid().numel() >= 2


def test_log_format_rational_base_and_lut_by_hand() -> None:
    from polyquant.formats import LogFormat as LF

    # AdaLog base 2^(q/r) with q = 74, r = 37: base 4; exponents -log2|x| * r / q
    f = LF(3, base_ratio=(74, 37))
    assert f.base_log2 == 2.0 and f.name == "log74r37_3"
    x = torch.tensor([1.0, 0.25, 0.2, 0.03, 1e-6, 0.0])  # k = 0, 1, round(1.16) = 1, round(2.53) = 3, 9.97 -> flushed
    assert torch.equal(f.round(x), torch.tensor([1.0, 0.25, 0.25, 4.0**-3, 0.0, 0.0]))
    assert LF(3) == LF(3, 1.0) and LF(3).base_ratio is None  # the old constructor is unchanged
    # hardware table: q = 50, r = 37, 2 bits: k q = 0, 50, 100, 150 -> shifts 0, 1, 2, 4 and fractions
    # 2^(-0/37), 2^(-13/37), 2^(-26/37), 2^(-2/37) rounded to steps of 1 / (2^3 - 2) = 1/6
    g = LF(2, base_ratio=(50, 37), lut=True)
    frac = torch.round(torch.exp2(-torch.tensor([0.0, 13, 26, 2], dtype=torch.float64) / 37) * 6) / 6
    expected = (frac * torch.exp2(-torch.tensor([0.0, 1, 2, 4], dtype=torch.float64))).float()
    assert torch.equal(g.magnitude(torch.arange(4)), expected)
    assert torch.equal(g.grid(), torch.cat([torch.zeros(1), expected.flip(0)]))
    codes = g.encode(g.round(torch.tensor([1.0, 0.4, 0.0])))
    assert codes.tolist() == [0, 1, 4] and torch.equal(g.decode(codes), g.round(torch.tensor([1.0, 0.4, 0.0])))
    with pytest.raises(ValueError, match="rational"):
        LF(3, lut=True)
    with pytest.raises(ValueError, match="contradicts"):
        LF(3, base_log2=0.5, base_ratio=(74, 37))
    with pytest.raises(ValueError, match="positive integers"):
        LF(3, base_ratio=(0, 37))


def test_twin_uniform_format_by_hand() -> None:
    from polyquant.formats import TwinUniformFormat

    # 3 bits: two 2-bit ranges; fine steps 0..3, coarse steps 0, 4, 8, 12 (ratio 2^2)
    f = TwinUniformFormat(3, 2)
    assert f.grid().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 12.0]
    # below the fine range's end (4) a value stays on the fine grid: 3.6 -> 3, not the nearer 4 (PTQ4ViT)
    assert f.round(torch.tensor([2.4, 3.6, 4.1, 6.0, 99.0])).tolist() == [2.0, 3.0, 4.0, 8.0, 12.0]
    s = TwinUniformFormat(3, 2, signed=True)  # negatives on the fine grid (-4 .. 0), the rest on the coarse one
    assert s.grid().tolist() == [-4.0, -3.0, -2.0, -1.0, 0.0, 4.0, 8.0, 12.0]
    assert s.round(torch.tensor([-9.0, -1.4, 1.9, 2.1, 7.0])).tolist() == [-4.0, -1.0, 0.0, 4.0, 8.0]
    assert get_format(f) is f and not f.supports_zero_point and f.name == "twin2_3"
    with pytest.raises(ValueError, match="bits"):
        TwinUniformFormat(1)


# --- issue 21, class 5: NaN / Inf and codes off the format -----------------------------------------------------

_EVERY_KIND = ["int4", "uint4", "e2m1", "e4m3", "e5m2", "log2_4", "logsqrt2_3", "binary", "nf4"]


def _every_format() -> list:  # type: ignore[type-arg]
    from polyquant.formats import TableFormat, TwinUniformFormat

    return [get_format(n) for n in _EVERY_KIND] + [
        LogFormat(3, signed=True), LogFormat(4, base_ratio=(27, 37), lut=True), TwinUniformFormat(4, 2),
        TwinUniformFormat(4, 1, signed=True), TableFormat((0.5,) * 2),
    ]


@pytest.mark.parametrize("fmt", _every_format(), ids=lambda f: f.name)
def test_round_keeps_nan_and_saturates_inf(fmt) -> None:  # type: ignore[no-untyped-def]
    # NaN used to become 0 (log), 1.0 (nf4) or -1 (binary); e2m1 / e4m3 gave NaN for +-Inf.
    out = fmt.round(torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38]))
    assert torch.isnan(out[0])
    assert torch.isfinite(out[1:]).all()
    grid = fmt.grid()
    assert out[1] == grid.max() and out[3] == grid.max()


@pytest.mark.parametrize("name", ["int4", "uint4", "log2_4", "binary", "e2m1", "nf4"])
def test_encode_refuses_nan(name: str) -> None:
    # int4 gave code 8 for NaN, log2_4 gave -2147483648, binary gave code 0.
    with pytest.raises(ValueError, match="NaN|nan|not on the grid|not in the table|other values"):
        get_format(name).encode(torch.tensor([0.0, float("nan")]))


def test_encode_refuses_values_off_the_grid() -> None:
    with pytest.raises(ValueError, match=r"int4: encode .* \[-8, 7\], got values in \[-9, 20\]"):
        IntFormat(4).encode(torch.tensor([20.0, -9.0]))  # codes 28 and 255 before
    with pytest.raises(ValueError, match="log2_4: encode"):
        get_format("log2_4").encode(torch.tensor([0.5, 3.0]))  # code -2 before
    with pytest.raises(ValueError, match="log2_4: encode"):
        get_format("log2_4").encode(torch.tensor([-0.5]))  # the code of +0.5 before
    with pytest.raises(ValueError, match="log2_4: encode"):
        get_format("log2_4").encode(torch.tensor([2.0**-20]))  # code 20, not a level of 4 bits
    lut = LogFormat(4, base_ratio=(27, 37), lut=True)
    with pytest.raises(ValueError, match="levels"):
        lut.encode(torch.tensor([0.3]))  # code 0 (the level 1.0) before
    with pytest.raises(ValueError, match="binary"):
        BinaryFormat().encode(torch.tensor([0.0]))
    for fmt in (IntFormat(4), IntFormat(2, signed=False), get_format("log2_4"), lut, BinaryFormat()):
        grid = fmt.grid()
        assert torch.equal(fmt.decode(fmt.encode(grid)), grid)


@pytest.mark.parametrize("name, bad", [("int4", 16), ("uint2", 4), ("e2m1", 16), ("e4m3", -1), ("log2_4", -1),
                                       ("binary", 2), ("nf4", 16)])
def test_decode_refuses_codes_the_format_lacks(name: str, bad: int) -> None:
    # int4 code 16 gave 8 (> qmax), e2m1 code 16 an IndexError, e4m3 code -1 wrapped to the last pattern (NaN),
    # log code -1 gave 2.0 (> 1), binary code 2 gave 3.
    fmt = get_format(name)
    with pytest.raises(ValueError, match="codes must lie in"):
        fmt.decode(torch.tensor([0, bad]))
    assert fmt.decode(torch.empty(0, dtype=torch.uint8)).numel() == 0
