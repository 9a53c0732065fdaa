"""Quantization as pure functions (torchao style): choose qparams, quantize, dequantize, fake-quantize.

One ``block_size`` argument covers every granularity. A block is the set of elements that share one scale
(and zero point); ``block_size`` has one entry per dimension of the input and must divide it.

| granularity            | input shape   | block_size     | scale shape    |
|------------------------|---------------|----------------|----------------|
| per tensor             | (N, C)        | (N, C)         | (1, 1)         |
| per channel, axis 0    | (N, C)        | (1, C)         | (N, 1)         |
| per channel, axis 1    | (N, C)        | (N, 1)         | (1, C)         |
| per group of g, axis 1 | (N, C)        | (1, g)         | (N, C / g)     |
| per token              | (B, T, C)     | (1, 1, C)      | (B, T, 1)      |

Scales and zero points are stored with the *scale shape* above (one entry per block, same rank as the input),
so ``x.view(blocked) * scale.view(blocked)`` broadcasts. Use the ``Granularity`` dataclasses and
``block_size_for`` to get a ``block_size`` without counting dimensions by hand.

What is checked (``ValueError`` each, naming the problem):

| function            | refuses                                                                       |
|---------------------|-------------------------------------------------------------------------------|
| every one           | a ``block_size`` of the wrong rank or not dividing the shape; scales / zero    |
|                     | points without one entry per block (e.g. per-token scales of another batch)    |
| choose_qparams      | an empty tensor, NaN / Inf inputs                                             |
| qparams_from_minmax | NaN / Inf statistics, ``eps <= 0``, a range whose scale overflows float32       |
| quantize_tensor     | NaN inputs (+-Inf saturate), scales that are not positive and finite, NaN /    |
|                     | Inf zero points (one reduction; on an accelerator one device sync per call)   |
| fake_quantize       | the same scale / zero-point values, for CPU tensors only: on an accelerator it |
|                     | is the per-forward path and a check would sync; there a zero scale gives NaN   |

NaN inputs of ``fake_quantize`` and ``dequantize`` propagate to NaN outputs. An empty input gives an empty
result (its scale is not used).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from .formats import Format, IntFormat, checking_values, get_format

__all__ = [
    "granularity_to_dict",
    "granularity_from_dict",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerToken",
    "Granularity",
    "block_size_for",
    "scale_shape",
    "block_reduce",
    "block_expand",
    "qparams_from_minmax",
    "choose_qparams",
    "pow2_scale",
    "quantize_tensor",
    "dequantize",
    "fake_quantize",
]


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of ``axis`` (weights: axis 0 = output channels)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive elements along ``axis`` and per index of the other axes."""

    group_size: int
    axis: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"PerGroup: group_size must be a positive integer, got {self.group_size!r}")


@dataclass(frozen=True)
class PerToken:
    """One scale per token: every index of all but the last (feature) dimension."""


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken]


_GRANULARITIES: dict[str, type] = {t.__name__: t for t in (PerTensor, PerChannel, PerGroup, PerToken)}


def granularity_to_dict(granularity: Granularity) -> dict[str, Any]:
    """JSON of a granularity: ``{"type": "PerGroup", "group_size": 128, "axis": -1}``."""
    if type(granularity).__name__ not in _GRANULARITIES:
        raise TypeError(f"unknown granularity {granularity!r}")
    return {"type": type(granularity).__name__, **dataclasses.asdict(granularity)}


def granularity_from_dict(data: Any) -> Granularity:
    """The granularity a ``granularity_to_dict`` JSON describes (``ValueError`` for anything else)."""
    if not isinstance(data, dict) or data.get("type") not in _GRANULARITIES:
        raise ValueError(f"not a granularity description: {data!r:.200}")
    kwargs = {k: v for k, v in data.items() if k != "type"}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in kwargs.values()):
        raise ValueError(f"granularity fields are integers, got {kwargs!r:.200}")
    try:
        return _GRANULARITIES[data["type"]](**kwargs)
    except TypeError as e:
        raise ValueError(f"{data['type']}: {e}") from None


