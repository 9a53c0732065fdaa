"""Packed modules: quantized layers that keep only their codes and run on the shared kernels.

A fake-quant model (``polyquant.nn``) stores float weights on the quantization grid; the modules here store what
an artifact stores (packed codes, scales, zero points) and compute with them:

| module         | weight                                         | activations                     | matmul                          |
|----------------|------------------------------------------------|---------------------------------|---------------------------------|
| PackedLinear   | 2..8-bit int or fp4 (e2m1) codes, row layout,  | float (the layer's own input    | 4-bit: ``kernels.w4_gemm`` on   |
|                | per-channel or group-wise scales (+ zero pts)  | quantizer, if any, still runs)  | CUDA, torch's int4 CPU GEMM;    |
|                |                                                |                                 | 8-bit: torch's int8 CPU GEMM;   |
|                |                                                |                                 | else decode + ``F.linear``      |
| W8A8Linear     | int8 / uint8, per-channel (+ zero points)      | int8: static per-tensor         | ``kernels.int8_gemm`` on CUDA,  |
|                |                                                | (+ zero point) or dynamic       | ``torch._int_mm`` on CPU        |
|                |                                                | per-token                       |                                 |
| HadamardLinear | a PackedLinear / W8A8Linear of W @ H           | online ``kernels.fwht`` of x    | the inner module's              |
| PackedConv     | as PackedLinear (flattened (O, I * kh * kw))   | float                           | decode + the float convolution  |
| VQLinear       | codes of sub-vectors (R residual stages)       | float                           | ``kernels.rvq_decode`` + linear |
| VQTensor       | any tensor as VQ codes + codebooks             | -                               | ``kernels.rvq_decode``          |

Weights are the core's definitions: codes are the formats' ``encode`` codes in ``polyquant.pack``'s row layout
(``pack_rows``), the value of code c in block b is ``(fmt.decode(c) - zero_point[b]) * scale[b]`` with blocks
(1, g) along the flattened input dimension (``PerChannel(0)``: g = K; ``PerGroup(g)``). ``WeightEntry`` reads them
from an artifact's ``<fqn>.weight_packed / weight_scale / weight_zero_point / weight_shape`` tensors as they are.

CPU compute dtype: torch's int4 and int8 weight-only CPU GEMMs are fast in bfloat16 only (measured on this
project's AVX-512 CPU, 4096 x 4096, batch 1: 0.43 ms in bf16, 14 ms in fp32, fp32 dense 3.7 ms). Those paths
cast the input and the scales to ``cpu_dtype`` and return the input's dtype: ``torch.bfloat16`` (default) is the
fast one, with bf16 rounding of inputs and scales (on the digits ViT at W4A4 it moved test accuracy by up to 0.7
points either way against fake-quant); ``torch.float32`` gives the fake-quant layer's outputs within fp32
rounding, but torch's fp32 kernels are slower than a float matmul (``benchmarks/packed.py``).

Where the bytes live: on CUDA the artifact's row bytes are the kernels' input unchanged. On CPU, 4-bit int weights
take torch's tiled int4 layout (``_convert_weight_to_int4pack_for_cpu``, a one-time reordering of the same codes
at build, so modules are built for a device: ``device=`` of the constructors and of ``pack_model``; the forward
refuses inputs on another device type), and 8-bit weights are held as int8 (the code XOR 0x80). Zero points are
exact corrections: ``(c - z) * s = (c - 8) * s + (8 - z) * s``, so symmetric kernels serve asymmetric weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .artifact import ArtifactError
from .entries import Entry, RotatedEntry, VQEntry, WeightEntry, read_weight
from .kernels import fwht, fwht_quantize, int8_gemm, quantize_dynamic, w4_gemm
from .formats import FloatFormat, Format, IntFormat, get_format
from .nn import vq_decode_weight
from .pack import unpack_rows
from .primitives import PerTensor, PerToken, quantize_tensor

__all__ = [
    "WeightEntry",
    "VQEntry",
    "RotatedEntry",
    "read_weight",
    "decode_weight",
    "PackedLinear",
    "PackedConv",
    "W8A8Linear",
    "HadamardLinear",
    "VQTensor",
    "VQLinear",
    "PackReport",
    "pack_model",
    "resident_bytes",
    "PACKED_MODULES",
]

_E2M1 = FloatFormat(2, 1)
_CPU_INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 GEMM takes


# --- weight entries (polyquant.entries) ----------------------------------------------------------------------


def decode_weight(
    codes: Tensor, fmt: Format, scale: Tensor, zero_point: Tensor | None, shape: tuple[int, ...] | None = None,
    *, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Codes (N, K) with block params (N, G) -> the dequantized weight (N, K) (or ``shape``)."""
    n, k = codes.shape
    g = k // scale.shape[1]
    q = fmt.decode(codes).float().reshape(n, -1, g)  # (N, G, g) grid values
    if zero_point is not None:
        q = q - zero_point.float()[:, :, None]
    w = (q * scale.float()[:, :, None]).reshape(n, k)
    return w.to(dtype).reshape(shape if shape is not None else (n, k))


