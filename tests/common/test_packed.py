"""Packed modules (``polyquant.packed``): hand-computed values, every CPU path against the decoded weight
(element-wise), W8A8 against the core's fake-quant layer, the Hadamard and VQ modules, whole-model packing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import polyquant as pq
from polyquant.artifact import ArtifactError
from polyquant.export import export, export_tensors, quantizer_specs, weight_entries
from polyquant.formats import FloatFormat, IntFormat
from polyquant.nn import QuantConv2d, QuantLinear, QuantSpec, Quantizer
from polyquant.pack import pack_rows
from polyquant.packed import (
    HadamardLinear, Int8Activation, PackedConv, PackedLinear, VQLinear, VQTensor, W8A8Linear, WeightEntry,
    decode_weight, int8_activation, pack_model, quantize_weight, read_weight, resident_bytes,
)
from polyquant.primitives import PerChannel, PerGroup, PerTensor, PerToken


def _entry(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, fmt: IntFormat | FloatFormat) -> WeightEntry:
    return WeightEntry(pack_rows(codes, fmt.bits), scale, zp, tuple(codes.shape), fmt, fmt.bits)


def _reference(entry: WeightEntry, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = decode_weight(entry.codes(), entry.fmt, *entry.block_params())
    return torch.nn.functional.linear(x, w, bias)


def test_hand_computed_int4_and_e2m1() -> None:
    # int4 codes are q + 8: rows q = [0, 1, -1, -8] * 0.5 and [7, 0, 0, 0] * 2
    codes = torch.tensor([[8, 9, 7, 0], [15, 8, 8, 8]], dtype=torch.uint8)
    m = PackedLinear(_entry(codes, torch.tensor([[0.5], [2.0]]), None, IntFormat(4)), cpu_dtype=torch.float32)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert_close(m(x), torch.tensor([[0 + 1.0 - 1.5 - 16.0, 14.0]]), rtol=0, atol=0)
    # e2m1 bit patterns: 0b0010 = 1.0, 0b0111 = 6.0, 0b1011 = -1.5, 0b0001 = 0.5; scale 2
    codes = torch.tensor([[0b0010, 0b0111, 0b1011, 0b0001]], dtype=torch.uint8)
    m = PackedLinear(_entry(codes, torch.tensor([[2.0]]), None, FloatFormat(2, 1)))
    assert_close(m(x), torch.tensor([[2.0 + 24.0 - 9.0 + 4.0]]), rtol=0, atol=0)
    # asymmetric uint4: value (code - z) * s, z = 3
    codes = torch.tensor([[3, 4, 0, 15]], dtype=torch.uint8)
    m = PackedLinear(_entry(codes, torch.tensor([[1.0]]), torch.tensor([[3.0]]), IntFormat(4, signed=False)))
    assert_close(m(x), torch.tensor([[0.0 + 2.0 - 9.0 + 48.0]]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "fmt,bits,group,asym,path",
    [
        ("int4", 4, 64, False, "cpu_int4"),
        ("int4", 4, None, False, "cpu_int4"),  # per channel: torch's groups of 128 with repeated scales
        ("uint4", 4, 32, True, "cpu_int4"),  # asymmetric: the zero point becomes tinygemm's zero
        ("e2m1", 4, 32, False, "decode"),  # no fp4 GEMM in torch on CPU
        ("int8", 8, None, False, "w8"),
        ("uint8", 8, None, True, "w8"),
        ("int8", 8, 64, False, "decode"),  # group-wise 8-bit: no torch op
        ("uint6", 6, None, True, "decode"),
        ("int3", 3, 16, False, "decode"),
    ],
)
def test_cpu_paths_match_the_decoded_weight(fmt: str, bits: int, group: int | None, asym: bool, path: str) -> None:
    g = torch.Generator().manual_seed(bits)
    n, k = 32, 256
    f = pq.get_format(fmt)
    groups = 1 if group is None else k // group
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, groups, generator=g) + 0.05
    zp = torch.randint(0, 2**bits, (n, groups), generator=g).float() if asym else None
    if isinstance(f, FloatFormat):
        codes = codes & 0b0111 | (codes & 0b1000)  # any 4-bit pattern is an e2m1 code
    entry = _entry(codes, scale, zp, f)
    bias = torch.randn(n, generator=g)
    m = PackedLinear(entry, bias, cpu_dtype=torch.float32)
    assert m.path == "decode"  # fp32: torch's int4 / int8 CPU GEMMs are slower than decode + F.linear
    x = torch.randn(3, 5, k, generator=g)
    ref = _reference(entry, x, bias)
    assert_close(m(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # the default, bfloat16 (torch's fast int4 / int8 CPU kernels): within bf16 rounding
    fast = PackedLinear(entry, bias)
    assert fast.path == path
    assert fast(x).dtype == x.dtype
    assert_close(fast(x), ref, rtol=2e-2, atol=1e-2 * float(ref.abs().max()))
    w = decode_weight(entry.codes(), f, *entry.block_params())
    assert_close(m.dequantized_weight(), w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


@pytest.mark.parametrize("k,path", [(4, "decode"), (24, "decode"), (32, "w8")])
def test_cpu_int8_path_only_for_k_it_takes_and_strided_inputs(k: int, path: str) -> None:
    # torch's _weight_int8pack_mm crashes on K = 4, 8, 12, 24 (a Mamba dt_proj has K = time_step_rank) and refuses
    # inputs without unit strides (a transposed activation): such layers decode, such inputs are made contiguous
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 256, (16, k), generator=g, dtype=torch.uint8)
    entry = _entry(codes, torch.rand(16, 1, generator=g) + 0.05, None, pq.get_format("int8"))
    fast = PackedLinear(entry)
    assert fast.path == path
    x = torch.randn(2, k, 7, generator=g).transpose(1, 2)  # (2, 7, k), not contiguous
    ref = _reference(entry, x.contiguous(), None)
    assert_close(fast(x), ref, rtol=2e-2, atol=1e-2 * float(ref.abs().max()))


def test_one_wrong_code_is_caught_element_wise() -> None:
    # The check above is element-wise: a single corrupted code changes one column of outputs beyond tolerance.
    codes = torch.randint(0, 16, (32, 128), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    entry = _entry(codes, torch.ones(32, 1), None, IntFormat(4))
    bad = codes.clone()
    bad[5, 7] ^= 0b0100
    x = torch.randn(2, 128)
    with pytest.raises(AssertionError):
        assert_close(PackedLinear(_entry(bad, torch.ones(32, 1), None, IntFormat(4)), cpu_dtype=torch.float32)(x), _reference(entry, x),
                     rtol=1e-4, atol=1e-4 * 128)


def test_packed_linear_stores_codes_only() -> None:
    lin = nn.Linear(512, 256)
    m = PackedLinear.from_float(lin, fmt="int4", group_size=128)
    floats = [t for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()]
    assert all(t.numel() < lin.weight.numel() // 8 for t in floats)  # scales, bias: no float copy of W
    assert resident_bytes(m) < resident_bytes(lin) / 6  # 0.5 byte per weight + scales, against 4 bytes
    x = torch.randn(4, 512)
    ref = lin(x)
    assert (m(x) - ref).norm() / ref.norm() < 0.15  # 4-bit quantization error, not a wrong layout


def test_weight_entry_rejects_bad_entries() -> None:
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bytes"):
        WeightEntry(pack_rows(codes, 4)[:, :3], torch.ones(4, 1), None, (4, 8), IntFormat(4), 4)
    with pytest.raises(ValueError, match="blocks"):
        WeightEntry(pack_rows(codes, 4), torch.ones(3), None, (4, 8), IntFormat(4), 4)
    with pytest.raises(ValueError, match="zero point"):
        WeightEntry(pack_rows(codes, 4), torch.ones(4, 1), torch.ones(4, 1), (4, 8), FloatFormat(2, 1), 4)
    with pytest.raises(ValueError, match="bits"):
        WeightEntry(pack_rows(codes, 4), torch.ones(4, 1), None, (4, 8), IntFormat(4), 8)
    with pytest.raises(ArtifactError, match="missing"):
        read_weight({}, "fc", "int4")


def test_packed_linear_refuses_inputs_on_another_device() -> None:
    m = PackedLinear.from_float(nn.Linear(64, 16), fmt="int4", group_size=32)
    with pytest.raises(RuntimeError, match="built for cpu"):
        m(torch.randn(2, 64, device="meta"))


# --- W8A8 -------------------------------------------------------------------------------------------------------


def _core_linear(wspec: QuantSpec, ispec: QuantSpec, x: torch.Tensor) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(nn.Linear(x.shape[-1], 24), weight=wspec, input=ispec))
    pq.calibrate(model, [x], progress=False)
    return model.eval()


@pytest.mark.parametrize(
    "wspec,ispec",
    [
        (QuantSpec("int8", PerChannel(0)), QuantSpec("int8", PerTensor())),
        (QuantSpec("uint8", PerChannel(0), symmetric=False), QuantSpec("uint8", PerTensor(), symmetric=False)),
        (QuantSpec("int8", PerChannel(0), symmetric=False), QuantSpec("int8", PerTensor(), symmetric=False)),
        (QuantSpec("int8", PerChannel(0)), QuantSpec("int8", PerToken(), dynamic=True)),
    ],
    ids=["sym", "uint8-asym", "int8-asym", "dynamic"],
)
def test_w8a8_matches_the_core_fake_quant_layer(wspec: QuantSpec, ispec: QuantSpec) -> None:
    x = torch.randn(9, 80, generator=torch.Generator().manual_seed(1)) * 2 + 0.7
    model = _core_linear(wspec, ispec, x)
    ref = model(x).detach()
    art = pq.Artifact(export_tensors(model), meta={"quantizers": quantizer_specs(model)})
    entries = weight_entries(model, art)
    report = pack_model(model, entries)
    assert report.packed == {"0": "W8A8Linear"}
    assert isinstance(model[0], W8A8Linear)
    assert_close(model(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert_close(model(x[:0]), ref[:0])  # empty batch


def test_int8_activation_only_for_what_w8a8_reproduces() -> None:
    x = torch.randn(4, 32)
    per_channel = _core_linear(QuantSpec("int8", PerChannel(0)), QuantSpec("int8", PerChannel(1)), x)
    assert int8_activation(per_channel[0].input_quantizer) is None
    four_bit = _core_linear(QuantSpec("int8", PerChannel(0)), QuantSpec("int4", PerTensor()), x)
    assert int8_activation(four_bit[0].input_quantizer) is None

    class OwnRounding(Quantizer):
        def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
            return x.floor()

    own = OwnRounding(QuantSpec("int8", PerTensor()))
    own.freeze(torch.tensor(0.1), torch.tensor(0.0))
    own.set_state("quantized")
    assert int8_activation(own) is None
    static = _core_linear(QuantSpec("int8", PerChannel(0)), QuantSpec("uint8", PerTensor(), symmetric=False), x)
    act = int8_activation(static[0].input_quantizer)
    assert act is not None and not act.dynamic and act.fmt == IntFormat(8, signed=False)
    with pytest.raises(ValueError):
        Int8Activation(dynamic=False, scale=0.0)


# --- Hadamard ---------------------------------------------------------------------------------------------------


def test_hadamard_linear_is_the_rotated_layer() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    x = torch.randn(6, 128)
    h = HadamardLinear.from_float(lin, fmt="int8", group_size=None, activations="int8")
    # fused fwht + int8 quantization == W8A8 layer of W @ H on fwht(x)
    inner = W8A8Linear(quantize_weight(lin.weight.detach() @ pq.hadamard_matrix(128), "int8", None), lin.bias,
                       act=Int8Activation(dynamic=True))
    assert_close(h(x), inner(pq.fwht(x)), rtol=1e-5, atol=1e-5)


def test_hadamard_beats_plain_w8a8_on_outlier_channels() -> None:
    # The point of the rotation (Quamba / QuaRot): a few large input channels ruin per-token int8 scales.
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(32, 256, generator=g)
    x[:, [3, 77]] *= 60.0
    ref = lin(x)
    plain = W8A8Linear(quantize_weight(lin.weight, "int8", None), lin.bias, act=Int8Activation(dynamic=True))
    rotated = HadamardLinear.from_float(lin, fmt="int8", group_size=None, activations="int8")
    err_plain = ((plain(x) - ref).norm() / ref.norm()).item()
    err_rot = ((rotated(x) - ref).norm() / ref.norm()).item()
    assert err_rot < 0.5 * err_plain, (err_rot, err_plain)


def test_hadamard_weight_only() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(64, 16)
    h = HadamardLinear.from_float(lin, fmt="int4", group_size=32)
    x = torch.randn(3, 64)
    w_rot = h.inner.dequantized_weight()  # the quantized W @ H
    ref = pq.fwht(x) @ w_rot.T + lin.bias
    assert_close(h(x), ref, rtol=2e-2, atol=1e-2 * float(ref.detach().abs().max()))  # bf16 CPU int4 GEMM
    with pytest.raises(ValueError, match="Hadamard"):
        HadamardLinear.from_float(nn.Linear(7 * 16 + 2, 4), fmt="int8", group_size=None)


# --- vector quantization ----------------------------------------------------------------------------------------


def test_vq_tensor_hand_computed() -> None:
    codebooks = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], [[0.5, 0.5], [0.0, 0.0], [-1.0, 0.0]]])  # (2, 3, 2)
    codes = torch.tensor([[0, 1], [2, 0], [1, 2]])  # 3 vectors, 2 stages
    t = VQTensor(codes, codebooks, (1, 6))
    assert t.bits == 2 and t.codes_packed.dtype == torch.uint8
    assert_close(t(), torch.tensor([[1.0, 0.0, 2.5, 2.5, -1.0, 1.0]]), rtol=0, atol=0)
    assert torch.equal(t.codes(), codes)
    with pytest.raises(ValueError, match="codes must lie"):
        VQTensor(torch.tensor([[0, 3]]), codebooks, (2,))


def test_vq_linear_more_stages_less_error() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    ref = lin(x)
    errs = [((VQLinear.from_float(lin, dim=4, codebook_size=16, stages=s)(x) - ref).norm() / ref.norm()).item()
            for s in (1, 2)]
    assert errs[1] < errs[0] < 1.0
    v = VQLinear.from_float(lin, dim=4, codebook_size=16, stages=2)
    assert resident_bytes(v) < resident_bytes(lin) / 3


# --- whole models -----------------------------------------------------------------------------------------------


def test_pack_model_mixed_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(),
                          nn.Linear(32, 16), nn.Linear(16, 4))
    rules = [
        pq.QuantRule("0", weight=QuantSpec("int8", PerChannel(0))),
        pq.QuantRule("2", weight=QuantSpec("int4", PerGroup(64)), input=QuantSpec("uint8", PerTensor(), symmetric=False)),
        pq.QuantRule("4", weight=QuantSpec("int4", PerChannel(1))),  # columns: not rows of the weight
        pq.QuantRule("5", weight=QuantSpec("log2_4", PerTensor())),  # log weights: a table entry
    ]
    qmodel = pq.prepare(model, rules)
    x = torch.randn(5, 3, 8, 8)
    pq.calibrate(qmodel, [x], progress=False)
    qmodel.eval()
    ref = qmodel(x)
    art = export(qmodel)  # self-describing: the manifest records each weight's entry
    legacy = pq.Artifact(art.tensors, meta={"quantizers": quantizer_specs(qmodel)})  # no entries: int / float only
    assert {k for k, v in weight_entries(qmodel, legacy).items() if isinstance(v, str)} == {"4", "5"}
    report = pack_model(qmodel, weight_entries(qmodel, art), cpu_dtype=torch.float32)
    assert report.packed == {"0": "PackedConv", "2": "PackedLinear(decode)", "5": "PackedLinear(decode)"}
    assert set(report.kept) == {"4"}
    assert isinstance(qmodel[0], PackedConv) and isinstance(qmodel[4], QuantLinear)
    assert_close(qmodel(x), ref, rtol=1e-4, atol=1e-4 * float(ref.detach().abs().max()))


@pytest.mark.parametrize("dims", [1, 2])
def test_transposed_conv_quantizes_exports_and_packs(dims: int) -> None:
    torch.manual_seed(dims)
    conv_t = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}[dims]
    model = nn.Sequential(conv_t(6, 4, 4, stride=2, padding=1, output_padding=1), nn.ELU(),
                          conv_t(4, 2, 3, stride=3, groups=2))
    x = torch.randn(3, 6, *(7,) * dims)
    with torch.no_grad():
        ref_float = model(x)
    qmodel = pq.prepare(model, [pq.QuantRule("*", weight=QuantSpec("int8", PerChannel(0)))])
    assert type(qmodel[0]).__name__ == f"QuantConvTranspose{dims}d"
    with torch.no_grad():
        raw = qmodel(x)  # raw quantizers: the float transposed convolutions, output_padding included
    assert_close(raw, ref_float)
    pq.calibrate(qmodel, [x], progress=False)
    qmodel.eval()
    with torch.no_grad():
        fake = qmodel(x)
    assert fake.shape == ref_float.shape and not torch.equal(fake, ref_float)
    report = pack_model(qmodel, weight_entries(qmodel, export(qmodel)), cpu_dtype=torch.float32)
    assert report.packed == {"0": "PackedConv", "2": "PackedConv"} and not report.kept
    assert isinstance(qmodel[0], PackedConv) and qmodel[0].transposed
    assert (qmodel[0].in_channels, qmodel[0].out_channels) == (6, 4)
    with torch.no_grad():
        packed = qmodel(x)
    assert_close(packed, fake, rtol=1e-5, atol=1e-5 * float(fake.abs().max()))
    # int8 per channel: the output error is within the weights' quantization error
    err = float((fake - ref_float).norm() / ref_float.norm())
    assert 0 < err < 0.02


# --- CUDA: the Triton kernels behind the modules ------------------------------------------------------------------


@pytest.fixture
def compiled_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU tests run the compiled kernels (not the reference, whatever POLYQUANT_KERNELS says)."""
    from polyquant.kernels._dispatch import HAS_TRITON, interpreting

    if not torch.cuda.is_available() or not HAS_TRITON or interpreting():
        pytest.skip("needs CUDA and compiled Triton kernels (POLYQUANT_TRITON_NATIVE=1)")
    monkeypatch.setenv("POLYQUANT_KERNELS", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,group,asym", [("int4", 128, False), ("uint4", 64, True), ("int4", None, False),
                                            ("e2m1", 32, False)])