def block_size_for(granularity: Granularity, shape: Sequence[int]) -> tuple[int, ...]:
    """The ``block_size`` that expresses ``granularity`` for a tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if isinstance(granularity, PerTensor):
        return shape
    if ndim == 0:
        raise ValueError(f"{type(granularity).__name__} needs a tensor with at least one dimension")
    if isinstance(granularity, PerChannel):
        axis = _axis(granularity.axis, ndim)
        return tuple(1 if d == axis else s for d, s in enumerate(shape))
    if isinstance(granularity, PerGroup):
        axis = _axis(granularity.axis, ndim)
        if shape[axis] % granularity.group_size:
            raise ValueError(
                f"group size {granularity.group_size} does not divide dimension {axis} of size {shape[axis]}"
            )
        return tuple(granularity.group_size if d == axis else 1 for d in range(ndim))
    if isinstance(granularity, PerToken):
        return tuple(1 for _ in shape[:-1]) + (shape[-1],)
    raise TypeError(f"unknown granularity {granularity!r}")


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def _check_block(shape: Sequence[int], block_size: Sequence[int]) -> None:
    if len(block_size) != len(shape):
        raise ValueError(f"block_size {tuple(block_size)} must have one entry per dimension of shape {tuple(shape)}"
                         f" ({len(block_size)} entries for {len(shape)} dimensions)")
    for s, b in zip(shape, block_size):
        if b < 1:
            empty = " (an empty tensor has no blocks)" if s == 0 else ""
            raise ValueError(f"block_size {tuple(block_size)} must be positive{empty}, for shape {tuple(shape)}")
        if s % b:
            raise ValueError(f"block_size {tuple(block_size)} does not divide shape {tuple(shape)}")


def scale_shape(shape: Sequence[int], block_size: Sequence[int]) -> tuple[int, ...]:
    """Shape of the scale / zero-point tensor: one entry per block."""
    _check_block(shape, block_size)
    return tuple(s // b for s, b in zip(shape, block_size))


def _blocked_view(shape: Sequence[int], block_size: Sequence[int]) -> tuple[list[int], list[int]]:
    # (S0, S1) with blocks (B0, B1) -> view (S0/B0, B0, S1/B1, B1); reduce over the odd dims.
    view: list[int] = []
    reduce_dims: list[int] = []
    for i, (s, b) in enumerate(zip(shape, block_size)):
        view += [s // b, b]
        reduce_dims.append(2 * i + 1)
    return view, reduce_dims


def block_reduce(x: Tensor, block_size: Sequence[int], op: str) -> Tensor:
    """Reduce ``x`` over each block with ``op`` in {'amin', 'amax', 'absmax'}; result has the scale shape."""
    _check_block(x.shape, block_size)
    view, dims = _blocked_view(x.shape, block_size)
    xb = x.reshape(view)
    if op == "amin":
        out = torch.amin(xb, dim=dims, keepdim=True)
    elif op == "amax":
        out = torch.amax(xb, dim=dims, keepdim=True)
    elif op == "absmax":
        out = torch.amax(xb.abs(), dim=dims, keepdim=True)
    else:
        raise ValueError(f"unknown reduction {op!r}")
    return out.reshape(scale_shape(x.shape, block_size))


def block_expand(p: Tensor, shape: Sequence[int], block_size: Sequence[int], *, what: str = "parameters") -> Tensor:
    """Broadcast per-block parameters ``p`` (scale shape) back to the full ``shape``.

    ``p`` may have any shape with one entry per block (read in the order of the scale shape); anything else is a
    ``ValueError`` that names ``what`` (e.g. "scale") and the expected scale shape.
    """
    blocks = scale_shape(shape, block_size)
    if p.numel() != math.prod(blocks):
        raise ValueError(
            f"{what} of shape {tuple(p.shape)} has {p.numel()} entries, but block_size {tuple(block_size)} on a "
            f"tensor of shape {tuple(shape)} has {math.prod(blocks)} blocks: expected the scale shape {blocks} "
            "(parameters computed for another input shape, e.g. per-token scales of another batch, do not fit)"
        )
    view, _ = _blocked_view(shape, block_size)
    pv = p.reshape([v if i % 2 == 0 else 1 for i, v in enumerate(view)])
    return pv.expand(view).reshape(tuple(shape))


def qparams_from_minmax(
    min_val: Tensor,
    max_val: Tensor,
    fmt: Format | str,
    *,
    symmetric: bool = True,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point from per-block min / max statistics.

    Symmetric: scale = max(|min|, |max|) / fmt.max_value (for unsigned INT: max / qmax), zero point 0.
    Asymmetric (INT only): the range is widened to include 0, scale = (max - min) / (qmax - qmin),
    zero_point = qmin - round(min / scale), clamped to [qmin, qmax].
    Zero-range blocks (all zeros) get scale ``eps`` (> 0): they dequantize to exactly 0. Ranges up to the float32
    limit (+-3.4e38) give finite scales; a scale that would still overflow (1-bit formats, formats whose largest
    value is below 1) is a ``ValueError``, as are NaN / Inf statistics.
    """
    fmt = get_format(fmt)
    if not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
        raise ValueError(f"eps must be a positive finite number (the scale of an all-zero block), got {eps!r}")
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and "
                         f"{tuple(max_val.shape)}")
    min_val = min_val.float()
    max_val = max_val.float()
    if checking_values() and not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("quantization range contains NaN or Inf (or float64 values beyond the float32 range, "
                         "3.4e38); check the calibration data")
    if symmetric:
        if isinstance(fmt, IntFormat) and not fmt.signed:
            amax = max_val.clamp_min(0)
            scale = amax / fmt.qmax
        else:
            if isinstance(fmt, IntFormat) and fmt.qmax == 0:
                raise ValueError(f"{fmt.name} has no positive values: use symmetric=False or more bits")
            amax = torch.maximum(min_val.abs(), max_val.abs())
            denom = fmt.qmax if isinstance(fmt, IntFormat) else fmt.max_value
            scale = amax / denom
            if denom < 1:  # only a format whose largest value is below 1 can overflow a finite range
                _check_finite_scale(scale, fmt)
        scale = scale.clamp_min(eps)
        return scale, torch.zeros_like(scale)
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"asymmetric quantization needs an integer format, got {fmt.name}")
    lo = torch.minimum(min_val, torch.zeros_like(min_val))
    hi = torch.maximum(max_val, torch.zeros_like(max_val))
    levels = fmt.qmax - fmt.qmin
    scale = (hi - lo) / levels
    # hi - lo overflows float32 beyond 3.4e38 (e.g. [-3e38, 3e38]); hi / n - lo / n does not (same bits elsewhere).
    scale = torch.where(torch.isfinite(scale), scale, hi / levels - lo / levels)
    if levels < 2:  # 1-bit formats: hi - lo itself is the scale
        _check_finite_scale(scale, fmt)
    scale = scale.clamp_min(eps)
    zero_point = torch.clamp(fmt.qmin - torch.round(lo / scale), fmt.qmin, fmt.qmax)
    return scale, zero_point


