"""Fake-quant modules, model surgery and calibration.

A ``Quantizer`` module quantizes one tensor. It moves through three states:

    raw          -> identity (the float model)
    calibrating  -> identity, while its observer records statistics
    quantized    -> fake-quant with frozen scale / zero point (or dynamic per-token qparams)

``QuantLinear``, ``QuantConv1d/2d/3d`` and ``QuantMatMul`` hold a weight quantizer and input quantizers.
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
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import Format, get_format
from .observers import Observer, make_observer
from .primitives import Granularity, PerTensor, block_size_for, choose_qparams, fake_quantize

__all__ = [
    "QuantSpec",
    "QuantRule",
    "Quantizer",
    "ActQuantizer",
    "SearchedQuantizer",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantMatMul",
    "prepare",
    "set_submodule",
    "calibrate",
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
        observer: "minmax", "percentile" or "mse".
        percentile: upper percentile for the percentile observer.
        averaging: EMA constant for running statistics; None keeps the running min / max.
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
        if self.observer not in ("minmax", "percentile", "mse"):
            raise ValueError(f"unknown observer {self.observer!r}; choose minmax, percentile or mse")
        if not self.symmetric and not self.fmt.supports_zero_point:
            raise ValueError(f"asymmetric quantization needs an integer format, got {self.fmt.name}")
        if self.dynamic and self.observer != "minmax":
            raise ValueError("dynamic quantization computes min-max qparams at run time; use observer='minmax'")


class Quantizer(nn.Module):
    """Fake-quantizes one tensor according to a ``QuantSpec``; see the module docstring for its states."""

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

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "raw":
            return x
        if self.state == "calibrating":
            if self.observer is not None:
                self.observer.update(x)
            return x
        return self.fake_quant(x)

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
        return self.fake_quant(x)


def _make(spec: QuantSpec | None, name: str) -> Quantizer | None:
    return None if spec is None else Quantizer(spec, name=name)


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


class QuantMatMul(nn.Module):
    """a @ b with both operands fake-quantized (attention products q @ k^T and attn @ v)."""

    def __init__(self, *, a: QuantSpec | None = None, b: QuantSpec | None = None, name: str = "") -> None:
        super().__init__()
        self.a_quantizer = _make(a, f"{name}.a" if name else "a")
        self.b_quantizer = _make(b, f"{name}.b" if name else "b")

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a @ b


# --- model surgery -------------------------------------------------------------------------------------------

_WRAPPERS: dict[type[nn.Module], type[QuantWeightModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
}


@dataclass
class QuantRule:
    """Which modules to quantize and how.

    Args:
        pattern: module name pattern (fnmatch, e.g. "blocks.*.attn.qkv"; or "re:<regex>" matched in full), or a
            module type / tuple of types. "*" matches every supported module.
        weight: spec of the weight quantizer (None: float weight).
        input: spec of the input quantizer (None: float input).
        output: spec of the output quantizer (usually None).
    """

    pattern: str | type | tuple[type, ...] = "*"
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None

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
        new = wrapper(module, weight=rule.weight, input=rule.input, output=rule.output, name=name)  # type: ignore[arg-type]
        set_submodule(model, name, new)
        replaced += 1
    if replaced == 0:
        raise ValueError("no module matched the quantization rules; check the patterns (names look like "
                         f"{[n for n, _ in list(model.named_modules())[1:4]]})")
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


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    desc: str = "calibrating",
) -> nn.Module:
    """Run the calibration batches through the model with every quantizer observing, then freeze them.

    All quantizers observe at once (every module sees float inputs, as in parallel calibration). Raises
    ValueError for an empty calibration set and for NaN / Inf in the data (naming the quantizer).
    """
    from tqdm.auto import tqdm

    forward_fn = forward_fn or default_forward
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
