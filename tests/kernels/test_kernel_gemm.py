"""4-bit packing, weight-only GEMM (int4 / fp4) and W8A8 int8 GEMM."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import RTOL, assert_kernel_close, rel_err

from polyquant.formats import IntFormat, get_format
from polyquant.kernels import gemm
from polyquant.kernels.gemm import GemmConfig
from polyquant.pack import pack_rows


# ------------------------------------------------------------------------------------------------ references


def test_pack_4bit_layout() -> None:
    # the core's row layout: low nibble = even index; int4 codes are offset binary q + 8; odd K padded with code 0
    int4 = get_format("int4")
    q = torch.tensor([[1, -2, 3], [-8, 7, -1]], dtype=torch.int8)
    packed = gemm.pack_4bit(int4.encode(q))  # codes [[9, 6, 11], [0, 15, 7]]
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x69, 0x0B], [0xF0, 0x07]]
    assert torch.equal(packed, pack_rows(int4.encode(q), 4))
    assert gemm.unpack_4bit(packed, 3).tolist() == [[9, 6, 11], [0, 15, 7]]
    assert int4.decode(gemm.unpack_4bit(packed, 3)).tolist() == q.tolist()
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        gemm.pack_4bit(q)  # two's complement codes are not the format's codes


def test_pack_round_trip_random() -> None:
    codes = torch.randint(0, 16, (5, 4, 17), dtype=torch.uint8)
    assert torch.equal(gemm.unpack_4bit(gemm.pack_4bit(codes), 17), codes)
    with pytest.raises(ValueError):
        gemm.unpack_4bit(gemm.pack_4bit(codes), 15)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_quantize_weight_4bit_refuses_non_finite(request: pytest.FixtureRequest, path: str) -> None:
    # Issue 21, class 5: on the Triton path a NaN weight was packed to some code silently (no check there).
    device = request.getfixturevalue(f"{path}_path") or "cpu"
    w = torch.ones(2, 32, device=device)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gemm.quantize_weight_4bit(w, fmt="int4", block_size=(1, 32))


def test_quantize_weight_4bit_hand() -> None:
    w = torch.tensor([[7.0, -3.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    packed, scale = gemm.quantize_weight_4bit(w, fmt="int4", block_size=(1, 4))
    assert scale.tolist() == [[1.0], [1.0]]
    assert gemm.unpack_4bit(packed, 4).tolist() == [[15, 4, 9, 8], [8, 8, 8, 8]]  # -3.5 ties to even: -4 + 8
    packed, scale = gemm.quantize_weight_4bit(torch.tensor([[6.0, -1.5, 0.2, 2.6]]), fmt="fp4", block_size=(1, 4))
    assert scale.tolist() == [[1.0]]
    back = gemm.dequantize_weight_4bit(packed, scale, k=4, fmt="fp4", block_size=(1, 4))
    assert back.tolist() == [[6.0, -1.5, 0.0, 3.0]]


def test_w4_reference_equals_dense_matmul() -> None:
    w = torch.randn(24, 64)
    packed, scale = gemm.quantize_weight_4bit(w, fmt=IntFormat(4), block_size=(1, 32))
    wd = gemm.dequantize_weight_4bit(packed, scale, k=64, fmt="int4", block_size=(1, 32))
    assert rel_err(wd, w) < 0.15  # a quantization error against the float weight: norm-relative on purpose
    x = torch.randn(2, 3, 64)
    bias = torch.randn(24)
    y = gemm.w4_gemm_reference(x, packed, scale, fmt="int4", block_size=(1, 32), bias=bias)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ wd.T + bias)
    with pytest.raises(ValueError, match="scale"):
        gemm.w4_gemm_reference(x, packed, scale[:, :1], block_size=(1, 32))
    with pytest.raises(ValueError, match="int4 or e2m1"):
        gemm.quantize_weight_4bit(w, fmt="int3")
    with pytest.raises(ValueError, match="does not divide"):
        gemm.quantize_weight_4bit(w, block_size=(1, 48))
    with pytest.raises(ValueError, match="even group"):
        gemm.quantize_weight_4bit(torch.randn(4, 63), block_size=(1, 21))
    with pytest.raises(ValueError, match=r"\(1, g\)"):
        gemm.quantize_weight_4bit(w, block_size=(2, 32))


def test_int8_reference_hand() -> None:
    xq = torch.tensor([[1, 2], [-3, 4]], dtype=torch.int8)
    wq = torch.tensor([[5, 6], [7, -8], [127, -128]], dtype=torch.int8)
    y = gemm.int8_gemm_reference(xq, torch.tensor([[0.5], [2.0]]), wq, torch.tensor([1.0, 0.1, 0.01]),
                                 out_dtype=torch.float32)
    expected = torch.tensor([[17 * 0.5, -9 * 0.5 * 0.1, -129 * 0.5 * 0.01], [9 * 2.0, -53 * 2.0 * 0.1,
                                                                             -893 * 2.0 * 0.01]])
    torch.testing.assert_close(y, expected)


def test_int8_reference_is_exact_for_long_k() -> None:
    k = 8192  # sums reach 1.3e8 > 2^24: an fp32 matmul would round them
    xq = torch.full((1, k), 127, dtype=torch.int8)
    wq = torch.full((1, k), -128, dtype=torch.int8)
    wq[0, 0] = -127
    y = gemm.int8_gemm_reference(xq, 1.0, wq, 1.0, out_dtype=torch.float32)
    assert y.item() == float(torch.tensor(127 * (-128 * k + 1), dtype=torch.float32))


@pytest.mark.parametrize("k", [1, 7, 16, 384, 1023, 1024, 3000])
@pytest.mark.parametrize("path", ["int_mm", "float32", "float64"])
def test_int8_reference_matches_integer_matmul_bit_for_bit(k: int, path: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every accumulation path (torch._int_mm on the CPU; without it float32 below K = 1024, exact since partial
    sums stay below 2^24; float64 otherwise) gives the int64 sums rounded once to float32."""
    calls = []
    if path == "int_mm":
        int_mm = torch._int_mm
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    else:
        monkeypatch.delattr(torch, "_int_mm", raising=False)
    if path == "float64":  # a float32 matmul that may round (bf16 / tf32 shortcuts) is not trusted
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    g = torch.Generator().manual_seed(k)
    xq = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (9, k), dtype=torch.int8, generator=g)
    xq[0], wq[0] = -128, -128  # the largest sum: k * 2^14 (16,760,832 at k = 1023, still exact in float32)
    xq[1], wq[1] = 127, -128  # the most negative
    want = (xq.long() @ wq.long().T).float()  # exact integers, rounded once to float32
    y = gemm.int8_gemm_reference(xq, 1.0, wq, 1.0, out_dtype=torch.float32)
    assert torch.equal(y, want)
    assert len(calls) == (path == "int_mm" and k >= 16)  # torch._int_mm from K = 16 (wrong at K = 1, torch 2.14)
    assert y[0, 0].item() == float(torch.tensor(k * 16384, dtype=torch.float32))


