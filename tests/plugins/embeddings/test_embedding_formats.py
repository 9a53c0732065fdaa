"""Embedding codecs: hand-computed codes and decoded values per format, and scores on the codes against the
dequantized dot product (the tolerance of each format derived in ``formats``' docstring)."""

from __future__ import annotations

import pytest
import torch

from polyquant.kernels import hamming_distance_reference
from polyquant.plugins.embeddings.formats import FORMATS, TILE_ROWS, Codec, fit_codec

T = torch.tensor


def _roundtrip(codec: Codec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    codes, row_scale = codec.encode(x)
    return codes, row_scale, codec.decode(codes, row_scale)


def test_int8_symmetric_per_dimension_by_hand() -> None:
    codec = fit_codec(T([[63.5, -1.0], [-20.0, 31.75]]), "int8")  # absmax 63.5, 31.75 -> steps 0.5, 0.25
    assert torch.equal(codec.step, T([0.5, 0.25]))
    codes, _, x = _roundtrip(codec, T([[10.2, -3.1], [100.0, -0.1]]))
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[20, -12], [127, 0]]  # 20.4 -> 20, -12.4 -> -12, 200 clamps to 127, -0.4 -> 0
    assert x.tolist() == [[10.0, -3.0], [63.5, 0.0]]


def test_uint8_cells_and_midpoints_by_hand() -> None:
    # dim 0 over [-1, 1]: step 2 / 256 = 1/128; dim 1 over [0, 4]: step 4 / 256 = 1/64; offset = min + step / 2
    codec = fit_codec(T([[-1.0, 4.0], [1.0, 0.0]]), "uint8")
    assert torch.equal(codec.step, T([1 / 128, 1 / 64]))
    assert torch.equal(codec.offset, T([-1 + 1 / 256, 1 / 128]))
    codes, _, x = _roundtrip(codec, T([[0.0, 1.0], [1.0, 0.0], [-1.0, 4.0]]))
    # code = floor((x - min) / step), clamped to 255: 0 -> cell 128, 1 -> cell 64, the top edges -> 255
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[128, 64], [255, 0], [0, 255]]
    # decoded at the cell midpoints min + (code + 0.5) step
    torch.testing.assert_close(x, T([[1 / 256, 1 + 1 / 128], [1 - 1 / 256, 1 / 128], [-1 + 1 / 256, 4 - 1 / 128]]),
                               rtol=0, atol=1e-7)


def test_int4_packs_two_codes_per_byte_by_hand() -> None:
    codec = fit_codec(T([[-1.0, 4.0, 0.0], [1.0, 0.0, 1.0]]), "int4")  # steps 1/8, 1/4, 1/16
    assert torch.equal(codec.step, T([1 / 8, 1 / 4, 1 / 16]))
    codes, _, x = _roundtrip(codec, T([[0.0, 1.0, 1.0]]))
    # codes 8, 4, 15 (1.0 is the top edge of dim 2: 16 clamps to 15); low nibble = even dim; 3 dims -> 2 bytes
    assert codes.dtype == torch.uint8 and codes.tolist() == [[0x48, 0x0F]]
    torch.testing.assert_close(x, T([[-1 + 1 / 16 + 1.0, 1 / 8 + 1.0, 1 / 32 + 15 / 16]]), rtol=0, atol=1e-7)


def test_binary_sign_bits_and_calibrated_magnitudes_by_hand() -> None:
    codec = fit_codec(T([[1.0, -2.0], [-3.0, 4.0]]), "binary", magnitude="dimension")  # step = mean |x| per dim
    assert torch.equal(codec.step, T([2.0, 3.0]))
    codes, _, x = _roundtrip(codec, T([[0.5, -0.1], [-1.0, 0.0]]))
    assert codes.tolist() == [[0b01], [0b10]]  # bit j = dim j >= 0 (0 counts as +)
    assert x.tolist() == [[2.0, -3.0], [-2.0, 3.0]]


