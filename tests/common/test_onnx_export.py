"""ONNX export with Q / DQ (``polyquant.onnx_export``): the two ops against the core's fake-quant maths
(hand-checked values and random tensors), every packed module kind in ONNX Runtime against the packed model, the
integer initializers in the file, a free batch dimension, the vit digits model and the lidar detector, the
command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import polyquant as pq  # noqa: E402
from polyquant.cli import main  # noqa: E402
from polyquant.formats import IntFormat  # noqa: E402
from polyquant.nn import ActQuantizer, QuantSpec  # noqa: E402
from polyquant.onnx_export import QDQ, dequantize_weight, export_onnx, onnx_ready, qdq, run_onnx  # noqa: E402
from polyquant.packed import (  # noqa: E402
    HadamardLinear, Int8Activation, PackedConv, PackedLinear, VQLinear, W8A8Linear, quantize_weight,
)
from polyquant.plugins import load  # noqa: E402
from polyquant.primitives import PerTensor, fake_quantize  # noqa: E402
from polyquant.transforms import hadamard_matrix  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_ops_hand_computed() -> None:
    # int8, scale 0.5, zero point 3: q = clamp(round(x / 0.5) + 3, -128, 127); (q - 3) * 0.5
    x = torch.tensor([0.2, 1.3, -70.0, 100.0])
    assert_close(qdq(x, torch.tensor(0.5), torch.tensor(3.0)), torch.tensor([0.0, 1.5, -65.5, 62.0]))
    # weights: signed values (N, K) = (2, 4), blocks of 2: (q - z) * s per block
    q = torch.tensor([[1, -2, 3, 0], [7, -8, 0, 1]], dtype=torch.int8)
    s = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    z = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    assert_close(dequantize_weight(q, s, z, 2, 4), torch.tensor([[0.5, -1.0, 4.0, -2.0], [8.0, -7.0, 0.0, 0.25]]))
    # per channel (block 0): scale / zero point (N,)
    assert_close(dequantize_weight(q, s[:, 0], z[:, 0], 0, 4), torch.tensor([[0.5, -1.0, 1.5, 0.0],
                                                                              [8.0, -7.0, 1.0, 2.0]]))


@pytest.mark.parametrize("fmt", [IntFormat(8), IntFormat(8, signed=False), IntFormat(4), IntFormat(6, signed=False),
                                 IntFormat(3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qdq_module_is_the_core_fake_quant(fmt: IntFormat, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(64, 32) * 3
    scale = torch.tensor(0.07 + 0.05 * seed)
    zp = torch.tensor(0.0 if fmt.signed else float(2 ** (fmt.bits - 1) - 2))
    want = fake_quantize(x, fmt, scale, None if fmt.signed else zp, tuple(x.shape))
    assert_close(QDQ(scale, None if fmt.signed else zp, fmt)(x), want, rtol=0, atol=1e-6)


class _Net(nn.Module):
    """Every packed module kind: an int4 convolution, an int4 group-wise linear behind a static uint8 input
    quantizer, W8A8 with a static asymmetric and a dynamic per-token input, a Hadamard-rotated int8 linear; the
    weight-only layers in fp32 (the export computes the packed values in fp32)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = PackedConv(quantize_weight(conv.weight, "int4", None), conv)
        lin = nn.Linear(8 * 6 * 6, 64)
        iq = ActQuantizer(QuantSpec(IntFormat(8, signed=False), PerTensor(), symmetric=False))
        iq.freeze(torch.tensor(0.02), torch.tensor(100.0))
        iq.set_state("quantized")
        self.fc1 = PackedLinear(quantize_weight(lin.weight, "int4", 32), lin.bias, input_quantizer=iq,
                                cpu_dtype=torch.float32)
        lin2, lin3, lin4 = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)
        self.fc2 = W8A8Linear(quantize_weight(lin2.weight, "int8", None), lin2.bias,
                              act=Int8Activation(dynamic=False, scale=0.05, zero_point=-20.0, fmt=IntFormat(8)))
        self.fc3 = W8A8Linear(quantize_weight(lin3.weight, "int8", None), lin3.bias, act=Int8Activation(dynamic=True))
        w_rot = lin4.weight.detach() @ hadamard_matrix(32)  # fp32 compute (the bf16 CPU GEMMs round the input)
        self.fc4 = HadamardLinear(PackedLinear(quantize_weight(w_rot, "int8", None), lin4.bias,
                                               cpu_dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def test_every_packed_module_in_onnxruntime(tmp_path: Path) -> None:
    net = _Net().eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        want = net(x)
        assert_close(onnx_ready(net)(x), want, rtol=1e-5, atol=1e-5)  # the rewritten model, in torch
    report = export_onnx(net, (x,), tmp_path / "net.onnx")
    assert _rel(run_onnx(tmp_path / "net.onnx", x)[0], want) < 1e-5
    x5 = torch.randn(5, 3, 6, 6)  # the batch dimension is free
    with torch.no_grad():
        assert _rel(run_onnx(tmp_path / "net.onnx", x5)[0], net(x5)) < 1e-5
    assert set(report.weights) == {"conv", "fc1", "fc2", "fc3", "fc4"}
    assert report.weights["fc1"] == "int4 DQ, block 32" and report.weights["conv"] == "int4 DQ, per channel"
    assert report.activations == {"fc1.input_quantizer": "uint8 QDQ"}
    graph = onnx.load(str(tmp_path / "net.onnx")).graph
    types = {i.data_type for i in graph.initializer}
    assert {onnx.TensorProto.INT4, onnx.TensorProto.INT8} <= types  # the weights stay integers in the file
    assert report.nodes["QuantizeLinear"] == 2 and report.nodes["DequantizeLinear"] >= 7
    floats = sum(p.numel() for p in [*nn.Conv2d(3, 8, 3).parameters(), *nn.Linear(288, 64).parameters()]) * 4
    assert report.bytes < floats  # int4 codes, not float weights


def test_vq_linear_in_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(VQLinear.from_float(nn.Linear(64, 32), dim=4, codebook_size=16, stages=2, iters=3),
                        nn.ReLU()).eval()
    x = torch.randn(3, 64)
    report = export_onnx(net, (x,), tmp_path / "vq.onnx")
    assert report.weights == {"0": "vq codes, Gather of codewords"}
    with torch.no_grad():
        assert _rel(run_onnx(tmp_path / "vq.onnx", x)[0], net(x)) < 1e-5


def test_export_replaces_a_file_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")

    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) > 0:  # data-dependent Python control flow: torch.export refuses it
                return x
            return -x

    with pytest.raises(Exception):
        export_onnx(Bad(), (torch.ones(2),), out)
    assert out.read_bytes() == b"old"


def _packed_example(plugin: str, method: str, tmp_path: Path) -> tuple[nn.Module, pq.api.MethodExample]:
    ex = load(plugin).example(method)
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False)
    path = pq.save(qm, tmp_path / f"{method}.safetensors")
    return pq.load(path, mode="packed", cpu_dtype=torch.float32).model, ex


