"""Fake-quant modules, model surgery and calibration.

A ``Quantizer`` module quantizes one tensor. It moves through three states:

    raw          -> identity (the float model)
    calibrating  -> identity, while its observer records statistics
    quantized    -> fake-quant with frozen scale / zero point (or dynamic per-token qparams)

``QuantLinear``, ``QuantConv1d/2d/3d``, ``QuantConvTranspose1d/2d/3d`` and ``QuantMatMul`` hold a weight quantizer
and input quantizers.
The weight entries of an artifact each have their fake-quant twin here (``polyquant.packed`` the packed one):

| entry kind    | fake-quant                                                  | packed (``polyquant.packed``)     |
|---------------|-------------------------------------------------------------|-----------------------------------|
| int, float    | ``Quantizer`` with an ``IntFormat`` / ``FloatFormat``       | PackedLinear / W8A8Linear / -Conv |
| table         | ``Quantizer`` with a ``TableFormat`` (NF4, FP4DiT grids) or | PackedLinear (table decode)       |
|               | a log format (stored as its table)                          |                                   |
| vq            | ``VQWeightQuantizer`` (``VQSpec``: RVQ codes + codebooks)   | VQLinear                          |
| rotated       | ``RotatedLinear`` (x H and W H around an inner weight)      | HadamardLinear                    |

``Calibration`` (batches and how to feed them) is what ``calibrate`` and ``polyquant.capture.capture`` read.
``prepare(model, rules)`` swaps matching modules for their quant versions; ``calibrate(model, batches)`` runs the
calibration set through the model and freezes every quantizer.

    rules = [QuantRule("blocks.*.mlp.fc*", weight=QuantSpec("int4", PerChannel(0)), input=QuantSpec("int8"))]
    qmodel = prepare(model, rules, ignore=["head"])
    calibrate(qmodel, loader)
"""

from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .formats import Format, IntFormat, format_from_dict, format_to_dict, get_format
from .observers import OBSERVERS, Observer, make_observer
from .primitives import (
    Granularity,
    PerTensor,
    block_size_for,
    choose_qparams,
    fake_quantize,
    granularity_from_dict,
    granularity_to_dict,
    quantize_tensor,
)
from .vq import residual_kmeans

__all__ = [
    "Calibration",
    "calibration",
    "to_device",
    "tensors_in",
    "HALF_DTYPES",
    "half_dtype",
    "cast_floats",
    "QuantSpec",
    "VQSpec",
    "VQWeightQuantizer",
    "RotatedLinear",
    "ROTATIONS",
    "layer_specs",
    "prepare_from_specs",
    "QuantRule",
    "Quantizer",
    "ActQuantizer",
    "SearchedQuantizer",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantMatMul",
    "QuantMatMulKT",
    "prepare",
    "set_submodule",
    "calibrate",
    "quantize_weights",
    "set_state",
    "quantizers",
    "State",
]

State = Literal["raw", "calibrating", "quantized"]
_STATES = ("raw", "calibrating", "quantized")


@dataclass
class QuantSpec:
    """How one tensor is quantized.

    Args:
        fmt: format name or instance ("int8", "uint4", "e2m1", "log2_4", ...).
        granularity: PerTensor(), PerChannel(axis), PerGroup(size, axis) or PerToken().
        symmetric: symmetric range (zero point 0) or asymmetric (INT only).
        observer: "minmax", "percentile", "abs_percentile" (Quamba's running percentile of |x|) or "mse".
        percentile: upper percentile for the percentile observers.
        averaging: EMA constant for running statistics; None keeps the running min / max (abs_percentile: 0.01).
        dynamic: compute qparams from every input at run time (per-token activations); no calibration.
    """

    fmt: str | Format = "int8"
    granularity: Granularity = field(default_factory=PerTensor)
    symmetric: bool = True
    observer: str = "minmax"
    percentile: float = 99.99
    averaging: float | None = None
    dynamic: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        self.fmt = get_format(self.fmt)
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if not self.symmetric and not self.fmt.supports_zero_point:
            raise ValueError(f"asymmetric quantization needs an integer format, got {self.fmt.name}")
        if self.dynamic and self.observer != "minmax":
            raise ValueError("dynamic quantization computes min-max qparams at run time; use observer='minmax'")

    def to_dict(self) -> dict[str, Any]:
        """JSON of what the quantized tensor is (format, granularity, scheme); the observer is not recorded."""
        return {"format": format_to_dict(self.fmt), "granularity": granularity_to_dict(self.granularity),
                "symmetric": self.symmetric, "dynamic": self.dynamic}

    @classmethod
    def from_dict(cls, data: Any) -> "QuantSpec":
        """The spec a ``to_dict`` JSON describes (``ValueError`` for anything else)."""
        if not isinstance(data, dict) or set(data) != {"format", "granularity", "symmetric", "dynamic"}:
            raise ValueError(f"not a quantizer spec: {data!r:.200}")
        if not isinstance(data["symmetric"], bool) or not isinstance(data["dynamic"], bool):
            raise ValueError("a quantizer spec's symmetric and dynamic are booleans")
        return cls(format_from_dict(data["format"]), granularity_from_dict(data["granularity"]),
                   symmetric=data["symmetric"], dynamic=data["dynamic"])