def test_uniform_binary_magnitude_ranks_rescoring_by_the_signs_by_hand() -> None:
    """The default magnitude is one value for every dimension, the mean of the per-dimension ones ((2 + 3) / 2), so
    rescoring ranks by q . sign like sentence-transformers; per-dimension magnitudes can rank otherwise."""
    calibration = T([[1.0, -2.0], [-3.0, 4.0]])
    uniform, per_dim = fit_codec(calibration, "binary"), fit_codec(calibration, "binary", magnitude="dimension")
    assert torch.equal(uniform.step, T([2.5, 2.5])) and torch.equal(uniform.encode(calibration)[0],
                                                                    per_dim.encode(calibration)[0])
    codes, _ = uniform.encode(T([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]))  # signs (+, +), (+, -), (-, +)
    q = T([[0.6, 0.5]])
    prep, prep_dim = uniform.prepare(q, T([0.0])), per_dim.prepare(q, T([0.0]))
    torch.testing.assert_close(uniform.dequantized_scores(prep, codes), T([[2.75, 0.25, -0.25]]))  # 2.5 q . sign
    torch.testing.assert_close(per_dim.dequantized_scores(prep_dim, codes), T([[2.7, -0.3, 0.3]]))  # (2, 3) weights
    with pytest.raises(ValueError, match="magnitude applies to binary codes"):
        fit_codec(calibration, "int8", magnitude="dimension")
    with pytest.raises(ValueError, match="magnitude applies to binary codes"):
        fit_codec(calibration, "binary", magnitude="per-dim")


def test_centred_binary_codes_and_decode_by_hand() -> None:
    codec = fit_codec(T([[1.0, -2.0], [-3.0, 4.0]]), "binary", center=True, magnitude="dimension")  # mu = (-1, 1),
    # mean |x - mu| = (2, 3)
    assert codec.centred and torch.equal(codec.offset, T([-1.0, 1.0])) and torch.equal(codec.step, T([2.0, 3.0]))
    assert set(codec.tensors()) == {"step", "offset"} and codec.nbytes() == 16 and codec.code_bytes() == 1
    codes, _, x = _roundtrip(codec, T([[0.5, -0.1], [-1.0, 1.0], [-2.0, 2.0]]))
    # x - mu = (1.5, -1.1), (0, 0), (-1, 1): bit j = dim j >= mu_j (the uncentred bits would be 01, 10, 10)
    assert codes.tolist() == [[0b01], [0b11], [0b10]]
    assert x.tolist() == [[1.0, -2.0], [1.0, 4.0], [-3.0, 4.0]]  # mu + sign * step
    # the query's bits are those of q itself (q - mu = (0.5, -0.5) would give 0b01); bias = offset + q . mu
    prep = codec.prepare(T([[-0.5, 0.5]]), T([0.25]))
    assert prep.bits.tolist() == [[0b10]] and prep.bias.tolist() == [1.25]
    assert codec.scores(prep, codes).tolist() == [[-1.0, 0.0, 1.0]]  # (D - 2 h) / D with h = 2, 1, 0
    # rescoring: offset + q . (mu + sign * step) = 0.25 + (-0.5, 0.5) . decoded
    assert codec.dequantized_scores(prep, codes).tolist() == [[-1.25, 1.75, 3.75]]


def test_centred_hamming_top_k_is_the_brute_force_on_centred_signs() -> None:
    from polyquant.kernels import hamming_topk

    x, q = _data()
    codec = fit_codec(x[:200], "binary", center=True)
    assert float(codec.offset.norm()) > 0.05  # the data are not centred: the bits really change
    codes, _ = codec.encode(x)
    prep = codec.prepare(q, torch.zeros(len(q)))
    sx = torch.where(x - x[:200].mean(dim=0) >= 0, 1.0, -1.0)  # (N, D) centred signs from the floats
    sq = torch.where(q >= 0, 1.0, -1.0)  # (Q, D)
    h = ((codec.dim - sq @ sx.T) / 2).long()  # (Q, N) Hamming distances
    want = torch.sort(h, dim=1, stable=True)  # ties to the smaller index
    dist, idx = hamming_topk(prep.bits, codes, 25)
    assert torch.equal(dist.long(), want.values[:, :25]) and torch.equal(idx, want.indices[:, :25])
    assert torch.equal(codec.scores(prep, codes), (codec.dim - 2 * h).float() / codec.dim)
    assert not torch.equal(codes, fit_codec(x[:200], "binary").encode(x)[0])


def test_float16_and_bfloat16_round_to_nearest_and_saturate() -> None:
    x = T([[1 / 3, 70000.0, -1e-8]])
    codes, _, y = _roundtrip(fit_codec(x, "float16"), x)
    assert codes.dtype == torch.float16
    assert y.tolist() == [[0.333251953125, 65504.0, 0.0]]  # 70000 saturates at the fp16 max, not inf
    codes, _, y = _roundtrip(fit_codec(x, "bfloat16"), x)
    assert codes.dtype == torch.bfloat16
    assert y.tolist() == [[0.333984375, 70144.0, -1.0011717677116394e-08]]
    assert torch.equal(codes, x.to(torch.bfloat16))  # the core's rounding is IEEE round-to-nearest-even


