"""ONNX export with QuantizeLinear / DequantizeLinear (QDQ): the form ONNX Runtime and TensorRT read as a
quantized network.

``export_onnx(model, args, path)`` takes a packed model (``polyquant.load(path, mode="packed")``) or a fake-quant
one, rewrites a copy of it into modules whose quantized steps are two custom ops, and exports that with
``torch.onnx.export(dynamo=True)``, which translates the ops into standard ONNX nodes (opset 21):

| what                                   | ONNX                                                                   |
|----------------------------------------|------------------------------------------------------------------------|
| int weight of a packed linear / conv   | the values as an INT4 (<= 4 bits) or INT8 initializer (unsigned        |
|                                        | formats shifted by half their range, zero points alike),              |
| (``PackedLinear``, ``PackedConv``,     | ``DequantizeLinear`` per channel (axis 0) or blocked (``block_size``,  |
| ``W8A8Linear``)                        | group-wise), then ``Gemm`` / ``MatMul`` / ``Conv``                      |
| static int activation quantizer        | ``QuantizeLinear`` -> ``DequantizeLinear`` in INT8 (unsigned formats:  |
| (a ``Quantizer`` with an int format of | the zero point moved down by 128); 2..7 bits: a ``Clip`` to the        |
| <= 8 bits, one scale; W8A8's input)    | format's range first (the same values)                                 |
| W8A8 dynamic per-token input           | the row absmax scale and the rounding as float operations (see         |
|                                        | ``DynamicRowQDQ``)                                                     |
| ``HadamardLinear``                     | ``MatMul`` by the constant orthonormal Hadamard matrix, then its inner |
| ``VQLinear``                           | the codes (uint8 for <= 256 codewords) ``Gather`` codewords, summed    |
| everything else                        | traced as the float operations it is: float / table / log formats      |
|                                        | (AdaLog's table lookup is a ``Gather``), dynamic quantizers           |

Per-channel activation scales stay float operations (TensorRT and ONNX Runtime's integer kernels take one
activation scale). A fake-quant layer's weight is exported as its quantizer computes it (folded into a float
constant), so exporting the packed model is what keeps the integer weights and the file small.
The graph is checked by running it in ONNX Runtime (``run_onnx``); the tests compare it with the packed model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import IntFormat
from .nn import Quantizer, vq_decode_weight
from .packed import HadamardLinear, PackedConv, PackedLinear, VQLinear, VQTensor, W8A8Linear

__all__ = ["OnnxReport", "export_onnx", "onnx_ready", "run_onnx", "qdq", "dequantize_weight"]

OPSET = 21  # INT4 / UINT4 tensors and blocked DequantizeLinear


# --- the two ops: torch references (the eager path and the spec) ----------------------------------------------------


@torch.library.custom_op("polyquant::qdq", mutates_args=())
def qdq(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """ONNX ``DequantizeLinear(QuantizeLinear(x, scale, zero_point))`` in INT8, per tensor: q = saturate(round(x /
    scale) + zero_point) to [-128, 127], then (q - zero_point) * scale."""
    s, z = scale.float(), zero_point.float()
    q = torch.clamp(torch.round(x.float() / s) + z, -128, 127)
    return ((q - z) * s).to(x.dtype)


@qdq.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("polyquant::dequantize_weight", mutates_args=())
def dequantize_weight(q: Tensor, scale: Tensor, zero_point: Tensor, block: int, bits: int) -> Tensor:
    """ONNX ``DequantizeLinear`` of signed values ``q`` (N, K) int8: float32 (N, K) = (q - zero_point) * scale, per
    output channel (``block`` 0: scale / zero_point (N,)) or per block of ``block`` columns (scale / zero_point
    (N, K / block)); stored as INT4 for ``bits`` <= 4, else INT8."""
    n, k = q.shape
    g = k if block == 0 else block
    s, z = scale.float().reshape(n, -1, 1), zero_point.float().reshape(n, -1, 1)
    return ((q.float().reshape(n, -1, g) - z) * s).reshape(n, k)


@dequantize_weight.register_fake
def _(q: Tensor, scale: Tensor, zero_point: Tensor, block: int, bits: int) -> Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _translations() -> dict[Any, Any]:
    """The ONNX functions of the two ops (onnxscript, imported only to export)."""
    import onnx
    from onnxscript import opset21 as op

    def qdq_onnx(x: Any, scale: Any, zero_point: Any) -> Any:
        zp = op.Cast(zero_point, to=onnx.TensorProto.INT8)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)

    def dequantize_weight_onnx(q: Any, scale: Any, zero_point: Any, block: int, bits: int) -> Any:
        # the optimizer folds the casts of the constants into typed initializers (INT4 values: half a byte each)
        to = onnx.TensorProto.INT4 if bits <= 4 else onnx.TensorProto.INT8
        if block == 0:
            return op.DequantizeLinear(op.Cast(q, to=to), scale, op.Cast(zero_point, to=to), axis=0)
        return op.DequantizeLinear(op.Cast(q, to=to), scale, op.Cast(zero_point, to=to), axis=1, block_size=block)

    return {torch.ops.polyquant.qdq.default: qdq_onnx,
            torch.ops.polyquant.dequantize_weight.default: dequantize_weight_onnx}


# --- the modules a model is rewritten into --------------------------------------------------------------------------


class QDQ(nn.Module):
    """A static per-tensor int quantizer as ONNX Q / DQ in INT8: ``fmt`` of 2..8 bits, clamped first to the
    format's range when it is narrower; an unsigned format's zero point moves down by 128 (the same values:
    saturating at [-128, 127] after adding z - 128 is saturating at [0, 255] after adding z). The values of
    ``polyquant.primitives.fake_quantize`` up to round-half-even ties when the zero point is odd. (Signed only:
    ONNX Runtime's QDQ Gemm rewrite fails on a UINT8 activation beside an INT8 weight; TensorRT takes INT8.)"""

    def __init__(self, scale: Tensor, zero_point: Tensor | None, fmt: IntFormat) -> None:
        super().__init__()
        scale = scale.detach().float().reshape(())
        zp = torch.zeros_like(scale) if zero_point is None else zero_point.detach().float().reshape(())
        if not torch.equal(zp, zp.round()):
            raise ValueError("a fractional zero point has no ONNX QuantizeLinear")
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp - (0 if fmt.signed else 128))
        self.narrow = fmt.bits < 8
        self.register_buffer("low", (fmt.qmin - zp) * scale)  # the format's range in real values
        self.register_buffer("high", (fmt.qmax - zp) * scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.narrow:
            x = torch.minimum(torch.maximum(x, self.low.to(x.dtype)), self.high.to(x.dtype))
        return qdq(x, self.scale, self.zero_point)


class DynamicRowQDQ(nn.Module):
    """W8A8's dynamic per-token int8 input: each row's absmax / 127 as its scale, computed in the graph, and the
    rounding as float operations: TensorRT takes static activation scales only, and ONNX's own
    DynamicQuantizeLinear is per tensor."""

    def forward(self, x: Tensor) -> Tensor:
        amax = x.abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        return torch.clamp(torch.round(x / scale), -128, 127) * scale


class ChannelFakeQuant(nn.Module):
    """A static int quantizer with one scale per channel as float operations, (clamp(round(x / s) + z, qmin, qmax)
    - z) * s, its scale broadcast against x (the core's block expansion would write the input's shape, batch
    included, into the graph)."""

    def __init__(self, scale: Tensor, zero_point: Tensor | None, fmt: IntFormat) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float())
        self.register_buffer("zero_point", torch.zeros_like(self.scale) if zero_point is None
                             else zero_point.detach().float().expand_as(scale).clone())
        self.qmin, self.qmax = fmt.qmin, fmt.qmax

    def forward(self, x: Tensor) -> Tensor:
        s, z = self.scale.to(x.dtype), self.zero_point.to(x.dtype)
        return (torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax) - z) * s