def test_cuda_w4_path(compiled_triton: None, fmt: str, group: int | None, asym: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 512, 1024
    f = pq.get_format(fmt)
    groups = 1 if group is None else k // group
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, groups, generator=g) * 0.01 + 0.001
    zp = torch.randint(0, 16, (n, groups), generator=g).float() if asym else None
    entry = _entry(codes, scale, zp, f)
    m = PackedLinear(entry, torch.randn(n, generator=g), device="cuda")
    assert m.path == "w4"
    for batch, dtype in ((1, torch.float16), (16, torch.float16), (33, torch.bfloat16), (8, torch.float32)):
        x = torch.randn(batch, k, generator=g).to("cuda", dtype)
        ref = _reference(entry, x.float().cpu(), m.bias.cpu())
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}[dtype]
        assert_close(m(x).float().cpu(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.gpu
def test_cuda_w8a8_hadamard_vq_match_cpu(compiled_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYQUANT_KERNELS", "auto")  # CPU references on the reference path, CUDA on Triton
    torch.manual_seed(0)
    lin = nn.Linear(1024, 256)
    x = torch.randn(24, 1024)
    entry = quantize_weight(lin.weight, "int8", None)
    for act in (Int8Activation(dynamic=True), Int8Activation(dynamic=False, scale=0.03, zero_point=5.0,
                                                             fmt=IntFormat(8, signed=False))):
        cpu = W8A8Linear(entry, lin.bias, act=act)(x)
        gpu = W8A8Linear(entry, lin.bias, act=act, device="cuda")(x.cuda()).cpu()
        assert_close(gpu, cpu, rtol=1e-4, atol=1e-4 * float(cpu.abs().max()))
    h_cpu = HadamardLinear.from_float(lin, fmt="int8", group_size=None, activations="int8")
    h_gpu = HadamardLinear.from_float(lin.cuda(), fmt="int8", group_size=None, activations="int8")
    # the fused rotation + quantization may round a few ties differently on the GPU: compare to the float layer
    ref = lin.cpu()(x)
    for h, xin in ((h_cpu, x), (h_gpu, x.cuda())):
        assert ((h(xin).cpu() - ref).norm() / ref.norm()) < 0.02
    v = VQLinear.from_float(lin, dim=4, codebook_size=64)
    out_cpu = v(x)
    assert_close(v.cuda()(x.cuda()).cpu(), out_cpu, rtol=1e-4, atol=1e-4 * float(out_cpu.abs().max()))


@pytest.mark.gpu
def test_cuda_packed_load_matches_fake(compiled_triton: None, tmp_path) -> None:
    import dataclasses

    from polyquant.plugins import load as load_plugin

    impl = load_plugin("vit")
    ex = impl.example("minmax")
    qm = pq.quantize(ex.model, dataclasses.replace(ex.config, wbits=4, abits=4), calib=ex.calib, progress=False)
    path = pq.save(qm, tmp_path / "m.safetensors")
    fake = pq.load(path, device="cuda")
    packed = pq.load(path, mode="packed", device="cuda")
    assert any(kind == "PackedLinear(w4)" for kind in packed.packing.packed.values()), packed.packing.packed
    x = ex.inputs.cuda()
    with torch.no_grad():
        want, got = fake.model(x), packed.model(x)
    assert (got - want).abs().mean() < 0.01 * want.abs().mean()