def _initializer_elements(path: Path) -> dict[int, int]:
    """Elements of the file's initializers per ONNX data type."""
    out: dict[int, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        out[t.data_type] = out.get(t.data_type, 0) + n
    return out


@pytest.mark.parametrize("method", ["minmax", "adalog", "qhyvit"])
def test_vit_digits_model(method: str, tmp_path: Path) -> None:
    # The same operations in ONNX Runtime (MatMulNBits in fp32: run_onnx) agree to float rounding (1.4e-7 measured);
    # the bound leaves room for a rounding difference that moves a low-bit activation across a step on another CPU.
    # Log quantizers (AdaLog) and per-channel activations (Q-HyViT) go in as float operations.
    packed, ex = _packed_example("vit", method, tmp_path)
    report = export_onnx(packed, (ex.inputs,), tmp_path / "vit.onnx")
    assert report.nodes.get("QuantizeLinear", 0) > 0 and report.nodes.get("DequantizeLinear", 0) > 0
    assert report.dynamic_batch
    elements = _initializer_elements(tmp_path / "vit.onnx")
    ints = elements.get(onnx.TensorProto.INT8, 0) + elements.get(onnx.TensorProto.INT4, 0)
    assert ints > 10 * elements.get(onnx.TensorProto.FLOAT, 0)  # the weights are in the file as integers
    with torch.no_grad():
        want = packed(ex.inputs)
        want16 = packed(ex.inputs.repeat(2, 1, 1, 1))
    got = run_onnx(tmp_path / "vit.onnx", ex.inputs)[0]
    assert _rel(got, want) < 1e-2 and torch.equal(got.argmax(-1), want.argmax(-1))
    assert _rel(run_onnx(tmp_path / "vit.onnx", ex.inputs.repeat(2, 1, 1, 1))[0], want16) < 1e-2  # another batch


def test_lidar_detector(tmp_path: Path) -> None:
    packed, ex = _packed_example("lidar", "lidarptq", tmp_path)
    inputs = tuple(ex.inputs.values()) if isinstance(ex.inputs, dict) else (ex.inputs,)
    kwargs = ex.inputs if isinstance(ex.inputs, dict) else None
    report = export_onnx(packed, () if kwargs else inputs, tmp_path / "lidar.onnx", kwargs=kwargs)
    assert all(how == "int8 DQ, per channel" for how in report.weights.values()) and report.dynamic_batch
    with torch.no_grad():
        want = packed(**kwargs) if kwargs else packed(*inputs)
    assert _rel(run_onnx(tmp_path / "lidar.onnx", *inputs)[0], want) < 1e-3


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = load("lidar").example("minmax")
    path = pq.save(pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False), tmp_path / "a.safetensors")
    out = tmp_path / "a.onnx"
    assert main(["export", str(path), "--onnx", str(out)]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 0 and "Q / DQ" in capsys.readouterr().out
    assert main(["export", str(path), "--onnx", str(path)]) == 2  # never over the artifact
    assert "artifact itself" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.safetensors"), "--onnx", str(out)]) == 2