class _Weight(nn.Module):
    """A weight as its grid values and block parameters, dequantized by ``dequantize_weight`` (ONNX: DQ)."""

    def __init__(self, codes: Tensor, fmt: IntFormat, scale: Tensor, zero_point: Tensor | None,
                 shape: tuple[int, ...]) -> None:
        super().__init__()
        n, k = codes.shape
        groups = scale.shape[1]
        # Signed containers for every weight (INT4 / INT8): an unsigned format's values and zero points both move
        # down by half the range, (q - o) - (z - o) = q - z. (ONNX Runtime's QDQ Gemm rewrite fails on an INT8
        # activation beside a UINT8 weight; TensorRT takes signed weights.)
        offset = 0 if fmt.signed else 2 ** (fmt.bits - 1)
        self.register_buffer("q", (codes.to(torch.int16) + fmt.qmin - offset).to(torch.int8))
        zp = torch.zeros_like(scale) if zero_point is None else zero_point.float()
        if not torch.equal(zp, zp.round()):
            raise ValueError("a fractional zero point has no ONNX DequantizeLinear")
        zp = zp - offset
        self.block = 0 if groups == 1 else k // groups
        self.register_buffer("scale", scale.float().reshape(n) if groups == 1 else scale.float())
        self.register_buffer("zero_point", zp.reshape(n) if groups == 1 else zp)
        self.bits, self.shape = fmt.bits, shape

    def forward(self) -> Tensor:
        w = dequantize_weight(self.q, self.scale, self.zero_point, self.block, self.bits)
        return w.reshape(self.shape)