def _zero(entry_fmt: Format, zero_point: Tensor | None, like: Tensor) -> Tensor:
    """z with value = (code - z) * s for integer codes: zero_point - qmin."""
    assert isinstance(entry_fmt, IntFormat)
    zp = torch.zeros_like(like) if zero_point is None else zero_point
    return zp - entry_fmt.qmin


def _cpu_int4_group(n: int, g: int) -> int | None:
    """The group torch's CPU int4 GEMM can use for blocks of g (a divisor of g it accepts), or None."""
    if n % 16:
        return None
    return next((c for c in _CPU_INT4_GROUPS if g % c == 0), None)


def _check_device(layout_device: str, x: Tensor, what: str) -> None:
    if x.device.type != layout_device:
        raise RuntimeError(f"this {what} was built for {layout_device} and got input on {x.device.type}; rebuild it "
                           f"there (polyquant.load(path, mode='packed', device='{x.device.type}'))")


# --- torch's CPU weight-only GEMMs under torch.compile ------------------------------------------------------------
# They need a contiguous input, and inductor hands an aten fallback the strides it chose (a transposed input stays
# transposed: "A must be contiguous"). Compiled, the calls go through these custom ops, whose bodies make the input
# contiguous; eager calls the aten ops directly (no custom-op dispatch per call).


@torch.library.custom_op("polyquant::weight_int8_mm", mutates_args=())
def _weight_int8_mm(a: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return torch.ops.aten._weight_int8pack_mm(a.contiguous(), w, scale)


@_weight_int8_mm.register_fake
def _(a: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], w.shape[0]))


@torch.library.custom_op("polyquant::weight_int4_mm", mutates_args=())
def _weight_int4_mm(a: Tensor, w: Tensor, group: int, params: Tensor) -> Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(a.contiguous(), w, group, params)


@_weight_int4_mm.register_fake
def _(a: Tensor, w: Tensor, group: int, params: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], params.shape[1]))