def test_w8a8_linear_close_to_float(torch_path: None) -> None:
    x = torch.randn(6, 64)
    w = torch.randn(32, 64)
    ws = w.abs().amax(dim=1) / 127
    wq = torch.round(w / ws[:, None]).to(torch.int8)
    y = gemm.w8a8_linear(x, wq, ws)
    assert rel_err(y, x @ w.T) < 0.02  # a quantization error against the float product: norm-relative on purpose


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_check_rejects_one_wrong_element(dtype: torch.dtype) -> None:
    """The element-wise check of the kernel tests fails on one wrong output element; the old norm-relative check
    (``rel_err(out, ref) < tol``, tolerances 1e-5 / 2e-3 / 1e-2) passed it."""
    old_tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    w = torch.randn(256, 512)
    packed, scale = gemm.quantize_weight_4bit(w, fmt="int4", block_size=(1, 128))
    x = torch.randn(128, 512).to(dtype)
    ref = gemm.w4_gemm_reference(x, packed, scale, fmt="int4", block_size=(1, 128))  # (128, 256)
    assert_kernel_close(ref.clone(), ref)
    out = ref.clone()
    out[17, 33] += 10 * RTOL[dtype] * ref.abs().max()  # one element off by 5x its tolerance or more
    assert rel_err(out, ref) < old_tol
    with pytest.raises(AssertionError, match="Mismatched elements: 1 /"):
        assert_kernel_close(out, ref)


# ------------------------------------------------------------------------------------------------ Triton