class _VQWeight(nn.Module):
    """A ``VQTensor``'s weight decoded in the graph: its codes (unpacked, uint8 / int16 / int32: ONNX has no bit
    shifts of the row layout's width) gather codewords (``Gather``) that add over stages."""

    def __init__(self, vq: VQTensor) -> None:
        super().__init__()
        codes = vq.codes()
        codes = codes[None] if codes.dim() == 2 else codes  # (G, M, R)
        k = vq.codebooks.shape[2]
        dtype = torch.uint8 if k <= 256 else torch.int16 if k <= 2**15 else torch.int32
        self.register_buffer("codes", codes.to(dtype))
        self.register_buffer("codebooks", vq.codebooks)
        self.matrix_shape, self.shape = vq.matrix_shape, vq.shape

    def forward(self) -> Tensor:
        return vq_decode_weight(self.codes.long(), self.codebooks, self.matrix_shape).reshape(self.shape)


class _Layer(nn.Module):
    """A linear or convolution layer of an exported packed module: quantizers (converted on their own), the
    weight (``_Weight`` or a float constant) and the float operation."""

    def __init__(self, weight: "_Weight | _VQWeight | Tensor", bias: Tensor | None, op: str, conv: dict[str, Any] | None = None,
                 input_quantizer: nn.Module | None = None, output_quantizer: nn.Module | None = None) -> None:
        super().__init__()
        if isinstance(weight, Tensor):
            self.register_buffer("float_weight", weight.detach().float())
            self.weight = None
        else:
            self.weight = weight
        self.register_buffer("bias", bias)
        self.op, self.conv = op, conv or {}
        self.input_quantizer, self.output_quantizer = input_quantizer, output_quantizer

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = (self.float_weight if self.weight is None else self.weight()).to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        c = self.conv
        if self.op == "linear":
            y = F.linear(x, w, b)
        elif self.op.startswith("conv_transpose"):
            fn = {"conv_transpose1d": F.conv_transpose1d, "conv_transpose2d": F.conv_transpose2d,
                  "conv_transpose3d": F.conv_transpose3d}[self.op]
            y = fn(x, w, b, c["stride"], c["padding"], c["output_padding"], c["groups"], c["dilation"])
        else:
            fn = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.op]
            y = fn(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])
        return y if self.output_quantizer is None else self.output_quantizer(y)


class _Rotated(nn.Module):
    """``HadamardLinear``: x @ H (a constant MatMul), then the inner layer."""

    def __init__(self, inner: nn.Module, n: int) -> None:
        super().__init__()
        from .transforms import hadamard_matrix

        self.inner = inner
        self.register_buffer("hadamard", hadamard_matrix(n))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x @ self.hadamard.to(x.dtype))


# --- rewriting a model ----------------------------------------------------------------------------------------------


@dataclass
class OnnxReport:
    """What ``export_onnx`` wrote: per module, how its weight or activation went into the graph."""

    path: Path | None = None
    weights: dict[str, str] = field(default_factory=dict)  # module -> "int4 DQ, block 32" / "float (e2m1)"
    activations: dict[str, str] = field(default_factory=dict)  # quantizer -> "int8 QDQ per tensor" / why float
    nodes: dict[str, int] = field(default_factory=dict)  # ONNX op type -> count
    bytes: int = 0
    dynamic_batch: bool = False  # every input's first dimension is free in the file (the model's code may fix it)


