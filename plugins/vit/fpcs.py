"""AdaLog's Fast Progressive Combining Search (FPCS) for asymmetric uniform quantizers, on ``polyquant.search``.

As in the reference code (GoatWu/AdaLog ``weight_fpcs`` / ``activation_fpcs`` / ``_fpcs``), with candidates of
shape (K, G) and ``evaluate(scales, zero_points) -> (K, G)`` losses (lower is better, independent per group):

1. an initial grid of ``eq_n`` pairs (``polyquant.search.uniform_grid``): ``num_zp = min(16, zp_levels)`` integer
   zero points centred on 2^(n-1), times ``eq_n / num_zp`` scales spaced linearly between
   (P0.9 - P0.1) / (2^n - 1) and (P1 - P0) / (2^n - 1);
2. keep the best ``width`` (16) per group;
3. ``steps - 1`` (5) refinement rounds: around every survivor try ``eq_n / width`` (8) scales
   s + (linspace(0, 1, 8) - 0.5) * d, with d shrinking by (8 - 0.5) = 7.5 each round, zero point fixed; keep the
   best 16, and the best 1 in the last round.

That is ``steps * eq_n`` = 768 evaluations per quantizer (``SearchResult.evaluations``): the core's
``progressive_search`` with AdaLog's settings. ``positive_quantile`` is the reference's ``positive_percentile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polyquant.search import Evaluate, SearchResult, grid_search, progressive_search, quantile_rows, uniform_grid

__all__ = [
    "Evaluate",
    "SearchResult",
    "quantile_rows",
    "uniform_grid",
    "positive_quantile",
    "fpcs",
    "flat_grid_search",
]


def positive_quantile(x: Tensor, ps: list[float]) -> Tensor:
    """Nearest-rank quantiles of the positive entries of ``x`` (the reference ``positive_percentile``); 0 if none."""
    pos = x.detach().float().flatten()
    pos = pos[pos > 0].sort().values
    if pos.numel() == 0:
        return torch.zeros(len(ps))
    n = pos.numel()
    idx = [max(0, min(n - 1, int(torch.ceil(torch.tensor(n * p)).item()) - 1)) for p in ps]
    return pos[idx]


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
) -> SearchResult:
    """FPCS from the initial grid (``uniform_grid``): ``steps`` rounds, ``width`` survivors, ``eq_n // width``
    new scales per survivor (see the module docstring)."""
    return progressive_search(scales, zero_points, step, evaluate, rounds=steps, width=width,
                              new_per=max(1, eq_n // width), min_scale=min_scale)


def flat_grid_search(scales: Tensor, zero_points: Tensor, evaluate: Evaluate) -> SearchResult:
    """Evaluate every candidate once and keep the best per group (the non-FPCS ablation path)."""
    return grid_search(scales, zero_points, evaluate)
