"""Observers: collect statistics of a tensor during calibration and turn them into scale / zero point.

| observer    | statistic per block                               | qparams                                    |
|-------------|---------------------------------------------------|--------------------------------------------|
| minmax      | running min / max (or EMA with ``averaging``)     | min-max (``qparams_from_minmax``)           |
| percentile  | lower / upper percentile of each batch (EMA'd)    | min-max of the clipped range               |
| mse         | min / max plus a bounded sample of the data       | clipping ratio by grid search on the MSE   |
| abs_percentile | w <- w + m (quantile(abs(x), p) - w) per batch | symmetric range [-w, w] (Quamba)           |
| entropy     | 2048-bin histogram of abs(x), re-binned as the max grows | TensorRT's KL threshold, symmetric      |

Every observer rejects NaN / Inf in its input with a ``ValueError``, refuses a batch whose blocks differ from the
earlier batches' (per-token statistics of another batch size), and refuses to produce qparams before it has seen
data. Values up to the float32 limit (3e38) give finite statistics and scales.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .formats import Format, IntFormat, get_format
from .primitives import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    block_reduce,
    block_size_for,
    fake_quantize,
    qparams_from_minmax,
    scale_shape,
)

__all__ = ["Observer", "MinMaxObserver", "PercentileObserver", "AbsPercentileObserver", "MSEObserver",
           "EntropyObserver", "kl_threshold", "make_observer", "OBSERVERS", "quantile"]


class Observer:
    """Base class: running per-block min / max, optionally as an exponential moving average."""

    def __init__(
        self,
        fmt: Format | str,
        granularity: Granularity | Sequence[int],
        *,
        symmetric: bool = True,
        averaging: float | None = None,
        name: str = "",
    ) -> None:
        if averaging is not None and not 0.0 < averaging <= 1.0:
            raise ValueError(f"averaging must be in (0, 1], got {averaging}")
        self.fmt = get_format(fmt)
        self.granularity = granularity
        self.symmetric = symmetric
        self.averaging = averaging
        self.name = name
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None
        self.batches = 0

    def _check(self, x: Tensor) -> Tensor:
        where = f" in {self.name}" if self.name else ""
        if x.numel() == 0:
            raise ValueError(f"empty tensor observed{where}")
        if not torch.isfinite(x).all():
            raise ValueError(f"calibration data contains NaN or Inf{where}")
        return x.detach().float()

    def block_size(self, x: Tensor) -> tuple[int, ...]:
        """Blocks for this input: a Granularity is resolved against each tensor's own shape."""
        if isinstance(self.granularity, (PerTensor, PerChannel, PerGroup, PerToken)):
            return block_size_for(self.granularity, x.shape)
        return tuple(int(b) for b in self.granularity)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bs = self.block_size(x)
        return block_reduce(x, bs, "amin"), block_reduce(x, bs, "amax")

    def _batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Checked input -> this batch's per-block statistics, refused unless they match the earlier batches'."""
        lo, hi = self._stats(x)
        if self.min_val is not None and lo.shape != self.min_val.shape:
            where = f" {self.name}" if self.name else ""
            raise ValueError(
                f"observer{where}: a batch of shape {tuple(x.shape)} has blocks {tuple(lo.shape)}, the earlier "
                f"batches {tuple(self.min_val.shape)}; statistics per block need the same blocks in every batch "
                "(per-token statistics need the same batch and token counts: quantize such inputs dynamically)"
            )
        return lo, hi

    def update(self, x: Tensor) -> None:
        x = self._check(x)
        lo, hi = self._batch_stats(x)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        elif self.averaging is None:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        else:
            a = self.averaging
            self.min_val = (1 - a) * self.min_val + a * lo
            self.max_val = (1 - a) * self.max_val + a * hi
        self.batches += 1

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        if self.min_val is None or self.max_val is None:
            where = f" {self.name}" if self.name else ""
            raise ValueError(f"observer{where} has seen no data: the calibration set is empty")
        return qparams_from_minmax(self.min_val, self.max_val, self.fmt, symmetric=self.symmetric)


class MinMaxObserver(Observer):
    """Running (or EMA) min / max."""


class PercentileObserver(Observer):
    """Per-batch lower / upper percentiles of each block, merged by EMA (or plain mean when averaging=None)."""

    def __init__(
        self,
        fmt: Format | str,
        granularity: Granularity | Sequence[int],
        *,
        percentile: float = 99.99,
        symmetric: bool = True,
        averaging: float | None = None,
        name: str = "",
    ) -> None:
        super().__init__(fmt, granularity, symmetric=symmetric, averaging=averaging, name=name)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bs = self.block_size(x)
        blocks = _blocks_as_rows(x, bs)  # (num_blocks, block_numel)
        n = blocks.shape[1]
        k_hi = max(1, min(n, int(round(self.percentile / 100.0 * n))))
        k_lo = max(1, min(n, n - k_hi + 1))
        hi = blocks.kthvalue(k_hi, dim=1).values
        lo = blocks.kthvalue(k_lo, dim=1).values
        shape = scale_shape(x.shape, bs)
        return lo.reshape(shape), hi.reshape(shape)

    def update(self, x: Tensor) -> None:
        if self.averaging is not None:
            super().update(x)
            return
        # Plain running mean of per-batch percentiles (what most PTQ code does).
        x = self._check(x)
        lo, hi = self._batch_stats(x)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = _running_mean(self.min_val, lo, self.batches)
            self.max_val = _running_mean(self.max_val, hi, self.batches)
        self.batches += 1


def quantile(x: Tensor, q: float, dim: int = -1) -> Tensor:
    """``torch.quantile(x, q, dim)`` (linear interpolation between the two nearest order statistics) without
    its input-size limit: two ``kthvalue`` calls."""
    n = x.shape[dim]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = x.kthvalue(lo + 1, dim=dim).values
    v_hi = v_lo if hi == lo else x.kthvalue(hi + 1, dim=dim).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


class AbsPercentileObserver(Observer):
    """Quamba's ``PerTensorPercentileObserver``: per batch ``cur = quantile(|x|, percentile / 100)`` of each
    block, merged by the running update ``w <- w + m (cur - w)`` (``m = averaging``, 0.01 when None; the first
    batch sets ``w = cur``); qparams of the symmetric range ``[-w, w]``. Symmetric only.

    Chiang et al., "Quamba: A Post-Training Quantization Recipe for Selective State Space Models", ICLR 2025,
    arXiv 2410.13229 (alpha = 0.99999 for Mamba, i.e. ``percentile=99.999``).
    """

    def __init__(
        self,
        fmt: Format | str,
        granularity: Granularity | Sequence[int],
        *,
        percentile: float = 99.999,
        symmetric: bool = True,
        averaging: float | None = None,
        name: str = "",
    ) -> None:
        if not symmetric:
            raise ValueError("abs_percentile clips |x|: it is a symmetric observer (use 'percentile' for ranges)")
        super().__init__(fmt, granularity, symmetric=True, averaging=0.01 if averaging is None else averaging,
                         name=name)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bs = self.block_size(x)
        cur = quantile(_blocks_as_rows(x, bs).abs(), self.percentile / 100.0, dim=1)  # (num_blocks,)
        cur = cur.reshape(scale_shape(x.shape, bs))
        return -cur, cur


class MSEObserver(Observer):
    """Grid search over clipping ratios: pick, per block, the ratio whose fake-quant MSE is lowest.

    Keeps at most ``max_samples`` elements per block (a uniform subsample of every batch) for the search.
    """

    def __init__(
        self,
        fmt: Format | str,
        granularity: Granularity | Sequence[int],
        *,
        symmetric: bool = True,
        averaging: float | None = None,
        grid: int = 100,
        min_ratio: float = 0.01,
        norm: float = 2.0,
        max_samples: int = 4096,
        name: str = "",
    ) -> None:
        super().__init__(fmt, granularity, symmetric=symmetric, averaging=averaging, name=name)
        if grid < 1 or not 0.0 < min_ratio <= 1.0:
            raise ValueError("MSEObserver: grid must be >= 1 and min_ratio in (0, 1]")
        self.grid = grid
        self.min_ratio = min_ratio
        self.norm = norm
        self.max_samples = max_samples
        self._samples: list[Tensor] = []
        self._sample_count = 0

    def update(self, x: Tensor) -> None:
        super().update(x)
        rows = _blocks_as_rows(x.detach().float(), self.block_size(x))  # (num_blocks, block_numel)
        budget = self.max_samples - self._sample_count
        if budget <= 0:
            return
        if rows.shape[1] > budget:
            gen = torch.Generator().manual_seed(self.batches)
            idx = torch.randperm(rows.shape[1], generator=gen)[:budget]
            rows = rows[:, idx]
        self._samples.append(rows)
        self._sample_count += rows.shape[1]

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        scale, zp = super().calculate_qparams()
        assert self.min_val is not None and self.max_val is not None
        data = torch.cat(self._samples, dim=1)  # (num_blocks, samples)
        nb = data.shape[0]
        best_err = torch.full((nb,), float("inf"))
        best_scale, best_zp = scale.reshape(nb).clone(), zp.reshape(nb).clone()
        lo, hi = self.min_val.reshape(nb), self.max_val.reshape(nb)
        ratios = torch.linspace(1.0, self.min_ratio, self.grid).tolist()
        # the grid in chunks of ratios at once (rows ratio-major), at most ~4M elements each
        chunk = max(1, min(len(ratios), (1 << 22) // max(1, data.numel())))
        for start in range(0, len(ratios), chunk):
            r = torch.tensor(ratios[start:start + chunk]).reshape(-1, 1)  # (g, 1)
            g = r.shape[0]
            s, z = qparams_from_minmax((lo * r).reshape(-1), (hi * r).reshape(-1), self.fmt, symmetric=self.symmetric)
            s, z = s.reshape(g * nb, 1), z.reshape(g * nb, 1)
            zq = z if self.fmt.supports_zero_point else None
            rows = data.repeat(g, 1)  # (g * nb, samples)
            xq = fake_quantize(rows, self.fmt, s, zq, (1, data.shape[1]))
            errs = (xq - rows).abs().pow(self.norm).mean(dim=1).reshape(g, nb)
            s, z = s.reshape(g, nb), z.reshape(g, nb)
            for i in range(g):  # in grid order: the first ratio of the lowest error wins, as one at a time
                better = errs[i] < best_err
                best_err = torch.where(better, errs[i], best_err)
                best_scale = torch.where(better, s[i], best_scale)
                best_zp = torch.where(better, z[i], best_zp)
        return best_scale.reshape(scale.shape), best_zp.reshape(zp.shape)


def _running_mean(mean: Tensor, new: Tensor, n: int) -> Tensor:
    """(mean * n + new) / (n + 1); where mean * n overflows float32 (3e38 statistics), mean * n / (n + 1) +
    new / (n + 1) instead (the same bits everywhere else)."""
    out = (mean * n + new) / (n + 1)
    return torch.where(torch.isfinite(out), out, mean * (n / (n + 1)) + new / (n + 1))


def _blocks_as_rows(x: Tensor, block_size: Sequence[int]) -> Tensor:
    """(num_blocks, block_numel): each row holds one block's elements."""
    shape = scale_shape(x.shape, block_size)
    ndim = x.dim()
    view: list[int] = []
    for s, b in zip(x.shape, block_size):
        view += [s // b, b]
    perm = [2 * i for i in range(ndim)] + [2 * i + 1 for i in range(ndim)]
    num_blocks = 1
    for s in shape:
        num_blocks *= s
    return x.reshape(view).permute(perm).reshape(num_blocks, -1)


def _smooth(p: Any, eps: float = 1e-4) -> Any:  # numpy arrays (numpy is imported lazily)
    """Move ``eps`` onto every empty bin of counts ``p``, taken evenly from the non-empty ones (MXNet's
    ``_smooth_distribution``)."""
    zeros = p == 0
    n_zero = int(zeros.sum())
    return p + eps * zeros - (eps * n_zero / (p.size - n_zero)) * ~zeros


def kl_threshold(hist: Tensor, levels: int) -> int:
    """TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017; as MXNet's
    ``_get_optimal_threshold`` writes it) on a histogram of |x| (``hist`` (B,) counts over [0, max), equal bins):
    the bin count i in [levels, B] whose reference P (bins 0..i-1, the outliers of bins i.. added to bin i-1) is
    closest in KL divergence to Q, the bins 0..i-1 merged into ``levels`` groups (i // levels bins each, the last
    taking the remainder) and spread evenly back over the bins where P is non-zero, both smoothed (``_smooth``).
    The threshold is then (i + 0.5) bin widths (``EntropyObserver``). Returns B for a histogram no longer than
    ``levels`` or without counts."""
    import numpy as np

    h = hist.double().cpu().numpy()
    n = h.size
    if n <= levels or h.sum() == 0:
        return n
    tail = np.cumsum(h[::-1])[::-1]  # tail[i] = sum(h[i:])
    best_i, best_kl = n, math.inf
    for i in range(levels, n + 1):
        p = h[:i].copy()
        if i < n:
            p[i - 1] += tail[i]
        nz = p != 0
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        sums = np.bincount(group, weights=h[:i], minlength=levels)
        counts = np.bincount(group, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, sums[group] / np.maximum(counts[group], 1), 0.0)
        if q.sum() == 0:
            continue
        ps, qs = _smooth(p), _smooth(q)  # on counts, as MXNet (eps is 1e-4 of one count)
        ps, qs = ps / ps.sum(), qs / qs.sum()
        kl = float((ps * np.log(ps / qs)).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


class EntropyObserver(Observer):
    """TensorRT's entropy (KL) calibration, symmetric and per tensor, for integer formats: a ``bins``-bin histogram
    of |x| over [0, running max |x|] (an earlier histogram is re-binned by its bin centres when the max grows), and
    the clipping threshold T = (i + 0.5) * bin width of ``kl_threshold`` with 2^(bits - 1) levels (128 for int8).
    Zeros count in the histogram as TensorRT counts them: on a mostly empty feature map (LiDAR BEV) they pull the
    threshold down, the failure LiDAR-PTQ describes."""

    def __init__(
        self,
        fmt: Format | str,
        granularity: Granularity | Sequence[int],
        *,
        symmetric: bool = True,
        averaging: float | None = None,
        bins: int = 2048,
        name: str = "",
    ) -> None:
        super().__init__(fmt, granularity, symmetric=symmetric, averaging=averaging, name=name)
        if not symmetric or averaging is not None:
            raise ValueError("entropy calibration is symmetric with a running histogram (no averaging)")
        if not isinstance(self.fmt, IntFormat) or not self.fmt.signed:
            raise ValueError(f"entropy calibration needs a signed integer format, got {self.fmt.name}")
        if not isinstance(granularity, PerTensor):
            raise ValueError("entropy calibration is per tensor")
        self.bins = bins
        self.levels = 2 ** (self.fmt.bits - 1)
        if bins < self.levels:
            raise ValueError(f"entropy calibration needs at least {self.levels} bins, got {bins}")
        self.hist: Tensor | None = None
        self.range = 0.0

    def update(self, x: Tensor) -> None:
        super().update(x)
        a = x.detach().float().abs().flatten()
        top = float(a.max())
        if self.hist is None:
            self.range = top if top > 0 else 1.0
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        elif top > self.range:  # re-bin the old counts by their bin centres onto the wider range
            centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.range / self.bins)
            idx = (centres / (top / self.bins)).floor().long().clamp(max=self.bins - 1)
            self.hist = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.hist)
            self.range = top
        self.hist += torch.histc(a, self.bins, 0.0, self.range).double()

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        if self.hist is None or self.min_val is None:
            where = f" {self.name}" if self.name else ""
            raise ValueError(f"observer{where} has seen no data: the calibration set is empty")
        i = kl_threshold(self.hist, self.levels)
        t = min((i + 0.5) * self.range / self.bins, self.range) if i < self.bins else self.range
        t = max(t, 1e-30)
        return qparams_from_minmax(torch.tensor(-t).reshape(self.min_val.shape),
                                   torch.tensor(t).reshape(self.max_val.shape), self.fmt, symmetric=True)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "abs_percentile": AbsPercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(
    kind: str,
    fmt: Format | str,
    granularity: Granularity | Sequence[int],
    *,
    symmetric: bool = True,
    averaging: float | None = None,
    percentile: float = 99.99,
    name: str = "",
) -> Observer:
    """Build an observer by name ('minmax', 'percentile', 'abs_percentile', 'mse' or 'entropy')."""
    if kind == "minmax":
        return MinMaxObserver(fmt, granularity, symmetric=symmetric, averaging=averaging, name=name)
    if kind == "percentile":
        return PercentileObserver(
            fmt, granularity, percentile=percentile, symmetric=symmetric, averaging=averaging, name=name
        )
    if kind == "abs_percentile":
        return AbsPercentileObserver(fmt, granularity, percentile=percentile, symmetric=symmetric,
                                     averaging=averaging, name=name)
    if kind == "mse":
        return MSEObserver(fmt, granularity, symmetric=symmetric, averaging=averaging, name=name)
    if kind == "entropy":
        return EntropyObserver(fmt, granularity, symmetric=symmetric, averaging=averaging, name=name)
    raise ValueError(f"unknown observer {kind!r}; choose from {sorted(OBSERVERS)}")