def _weight(m: PackedLinear | PackedConv, shape: tuple[int, ...]) -> tuple["_Weight | Tensor", str]:
    """A packed weight as DQ of its integer values, or (float, table formats) its decoded float values."""
    if isinstance(m.fmt, IntFormat):
        w = _Weight(m.codes(), m.fmt, m.weight_scale, m.weight_zero_point, shape)
        return w, f"{m.fmt.name} DQ, " + ("per channel" if w.block == 0 else f"block {w.block}")
    return m.dequantized_weight(), f"float ({m.fmt.name}: no ONNX integer type)"


def _vq_linear(m: VQLinear) -> tuple[nn.Module, str]:
    w = _VQWeight(m.weight)
    return _Layer(w, m.bias, "linear", None, m.input_quantizer, m.output_quantizer), "vq codes, Gather of codewords"


def _packed_linear(m: PackedLinear) -> tuple[nn.Module, str]:
    w, how = _weight(m, (m.out_features, m.in_features))
    return _Layer(w, m.bias, "linear", None, m.input_quantizer, m.output_quantizer), how


def _w8a8(m: W8A8Linear) -> tuple[nn.Module, str]:
    q, z = m.int8_weight()
    w = _Weight(q.view(torch.uint8) ^ 0x80, IntFormat(8), m.weight_scale[:, None], z[:, None],
                (m.out_features, m.in_features))  # codes = q + 128
    act = m.act
    iq: nn.Module = DynamicRowQDQ() if act.dynamic else QDQ(torch.tensor(act.scale), torch.tensor(act.zero_point),
                                                             act.fmt)
    how = "int8 DQ, per channel; input " + ("dynamic per row" if act.dynamic else "static int8 QDQ")
    return _Layer(w, m.bias, "linear", None, iq, m.output_quantizer), how


def _packed_conv(m: PackedConv) -> tuple[nn.Module, str]:
    dims = len(m.shape) - 2
    op = f"conv_transpose{dims}d" if m.transposed else f"conv{dims}d"
    conv = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
            "output_padding": m.output_padding}
    w, how = _weight(m, tuple(m.shape))
    return _Layer(w, m.bias, op, conv, m.input_quantizer, m.output_quantizer), how


def _convert_module(m: nn.Module) -> tuple[nn.Module, str] | None:
    if isinstance(m, HadamardLinear):
        inner = _convert_module(m.inner)
        assert inner is not None
        return _Rotated(inner[0], m.in_features), "Hadamard MatMul, then " + inner[1]
    if isinstance(m, W8A8Linear):
        return _w8a8(m)
    if isinstance(m, PackedLinear):
        return _packed_linear(m)
    if isinstance(m, PackedConv):
        return _packed_conv(m)
    if isinstance(m, VQLinear):
        return _vq_linear(m)
    return None


def _activation(q: Quantizer) -> tuple[nn.Module | None, str]:
    """The export module of an activation quantizer (None: it stays as it is, traced as float operations) and how
    it went in. Q / DQ for one scale only: the integer kernels of TensorRT and ONNX Runtime take one activation
    scale (ONNX Runtime fuses a per-channel activation DQ into a MatMulIntegerToFloat that then refuses it)."""
    if type(q).fake_quant is not Quantizer.fake_quant and not q.affine_grid:
        return None, f"{type(q).__name__}: its own quantizer maths, float operations"
    fmt = q.fmt
    if q.spec.dynamic:
        return None, "dynamic parameters: float operations"
    if q.state != "quantized" or q.scale is None:
        return None, f"state {q.state}: a pass-through"
    if not isinstance(fmt, IntFormat) or fmt.bits > 8:
        return None, f"{fmt.name}: not an integer format of <= 8 bits, float operations"
    zp = q.zero_point if fmt.supports_zero_point else None
    if zp is not None and not torch.equal(zp, zp.round()):
        return None, "a fractional zero point: float operations"
    if q.scale.numel() == 1:
        return QDQ(q.scale, zp, fmt), f"{fmt.name} QDQ"
    if sum(d != 1 for d in q.scale.shape) == 1:
        return ChannelFakeQuant(q.scale, zp, fmt), f"{fmt.name} per channel, float operations"
    return None, f"scales of shape {tuple(q.scale.shape)}: float operations"