W4_CASES = [  # (M, N, K, group)
    (1, 48, 256, 128),
    (3, 40, 192, 32),
    (20, 64, 384, 64),
    (5, 33, 200, 40),  # non-power-of-two group
    (2, 17, 131, 131),  # odd K, per channel
    (0, 16, 64, 32),  # empty batch
]


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w4_gemm_triton_matches_reference(triton_path: str, fmt: str, dtype: torch.dtype) -> None:
    for m, n, k, g in W4_CASES:
        w = torch.randn(n, k, device=triton_path)
        packed, scale = gemm.quantize_weight_4bit(w, fmt=fmt, block_size=(1, g))
        x = torch.randn(m, k, device=triton_path).to(dtype)
        bias = torch.randn(n, device=triton_path) if m % 2 else None
        ref = gemm.w4_gemm_reference(x, packed, scale, fmt=fmt, block_size=(1, g), bias=bias)
        out = gemm.w4_gemm(x, packed, scale.to(dtype), fmt=fmt, block_size=(1, g), bias=bias)
        assert out.dtype == dtype and out.shape == (m, n)
        assert_kernel_close(out, ref, context=(m, n, k, g))


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("config", [
    GemmConfig("gemv", 1, 16, 64, 4, 1),  # one group per step
    GemmConfig("gemv", 1, 16, 256, 4, 1),  # several groups per step
    GemmConfig("dot", 16, 32, 64, 4, 1),  # scale after the dot (group % BLOCK_K == 0)
    GemmConfig("dot", 16, 32, 128, 4, 1),  # scale before the dot
])
def test_w4_gemm_triton_configs(triton_path: str, fmt: str, config: GemmConfig) -> None:
    m, n, k, g = 2, 40, 320, 64
    w = torch.randn(n, k, device=triton_path)
    packed, scale = gemm.quantize_weight_4bit(w, fmt=fmt, block_size=(1, g))
    x = torch.randn(m, k, device=triton_path)
    ref = gemm.w4_gemm_reference(x, packed, scale, fmt=fmt, block_size=(1, g))
    out = gemm.w4_gemm_triton(x, packed, scale, fmt=fmt, block_size=(1, g), config=config)
    assert_kernel_close(out, ref, context=config)


@pytest.mark.parametrize("m, n, k", [(1, 16, 32), (37, 70, 300), (64, 64, 512), (0, 8, 16)])
def test_int8_gemm_triton_matches_reference(triton_path: str, m: int, n: int, k: int) -> None:
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=triton_path)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=triton_path)
    xs = torch.rand(m, 1, device=triton_path) / 64  # keeps fp16 outputs finite
    ws = torch.rand(n, device=triton_path) / 64
    bias = torch.randn(n, device=triton_path)
    for out_dtype in (torch.float32, torch.float16):
        ref = gemm.int8_gemm_reference(xq, xs, wq, ws, bias=bias, out_dtype=out_dtype)
        out = gemm.int8_gemm(xq, xs, wq, ws, bias=bias, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        torch.testing.assert_close(out, ref, rtol=1e-5 if out_dtype == torch.float32 else 1e-3, atol=1e-6)


def test_w8a8_linear_triton(triton_path: str) -> None:
    x = torch.randn(2, 5, 96, device=triton_path)
    wq = torch.randint(-127, 128, (48, 96), dtype=torch.int8, device=triton_path)
    ws = torch.rand(48, device=triton_path) / 100
    out = gemm.w8a8_linear(x, wq, ws)
    ref_q, ref_s = gemm.quantize_dynamic(x, fmt="int8")
    ref = gemm.int8_gemm_reference(ref_q, ref_s, wq, ws, out_dtype=x.dtype)
    assert out.shape == (2, 5, 48)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4_gemm_gpu_large(fmt: str, m: int, dtype: torch.dtype) -> None:
    n = k = 4096
    w = torch.randn(n, k, device="cuda")
    packed, scale = gemm.quantize_weight_4bit(w, fmt=fmt, block_size=(1, 128))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = gemm.w4_gemm_reference(x, packed, scale, fmt=fmt, block_size=(1, 128))
    out = gemm.w4_gemm(x, packed, scale.to(dtype), fmt=fmt, block_size=(1, 128))
    assert_kernel_close(out, ref)


@pytest.mark.gpu
def test_int8_gemm_gpu_large() -> None:
    m, n, k = 1000, 4096, 4096
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    ref = torch._int_mm(torch.cat([xq, xq[:24]]), wq.T)[:m].float()
    out = gemm.int8_gemm(xq, 1.0, wq, 1.0, out_dtype=torch.float32)
    assert torch.equal(out, ref)
