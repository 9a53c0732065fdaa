"""Searches for quantization parameters: candidate grids, a flat grid search and a progressive search.

A search ranks *candidates* with a loss that is lower-is-better and independent per *group* (a weight row, a
head, a channel, or one group for a per-tensor quantizer). Candidates are tensors with a leading candidate axis K
and one column per group G:

| tensor        | shape  | holds                                                                         |
|---------------|--------|-------------------------------------------------------------------------------|
| ``scales``    | (K, G) | candidate scales, or multipliers of a base scale (clipping ratios)            |
| ``zero_points``| (K, G)| zero points searched with the scale, or another parameter kept fixed while the |
|               |        | scale is refined (AdaLog's log-base numerator q), or None                      |
| loss          | (K, G) | ``evaluate(scales, zero_points)``: the pluggable loss, lower is better         |

``evaluate`` may see the candidates in slices: with ``chunk=n`` a search calls it on at most ``n`` candidates at
a time, and ``chunked`` splits a callback's own work by an element budget, so memory stays bounded.

| function                | what it does                                                                    |
|-------------------------|---------------------------------------------------------------------------------|
| ``grid_search``         | evaluate every candidate once, keep the best per group                          |
| ``progressive_search``  | keep the best ``width`` per group, refine the scale around each survivor        |
|                         | (``new_per`` offsets, spacing shrinking by ``new_per - 0.5`` a round), the      |
|                         | zero point fixed; AdaLog's FPCS is this loop                                     |
| ``uniform_grid``        | (scale, zero point) candidates between two percentile ranges (FPCS's first grid)|
| ``quantile_rows``       | per-row quantiles without ``torch.quantile``'s size limit                       |
| ``lowest``              | indices of the k lowest losses per group (NaN ranks last)                       |
| ``chunked``             | run a callback on slices of the candidate axis and concatenate                  |
| ``output_error_search`` | clip a layer's per-tensor input quantizer by the error of the layer's output,    |
|                         | weighted per output element (LiDAR-PTQ's grid search on non-empty BEV cells)     |

Ties: ``tie_break="topk"`` ranks equal losses in ``torch.topk``'s order (the FPCS reference code);
``"first"`` picks the lowest candidate index among equal losses (``torch.argmin``; a loop that keeps the first
strictly better candidate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .nn import QuantWeightModule

__all__ = [
    "Evaluate",
    "SearchResult",
    "MAX_ELEMENTS",
    "chunked",
    "lowest",
    "quantile_rows",
    "uniform_grid",
    "grid_search",
    "progressive_search",
    "output_error_search",
]

Evaluate = Callable[[Tensor, "Tensor | None"], Tensor]  # (K, G) scales, zero points or None -> (K, G) losses
TieBreak = Literal["topk", "first"]

MAX_ELEMENTS = 1 << 19  # elements of one candidate chunk in ``chunked``: small chunks stay in cache


@dataclass
class SearchResult:
    """The best candidate of every group.

    Args:
        scale: (G,) chosen scales (or multipliers, if the candidates were multipliers).
        zero_point: (G,) chosen zero points (or second parameters), or None when none was searched.
        loss: (G,) their losses.
        index: (G,) their index in the last evaluated candidate set.
        evaluations: candidates evaluated per group.
    """

    scale: Tensor
    zero_point: Tensor | None
    loss: Tensor
    index: Tensor
    evaluations: int


def chunked(fn: Callable[[slice], Tensor], k: int, per_candidate: int, *, max_elements: int = MAX_ELEMENTS
            ) -> Tensor:
    """``torch.cat([fn(s) for s in slices])`` over slices of ``range(k)`` holding at most ``max_elements //
    per_candidate`` candidates (at least one): a callback whose cost is ``per_candidate`` elements per candidate
    stays within ``max_elements``."""
    if k < 1:
        raise ValueError(f"chunked needs at least one candidate, got k={k}")
    size = max(1, max_elements // max(1, per_candidate))
    return torch.cat([fn(slice(i, min(k, i + size))) for i in range(0, k, size)], dim=0)


def lowest(loss: Tensor, k: int = 1, *, tie_break: TieBreak = "topk") -> Tensor:
    """Indices (k', G) of the k lowest losses of every column of ``loss`` (K, G), best first; k' = min(k, K).

    NaN counts as +inf. ``tie_break="first"`` (only for k = 1) returns the first index among equal losses.
    """
    if loss.dim() != 2:
        raise ValueError(f"loss must have shape (K, G), got {tuple(loss.shape)}")
    loss = torch.nan_to_num(loss, nan=float("inf"))
    if tie_break == "first":
        if k != 1:
            raise ValueError("tie_break='first' picks one candidate per group (k=1)")
        return torch.argmin(loss, dim=0, keepdim=True)
    if tie_break != "topk":
        raise ValueError(f"tie_break must be 'topk' or 'first', got {tie_break!r}")
    return torch.topk(loss, k=min(k, loss.shape[0]), dim=0, largest=False).indices


def quantile_rows(rows: Tensor, ps: list[float]) -> Tensor:
    """Quantiles of every row of ``rows`` (G, M) with linear interpolation (``torch.quantile`` semantics, no
    size limit). Returns (len(ps), G)."""
    srt = rows.float().sort(dim=1).values
    m = srt.shape[1]
    out = []
    for p in ps:
        pos = p * (m - 1)
        lo = int(pos)
        hi = min(lo + 1, m - 1)
        frac = pos - lo
        out.append(srt[:, lo] * (1 - frac) + srt[:, hi] * frac)
    return torch.stack(out)


def uniform_grid(
    rows: Tensor, bits: int, *, eq_n: int = 128, zp_levels: int | None = None, lo: float = 0.9, hi: float = 1.0,
    centre: str = "mid",
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric uniform candidates for data ``rows`` (G, M): scales (K, G), zero points (K, G), scale step (G,).

    ``num_zp = min(16, zp_levels)`` integer zero points (``zp_levels`` default 2^(bits-1)), times
    ``eq_n // num_zp`` scales spaced linearly from (P_lo - P_(1-lo)) / (2^bits - 1) to (P_hi - P_(1-hi)) /
    (2^bits - 1); the zero point is the slow index, K = num_zp * (eq_n // num_zp). The step is the spacing of the
    scales (the first refinement width of ``progressive_search``).

    ``centre``: where the zero points are centred. "mid": on 2^(bits-1) (the AdaLog / PTQ4ViT references), which
    suits ranges centred on zero but clips a shifted one (a range [-1, 2] at 8 bits needs a zero point near 85,
    outside 120..135). "range": per candidate on round(-P_(1-hi) / scale), the zero point that maps the data's
    low end to code 0, so the candidates cover the observed range whatever its centre (on a range centred on
    zero it is 2^(bits-1) again), clamped to the codes.
    """
    zp_levels = 2 ** (bits - 1) if zp_levels is None else zp_levels
    num_zp = max(1, min(16, zp_levels))
    num_scale = max(2, eq_n // num_zp)
    q = quantile_rows(rows, [lo, hi, 1 - lo, 1 - hi])  # (4, G)
    delta_min = q[0] - q[2]
    delta_max = q[1] - q[3]
    steps = torch.linspace(0, 1, num_scale)[:, None]
    scales = (delta_min + steps * (delta_max - delta_min)) / (2**bits - 1)  # (num_scale, G)
    offsets = torch.arange(-(num_zp // 2), num_zp - num_zp // 2, dtype=torch.float32)  # (num_zp,)
    if centre == "mid":
        zps = (2 ** (bits - 1) + offsets).repeat_interleave(num_scale)[:, None].expand(-1, scales.shape[1]).clone()
    elif centre == "range":
        mid = torch.round(-q[3][None] / scales.clamp_min(1e-12))  # (num_scale, G): maps the low end to 0
        zps = (mid[None] + offsets[:, None, None]).reshape(-1, scales.shape[1]).clamp(0, 2**bits - 1)
    else:
        raise ValueError(f"centre must be 'mid' or 'range', got {centre!r}")
    scales = scales.repeat(num_zp, 1)
    step = (delta_max - delta_min) / (num_scale - 1) / (2**bits - 1)
    return scales, zps, step


def _evaluate(evaluate: Evaluate, scales: Tensor, zero_points: Tensor | None, chunk: int | None) -> Tensor:
    if chunk is None:
        return evaluate(scales, zero_points)
    k = scales.shape[0]
    def part(sl: slice) -> Tensor:
        return evaluate(scales[sl], None if zero_points is None else zero_points[sl])

    return chunked(part, k, 1, max_elements=chunk)


def _check(scales: Tensor, zero_points: Tensor | None) -> None:
    if scales.dim() != 2 or scales.shape[0] == 0:
        raise ValueError(f"candidate scales must have shape (K, G) with K >= 1, got {tuple(scales.shape)}")
    if zero_points is not None and zero_points.shape != scales.shape:
        raise ValueError(f"candidate zero points {tuple(zero_points.shape)} must match the scales "
                         f"{tuple(scales.shape)}")


def _pick(scales: Tensor, zero_points: Tensor | None, loss: Tensor, evaluations: int, tie_break: TieBreak
          ) -> SearchResult:
    best = lowest(loss, 1, tie_break=tie_break)  # (1, G)
    return SearchResult(
        scale=scales.gather(0, best)[0],
        zero_point=None if zero_points is None else zero_points.gather(0, best)[0],
        loss=loss.gather(0, best)[0],
        index=best[0],
        evaluations=evaluations,
    )


def grid_search(scales: Tensor, zero_points: Tensor | None, evaluate: Evaluate, *, chunk: int | None = None,
                tie_break: TieBreak = "topk") -> SearchResult:
    """Evaluate every candidate once and keep the best of every group.

    ``evaluate(scales (k, G), zero_points (k, G) or None) -> (k, G)``; with ``chunk`` it sees at most ``chunk``
    candidates per call. The loss must have one column per group (G = 1 for a per-tensor search).
    """
    _check(scales, zero_points)
    loss = _evaluate(evaluate, scales, zero_points, chunk)
    if loss.shape != scales.shape:
        raise ValueError(f"evaluate returned shape {tuple(loss.shape)}, expected {tuple(scales.shape)}")
    return _pick(scales, zero_points, loss, scales.shape[0], tie_break)


def progressive_search(
    scales: Tensor,
    zero_points: Tensor | None,
    step: Tensor | float,
    evaluate: Evaluate,
    *,
    rounds: int = 6,
    width: int = 16,
    new_per: int = 8,
    min_scale: float = 1e-8,
    chunk: int | None = None,
    tie_break: TieBreak = "topk",
) -> SearchResult:
    """Coarse-to-fine search: evaluate the initial candidates, then ``rounds - 1`` refinement rounds.

    Each round keeps the best ``width`` candidates per group and tries ``new_per`` scales around each survivor,
    s + (linspace(0, 1, new_per) - 0.5) * d, with its zero point fixed; d starts at ``step`` (a float, or
    (G,) per group) and shrinks by (new_per - 0.5) every round. Scales are clamped to ``min_scale``. The result
    is the best candidate of the last round. Evaluations per group: K + (rounds - 1) * width * new_per.
    """
    _check(scales, zero_points)
    if rounds < 1 or width < 1 or new_per < 1:
        raise ValueError(f"rounds, width and new_per must be positive, got {rounds}, {width}, {new_per}")
    scales = scales.clamp_min(min_scale)
    loss = _evaluate(evaluate, scales, zero_points, chunk)
    evaluations = scales.shape[0]
    delta = step.clone() if isinstance(step, Tensor) else float(step)
    groups = scales.shape[1]
    for _ in range(1, rounds):
        idx = lowest(loss, width)  # (k, G)
        top_s = scales.gather(0, idx)
        offsets = (torch.linspace(0, 1, new_per) - 0.5)[:, None] * delta  # (new_per, G) or (new_per, 1)
        delta = delta / (new_per - 0.5)
        scales = (top_s[:, None, :] + offsets[None]).reshape(-1, groups).clamp_min(min_scale)
        if zero_points is not None:
            zero_points = zero_points.gather(0, idx).repeat_interleave(new_per, dim=0)
        loss = _evaluate(evaluate, scales, zero_points, chunk)
        evaluations += scales.shape[0]
    return _pick(scales, zero_points, loss, evaluations, tie_break)


def output_error_search(
    layer: "QuantWeightModule",
    inputs: Sequence[Tensor],
    *,
    weights: Sequence[Tensor | None] | None = None,
    grid: int = 100,
    min_ratio: float = 0.01,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> SearchResult:
    """Clip ``layer``'s per-tensor input quantizer by the error of the layer's output; freezes it.

    The starting range is the quantizer's own when it is frozen (the max-min range ``calibrate`` gave it over the
    whole calibration set), else the max-min range of ``inputs`` (a list of the layer's input batches); candidate ranges
    are ``ratio * [min, max]`` for ``grid`` ratios spaced linearly from ``min_ratio`` to 1 (LiDAR-PTQ's
    lightweight grid search after its max-min initialisation). A candidate's loss is
    ``sum_b sum(w_b * (f(Q(x_b)) - f(x_b))^2)`` with f the layer's own op on its (quantized, if frozen) weight,
    or ``forward`` when given, and ``w_b`` the per-output-element ``weights`` (broadcast against the output; None:
    every element counts): 1 on the non-empty cells of a sparse BEV map, 0 on the empty ones, say, so the search
    spends the quantization grid where the points are. The quantizer gets the best candidate's scale and zero
    point (``Quantizer.freeze``) and ``SearchResult`` says which (``scale`` is the clip ratio there). Equal losses
    keep the largest ratio (all-zero weights leave the starting range).
    Runs under ``torch.no_grad()``. Raises ``ValueError`` for a layer without a per-tensor input quantizer or
    with no inputs.
    """
    from torch.nn import functional as F

    from .nn import QuantLinear, QuantWeightModule
    from .primitives import PerTensor, fake_quantize, qparams_from_minmax

    if not isinstance(layer, QuantWeightModule) or layer.input_quantizer is None:
        raise ValueError("output_error_search needs a quant layer with an input quantizer")
    quantizer = layer.input_quantizer
    if not isinstance(quantizer.spec.granularity, PerTensor) or quantizer.spec.dynamic:
        raise ValueError(f"output_error_search clips per-tensor static quantizers; {quantizer.name} is "
                         f"{type(quantizer.spec.granularity).__name__}{' dynamic' if quantizer.spec.dynamic else ''}")
    if not inputs:
        raise ValueError(f"output_error_search: no inputs for {quantizer.name}")
    if grid < 1 or not 0.0 < min_ratio <= 1.0:
        raise ValueError("output_error_search: grid must be >= 1 and min_ratio in (0, 1]")
    if weights is not None and len(weights) != len(inputs):
        raise ValueError(f"{len(weights)} weight tensors for {len(inputs)} input batches")
    spec = quantizer.spec
    op = forward
    if op is None:
        weight = layer.quant_weight().detach()
        conv_forward = getattr(layer, "conv_forward", None)
        if conv_forward is not None:
            op = lambda x: conv_forward(x, weight)  # noqa: E731
        elif type(layer) is QuantLinear:
            op = lambda x: F.linear(x, weight, layer.bias)  # noqa: E731
        else:
            raise ValueError(f"output_error_search: pass forward= for a {type(layer).__name__} (what its input "
                             "quantizer's output goes through)")
    if quantizer.scale is not None:  # frozen: the range its scale and zero point cover
        scale0 = quantizer.scale.detach().float().reshape(()).cpu()
        zp0 = (quantizer.zero_point.detach().float().reshape(()).cpu()
               if quantizer.zero_point is not None and spec.fmt.supports_zero_point else torch.zeros(()))
        if spec.fmt.supports_zero_point:
            lo, hi = (spec.fmt.qmin - zp0) * scale0, (spec.fmt.qmax - zp0) * scale0  # type: ignore[attr-defined]
        else:
            hi = scale0 * spec.fmt.max_value
            lo = -hi
        if spec.symmetric:
            lo = -hi
    else:
        lo = torch.stack([x.detach().float().min() for x in inputs]).min().cpu()
        hi = torch.stack([x.detach().float().max() for x in inputs]).max().cpu()
    zp_used = spec.fmt.supports_zero_point

    def candidate(ratio: Tensor) -> tuple[Tensor, Tensor]:
        return qparams_from_minmax((ratio * lo).reshape(1), (ratio * hi).reshape(1), spec.fmt, symmetric=spec.symmetric)

    def evaluate(ratios: Tensor, _: Tensor | None) -> Tensor:  # (k, 1) clip ratios -> (k, 1) weighted errors
        loss = torch.zeros(ratios.shape[0], 1)
        qparams = [candidate(r) for r in ratios[:, 0]]
        with torch.no_grad():
            for b, x in enumerate(inputs):
                ref = op(x)
                w = None if weights is None else weights[b]
                for k, (scale, zp) in enumerate(qparams):
                    err = (op(fake_quantize(x, spec.fmt, scale, zp if zp_used else None, tuple(x.shape))) - ref)
                    err = err.float().pow(2)
                    loss[k, 0] += float((err if w is None else err * w).sum())
        return loss

    # Largest ratio first, so that "first" keeps the largest ratio among equal losses.
    found = grid_search(torch.linspace(min_ratio, 1.0, grid).flip(0)[:, None], None, evaluate, tie_break="first")
    scale, zp = candidate(found.scale[0])
    quantizer.freeze(scale.reshape(()), zp.reshape(()) if zp_used else None)
    return SearchResult(scale=found.scale, zero_point=None, loss=found.loss,
                        index=grid - 1 - found.index, evaluations=grid)