HALF_DTYPES = (torch.float16, torch.bfloat16)  # computed in float32 by the quantizers, cast back (see cast_floats)


class Quantizer(nn.Module):
    """Fake-quantizes one tensor according to a ``QuantSpec``; see the module docstring for its states.

    ``affine_grid``: a subclass that overrides ``fake_quant`` with the same maths for an int format,
    (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale, sets it True, so that an ONNX export
    writes it as QuantizeLinear / DequantizeLinear (``polyquant.onnx_export``); other overrides stay float ops.
    """

    affine_grid: ClassVar[bool] = False

    def __init__(self, spec: QuantSpec, *, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.state: State = "raw"
        self.observer: Observer | None = None
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def fmt(self) -> Format:
        return self.spec.fmt  # type: ignore[return-value]

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.fmt.name}, {type(s.granularity).__name__}, sym={s.symmetric}, {s.observer}, state={self.state}"

    def set_state(self, state: State) -> None:
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        if state == "calibrating" and not self.spec.dynamic:
            self.observer = make_observer(
                self.spec.observer,
                self.fmt,
                self.spec.granularity,
                symmetric=self.spec.symmetric,
                averaging=self.spec.averaging,
                percentile=self.spec.percentile,
                name=self.name,
            )
        if state == "quantized" and not self.spec.dynamic and self.scale is None:
            if self.observer is None or self.observer.min_val is None:
                where = f" {self.name}" if self.name else ""
                raise ValueError(f"quantizer{where} was never calibrated: the calibration set is empty or unused")
            scale, zp = self.observer.calculate_qparams()
            self.scale, self.zero_point = scale, zp
            self.observer = None
        self.state = state

    def freeze(self, scale: Tensor, zero_point: Tensor | None = None, *, spec: QuantSpec | None = None) -> None:
        """Fix the quantization parameters (found by a search, or restored); no observer will replace them.

        ``spec`` replaces the quantizer's spec when the search also chose the format, granularity or scheme.
        ``scale`` / ``zero_point`` are stored as detached copies, in the shape the forward broadcasts against
        (the scale shape of ``primitives.scale_shape``; for per-tensor quantizers any shape of one element).
        The state is left as it is (a search may go on with the float model); ``set_state("quantized")`` then
        uses these parameters.
        """
        if spec is not None:
            if not isinstance(spec, QuantSpec):
                raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
            self.spec = spec
        if not isinstance(scale, Tensor):
            raise TypeError(f"scale must be a Tensor, got {type(scale).__name__}")
        if scale.device.type == "cpu":  # not on an accelerator: the check would sync it
            where = f" of {self.name}" if self.name else ""
            if scale.numel() and not bool((torch.isfinite(scale) & (scale > 0)).all()):
                raise ValueError(f"the scale{where} must be positive and finite: a zero or NaN scale gives NaN outputs")
            if zero_point is not None and zero_point.numel() and not bool(torch.isfinite(zero_point).all()):
                raise ValueError(f"the zero point{where} must be finite")
        self.scale = scale.detach().clone()
        self.zero_point = None if zero_point is None else zero_point.detach().clone()
        self.observer = None

    def calibrate_from(self, x: Tensor) -> None:
        """One-shot calibration from a tensor that is fully known (weights)."""
        self.set_state("calibrating")
        assert self.observer is not None or self.spec.dynamic
        if self.observer is not None:
            self.observer.update(x)
        self.set_state("quantized")

    def block_size(self, x: Tensor) -> tuple[int, ...]:
        return block_size_for(self.spec.granularity, x.shape)

    def codes(self, x: Tensor) -> Tensor:
        """The stored codes of ``x`` (uint8, ``fmt.encode`` of its grid values) with the frozen parameters: what
        an artifact holds for a weight. A subclass with its own rounding overrides this (and ``fake_quant``) so
        that ``fmt.decode(codes)`` on the blocks' scales and zero points gives its ``fake_quant(x)``."""
        if self.scale is None:
            raise ValueError(f"quantizer {self.name} is not frozen: calibrate it before taking its codes")
        zp = self.zero_point if self.fmt.supports_zero_point else None
        q = quantize_tensor(x.detach().float(), self.fmt, self.scale.to(x.device),
                            None if zp is None else zp.to(x.device), self.block_size(x))
        return self.fmt.encode(q).to(torch.uint8)

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "raw":
            return x
        if self.state == "calibrating":
            if self.observer is not None:
                self.observer.update(x)
            return x
        return _in_float32(self.fake_quant, x)

    def fake_quant(self, x: Tensor) -> Tensor:
        """Quantize-dequantize ``x`` with the frozen (or, for dynamic specs, per-input) parameters.

        Computed in float32 (see ``primitives.fake_quantize``): the output has the dtype of a floating-point ``x``,
        float32 for an integer one. An empty ``x`` (a batch of 0) passes through, as in the float model.
        """
        if x.numel() == 0:
            return x if x.dtype.is_floating_point else x.float()
        bs = self.block_size(x)
        if self.spec.dynamic:
            scale, zp = choose_qparams(x.detach(), self.fmt, bs, symmetric=self.spec.symmetric)
        else:
            scale, zp = self.scale, self.zero_point
        zp_arg = zp if self.fmt.supports_zero_point else None
        return fake_quantize(x, self.fmt, scale.to(x.device), None if zp_arg is None else zp_arg.to(x.device), bs)


