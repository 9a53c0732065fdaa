"""Fast Progressive Combining Search (FPCS) of AdaLog, for asymmetric uniform quantizers, plus the loss helpers.

The search ranks candidate (scale, zero point) pairs with a loss that is *lower is better* and independent per
*group* (a weight row, a head, a channel, or one group for a layer-wise quantizer). Candidates are tensors of
shape (K, G); an ``evaluate(scales, zero_points) -> (K, G)`` callback returns their losses. As in the reference
code (GoatWu/AdaLog ``weight_fpcs`` / ``activation_fpcs`` / ``_fpcs``):

1. an initial grid of ``eq_n`` pairs: ``num_zp = min(16, zp_levels)`` integer zero points centred on 2^(n-1),
   times ``eq_n / num_zp`` scales spaced linearly between (P0.9 - P0.1) / (2^n - 1) and (P1 - P0) / (2^n - 1);
2. keep the best ``width`` (16) per group;
3. ``steps - 1`` (5) refinement rounds: around every survivor try ``eq_n / width`` (8) scales
   s + (linspace(0, 1, 8) - 0.5) * d, with d shrinking by (8 - 0.5) = 7.5 each round, zero point fixed; keep the
   best 16, and the best 1 in the last round.

That is ``steps * eq_n`` = 768 evaluations per quantizer (``FPCSResult.evaluations``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "FPCSResult",
    "quantile_rows",
    "positive_quantile",
    "uniform_grid",
    "fpcs",
    "flat_grid_search",
    "chunked",
    "MAX_ELEMENTS",
]

Evaluate = Callable[[Tensor, Tensor], Tensor]  # (K, G) scales, (K, G) zero points -> (K, G) losses

MAX_ELEMENTS = 1 << 19  # elements of one candidate chunk: small chunks stay in cache and bound memory


@dataclass
class FPCSResult:
    """Best parameters per group, their loss, and how many candidates were evaluated (per group)."""

    scale: Tensor  # (G,)
    zero_point: Tensor  # (G,)
    loss: Tensor  # (G,)
    evaluations: int


def quantile_rows(rows: Tensor, ps: list[float]) -> Tensor:
    """Quantiles of every row of ``rows`` (G, M) with linear interpolation (``torch.quantile`` semantics, no
    size limit). Returns (len(ps), G)."""
    rows = rows.float()
    srt = rows.sort(dim=1).values
    m = srt.shape[1]
    out = []
    for p in ps:
        pos = p * (m - 1)
        lo = int(pos)
        hi = min(lo + 1, m - 1)
        frac = pos - lo
        out.append(srt[:, lo] * (1 - frac) + srt[:, hi] * frac)
    return torch.stack(out)


def positive_quantile(x: Tensor, ps: list[float]) -> Tensor:
    """Nearest-rank quantiles of the positive entries of ``x`` (the reference ``positive_percentile``); 0 if none."""
    pos = x.detach().float().flatten()
    pos = pos[pos > 0].sort().values
    if pos.numel() == 0:
        return torch.zeros(len(ps))
    n = pos.numel()
    idx = [max(0, min(n - 1, int(torch.ceil(torch.tensor(n * p)).item()) - 1)) for p in ps]
    return pos[idx]


def uniform_grid(
    rows: Tensor, bits: int, *, eq_n: int = 128, zp_levels: int | None = None, lo: float = 0.9, hi: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The initial FPCS grid for data ``rows`` (G, M): scales (K, G), zero points (K, G) and the scale step (G,).

    ``zp_levels`` bounds the number of zero points (reference: 2^(n-1) for weights and matmul operands, 2^n for
    linear-layer inputs); K = num_zp * (eq_n // num_zp).
    """
    zp_levels = 2 ** (bits - 1) if zp_levels is None else zp_levels
    num_zp = max(1, min(16, zp_levels))
    num_scale = max(2, eq_n // num_zp)
    q = quantile_rows(rows, [lo, hi, 1 - lo, 1 - hi])  # (4, G)
    delta_min = q[0] - q[2]
    delta_max = q[1] - q[3]
    steps = torch.linspace(0, 1, num_scale)[:, None]
    scales = (delta_min + steps * (delta_max - delta_min)) / (2**bits - 1)  # (num_scale, G)
    scales = scales.repeat(num_zp, 1)  # zero point is the slow index
    centre = 2 ** (bits - 1)
    zps = torch.arange(centre - num_zp // 2, centre - num_zp // 2 + num_zp, dtype=torch.float32)
    zps = zps.repeat_interleave(num_scale)[:, None].expand_as(scales).clone()
    step = (delta_max - delta_min) / (num_scale - 1) / (2**bits - 1)
    return scales, zps, step


def _topk(loss: Tensor, k: int) -> Tensor:
    loss = torch.nan_to_num(loss, nan=float("inf"))
    return torch.topk(loss, k=min(k, loss.shape[0]), dim=0, largest=False).indices  # (k, G)


def fpcs(
    scales: Tensor,
    zero_points: Tensor,
    step: Tensor,
    evaluate: Evaluate,
    *,
    width: int = 16,
    steps: int = 6,
    eq_n: int = 128,
    min_scale: float = 1e-8,
) -> FPCSResult:
    """Progressive search from the initial grid (``uniform_grid``); see the module docstring."""
    scales = scales.clamp_min(min_scale)
    loss = evaluate(scales, zero_points)
    evaluations = scales.shape[0]
    new_per = max(1, eq_n // width)
    delta = step.clone()
    for round_ in range(1, steps):
        idx = _topk(loss, width)
        top_s, top_z = scales.gather(0, idx), zero_points.gather(0, idx)  # (k, G)
        offsets = (torch.linspace(0, 1, new_per) - 0.5)[None, :, None] * delta[None, None, :]  # (1, n, G)
        delta = delta / (new_per - 0.5)
        scales = (top_s[:, None, :] + offsets).reshape(-1, top_s.shape[1]).clamp_min(min_scale)
        zero_points = top_z.repeat_interleave(new_per, dim=0)
        loss = evaluate(scales, zero_points)
        evaluations += scales.shape[0]
    best = _topk(loss, 1)
    return FPCSResult(
        scale=scales.gather(0, best)[0],
        zero_point=zero_points.gather(0, best)[0],
        loss=loss.gather(0, best)[0],
        evaluations=evaluations,
    )


def flat_grid_search(scales: Tensor, zero_points: Tensor, evaluate: Evaluate) -> FPCSResult:
    """Evaluate every candidate once and keep the best per group (the non-FPCS reference path)."""
    loss = evaluate(scales, zero_points)
    best = _topk(loss, 1)
    return FPCSResult(scales.gather(0, best)[0], zero_points.gather(0, best)[0], loss.gather(0, best)[0],
                      scales.shape[0])


def chunked(fn: Callable[[slice], Tensor], k: int, per_candidate: int) -> Tensor:
    """Run ``fn`` on slices of the candidate axis so one chunk holds at most ``MAX_ELEMENTS`` elements; cat on 0."""
    size = max(1, MAX_ELEMENTS // max(1, per_candidate))
    return torch.cat([fn(slice(i, min(k, i + size))) for i in range(0, k, size)], dim=0)