def onnx_ready(model: nn.Module, report: OnnxReport | None = None) -> nn.Module:
    """A copy of ``model`` rewritten for export (see the module docstring); ``report`` records how each packed
    module and quantizer went in. The copy computes what the model does (tests: ``tests/common/test_onnx_export.py``)."""
    from .nn import set_submodule

    report = report if report is not None else OnnxReport()
    m = copy.deepcopy(model).eval()
    for name, module in list(m.named_modules()):
        if not name or _inside_replaced(name, report.weights):
            continue
        converted = _convert_module(module)
        if converted is not None:
            set_submodule(m, name, converted[0])
            report.weights[name] = converted[1]
    for name, module in list(m.named_modules()):
        if isinstance(module, Quantizer) and name.rpartition(".")[2] != "weight_quantizer":
            new, how = _activation(module)
            if new is not None:
                set_submodule(m, name, new)
            report.activations[name] = how
    return m


def _inside_replaced(name: str, replaced: dict[str, str]) -> bool:
    return any(name.startswith(r + ".") for r in replaced)


def export_onnx(
    model: nn.Module, args: Sequence[Any], path: str | Path, *, kwargs: dict[str, Any] | None = None,
    opset: int = OPSET, dynamic_batch: bool = True, input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> OnnxReport:
    """Write ``model`` (packed or fake-quant, on the CPU) called on ``args`` / ``kwargs`` as an ONNX file with
    Q / DQ nodes (see the module docstring) and return what went where. ``dynamic_batch``: the first dimension of
    every input tensor is left free (when the model's code fixes it, torch.onnx writes the example's size:
    ``report.dynamic_batch`` says which). Needs ``onnx`` and ``onnxscript`` (``pip install polyquant[onnx]``)."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'polyquant[onnx]'") from e
    if opset < OPSET:
        raise ValueError(f"opset {opset}: the INT4 weights and blocked DequantizeLinear need opset >= {OPSET}")
    path = Path(path)
    report = OnnxReport(path=path)
    ready = onnx_ready(model, report)
    args = tuple(args)
    kwargs = dict(kwargs or {})
    dynamic_shapes = None
    if dynamic_batch:  # by parameter name, so that positional and keyword inputs are both covered
        bound = inspect.signature(ready.forward).bind(*args, **kwargs)
        dynamic_shapes = _batch_dims(dict(bound.arguments), torch.export.Dim("batch"))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's step-by-step lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ready, args, kwargs=kwargs, dynamo=True, opset_version=opset, verbose=False,
                                    custom_translation_table=_translations(), dynamic_shapes=dynamic_shapes,
                                    input_names=list(input_names) if input_names else None,
                                    output_names=list(output_names) if output_names else None)
    assert program is not None
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp))
    proto = onnx.load(str(tmp))
    for node in proto.graph.node:  # the exporter's per-node stack traces and module paths: 80% of a small file
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(proto, str(tmp))
    tmp.replace(path)  # an existing file is replaced only by a complete one
    graph = proto.graph
    for node in graph.node:
        report.nodes[node.op_type] = report.nodes.get(node.op_type, 0) + 1
    dims = [i.type.tensor_type.shape.dim for i in graph.input if i.type.tensor_type.shape.dim]
    report.dynamic_batch = bool(dims) and all(d[0].HasField("dim_param") for d in dims)
    report.bytes = path.stat().st_size
    return report


def _batch_dims(value: Any, batch: Any) -> Any:
    """``dynamic_shapes`` with the first dimension of every tensor in ``value`` (tuples, lists, dicts) free."""
    if isinstance(value, Tensor):
        return {0: batch} if value.dim() else None
    if isinstance(value, dict):
        return {k: _batch_dims(v, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_dims(v, batch) for v in value)
    return None


def run_onnx(path: str | Path, *inputs: Tensor, accuracy_level: int = 1) -> list[Tensor]:
    """Run an ONNX file in ONNX Runtime on the CPU: the outputs as tensors.

    ``accuracy_level``: ONNX Runtime turns ``DequantizeLinear`` -> ``MatMul`` into ``MatMulNBits``, whose
    activations its default level (4) rounds to int8 per block (faster, not the model: 3.6e-2 relative error on
    the diffusion DiT); 1 computes them in float32, the packed model's values. ONNX Runtime's
    ``QDQS8ToU8Transformer`` (x86: int8 activations rewritten as uint8) is turned off: it builds an invalid node
    for a Q / DQ that its propagation moved through a Reshape into a Gemm (the Q-HyViT head; ONNX Runtime 1.32);
    pass ``disabled_optimizers=["QDQS8ToU8Transformer"]`` to your own sessions of such graphs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["QDQS8ToU8Transformer"])
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(y) for y in session.run(None, feed)]