def _int8_mm(a: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return _weight_int8_mm(a, w, scale)
    return torch.ops.aten._weight_int8pack_mm(a, w, scale)


def _int4_mm(a: Tensor, w: Tensor, group: int, params: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return _weight_int4_mm(a, w, group, params)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(a, w, group, params)


# --- weight-only ------------------------------------------------------------------------------------------------


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held as packed codes (see the module docstring for the paths).

    The float input of a quantized layer still goes through its ``input_quantizer`` (activations stay simulated
    here; ``W8A8Linear`` computes them in int8), and the output through its ``output_quantizer``.
    """

    def __init__(
        self, entry: WeightEntry, bias: Tensor | None = None, *, device: str | torch.device = "cpu",
        input_quantizer: nn.Module | None = None, output_quantizer: nn.Module | None = None,
        cpu_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if cpu_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"cpu_dtype must be torch.bfloat16 or torch.float32, got {cpu_dtype}")
        if len(entry.shape) != 2:
            raise ValueError(f"PackedLinear takes a weight (N, K), got {entry.shape}; use PackedConv")
        dev = torch.device(device)
        self.out_features, self.in_features = entry.shape
        self.fmt = entry.fmt
        self.bits = entry.bits
        self.group_size = entry.group_size
        self.device_type = dev.type
        self.cpu_dtype = cpu_dtype
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        scale, zp = entry.block_params()  # (N, G) each
        packed = entry.packed.reshape(self.out_features, -1)
        self.path = self._choose_path(entry, dev)
        self.register_buffer("weight_scale", scale.to(dev))
        self.register_buffer("weight_zero_point", None if zp is None else zp.to(dev))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone().to(dev))
        # Derived (non-persistent) tensors of the fast paths; tiny next to the codes.
        self.register_buffer("_correction", None, persistent=False)  # (N, G): (8 - z) * s, int4 on CUDA
        self.register_buffer("_cpu_params", None, persistent=False)  # (K / g', N, 2) torch's int4 scales and zeros
        self.register_buffer("_w8_offset", None, persistent=False)  # (N,): (128 - z) * s for int8
        if self.path == "w4":
            self.register_buffer("weight_packed", packed.to(dev))
            if isinstance(self.fmt, IntFormat):
                corr = (8 - _zero(self.fmt, zp, scale)) * scale
                self._correction = corr.to(dev) if bool((corr != 0).any()) else None
        elif self.path == "cpu_int4":
            codes = entry.codes().to(torch.int32)
            self.register_buffer("weight_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            g2 = _cpu_int4_group(self.out_features, self.group_size)
            assert g2 is not None
            rep = self.group_size // g2
            s2 = scale.repeat_interleave(rep, dim=1)  # (N, K / g')
            z2 = ((8 - _zero(self.fmt, zp, scale)) * scale).repeat_interleave(rep, dim=1)  # tinygemm: (q - 8) s + z
            self._cpu_params = torch.stack([s2.T, z2.T], dim=-1).to(cpu_dtype).contiguous()
            self.cpu_group = g2
        elif self.path == "w8":
            codes = entry.codes()
            self.register_buffer("weight_packed", (codes ^ 0x80).view(torch.int8).to(dev))  # code - 128
            self._w8_offset = ((128 - _zero(self.fmt, zp, scale)) * scale)[:, 0].contiguous().to(dev)
            self.register_buffer("_w8_scale", scale[:, 0].to(cpu_dtype).contiguous().to(dev), persistent=False)
        else:
            self.register_buffer("weight_packed", packed.to(dev))

    def _choose_path(self, entry: WeightEntry, dev: torch.device) -> str:
        groups = entry.cols // entry.group_size
        if dev.type == "cpu" and self.cpu_dtype == torch.float32:
            return "decode"  # torch's fp32 int4 / int8 CPU GEMMs are slower than decoding and F.linear
        if entry.bits == 4 and (isinstance(entry.fmt, IntFormat) or entry.fmt == _E2M1):
            if dev.type == "cuda" and (entry.group_size % 2 == 0 or groups == 1):
                return "w4"
            if dev.type == "cpu" and isinstance(entry.fmt, IntFormat) \
                    and _cpu_int4_group(entry.rows, entry.group_size) is not None:
                return "cpu_int4"
        if entry.bits == 8 and isinstance(entry.fmt, IntFormat) and groups == 1 and dev.type == "cpu" \
                and entry.cols % 16 == 0:  # torch's _weight_int8pack_mm crashes (SIGSEGV) on K = 4, 8, 12, 24, ...
            return "w8"
        return "decode"

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, fmt: str | Format = "int4", group_size: int | None = 128,
        device: str | torch.device | None = None,
    ) -> "PackedLinear":
        """Quantize a float ``nn.Linear`` (symmetric absmax scales per group of ``group_size``; None: per channel)."""
        entry = quantize_weight(linear.weight.detach(), fmt, group_size)
        return cls(entry, linear.bias, device=device or linear.weight.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt.name}, "
                f"group={self.group_size}, path={self.path}, bias={self.bias is not None}")

    def dequantized_weight(self) -> Tensor:
        """The weight (N, K) in fp32, decoded (for checks; the forward does not build it on the fast paths)."""
        if self.path == "cpu_int4":
            eye = torch.eye(self.in_features, dtype=self.cpu_dtype)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_packed, self.cpu_group,
                                                               self._cpu_params).T.float().contiguous()
        if self.path == "w8":
            return (self.weight_packed.float() * self.weight_scale + self._w8_offset[:, None])
        return decode_weight(self.codes(), self.fmt, self.weight_scale, self.weight_zero_point)

    def codes(self) -> Tensor:
        """The weight's codes (N, K) uint8 (``fmt.encode``'s, as the artifact holds them), on every path: the row
        layout unpacked; int8 from its XOR; torch's tiled int4 layout has no unpacking op, so its codes are read
        back from the decoded weight, round(w / s + z) - qmin: exact, the bf16 decode is off by at most
        8 * 2^-8 of a step."""
        if self.path == "w8":
            return self.weight_packed.view(torch.uint8) ^ 0x80
        if self.path == "cpu_int4":
            assert isinstance(self.fmt, IntFormat)
            zp = 0.0 if self.weight_zero_point is None else self.weight_zero_point
            g = self.group_size
            w = self.dequantized_weight().reshape(self.out_features, -1, g)
            q = torch.round(w / self.weight_scale[:, :, None] + (zp if isinstance(zp, float) else zp[:, :, None]))
            return (q - self.fmt.qmin).clamp(0, 15).to(torch.uint8).reshape(self.out_features, self.in_features)
        return unpack_rows(self.weight_packed, self.bits, self.in_features)

    def linear(self, x: Tensor) -> Tensor:
        """x @ W.T + b on the codes (no quantizers)."""
        _check_device(self.device_type, x, "PackedLinear")
        if self.path == "w4":
            fmt = "e2m1" if isinstance(self.fmt, FloatFormat) else "int4"
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = w4_gemm(x, self.weight_packed, self.weight_scale, fmt=fmt, block_size=(1, self.group_size),
                        bias=bias if self._correction is None else None)
            if self._correction is None:
                return y  # bias added in the kernel
            # asymmetric: + sum over groups of (sum of x in the group) * (8 - z) * s
            xg = x.float().reshape(*x.shape[:-1], -1, self.group_size).sum(-1)  # (..., G)
            y = (y.float() + xg @ self._correction.T).to(x.dtype)
        elif self.path == "cpu_int4":
            xc = x.reshape(-1, self.in_features).to(self.cpu_dtype)
            y = _int4_mm(xc, self.weight_packed, self.cpu_group, self._cpu_params)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        elif self.path == "w8":
            xc = x.reshape(-1, self.in_features).to(self.cpu_dtype).contiguous()  # the kernel needs unit strides
            y = _int8_mm(xc, self.weight_packed, self._w8_scale).float()
            y = y + xc.float().sum(-1, keepdim=True) * self._w8_offset  # asymmetric correction (0 when symmetric)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = F.linear(x, self.dequantized_weight().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = self.linear(x)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y



def quantize_weight(w: Tensor, fmt: Format | str = "int4", group_size: int | None = 128) -> WeightEntry:
    """Symmetric absmax quantization of a float weight (N, ...) into a ``WeightEntry`` (core primitives).

    ``group_size``: block length along the flattened K (None: per output channel).
    """
    from .pack import pack_rows
    from .primitives import choose_qparams

    f = get_format(fmt)
    w2 = w.detach().float().reshape(w.shape[0], -1)  # (N, K)
    g = w2.shape[1] if group_size is None else int(group_size)
    if g < 1 or w2.shape[1] % g:
        raise ValueError(f"group_size {g} does not divide K = {w2.shape[1]}")
    bs = (1, g)
    scale, _ = choose_qparams(w2, f, bs, symmetric=True)  # (N, K / g)
    q = quantize_tensor(w2, f, scale, None, bs)
    codes = f.encode(q)
    zp = torch.zeros_like(scale) if isinstance(f, IntFormat) else None
    return WeightEntry(pack_rows(codes, f.bits), scale, zp, tuple(w.shape), f, f.bits)


# --- convolutions -------------------------------------------------------------------------------------------------

_CONV_FNS: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FNS: dict[int, Callable[..., Tensor]] = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class PackedConv(nn.Module):
    """A convolution whose weight (O, I / groups, *kernel) is held as packed codes, decoded for each call; a
    transposed convolution's (``conv.transposed``: weight (I, O / groups, *kernel), with its ``output_padding``) too."""

    def __init__(
        self, entry: WeightEntry, conv: nn.Module, *, device: str | torch.device = "cpu",
        input_quantizer: nn.Module | None = None, output_quantizer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dims = len(entry.shape) - 2
        if dims not in _CONV_FNS:
            raise ValueError(f"PackedConv takes 1-3d convolution weights, got shape {entry.shape}")
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        dev = torch.device(device)
        self.shape = entry.shape
        self.fmt = entry.fmt
        self.bits = entry.bits
        self.transposed = bool(getattr(conv, "transposed", False))
        self.output_padding = tuple(getattr(conv, "output_padding", (0,) * dims))
        rows, per_group = entry.shape[0], entry.shape[1] * conv.groups  # a transposed weight's rows are its inputs
        self.in_channels, self.out_channels = (rows, per_group) if self.transposed else (per_group, rows)
        self.kernel_size = tuple(entry.shape[2:])
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        scale, zp = entry.block_params()
        self.register_buffer("weight_packed", entry.packed.reshape(entry.rows, -1).to(dev))
        self.register_buffer("weight_scale", scale.to(dev))
        self.register_buffer("weight_zero_point", None if zp is None else zp.to(dev))
        bias = getattr(conv, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone().to(dev))

    def extra_repr(self) -> str:
        kind = ", transposed" if self.transposed else ""
        return (f"weight={self.shape}, {self.fmt.name}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}{kind}")

    def codes(self) -> Tensor:
        """The weight's codes (O, I / groups * prod(kernel)) uint8."""
        return unpack_rows(self.weight_packed, self.bits, math.prod(self.shape[1:]))

    def dequantized_weight(self) -> Tensor:
        return decode_weight(self.codes(), self.fmt, self.weight_scale, self.weight_zero_point, self.shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self.dequantized_weight().to(x.dtype)
        if self.transposed:
            y = _CONV_T_FNS[len(self.shape) - 2](x, w, bias, self.stride, self.padding, self.output_padding,
                                                 self.groups, self.dilation)
        else:
            y = _CONV_FNS[len(self.shape) - 2](x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y


# --- W8A8 -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Activation:
    """How a W8A8 layer quantizes its input: dynamic per-token symmetric int8, or static per-tensor
    ``q = round(x / scale + zero_point)`` clamped to the format (int8 or uint8; the core's ``quantize_tensor``)."""

    dynamic: bool = True
    scale: float = 1.0
    zero_point: float = 0.0
    fmt: IntFormat = field(default_factory=lambda: IntFormat(8))

    def __post_init__(self) -> None:
        if self.fmt.bits != 8:
            raise ValueError(f"W8A8 activations are 8-bit, got {self.fmt.name}")
        if not self.dynamic and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"a static activation scale must be finite and > 0, got {self.scale}")
        if self.zero_point != round(self.zero_point):
            raise ValueError(f"the activation zero point must be an integer, got {self.zero_point}")


def int8_activation(quantizer: nn.Module | None) -> Int8Activation | None:
    """The ``Int8Activation`` a core input quantizer computes, or None when W8A8 cannot reproduce it exactly
    (not 8-bit int, per-channel granularity, or a quantizer with its own rounding, e.g. a plugin's)."""
    from .nn import Quantizer

    if not isinstance(quantizer, Quantizer) or type(quantizer).fake_quant is not Quantizer.fake_quant:
        return None
    fmt, spec = quantizer.fmt, quantizer.spec
    if not isinstance(fmt, IntFormat) or fmt.bits != 8 or quantizer.state != "quantized":
        return None
    if spec.dynamic:
        ok = isinstance(spec.granularity, PerToken) and spec.symmetric and fmt.signed
        return Int8Activation(dynamic=True) if ok else None
    if not isinstance(spec.granularity, PerTensor) or quantizer.scale is None or quantizer.scale.numel() != 1:
        return None
    zp = 0.0 if quantizer.zero_point is None else float(quantizer.zero_point.reshape(-1)[0])
    return Int8Activation(dynamic=False, scale=float(quantizer.scale.reshape(-1)[0]), zero_point=zp, fmt=fmt)


class W8A8Linear(nn.Module):
    """y = x @ W.T + b with int8 activations and weights, int32 accumulation.

    Weight: 8-bit int codes with per-channel scales and zero points. Activations: ``Int8Activation``. With
    a = q_x - qmin_x - 128 and b = code - 128 (both int8) and offsets c_a = 128 + qmin_x - z_x, c_b = 128 - z_w:

        y[m, n] = s_x * s_w[n] * (sum_k a b + c_b[n] * sum_k a + c_a * sum_k b[n] + K * c_a * c_b[n]) + bias[n]

    the integer sum on ``kernels.int8_gemm`` (CUDA) or ``torch._int_mm`` (CPU), the rest exact corrections.
    """

    def __init__(
        self, entry: WeightEntry, bias: Tensor | None = None, *, act: Int8Activation, device: str | torch.device = "cpu",
        output_quantizer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(entry.fmt, IntFormat) and entry.bits == 8 and entry.group_size == entry.cols
                and len(entry.shape) == 2):
            raise ValueError(f"W8A8Linear takes an 8-bit int weight (N, K) with per-channel scales, got "
                             f"{entry.fmt.name} {entry.shape} group {entry.group_size}")
        dev = torch.device(device)
        self.out_features, self.in_features = entry.shape
        self.act = act
        self.device_type = dev.type
        self.output_quantizer = output_quantizer
        scale, zp = entry.block_params()
        b8 = (entry.codes() ^ 0x80).view(torch.int8)  # code - 128
        c_b = 128 - _zero(entry.fmt, zp, scale)[:, 0]  # (N,)
        self.register_buffer("weight_int8", b8.to(dev))
        self.register_buffer("weight_scale", scale[:, 0].contiguous().to(dev))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone().to(dev))
        self.register_buffer("_c_b", c_b.to(dev) if bool((c_b != 0).any()) else None, persistent=False)
        self.register_buffer("_b_sum", b8.float().sum(1).to(dev), persistent=False)  # (N,)
        # static activation qparams as tensors once (no host-to-device copy per call: CUDA graphs can capture it)
        self.register_buffer("_act_scale", torch.tensor(act.scale, device=dev), persistent=False)
        self.register_buffer("_act_zero_point", torch.tensor(act.zero_point, device=dev), persistent=False)

    @property
    def input_quantizer(self) -> None:
        return None

    def extra_repr(self) -> str:
        how = "dynamic per-token" if self.act.dynamic else f"static {self.act.fmt.name}"
        return f"in_features={self.in_features}, out_features={self.out_features}, act={how}, bias={self.bias is not None}"

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """x (M, K) -> int8 a (M, K), fp32 scales (M, 1) and the offset c_a."""
        if self.act.dynamic:
            a, s = quantize_dynamic(x, fmt="int8")
            return a, s.float(), 0.0
        fmt = self.act.fmt
        q = quantize_tensor(x, fmt, self._act_scale, self._act_zero_point, tuple(x.shape))
        a = (q - (fmt.qmin + 128)).to(torch.int8)
        s = self._act_scale.expand(x.shape[0], 1)
        return a, s, 128.0 + fmt.qmin - self.act.zero_point

    def int8_weight(self) -> tuple[Tensor, Tensor]:
        """The weight as int8 values q (N, K) and zero points z (N,): weight = (q - z) * ``weight_scale``."""
        z = torch.zeros(self.out_features, device=self.weight_int8.device) if self._c_b is None else -self._c_b
        return self.weight_int8, z

    def int8_matmul(self, a: Tensor, s: Tensor, c_a: float) -> Tensor:
        """(M, N) fp32 output of int8 a (M, K) with scales s (M, 1) and offset c_a (see the class docstring)."""
        if a.is_cuda:
            y = int8_gemm(a, s[:, 0], self.weight_int8, self.weight_scale, out_dtype=torch.float32)
        else:
            acc = torch._int_mm(a, self.weight_int8.T) if a.shape[0] else a.new_zeros(0, self.out_features, dtype=torch.int32)
            y = acc.float() * s * self.weight_scale
        if self._c_b is not None or c_a:
            corr = torch.zeros_like(y)
            if self._c_b is not None:
                corr += a.float().sum(1, keepdim=True) * self._c_b
            if c_a:
                c_b = self._c_b if self._c_b is not None else torch.zeros_like(self._b_sum)
                corr += c_a * (self._b_sum + self.in_features * c_b)
            y = y + corr * s * self.weight_scale
        return y

    def forward(self, x: Tensor) -> Tensor:
        _check_device(self.device_type, x, "W8A8Linear")
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        a, s, c_a = self.quantize_input(x.reshape(-1, self.in_features))
        return self.output_from_codes(x, a, s, c_a)

    def output_from_codes(self, x: Tensor, a: Tensor, s: Tensor, c_a: float) -> Tensor:
        """The layer's output for input ``x`` (..., K) already quantized to int8 ``a`` (M, K) with scales ``s``
        (M, 1) and offset ``c_a``: the integer matmul, bias, shape and dtype of ``x``, output quantizer."""
        y = self.int8_matmul(a, s, c_a)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y


# --- Hadamard -------------------------------------------------------------------------------------------------------


class HadamardLinear(nn.Module):
    """y = x @ W.T + b computed as inner(fwht(x)), the inner layer holding the quantized W @ H (H the core's
    orthonormal Hadamard matrix, ``kernels.fwht(x) = x @ H``): rotating spreads outliers before quantization
    (QuaRot / Quamba). With a W8A8 inner layer whose int8 input is dynamic per token, or static per tensor and
    symmetric, the rotation and the int8 quantization are one fused kernel (``kernels.fwht_quantize``). The
    fake-quant twin is ``polyquant.nn.RotatedLinear``."""

    def __init__(self, inner: "PackedLinear | W8A8Linear | VQLinear") -> None:
        super().__init__()
        if not isinstance(inner, (PackedLinear, W8A8Linear, VQLinear)):
            raise TypeError(f"HadamardLinear wraps a PackedLinear, W8A8Linear or VQLinear, got {type(inner).__name__}")
        from .transforms import is_hadamard_size

        if not is_hadamard_size(inner.in_features):
            raise ValueError(f"no Hadamard matrix of size {inner.in_features}")
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, fmt: str | Format = "int4", group_size: int | None = 128,
        activations: str = "float", act_scale: float | None = None, device: str | torch.device | None = None,
    ) -> "HadamardLinear":
        """Rotate and quantize a float linear layer. ``activations``: "float" (weight-only ``PackedLinear``) or
        "int8" (``W8A8Linear``; then ``fmt`` must be int8, per channel) with dynamic per-token int8 inputs, or a
        static symmetric per-tensor scale ``act_scale`` of the rotated input."""
        from .transforms import hadamard_matrix

        k = linear.in_features
        h = hadamard_matrix(k).to(linear.weight.device)  # (K, K) orthonormal
        w_rot = linear.weight.detach().float() @ h  # (N, K): x W^T = (x H)(W H)^T
        dev = device or linear.weight.device
        if activations == "float":
            return cls(PackedLinear(quantize_weight(w_rot, fmt, group_size), linear.bias, device=dev))
        if activations == "int8":
            entry = quantize_weight(w_rot, fmt, None)
            act = Int8Activation(dynamic=True) if act_scale is None else Int8Activation(dynamic=False, scale=act_scale)
            return cls(W8A8Linear(entry, linear.bias, act=act, device=dev))
        raise ValueError(f"activations must be 'float' or 'int8', got {activations!r}")

    def forward(self, x: Tensor) -> Tensor:
        inner = self.inner
        if isinstance(inner, W8A8Linear) and x.numel():
            act = inner.act
            if act.dynamic:  # fused rotation + per-token int8
                _check_device(inner.device_type, x, "HadamardLinear")
                a, s = fwht_quantize(x.reshape(-1, self.in_features))
                return inner.output_from_codes(x, a, s.float(), 0.0)
            if act.zero_point == 0 and act.fmt.signed:  # fused rotation + static symmetric int8
                _check_device(inner.device_type, x, "HadamardLinear")
                a, s = fwht_quantize(x.reshape(-1, self.in_features), out_scale=act.scale)
                return inner.output_from_codes(x, a, s.float(), 0.0)
        return inner(fwht(x))


# --- vector quantization ------------------------------------------------------------------------------------------


class VQTensor(nn.Module):
    """A tensor held as grouped residual VQ codes of its sub-vectors: ``forward()`` decodes it
    (``polyquant.nn.vq_decode_weight`` on ``kernels.rvq_decode``), as its fake-quant twin
    ``polyquant.nn.VQWeightQuantizer`` does.

    The tensor, flattened to (N, K), has its K columns split into G groups; each group's rows are cut into vectors
    of length ``d``; vector i of group g has R codes, one per stage, stored at ceil(log2 C) bits in the row layout
    (one row per vector); codebooks (G, R, C, d). Codes (M, R) with codebooks (R, C, d) are one group.
    """

    def __init__(self, codes: Tensor, codebooks: Tensor, shape: tuple[int, ...]) -> None:
        super().__init__()
        if codebooks.dim() == 3:
            codebooks, codes = codebooks[None], codes[None]
        if len(shape) == 1:  # a vector: one row
            shape = tuple(shape)
            self.shape = shape
            entry = VQEntry(codes, codebooks, (1, shape[0]))
        else:
            self.shape = tuple(shape)
            entry = VQEntry(codes, codebooks, self.shape)
        from .pack import pack_rows

        g, m, r = entry.codes.shape
        self.bits = entry.bits
        self.groups, self.vectors, self.levels = g, m, r
        self.matrix_shape = entry.shape
        rows = entry.codes.reshape(g * m, r)
        # (G * M, ceil(R * bits / 8)) packed rows (up to 16 bits); more than 65536 codewords: int32 codes
        stored = pack_rows(rows, self.bits) if self.bits <= 16 else rows.to(torch.int32)
        self.register_buffer("codes_packed", stored)
        self.register_buffer("codebooks", entry.codebooks.detach().float().clone())

    @classmethod
    def from_entry(cls, entry: VQEntry) -> "VQTensor":
        return cls(entry.codes, entry.codebooks, entry.shape)

    @classmethod
    def from_float(cls, x: Tensor, *, dim: int, codebook_size: int = 256, stages: int = 1, iters: int = 20,
                   seed: int = 0, groups: int = 1) -> "VQTensor":
        """Grouped residual k-means of x's sub-vectors (``polyquant.nn.vq_encode_weight``)."""
        from .nn import VQSpec, vq_encode_weight

        if x.shape[-1] % dim:
            raise ValueError(f"dim {dim} does not divide the last dim {x.shape[-1]}")
        w = x.detach().reshape(1, -1) if x.dim() == 1 else x.detach()
        spec = VQSpec(dim=dim, codebook_size=codebook_size, levels=stages, groups=groups, iters=iters, seed=seed)
        codes, books = vq_encode_weight(w, spec)
        return cls(codes, books, tuple(x.shape))

    def codes(self) -> Tensor:
        """(G, M, R) int64 (for one group: (M, R) as the constructor took them)."""
        if self.bits > 16:
            flat = self.codes_packed.long()
        else:
            flat = unpack_rows(self.codes_packed, self.bits, self.levels).long()
        out = flat.reshape(self.groups, self.vectors, self.levels)
        return out[0] if self.groups == 1 else out

    def forward(self) -> Tensor:
        codes = self.codes()
        codes = codes[None] if codes.dim() == 2 else codes
        return vq_decode_weight(codes, self.codebooks, self.matrix_shape).reshape(self.shape)


class VQLinear(nn.Module):
    """A linear layer whose weight is a ``VQTensor`` (sub-vectors along the input dim), decoded for each call."""

    def __init__(self, weight: VQTensor, bias: Tensor | None = None, *, input_quantizer: nn.Module | None = None,
                 output_quantizer: nn.Module | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"VQLinear takes a (N, K) weight, got {weight.shape}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_float(cls, linear: nn.Linear, *, dim: int = 4, codebook_size: int = 256, stages: int = 1,
                   seed: int = 0, groups: int = 1, iters: int = 20) -> "VQLinear":
        vq = VQTensor.from_float(linear.weight, dim=dim, codebook_size=codebook_size, stages=stages, seed=seed,
                                 groups=groups, iters=iters)
        return cls(vq, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight().to(x.dtype)
        y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return y if self.output_quantizer is None else self.output_quantizer(y)


PACKED_MODULES: tuple[type[nn.Module], ...] = (PackedLinear, PackedConv, W8A8Linear, HadamardLinear, VQLinear)


# --- whole models ---------------------------------------------------------------------------------------------------


@dataclass
class PackReport:
    """What ``pack_model`` did: packed layers (name -> module kind and path) and layers left as they were (why)."""

    packed: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def _linear_module(
    name: str, entry: WeightEntry | VQEntry, module: nn.Module, *, device: str | torch.device,
    int8_activations: bool, cpu_dtype: torch.dtype,
) -> tuple[nn.Module, str]:
    """The packed linear of an int / float / table / vq entry, with the layer's bias and quantizers."""
    iq = getattr(module, "input_quantizer", None)
    oq = getattr(module, "output_quantizer", None)
    bias = getattr(module, "bias", None)
    if isinstance(entry, VQEntry):
        if len(entry.shape) != 2:
            raise ValueError(f"vq weights of shape {entry.shape} have no packed module (linear layers only)")
        vq = VQTensor.from_entry(entry).to(device)
        return VQLinear(vq, bias, input_quantizer=iq, output_quantizer=oq).to(device), "VQLinear"
    act = int8_activation(iq) if int8_activations else None
    if act is not None and entry.bits == 8 and isinstance(entry.fmt, IntFormat) and entry.row_blocks \
            and entry.group_size == entry.cols:
        return W8A8Linear(entry, bias, act=act, device=device, output_quantizer=oq), "W8A8Linear"
    new = PackedLinear(entry, bias, device=device, input_quantizer=iq, output_quantizer=oq, cpu_dtype=cpu_dtype)
    return new, f"PackedLinear({new.path})"


def pack_model(
    model: nn.Module, entries: dict[str, Entry | str], *, device: str | torch.device = "cpu",
    int8_activations: bool = True, cpu_dtype: torch.dtype = torch.bfloat16,
) -> PackReport:
    """Replace each module named in ``entries`` (a fake-quant ``QuantLinear`` / ``RotatedLinear`` /
    ``QuantConv*`` or a float ``nn.Linear`` / ``nn.Conv*``) by the packed module of its entry's kind, in place (a
    string entry: the reason the layer stays as it is, recorded in the report):

    | entry            | linear                                                      | convolution |
    |------------------|-------------------------------------------------------------|-------------|
    | int, float, table| W8A8Linear (8-bit per-channel weight and a core int8 input  | PackedConv  |
    |                  | quantizer W8A8 reproduces, ``int8_activations``), else      |             |
    |                  | PackedLinear (input quantizer kept; ``cpu_dtype``)          |             |
    | vq               | VQLinear                                                    | kept        |
    | rotated          | HadamardLinear around the inner entry's linear              | -           |

    A layer an entry cannot be packed for (blocks that are not rows, a format with no packed path) is kept with
    the reason. The rest of the model is not moved: place it on ``device`` first.
    """
    from .nn import set_submodule

    report = PackReport()
    for name, entry in entries.items():
        if isinstance(entry, str):  # the plugin's reason for leaving this layer fake-quant
            report.kept[name] = entry
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"the artifact has a weight entry for {name!r}, which the model does not have") from None
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(entry.shape):
            raise ArtifactError(f"{name}: weight shape {entry.shape} in the artifact, "
                                f"{None if weight is None else tuple(weight.shape)} in the model")
        is_linear = isinstance(module, nn.Linear) or len(entry.shape) == 2 and hasattr(module, "in_features")
        try:
            if isinstance(entry, RotatedEntry):
                if not is_linear or getattr(module, "rotation", None) != entry.rotation:
                    raise ValueError(f"a {entry.rotation} rotated entry needs a RotatedLinear, got "
                                     f"{type(module).__name__}")
                inner, kind = _linear_module(name, entry.inner, module, device=device,
                                             int8_activations=int8_activations, cpu_dtype=cpu_dtype)
                new: nn.Module = HadamardLinear(inner)  # type: ignore[arg-type]
                kind = f"HadamardLinear({kind})"
            elif is_linear:
                new, kind = _linear_module(name, entry, module, device=device, int8_activations=int8_activations,
                                           cpu_dtype=cpu_dtype)
            elif hasattr(module, "stride") and hasattr(module, "groups") and isinstance(entry, WeightEntry):
                new = PackedConv(entry, module, device=device, input_quantizer=getattr(module, "input_quantizer", None),
                                 output_quantizer=getattr(module, "output_quantizer", None))
                kind = "PackedConv"
            else:
                report.kept[name] = f"{type(module).__name__} with a {entry.kind} entry has no packed module"
                continue
        except ValueError as e:
            report.kept[name] = str(e)
            continue
        set_submodule(model, name, new)
        report.packed[name] = kind
    return report


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (persistent or not), each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