def _check_finite_scale(scale: Tensor, fmt: Format) -> None:
    if checking_values() and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"the quantization range is too large for {fmt.name}: its scale overflows float32")


def choose_qparams(
    x: Tensor,
    fmt: Format | str,
    block_size: Sequence[int],
    *,
    symmetric: bool = True,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Min-max scale and zero point of ``x`` for every block (see ``qparams_from_minmax``)."""
    if x.numel() == 0:
        raise ValueError("cannot choose quantization parameters for an empty tensor")
    if checking_values() and not torch.isfinite(x).all():
        raise ValueError("input contains NaN or Inf")
    return qparams_from_minmax(
        block_reduce(x, block_size, "amin"), block_reduce(x, block_size, "amax"), fmt, symmetric=symmetric, eps=eps
    )


def pow2_scale(scale: Tensor) -> Tensor:
    """The smallest power of two >= each scale: the scale a format with an integer exponent bias (or an E8M0 shared
    exponent, as MX formats) can express, so the top code only reaches the range's max when it is 2^k times the
    format's max. Rounding up never clips; ``scale`` must be positive and finite."""
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError("pow2_scale needs positive, finite scales")
    return torch.exp2(torch.ceil(torch.log2(scale.float()))).to(scale.dtype)


def _check_params(scale: Tensor, zero_point: Tensor | None, q: Tensor | None = None) -> None:
    """Scales positive and finite, zero points finite, grid values ``q`` free of NaN: a ``ValueError`` naming
    what is wrong. Cheap: the scales' min / max and the sums of the (small) zero points and of ``q``, read back
    together (one device sync). With valid parameters ``q`` is NaN exactly where the input is (``round`` keeps
    NaN and saturates +-Inf); a NaN sum is confirmed element-wise (grid values of +-3e38 may sum to Inf - Inf).
    Skipped while a graph is traced (``formats.checking_values``)."""
    if not checking_values():
        return
    if zero_point is None and q is None and scale.numel() == 1:  # the common per-tensor case: one read-back
        lo = hi = float(scale.detach())
        if not (lo > 0 and hi < math.inf):
            raise ValueError(f"scales must be positive and finite, got {lo:.3g}")
        return
    stats = [*torch.aminmax(scale.detach().float().reshape(-1))]
    if zero_point is not None:
        stats.append(zero_point.detach().float().sum())
    if q is not None:
        stats.append(q.detach().sum(dtype=torch.float32))
    lo, hi, *sums = torch.stack(stats).tolist()
    if not (lo > 0 and hi < math.inf):
        raise ValueError(f"scales must be positive and finite, got values in [{lo:.3g}, {hi:.3g}] "
                         "(a zero scale divides by zero; qparams_from_minmax gives all-zero blocks eps)")
    if zero_point is not None and not math.isfinite(sums[0]) and not bool(torch.isfinite(zero_point).all()):
        raise ValueError("zero points must be finite, got NaN or Inf")
    if q is not None and math.isnan(sums[-1]) and bool(torch.isnan(q).any()):
        raise ValueError("input contains NaN: it has no quantized value (+-Inf saturate)")


def quantize_tensor(x: Tensor, fmt: Format | str, scale: Tensor, zero_point: Tensor | None, block_size: Sequence[int]) -> Tensor:
    """Map ``x`` onto the format's grid: q = round(x / scale + zero_point), clamped / saturated (the zero point is
    added before rounding; the kernels follow the same order).

    Returns grid values as float32 (integers for INT formats); ``fmt.encode`` turns them into codes.
    ``ValueError`` for NaN in ``x`` (it has no code), for scales that are not positive and finite and for NaN /
    Inf zero points; +-Inf and values beyond the range saturate. An empty ``x`` gives an empty result.
    """
    fmt = get_format(fmt)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    s = block_expand(scale.float(), x.shape, block_size, what="scale")
    v = x.float() / s
    if zero_point is not None:
        v = v + block_expand(zero_point.float(), x.shape, block_size, what="zero point")
    q = fmt.round(v)
    _check_params(scale, zero_point, q)
    if isinstance(fmt, IntFormat):
        return q
    if zero_point is not None and bool((zero_point != 0).any()):
        raise ValueError(f"{fmt.name} does not support a zero point")
    return q


def dequantize(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    block_size: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """x_hat = (q - zero_point) * scale. An empty ``q`` gives an empty result; NaN parameters give NaN."""
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    s = block_expand(scale.float(), q.shape, block_size, what="scale")
    out = q.float() if zero_point is None else q.float() - block_expand(
        zero_point.float(), q.shape, block_size, what="zero point")
    return (out * s).to(dtype)


def fake_quantize(
    x: Tensor, fmt: Format | str, scale: Tensor, zero_point: Tensor | None, block_size: Sequence[int]
) -> Tensor:
    """Quantize then dequantize, differentiable: straight-through rounding, clipped gradient outside the range.

    Gradients also reach ``scale`` (as in LSQ), so reconstruction can learn step sizes. Computed in float32 for
    every input dtype, as ``quantize_tensor`` and ``dequantize`` are, so the result equals
    ``dequantize(quantize_tensor(x, ...), ...)`` exactly; the output has the dtype of a floating-point ``x``
    (float32 for integer inputs). An empty ``x`` is returned as it is (cast to that dtype). NaN in ``x`` gives
    NaN. Scales on the CPU must be positive and finite (``ValueError``); on an accelerator they are not checked
    (the check would sync the device on every forward) and a zero scale gives NaN.
    """
    fmt = get_format(fmt)
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    if x.numel() == 0:
        return x.to(out_dtype)
    xf = x.float()
    s = block_expand(scale.float(), x.shape, block_size, what="scale")
    zp = zero_point if fmt.supports_zero_point else None
    if scale.device.type == "cpu":
        _check_params(scale, zp)
    if zp is None:
        return (fmt.round_ste(xf / s) * s).to(out_dtype)
    z = block_expand(zp.float(), x.shape, block_size, what="zero point")
    return ((fmt.round_ste(xf / s + z) - z) * s).to(out_dtype)