class ActQuantizer(Quantizer):
    """A quantizer placed on an activation by itself (e.g. after a softmax)."""


class SearchedQuantizer(Quantizer):
    """A quantizer whose parameters come from a search instead of an observer.

    ``calibrating`` is a pass-through (the search reads captured tensors, not the forward); ``freeze`` fixes the
    chosen parameters and marks the quantizer ``searched``; ``quantized`` is refused until then. Subclasses with
    their own parameterization (a log base, two scales, ...) override ``fake_quant``; the default is the core
    ``fake_quantize`` with the spec, as ``Quantizer`` does. Subclasses may register their parameter buffers
    with fixed shapes at construction, so a ``state_dict`` round trip (then ``searched = True``) restores them.
    """

    def __init__(self, spec: QuantSpec, *, name: str = "") -> None:
        super().__init__(spec, name=name)
        self.searched = False

    def freeze(self, scale: Tensor, zero_point: Tensor | None = None, *, spec: QuantSpec | None = None) -> None:
        super().freeze(scale, zero_point, spec=spec)
        self.searched = True

    def set_state(self, state: State) -> None:
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        if state == "quantized" and not self.searched:
            where = f" {self.name}" if self.name else ""
            raise ValueError(f"quantizer{where} has no parameters yet: calibrate the model first")
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        if self.state != "quantized":
            return x
        return _in_float32(self.fake_quant, x)