def test_fp8_raw_cast_by_hand() -> None:
    x = T([[0.05, 500.0, 0.001]])
    codes, row_scale, y = _roundtrip(fit_codec(x, "fp8_e4m3"), x)
    assert codes.dtype == torch.float8_e4m3fn and row_scale is None
    # 0.05: binade 2^-5, step 2^-8 -> 13 * 2^-8; 500 saturates at 448; 0.001: subnormal step 2^-9 -> 1 step
    assert y.tolist() == [[13 / 256, 448.0, 2**-9]]
    _, _, y = _roundtrip(fit_codec(x, "fp8_e5m2"), x)
    assert y.tolist() == [[6 / 128, 512.0, 2**-10]]  # e5m2: 0.05 -> 6 * 2^-7; 500 -> 512; 0.001 -> 2^-10


def test_fp8_vector_scale_maps_each_absmax_to_the_format_max() -> None:
    codec = fit_codec(T([[1.0, 1.0, 1.0]]), "fp8_e4m3", scale="vector")
    x = T([[0.05, -0.1, 0.025], [0.0, 0.0, 0.0]])
    codes, row_scale, y = _roundtrip(codec, x)
    assert codes[0].float().tolist() == [224.0, -448.0, 112.0]  # x / (0.1 / 448): all on the E4M3 grid
    torch.testing.assert_close(row_scale, T([0.1 / 448, 1e-8]))  # a zero vector keeps the core's eps scale
    torch.testing.assert_close(y, x, rtol=1e-6, atol=0)
    assert codec.code_bytes() == 3 + 4


def test_fp8_dimension_scale_is_calibrated() -> None:
    codec = fit_codec(T([[0.5, -0.25], [-0.125, 0.0625]]), "fp8_e4m3", scale="dimension")
    torch.testing.assert_close(codec.step, T([0.5 / 448, 0.25 / 448]))
    codes, _, y = _roundtrip(codec, T([[0.5, -0.25], [1.0, 0.0]]))
    assert codes.float().tolist() == [[448.0, -448.0], [448.0, 0.0]]  # beyond the calibrated range: saturates
    torch.testing.assert_close(y, T([[0.5, -0.25], [0.5, 0.0]]))


def test_raw_e4m3_cast_of_unit_vectors_underflows_and_a_scale_fixes_it() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 384, generator=g)
    x = x / x.norm(dim=1, keepdim=True)  # entries ~ 0.05: a quarter below the E4M3 smallest normal 2^-6
    small = x.abs() < 2**-6
    assert 0.2 < float(small.float().mean()) < 0.3
    rel = {}
    for scale in ("none", "vector"):
        codec = fit_codec(x, "fp8_e4m3", scale=scale)
        rel[scale] = float(((codec.decode(*codec.encode(x)) - x).abs() / x.abs())[small].mean())
    # subnormals keep fewer significant bits: ~16% relative error raw, ~2% (3 mantissa bits) once scaled
    assert rel["none"] > 0.12 and rel["vector"] < 0.03


def _data(d: int = 40, n: int = 300, q: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g) * torch.linspace(1.5, 0.2, d)
    return x / x.norm(dim=1, keepdim=True), torch.randn(q, d, generator=g)


SCORED = [(f, "none") for f in FORMATS] + [("fp8_e4m3", "vector"), ("fp8_e5m2", "dimension")]


@pytest.mark.parametrize("d", [40, 39], ids=["even", "odd"])
@pytest.mark.parametrize("fmt,scale", SCORED)
def test_scores_on_codes_match_the_dequantized_dot_product(fmt: str, scale: str, d: int) -> None:
    """On the CPU every format but binary upcasts tiles of codes and multiplies with the float query: the
    dequantized dot product up to fp32 summation order (int4 and fp8 as even / odd halves; fp8 of an odd
    dimension through torch's cast), over more than one tile."""
    x, q = _data(d=d, n=TILE_ROWS + 300)
    codec = fit_codec(x[:200], fmt, scale=scale)
    codes, row_scale = codec.encode(x)
    offset = torch.linspace(-0.5, 0.5, len(q))  # a reducer offset is carried through unchanged
    prep = codec.prepare(q, offset)
    got = codec.scores(prep, codes, row_scale)
    if fmt == "binary":  # the cosine of the sign vectors, (D - 2 h) / D, with h the Hamming distance
        h = hamming_distance_reference(prep.bits, codes).float()
        assert torch.equal(got, (codec.dim - 2 * h) / codec.dim)
        return
    want = offset[:, None] + q @ codec.decode(codes, row_scale).T
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # |q| |x| D eps with |q| ~ sqrt(D) here
    torch.testing.assert_close(codec.dequantized_scores(prep, codes, row_scale), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_upcast_is_exact_for_every_byte(fmt: str) -> None:
    """Every one of the 256 codes (subnormals and the largest included) upcast by the multiply-and-mask path is the
    float8 value (E4M3 at 2^-8, E5M2 exactly, Inf and NaN kept); an E4M3 NaN byte reads as +-480 and is what
    ``damaged`` flags."""
    codec = Codec(format=fmt, dim=256)
    dtype = torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)[None]  # (1, 256): every byte once
    out = torch.empty(1, 256)
    codec.upcast(codes, out)
    value = codes.float()[0]
    finite = torch.isfinite(value)
    unit = 2.0**-8 if fmt == "fp8_e4m3" else 1.0
    assert torch.equal(out[0, finite], value[finite] * unit)
    if fmt == "fp8_e5m2":
        assert torch.equal(out[0, ~finite].isnan(), value[~finite].isnan())
        assert torch.equal(out[0].isinf(), value.isinf())
    else:
        assert (out[0, ~finite].abs() == 480 * unit).all()
    bad = torch.stack([codes[0, :128], codes[0, 128:]])  # row 0 holds 0x7F (NaN in both formats), row 1 0xFF
    assert codec.damaged(bad).tolist() == [True, True]
    assert codec.damaged(torch.zeros(3, 256, dtype=torch.uint8).view(dtype)).tolist() == [False] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the int8 GEMM path)")
@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4"])
def test_cuda_integer_scores_round_only_the_query(fmt: str) -> None:
    x, q = _data()
    codec = fit_codec(x[:200], fmt)
    codes, _ = codec.encode(x)
    prep = codec.prepare(q.cuda(), torch.zeros(len(q), device="cuda"))
    got = codec.scores(prep, codes.cuda()).cpu()
    want = q @ codec.decode(codes).T
    # only the query is rounded (u ~ s_u u_q): |error| <= s_u / 2 * sum_d |c_d| over the GEMM's int8 codes
    c = codec.gemm_codes(codes).float().abs().sum(dim=1)  # (N,)
    bound = prep.qscale.cpu() / 2 * c[None, :] + 1e-5
    assert bool(((got - want).abs() <= bound).all())


@pytest.mark.parametrize("fmt", FORMATS)
def test_code_layout_and_empty_input(fmt: str) -> None:
    x, _ = _data(d=13, n=20)
    codec = fit_codec(x, fmt)
    codes, _ = codec.encode(x)
    width = {"int4": 7, "binary": 2}.get(fmt, 13)
    assert codes.shape == (20, width) and codes.dtype == codec.code_dtype and codec.code_width == width
    assert codec.code_bytes() == width * codec.code_dtype.itemsize
    empty, _ = codec.encode(x[:0])
    assert empty.shape == (0, width) and codec.decode(empty).shape == (0, 13)


def test_fit_codec_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_codec(T([[1.0, float("nan")]]), "int8")
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        fit_codec(T([[1.0, 2.0]]), "int3")
    with pytest.raises(ValueError, match="scale applies to fp8"):
        fit_codec(T([[1.0, 2.0]]), "int8", scale="vector")
    with pytest.raises(ValueError, match="step / offset"):
        Codec(format="int8", dim=2)
    with pytest.raises(ValueError, match="int8: center applies to binary codes only"):
        fit_codec(T([[1.0, 2.0]]), "int8", center=True)
    with pytest.raises(ValueError, match="binary: offset must be float32 \\(2,\\)"):
        Codec(format="binary", dim=2, step=T([1.0, 1.0]), offset=T([0.0, 0.0, 0.0]))


@pytest.mark.parametrize("step", [float("nan"), 0.0, -1.0, float("inf"), 3e38, 1e-13])
def test_codec_refuses_steps_that_cannot_come_from_a_fit(step: float) -> None:
    """A step outside [1e-12, 1e6] (NaN, 0, negative, Inf, 3e38, below the fit's eps) would decode or score to
    NaN / Inf or collapse every code: ``ValueError`` naming the tensor, as it is named in a store artifact."""
    good = torch.full((4,), 0.01)
    for fmt, offset in (("int8", None), ("uint8", torch.zeros(4)), ("binary", None)):
        Codec(format=fmt, dim=4, step=good, offset=offset)
        bad = good.clone()
        bad[1] = step
        with pytest.raises(ValueError, match="^codec.step must be finite and in \\[1e-12, 1e\\+06\\]: 1 entries are "
                                             "not \\(first: entry 1 = "):
            Codec(format=fmt, dim=4, step=bad, offset=offset)
    with pytest.raises(ValueError, match="^codec.offset must be finite"):
        Codec(format="uint8", dim=4, step=good, offset=torch.tensor([0.0, 0.0, 3e38, 0.0]))