def _in_float32(fake_quant: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fake_quant(x)`` computed in float32 for a float16 / bfloat16 ``x`` and returned in ``x``'s dtype (a
    quantizer's float32 parameters would otherwise promote the output, or a subclass compute its grid in half)."""
    if x.dtype not in HALF_DTYPES:
        return fake_quant(x)
    return fake_quant(x.float()).to(x.dtype)


def _make(spec: "QuantSpec | VQSpec | None", name: str) -> Quantizer | None:
    if spec is None:
        return None
    if isinstance(spec, VQSpec):
        return VQWeightQuantizer(spec, name=name)
    return Quantizer(spec, name=name)


@dataclass(frozen=True)
class VQSpec:
    """Vector quantization of a weight (AQLM / VQ codecs' residual VQ, HiFi-Codec's groups).

    The weight (N, K, ...) is flattened to (N, K'), its K' columns split into ``groups`` channel groups; each
    group's rows are cut into sub-vectors of ``dim`` along K' and coded by ``levels`` residual stages of
    ``codebook_size`` codewords, its own codebooks per group. Codes are stored at ceil(log2 codebook_size) bits.

    Args:
        dim: sub-vector length d (divides K' / groups).
        codebook_size: codewords per stage (2..65536).
        levels: residual stages R.
        groups: channel groups G (divides K').
        iters: k-means iterations per stage.
        seed: k-means seed (stage r of group g uses seed + g * levels + r).
    """

    dim: int = 4
    codebook_size: int = 256
    levels: int = 1
    groups: int = 1
    iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for key, lo, hi in (("dim", 1, 1024), ("codebook_size", 2, 65536), ("levels", 1, 16), ("groups", 1, 65536),
                            ("iters", 0, 10_000), ("seed", 0, 2**31 - 1)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"VQSpec: {key} must be an integer in [{lo}, {hi}], got {v!r}")

    @property
    def bits(self) -> int:
        """Stored bits per code: ceil(log2 codebook_size)."""
        return (self.codebook_size - 1).bit_length()

    def to_dict(self) -> dict[str, Any]:
        return {"type": "VQSpec", "dim": self.dim, "codebook_size": self.codebook_size, "levels": self.levels,
                "groups": self.groups, "iters": self.iters, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Any) -> "VQSpec":
        if not isinstance(data, dict) or data.get("type") != "VQSpec":
            raise ValueError(f"not a VQ spec: {data!r:.200}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "type"})
        except TypeError as e:
            raise ValueError(f"VQSpec: {e}") from None


def vq_decode_weight(codes: Tensor, codebooks: Tensor, shape: Sequence[int]) -> Tensor:
    """The weight of ``shape`` from grouped residual codes (G, M, R) and codebooks (G, R, C, d), float32:
    group g's sub-vectors are the sum over stages of their codewords (``kernels.rvq_decode``), laid out as the
    rows (N, K' / G) of its columns (the layout of ``VQSpec``). The packed ``VQTensor`` decodes with it too."""
    g, _, r = codes.shape
    n = int(shape[0])
    parts = [kernels.rvq_decode(codes[i], codebooks[i].float()).reshape(n, -1) for i in range(g)]  # (N, K'/G) each
    return torch.cat(parts, dim=1).reshape(tuple(shape))


def vq_encode_weight(w: Tensor, spec: VQSpec) -> tuple[Tensor, Tensor]:
    """Fit ``spec`` to a weight: grouped residual k-means (``polyquant.vq.residual_kmeans``); returns codes
    (G, M, R) int64 and codebooks (G, R, C, d) float32 (M = N * K' / (G d) sub-vectors per group)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)  # (N, K')
    n, k = w2.shape
    if k % spec.groups or (k // spec.groups) % spec.dim:
        raise ValueError(f"VQSpec(dim={spec.dim}, groups={spec.groups}) does not divide a weight of {k} columns")
    codes, books = [], []
    kg = k // spec.groups
    for g in range(spec.groups):
        vectors = w2[:, g * kg:(g + 1) * kg].reshape(-1, spec.dim)  # (M, d), row-major sub-vectors
        c, b = residual_kmeans(vectors, spec.codebook_size, levels=spec.levels, iters=spec.iters,
                               seed=spec.seed + g * spec.levels)
        codes.append(c)
        books.append(b)
    return torch.stack(codes), torch.stack(books)


class VQWeightQuantizer(Quantizer):
    """Fake-quant VQ of a weight: calibration fits codebooks and codes (``vq_encode_weight``), the quantized
    forward returns the decoded weight (``vq_decode_weight``) whatever weight it is given (the codes are frozen).

    Its ``spec`` describes the stored codes (``uint<bits>``); ``vq`` is the ``VQSpec``. ``codes_`` (G, M, R) and
    ``codebooks`` (G, R, C, d) are buffers (None until calibrated)."""

    def __init__(self, vq: VQSpec, *, name: str = "") -> None:
        super().__init__(QuantSpec(IntFormat(max(1, min(8, vq.bits)), signed=False)), name=name)
        self.vq = vq
        self.register_buffer("codes_", None)
        self.register_buffer("codebooks", None)

    def extra_repr(self) -> str:
        v = self.vq
        return f"dim={v.dim}, codebook_size={v.codebook_size}, levels={v.levels}, groups={v.groups}, state={self.state}"

    def set_state(self, state: State) -> None:
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        if state == "quantized" and self.codebooks is None:
            raise ValueError(f"VQ weight quantizer {self.name} was never calibrated")
        self.state = state

    def calibrate_from(self, x: Tensor) -> None:
        self.codes_, self.codebooks = vq_encode_weight(x, self.vq)
        self.state = "quantized"

    def set_codes(self, codes: Tensor, codebooks: Tensor) -> None:
        """Freeze given codes (G, M, R) and codebooks (G, R, C, d) (a restore)."""
        self.codes_, self.codebooks = codes.long().clone(), codebooks.float().clone()
        self.state = "quantized"

    def codes(self, x: Tensor) -> Tensor:
        if self.codes_ is None:
            raise ValueError(f"VQ weight quantizer {self.name} is not calibrated")
        return self.codes_

    def fake_quant(self, x: Tensor) -> Tensor:
        assert self.codes_ is not None and self.codebooks is not None
        return vq_decode_weight(self.codes_, self.codebooks, x.shape).to(x.dtype if x.dtype.is_floating_point
                                                                            else torch.float32)


class QuantWeightModule(nn.Module):
    """Shared logic of layers with a quantized weight and a quantized input."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quant(self, weight: QuantSpec | None, input: QuantSpec | None, output: QuantSpec | None, name: str) -> None:
        self.weight_quantizer = _make(weight, f"{name}.weight" if name else "weight")
        self.input_quantizer = _make(input, f"{name}.input" if name else "input")
        self.output_quantizer = _make(output, f"{name}.output" if name else "output")

    def quant_weight(self) -> Tensor:
        """The weight as the forward pass uses it: fake-quantized once the weight quantizer is frozen."""
        wq = self.weight_quantizer
        if wq is None or wq.state != "quantized":
            return self.weight
        return wq(self.weight)

    def calibrate_weight(self) -> None:
        """Weights are fully known: freeze the weight quantizer from the weight itself in one shot."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.scale = None
            self.weight_quantizer.zero_point = None
            self.weight_quantizer.calibrate_from(self.weight.detach())

    def _io(self, x: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = fn(x, self.quant_weight())
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y


class QuantLinear(QuantWeightModule):
    """nn.Linear with fake-quantized weight, input and (optionally) output."""

    def __init__(
        self,
        linear: nn.Linear,
        *,
        weight: QuantSpec | None = None,
        input: QuantSpec | None = None,
        output: QuantSpec | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_quant(weight, input, output, name)

    def forward(self, x: Tensor) -> Tensor:
        return self._io(x, lambda a, w: F.linear(a, w, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


ROTATIONS = ("hadamard",)


class RotatedLinear(QuantLinear):
    """y = x @ W.T + b computed as Q_in(x H) @ Q_w(W H).T + b with H the core's orthonormal Hadamard matrix
    (``kernels.fwht(x) = x @ H``): the rotation spreads outliers before quantization (QuaRot; Quamba's online
    Hadamard before the output projection). The layer holds the rotated weight W H as its ``weight``; its input
    quantizer sees x H. The packed twin is ``polyquant.packed.HadamardLinear`` (fused ``fwht_quantize`` for
    int8 inputs)."""

    def __init__(
        self,
        linear: nn.Linear,
        *,
        rotation: str = "hadamard",
        weight: "QuantSpec | VQSpec | None" = None,
        input: QuantSpec | None = None,
        output: QuantSpec | None = None,
        name: str = "",
    ) -> None:
        from .transforms import hadamard_matrix, is_hadamard_size

        if rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {rotation!r}; choose one of {', '.join(ROTATIONS)}")
        if not is_hadamard_size(linear.in_features):
            raise ValueError(f"no Hadamard matrix of size {linear.in_features} (in_features of {name or 'the layer'})")
        w = linear.weight.detach()
        rotated = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            device=w.device, dtype=w.dtype)
        with torch.no_grad():
            rotated.weight.copy_((w.float() @ hadamard_matrix(linear.in_features).to(w.device)).to(w.dtype))
        rotated.bias = linear.bias
        super().__init__(rotated, weight=weight, input=input, output=output, name=name)
        self.rotation = rotation

    def forward(self, x: Tensor) -> Tensor:
        return self._io(kernels.fwht(x), lambda a, w: F.linear(a, w, self.bias))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rotation={self.rotation}"


class _QuantConvNd(QuantWeightModule):
    _CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                   "padding_mode", "_reversed_padding_repeated_twice")

    def __init__(
        self,
        conv: nn.modules.conv._ConvNd,
        *,
        weight: QuantSpec | None = None,
        input: QuantSpec | None = None,
        output: QuantSpec | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        # Copy the conv's hyper-parameters (not the module: its weight would be stored twice).
        self._conv_type = type(conv)
        for attr in self._CONV_ATTRS:
            setattr(self, attr, getattr(conv, attr))
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_quant(weight, input, output, name)

    def conv_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """The float convolution of ``x`` with ``weight`` and this layer's bias, stride, padding, groups."""
        return self._conv_type._conv_forward(self, x, weight, self.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return self._io(x, self.conv_forward)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")


class QuantConv1d(_QuantConvNd):
    """nn.Conv1d with fake-quantized weight and input."""


class QuantConv2d(_QuantConvNd):
    """nn.Conv2d with fake-quantized weight and input."""


class QuantConv3d(_QuantConvNd):
    """nn.Conv3d with fake-quantized weight and input."""


class _QuantConvTransposeNd(_QuantConvNd):
    """A transposed convolution (weight (I, O / groups, *kernel): its rows, what per-channel blocks run along, are
    the input channels) with fake-quantized weight and input. Forward takes no ``output_size``: the module's
    ``output_padding`` fixes the output length, as ``ConvTransposeNd.forward(x)`` without it."""

    _CONV_ATTRS = (*_QuantConvNd._CONV_ATTRS, "output_padding", "transposed")
    _FNS: dict[int, Callable[..., Tensor]] = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

    def conv_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        fn = self._FNS[weight.dim() - 2]
        return fn(x, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)


class QuantConvTranspose1d(_QuantConvTransposeNd):
    """nn.ConvTranspose1d with fake-quantized weight and input."""


class QuantConvTranspose2d(_QuantConvTransposeNd):
    """nn.ConvTranspose2d with fake-quantized weight and input."""


class QuantConvTranspose3d(_QuantConvTransposeNd):
    """nn.ConvTranspose3d with fake-quantized weight and input."""


class QuantMatMul(nn.Module):
    """a @ b with both operands fake-quantized (attention products q @ k^T and attn @ v)."""

    def __init__(self, *, a: QuantSpec | None = None, b: QuantSpec | None = None, name: str = "") -> None:
        super().__init__()
        self.a_quantizer = _make(a, f"{name}.a" if name else "a")
        self.b_quantizer = _make(b, f"{name}.b" if name else "b")

    def quantize_operands(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Both operands through their quantizers (an operand without one passes as is)."""
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a, b

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = self.quantize_operands(a, b)
        return a @ b


class QuantMatMulKT(QuantMatMul):
    """a @ b^T with both operands fake-quantized as given: for q @ k^T with k passed untransposed, (..., M, d), so
    a token-wise (per-row) quantizer of b sees k's tokens, not k^T's channels."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = self.quantize_operands(a, b)
        return a @ b.transpose(-1, -2)


# --- model surgery -------------------------------------------------------------------------------------------

_WRAPPERS: dict[type[nn.Module], type[QuantWeightModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
}


@dataclass
class QuantRule:
    """Which modules to quantize and how.

    Args:
        pattern: module name pattern (fnmatch, e.g. "blocks.*.attn.qkv"; or "re:<regex>" matched in full), or a
            module type / tuple of types. "*" matches every supported module.
        weight: spec of the weight quantizer (None: float weight): a ``QuantSpec`` (int, float, table and log
            formats) or a ``VQSpec``.
        input: spec of the input quantizer (None: float input).
        output: spec of the output quantizer (usually None).
        rotation: "hadamard" makes a Linear a ``RotatedLinear`` (x H, W H); None: no rotation.
    """

    pattern: str | type | tuple[type, ...] = "*"
    weight: QuantSpec | VQSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    rotation: str | None = None

    def __post_init__(self) -> None:
        if self.rotation is not None and self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; choose one of {', '.join(ROTATIONS)} or None")

    def matches(self, name: str, module: nn.Module) -> bool:
        return _matches(self.pattern, name, module)


def _matches(pattern: str | type | tuple[type, ...], name: str, module: nn.Module) -> bool:
    if isinstance(pattern, (type, tuple)):
        return isinstance(module, pattern)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def prepare(
    model: nn.Module,
    rules: Sequence[QuantRule],
    *,
    ignore: Iterable[str | type] = (),
    inplace: bool = False,
) -> nn.Module:
    """Replace every Linear / Conv module matched by a rule with its quant version (first matching rule wins).

    Modules matched by ``ignore`` (name patterns or types) stay float. Returns the prepared model (a deep copy
    unless ``inplace``). Raises ValueError when no module matches any rule.
    """
    if not rules:
        raise ValueError("prepare needs at least one QuantRule")
    ignore = list(ignore)
    if not inplace:
        model = copy.deepcopy(model)
    replaced = 0
    for name, module in list(model.named_modules()):
        wrapper = _WRAPPERS.get(type(module))
        if wrapper is None or any(_matches(p, name, module) for p in ignore):  # type: ignore[arg-type]
            continue
        rule = next((r for r in rules if r.matches(name, module)), None)
        if rule is None:
            continue
        set_submodule(model, name, _wrap(module, name, rule))
        replaced += 1
    if replaced == 0:
        raise ValueError("no module matched the quantization rules; check the patterns (names look like "
                         f"{[n for n, _ in list(model.named_modules())[1:4]]})")
    return model


def _wrap(module: nn.Module, name: str, rule: QuantRule) -> QuantWeightModule:
    """The quant layer ``rule`` makes of the float ``module`` (a Linear / Conv of ``_WRAPPERS``)."""
    if rule.rotation is not None:
        if type(module) is not nn.Linear:
            raise ValueError(f"{name}: rotation {rule.rotation!r} applies to Linear layers, not {type(module).__name__}")
        return RotatedLinear(module, rotation=rule.rotation, weight=rule.weight, input=rule.input,  # type: ignore[arg-type]
                             output=rule.output, name=name)
    wrapper = _WRAPPERS[type(module)]
    return wrapper(module, weight=rule.weight, input=rule.input, output=rule.output, name=name)  # type: ignore[arg-type]


def _spec_json(q: Quantizer | None) -> dict[str, Any] | None:
    if q is None:
        return None
    if isinstance(q, VQWeightQuantizer):
        return q.vq.to_dict()
    return q.spec.to_dict()


def _spec_from_json(data: Any) -> "QuantSpec | VQSpec | None":
    if data is None:
        return None
    if isinstance(data, dict) and data.get("type") == "VQSpec":
        return VQSpec.from_dict(data)
    return QuantSpec.from_dict(data)


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """JSON of every core quant layer of ``model`` (its type, rotation and quantizer specs), by module name:
    what ``prepare_from_specs`` needs to rebuild the same layers on a float copy of the model. Layers whose
    quantizers are not core ``Quantizer`` / ``VQWeightQuantizer`` instances (a plugin's own) are left out."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantWeightModule):
            continue
        qs = (m.weight_quantizer, m.input_quantizer, m.output_quantizer)
        if any(q is not None and type(q) not in (Quantizer, VQWeightQuantizer) for q in qs):
            continue
        out[name] = {"type": type(m).__name__, "rotation": getattr(m, "rotation", None),
                     "weight": _spec_json(qs[0]), "input": _spec_json(qs[1]), "output": _spec_json(qs[2])}
    return out


def prepare_from_specs(model: nn.Module, specs: dict[str, Any]) -> nn.Module:
    """Rebuild, in place, the quant layers ``layer_specs`` recorded (a float model of the same architecture);
    returns the model. ``ValueError`` names a layer that is missing or does not fit its record."""
    if not isinstance(specs, dict):
        raise ValueError("layer specs must be a JSON object")
    for name, rec in specs.items():
        if not isinstance(rec, dict) or set(rec) != {"type", "rotation", "weight", "input", "output"}:
            raise ValueError(f"{name}: not a layer record")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}") from None
        wrapper = _WRAPPERS.get(type(module))
        expected = "RotatedLinear" if rec["rotation"] is not None else getattr(wrapper, "__name__", None)
        if wrapper is None or rec["type"] != expected:
            raise ValueError(f"{name}: recorded as {rec['type']}, the model has a {type(module).__name__}")
        rule = QuantRule(name, weight=_spec_from_json(rec["weight"]), input=_spec_from_json(rec["input"]),  # type: ignore[arg-type]
                         output=_spec_from_json(rec["output"]), rotation=rec["rotation"])
        set_submodule(model, name, _wrap(module, name, rule))
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule of ``model`` at the dotted ``name`` with ``module`` (also ``polyquant.surgery``).

    Raises ValueError for the root (``""``) or a name ending with a dot, TypeError when ``module`` is not an
    ``nn.Module``, and AttributeError (from ``get_submodule``, naming the missing part) for a bad parent path.
    """
    if not isinstance(name, str) or name == "":
        raise ValueError("cannot replace the root module; wrap it in a container first")
    if not isinstance(module, nn.Module):
        raise TypeError(f"set_submodule needs an nn.Module, got {type(module).__name__}")
    parent_name, _, child = name.rpartition(".")
    if not child:
        raise ValueError(f"module name {name!r} ends with a dot")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantizers(model: nn.Module) -> list[Quantizer]:
    """Every Quantizer in the model, in module order."""
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def set_state(model: nn.Module, state: State) -> None:
    """Move every quantizer of the model to ``state`` (raw / calibrating / quantized)."""
    qs = quantizers(model)
    if not qs:
        raise ValueError("the model has no quantizers; call prepare() first")
    for q in qs:
        q.set_state(state)


def default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        # (inputs, labels) pairs from a DataLoader: feed the first element.
        return model(batch[0])
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__}; pass forward_fn")


def to_device(batch: Any, device: torch.device | str | None, *, dtype: torch.dtype | None = None,
              copy: bool = False) -> Any:
    """``batch`` with every tensor in it (also inside tuples, lists and dicts) moved to ``device`` (None: as is);
    ``dtype``: floating-point tensors are also cast to it (integer ones, e.g. token ids, are not). ``copy``: every
    tensor is a fresh copy, also one already there (a recorder keeping inputs its caller may change in place)."""
    if device is None and dtype is None and not copy:
        return batch
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            batch = batch.to(dtype)
        return batch.to(device if device is not None else batch.device, copy=copy)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype=dtype, copy=copy) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device, dtype=dtype, copy=copy) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def tensors_in(x: Any) -> list[Tensor]:
    """The tensors inside nested tuples / lists / dicts (model outputs, hook arguments), in order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors_in(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_in(v)]
    return []


def half_dtype(model: nn.Module) -> torch.dtype | None:
    """float16 or bfloat16 when every floating-point parameter of ``model`` has that dtype, else None."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in HALF_DTYPES else None


def cast_floats(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place, except the quantizers' (their
    scales, zero points and searched parameters stay float32: fake quantization computes in float32 and returns
    the input's dtype). How a half-precision model is quantized in float32 and given back in its own dtype."""
    for module in model.modules():
        if isinstance(module, Quantizer):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(module, name, b.to(dtype))
    return model


class _Placed:
    """Batches read from ``source`` with their tensors moved to ``device`` (and floating-point ones cast to
    ``dtype``) as they are read (re-iterable)."""

    def __init__(self, source: Iterable[Any], device: torch.device | None, dtype: torch.dtype | None = None) -> None:
        self.source, self.device, self.dtype = source, device, dtype

    def __iter__(self) -> Iterator[Any]:
        return (to_device(b, self.device, dtype=self.dtype) for b in self.source)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Calibration:
    """Calibration input: batches (any re-iterable, e.g. a list or a DataLoader) and how to feed them.

    ``forward_fn(model, batch)`` runs one batch (None: ``default_forward``: a tensor is ``model(batch)``, a dict
    ``model(**batch)``, a tuple or list ``model(batch[0])``). ``calibrate``, ``capture`` and the handlers of
    ``polyquant.quantize`` take a ``Calibration`` whole, so a user's ``forward_fn`` always applies.
    """

    batches: Iterable[Any]
    forward_fn: Callable[[nn.Module, Any], Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return (self.forward_fn or default_forward)(model, batch)

    def to(self, device: torch.device | str | None, *, dtype: torch.dtype | None = None) -> "Calibration":
        """The same calibration with every batch's tensors moved to ``device`` as they are read (None: where they
        are); ``dtype``: floating-point tensors are also cast to it."""
        if device is None and dtype is None:
            return self
        return Calibration(_Placed(self.batches, None if device is None else torch.device(device), dtype),
                           self.forward_fn)

    def inputs(self, limit: int | None = None) -> Tensor:
        """The model inputs of the batches concatenated along dim 0 (first ``limit`` rows), for methods that
        work on one input tensor. Batches are tensors or (input, label) pairs; such methods call the model on
        the tensor themselves, so a ``forward_fn`` is refused rather than silently ignored."""
        if self.forward_fn is not None:
            raise TypeError("this method feeds the model one input tensor and cannot use forward_fn; pass batches "
                            "of model inputs (or (input, label) pairs) instead")
        parts: list[Tensor] = []
        n = 0
        for batch in self.batches:
            x = batch if isinstance(batch, Tensor) else batch[0] if isinstance(batch, (list, tuple)) and batch else None
            if not isinstance(x, Tensor):
                raise TypeError(f"this method needs tensor batches or (tensor, label) pairs, got {type(batch).__name__}")
            parts.append(x)
            n += len(x)
            if limit is not None and n >= limit:
                break
        if not parts:
            raise ValueError("the calibration set is empty")
        out = torch.cat(parts)
        return out if limit is None else out[:limit]


def calibration(batches: "Iterable[Any] | Calibration", forward_fn: Callable[[nn.Module, Any], Any] | None) -> Calibration:
    """``batches`` as a ``Calibration`` (a ``Calibration`` given with a separate ``forward_fn`` is a TypeError)."""
    if isinstance(batches, Calibration):
        if forward_fn is not None:
            raise TypeError("pass forward_fn inside the Calibration or as an argument, not both")
        return batches
    return Calibration(batches, forward_fn)


def quantize_weights(model: nn.Module, rules: Sequence[QuantRule], *, ignore: Iterable[str | type] = (),
                     inplace: bool = False) -> nn.Module:
    """Weight-only quantization without data: ``prepare`` with ``rules`` (which must set no input or output
    quantizer), then every weight quantizer frozen from its weight. Returns the model (a copy unless ``inplace``)."""
    if any(r.input is not None or r.output is not None for r in rules):
        raise ValueError("quantize_weights quantizes weights only: a rule with an input or output spec needs "
                         "calibration data (prepare + calibrate)")
    model = prepare(model, rules, ignore=ignore, inplace=inplace)
    for m in model.modules():
        if isinstance(m, QuantWeightModule):
            m.calibrate_weight()
    return model


def calibrate(
    model: nn.Module,
    batches: Iterable[Any] | Calibration,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    desc: str = "calibrating",
) -> nn.Module:
    """Run the calibration batches through the model with every quantizer observing, then freeze them.

    ``batches``: an iterable of batches fed by ``forward_fn``, or a ``Calibration`` (whose ``forward_fn`` is
    used). All quantizers observe at once (every module sees float inputs, as in parallel calibration). Raises
    ValueError for an empty calibration set and for NaN / Inf in the data (naming the quantizer).
    """
    from tqdm.auto import tqdm

    calib = calibration(batches, forward_fn)
    batches, forward_fn = calib.batches, calib.forward
    if not quantizers(model):
        raise ValueError("the model has no quantizers; call prepare() first")
    weight_modules = [m for m in model.modules() if isinstance(m, QuantWeightModule)]
    weight_qs = {id(m.weight_quantizer) for m in weight_modules if m.weight_quantizer is not None}
    # Weight quantizers stay raw during the pass: every module sees float inputs (parallel calibration).
    qs = [q for q in quantizers(model) if id(q) not in weight_qs]
    for m in weight_modules:
        if m.weight_quantizer is not None:
            m.weight_quantizer.set_state("raw")
    for q in qs:
        q.scale = None
        q.zero_point = None
        q.set_state("calibrating")
    was_training = model.training
    model.eval()
    seen = 0
    with torch.no_grad():
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            forward_fn(model, batch)
            seen += 1
    if seen == 0:
        for q in qs:
            q.set_state("raw")
        raise ValueError("the calibration set is empty: calibrate() needs at least one batch")
    for m in weight_modules:
        m.calibrate_weight()
    for q in qs:
        if q.observer is not None and q.observer.min_val is None and not q.spec.dynamic:
            raise ValueError(f"quantizer {q.name} saw no data during calibration: is its module used in forward?")
        q.set_state("quantized")
    model.train(was_training)
    return model
