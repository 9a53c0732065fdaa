"""Vector quantization: seeded (batched) k-means and VQ / RVQ / GRVQ / product VQ modules.

Every quantizer maps ``(..., dim)`` vectors to integer codes and back:

    encode(x) -> codes          decode(codes) -> x_hat          fit(x)  (offline, k-means)
    forward(x) -> (x_hat with a straight-through gradient, codes, commitment loss)   (training, EMA codebooks)

| quantizer            | codes shape                          | codebooks                                   |
|----------------------|--------------------------------------|---------------------------------------------|
| VectorQuantizer      | (...,)                               | one (K, dim)                                |
| FactorizedVQ         | (...,)                               | one (K, code_dim) behind projections (DAC)   |
| ResidualVQ           | (..., num_quantizers)                | one per stage, each on the previous residual |
| GroupedVQ            | (..., groups, *inner codes)          | any quantizer per slice of dim / groups      |
| GroupedResidualVQ    | (..., groups, num_quantizers)        | GroupedVQ of one RVQ per slice               |
| ProductVQ            | (..., num_subvectors)                | GroupedVQ of one VQ per slice                |

Codebooks are buffers updated by exponential moving averages of assigned counts and sums (EnCodec-style), or, with
``CodebookOptions(ema=False)``, Parameters learned by gradient through a codebook loss (HiFi-Codec / DAC-style).
k-means, ``fit``, ``set_codebook`` and training forwards refuse NaN / Inf vectors (one would poison a codebook row).
``decode`` refuses codes outside [0, K) (ResidualVQ: [-1, K), -1 = a skipped stage), non-integer codes and codes of
the wrong shape with a ``ValueError`` (one reduction over the codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import checking_values

__all__ = [
    "kmeans",
    "residual_kmeans",
    "nearest_codes",
    "batched_kmeans",
    "check_codes",
    "CodebookOptions",
    "CODEBOOK_PRESETS",
    "VectorQuantizer",
    "FactorizedVQ",
    "ResidualVQ",
    "GroupedVQ",
    "GroupedResidualVQ",
    "ProductVQ",
    "train_codebooks",
]

# Elements of one (B, rows, K) distance block when batch_size is not given.
_DIST_BLOCK = 1 << 24


# ---------------------------------------------------------------------------------------------------------------------
# k-means


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_finite(x: Tensor, what: str) -> None:
    """Refuse NaN / Inf: one such vector would make a centroid or an EMA codebook row NaN for good."""
    bad = int((~torch.isfinite(x)).any(dim=-1).sum()) if x.numel() else 0
    if bad:
        raise ValueError(f"{what}: {bad} vectors contain NaN or Inf; clean the data before training the codebook")


def check_codes(codes: Tensor, lo: int, k: int, what: str) -> None:
    """``ValueError`` unless ``codes`` are integers in [lo, k): one reduction. (-2 wrapped or was read as a skipped
    stage, and K an IndexError, before.)"""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"{what}: codes must be integers, got {codes.dtype}")
    if codes.numel() and checking_values():
        mn, mx = torch.aminmax(codes)
        if not bool((mn >= lo) & (mx < k)):
            raise ValueError(f"{what}: codes must lie in [{lo}, {k}), got values in [{int(mn)}, {int(mx)}]")


def _block_rows(b: int, k: int, batch_size: int | None) -> int:
    return batch_size if batch_size is not None else max(1, _DIST_BLOCK // max(1, b * k))


def nearest_codes(x: Tensor, c: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest row of ``c`` for each row of ``x``, a block of rows at a time.

    x: (B, N, D), c: (B, K, D) -> codes (B, N) int64, dist2 (B, N).
    """
    b, n, _ = x.shape
    rows = _block_rows(b, c.shape[1], batch_size)
    c_sq = c.pow(2).sum(-1)  # (B, K)
    codes = torch.empty(b, n, dtype=torch.int64, device=x.device)
    dist2 = torch.empty(b, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        xs = x[:, start : start + rows]  # (B, r, D)
        d = torch.baddbmm(c_sq[:, None, :], xs, c.transpose(1, 2), alpha=-2.0)  # (B, r, K) = |c|^2 - 2 x.c
        d_min, idx = d.min(dim=-1)
        codes[:, start : start + rows] = idx
        dist2[:, start : start + rows] = (d_min + xs.pow(2).sum(-1)).clamp_min(0)
    return codes, dist2


def _exact_scatter(x: Tensor) -> bool:
    """Whether scatter-add of x's dtype on x's device is reproducible (CPU: yes; CUDA: float atomics, no)."""
    return x.device.type == "cpu"


def _cluster_stats(x: Tensor, codes: Tensor, k: int, batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Per-cluster sums (B, K, D) and counts (B, K) of x (B, N, D) under codes (B, N), bitwise reproducible.

    On CPU a scatter-add; on accelerators scatter-add uses float atomics (run-to-run differences), so the sums are
    a one-hot matmul in float64 instead, a block of rows at a time.
    """
    b, n, d = x.shape
    counts = torch.zeros(b, k, dtype=torch.int64, device=x.device).scatter_add_(1, codes, torch.ones_like(codes))
    if _exact_scatter(x):
        sums = torch.zeros(b, k, d, dtype=x.dtype, device=x.device)
        return sums.scatter_add_(1, codes[..., None].expand(-1, -1, d), x), counts
    sums64 = torch.zeros(b, k, d, dtype=torch.float64, device=x.device)
    rows = _block_rows(b, k, batch_size)
    for start in range(0, n, rows):
        onehot = F.one_hot(codes[:, start : start + rows], k).to(torch.float64)  # (B, r, K)
        sums64 += onehot.transpose(1, 2) @ x[:, start : start + rows].double()
    return sums64.to(x.dtype), counts


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) for each of the B groups: (B, N, D) -> (B, k, D)."""
    b, n, d = x.shape
    groups = torch.arange(b, device=x.device)
    centers = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    first = torch.randint(0, n, (b,), generator=g, device=x.device)
    centers[:, 0] = x[groups, first]
    dist2 = (x - centers[:, :1]).pow(2).sum(-1)  # (B, N)
    for i in range(1, k):
        weights = torch.where(dist2.sum(1, keepdim=True) > 0, dist2, torch.ones_like(dist2))  # all taken: uniform
        # argmin E_j / w_j with E_j ~ Exp(1) picks j with probability w_j / sum(w): exact, and no float cumsum
        # (whose CUDA scan is not bitwise reproducible).
        race = torch.empty_like(weights).exponential_(generator=g) / weights
        race = torch.where(weights > 0, race, torch.inf)  # a point already taken is never picked again
        idx = race.argmin(dim=1)
        centers[:, i] = x[groups, idx]
        dist2 = torch.minimum(dist2, (x - centers[:, i : i + 1]).pow(2).sum(-1))
    return centers


def _update_centroids(
    x: Tensor, codes: Tensor, dist2: Tensor, centers: Tensor, batch_size: int | None = None
) -> Tensor:
    """Means of the assigned points; an empty cluster is re-seeded at the farthest points from their centroids."""
    b, n, d = x.shape
    k = centers.shape[1]
    sums, counts = _cluster_stats(x, codes, k, batch_size)
    new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None].to(x.dtype), centers)
    empty = counts == 0  # (B, K)
    if bool(empty.any()):
        far = dist2.topk(min(k, n), dim=1).indices  # (B, k') farthest points first
        rank = (empty.long().cumsum(1) - 1).clamp(0, far.shape[1] - 1)  # i-th empty cluster -> i-th farthest point
        idx = far.gather(1, rank)  # (B, K)
        new = torch.where(empty[..., None], x.gather(1, idx[..., None].expand(-1, -1, d)), new)
    return new


@torch.no_grad()
def batched_kmeans(
    x: Tensor, k: int, *, iters: int = 20, seed: int = 0, batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Independent k-means on each of B groups at once (Lloyd's algorithm with k-means++ seeding).

    Args:
        x: (B, N, D) points; B independent problems.
        k: clusters per group. If a group has fewer than k distinct points, some centroids coincide.
        iters: maximum Lloyd iterations (stops early when no assignment changes).
        seed: seeds the k-means++ sampling; same seed and input give the same result on the same device.
        batch_size: rows of x per distance block (bounds memory at B * batch_size * k); None picks one.

    Returns:
        centroids (B, k, D) in x's dtype, codes (B, N) int64: the nearest centroid of every point.
    """
    if x.dim() != 3:
        raise ValueError(f"batched_kmeans expects x of shape (B, N, D), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"kmeans needs floating-point data, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("kmeans needs at least one point (N = 0)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_finite(x, "kmeans")
    xw = x.to(_work_dtype(x))
    mean = xw.mean(dim=1, keepdim=True)  # (B, 1, D) centering keeps |x|^2 - 2 x.c + |c|^2 accurate far from 0
    xw = xw - mean
    g = torch.Generator(device=x.device).manual_seed(seed)
    centers = _kmeans_pp(xw, k, g)
    codes, dist2 = nearest_codes(xw, centers, batch_size)
    for _ in range(iters):
        centers = _update_centroids(xw, codes, dist2, centers, batch_size)
        new_codes, dist2 = nearest_codes(xw, centers, batch_size)
        converged = torch.equal(new_codes, codes)
        codes = new_codes
        if converged:
            break
    return (centers + mean).to(x.dtype), codes


def kmeans(
    x: Tensor, k: int, *, iters: int = 20, seed: int = 0, batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Seeded k-means of (N, D) points -> centroids (k, D), codes (N,). See ``batched_kmeans`` for the arguments."""
    if x.dim() != 2:
        raise ValueError(f"kmeans expects x of shape (N, D), got {tuple(x.shape)}")
    centers, codes = batched_kmeans(x[None], k, iters=iters, seed=seed, batch_size=batch_size)
    return centers[0], codes[0]


def residual_kmeans(
    x: Tensor, codebook_size: int, *, levels: int = 1, iters: int = 20, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Residual k-means of (M, d) vectors (offline RVQ, as RVQ codecs and VQ weight compression fit it): level r
    runs ``kmeans`` (seed + r) on the residual the levels before it leave, then the codes are the greedy nearest
    codeword of each level on that residual (what ``polyquant.kernels.rvq_assign`` computes).

    Returns codes (M, levels) int64 and codebooks (levels, codebook_size, d) float32.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"residual_kmeans expects (M, d) vectors with M >= 1, got {tuple(x.shape)}")
    if not 1 <= codebook_size <= x.shape[0]:
        raise ValueError(f"codebook_size must be in [1, {x.shape[0]}] (the number of vectors), got {codebook_size}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    _check_finite(x, "residual_kmeans input")
    residual = x.detach().float()
    codes, books = [], []
    for level in range(levels):
        centers, _ = kmeans(residual, codebook_size, iters=iters, seed=seed + level)
        idx, _ = nearest_codes(residual[None], centers[None])
        codes.append(idx[0])
        books.append(centers)
        residual = residual - centers[idx[0]]
    return torch.stack(codes, dim=1), torch.stack(books)


# ---------------------------------------------------------------------------------------------------------------------
# Vector quantizer


@dataclass(frozen=True)
class CodebookOptions:
    """How a ``VectorQuantizer``'s codebook learns and searches (the references differ; see ``CODEBOOK_PRESETS``).

    Args:
        ema: update the codebook by exponential moving averages of assigned counts and sums (EnCodec, SoundStream);
            False: the codebook is a Parameter learned by gradient through ``codebook_weight`` (HiFi-Codec, DAC).
        laplace_smoothing: EMA counts smoothed as EnCodec's ``(n_k + eps) / (sum n + K eps) * sum n`` before the
            division (else floored at ``eps``).
        codebook_weight: weight of the codebook loss ``|sg(z) - e|^2`` (only with ``ema=False``).
        cosine: nearest neighbour by cosine (L2-normalized vectors and codes; DAC); the lookup returns the raw code.
        init: initial codebook when k-means init is off: "randn" (N(0, 1)) or "uniform" (U(-1/K, 1/K), the
            ``nn.Embedding`` init of HiFi-Codec).
    """

    ema: bool = True
    laplace_smoothing: bool = False
    codebook_weight: float = 0.0
    cosine: bool = False
    init: str = "randn"

    def __post_init__(self) -> None:
        if self.init not in ("randn", "uniform"):
            raise ValueError(f"init must be 'randn' or 'uniform', got {self.init!r}")
        if self.codebook_weight < 0 or (self.ema and self.codebook_weight):
            raise ValueError("codebook_weight must be >= 0 and needs ema=False (an EMA codebook is not learned by "
                             "gradient)")


# The references' settings (with the VectorQuantizer arguments they go with, see the audio plugin's presets):
# EnCodec: EMA 0.99 + Laplace smoothing, k-means init, dead-code threshold 2, commitment 1;
# HiFi-Codec: learned codebook (codebook loss 1, commitment 0.25), U(+-1/K) init, no k-means, no restart;
# DAC: learned codebook (1, 0.25) searched by cosine in a factorized (8-d) space.
CODEBOOK_PRESETS: dict[str, CodebookOptions] = {
    "encodec": CodebookOptions(ema=True, laplace_smoothing=True),
    "hificodec": CodebookOptions(ema=False, codebook_weight=1.0, init="uniform"),
    "dac": CodebookOptions(ema=False, codebook_weight=1.0, cosine=True),
}


class VectorQuantizer(nn.Module):
    """VQ with EMA codebook (van den Oord et al. 2017, "Neural Discrete Representation Learning")."""

    code_dims = 0  # codes (...,): no code axis of its own (see GroupedVQ)

    embed: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    initted: Tensor

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_dead_code: float = 0.0,
        eps: float = 1e-5,
        seed: int = 0,
        options: CodebookOptions | None = None,
    ) -> None:
        """
        Args:
            dim: vector size D.
            codebook_size: number of codes K.
            decay: EMA decay ``g`` of the codebook statistics, in [0, 1). Per training batch, with ``c_k`` the
                number and ``s_k`` the sum of vectors assigned to code k: ``n_k = g n_k + (1 - g) c_k``,
                ``m_k = g m_k + (1 - g) s_k``, ``e_k = m_k / n_k``. A code starts with ``n_k = 1, m_k = e_k``, so an
                unused code stays where it is (both decay together) instead of collapsing to zero.
            commitment_weight: weight of ``|x - sg(q)|^2`` in the returned loss.
            kmeans_init: initialize the codebook by k-means on the first training batch (else seeded randn).
            kmeans_iters: Lloyd iterations for that initialization and for ``fit``.
            threshold_dead_code: codes whose EMA count falls below this are restarted at random batch vectors
                (0 disables).
            eps: floor of the EMA counts in the division.
            seed: seeds the initial codebook, k-means and dead-code sampling.
            options: EMA or learned codebook, Laplace smoothing, cosine search, init (``CodebookOptions``; default:
                EMA, no smoothing, Euclidean, randn).
        """
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise ValueError(f"dim and codebook_size must be >= 1, got dim={dim}, codebook_size={codebook_size}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if threshold_dead_code < 0:
            raise ValueError(f"threshold_dead_code must be >= 0, got {threshold_dead_code}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_dead_code = threshold_dead_code
        self.eps = eps
        self.seed = seed
        self.options = options if options is not None else CodebookOptions()
        self._generator = torch.Generator().manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        if self.options.init == "uniform":
            init = (torch.rand(codebook_size, dim, generator=g) * 2 - 1) / codebook_size
        else:
            init = torch.randn(codebook_size, dim, generator=g)
        if self.options.ema:
            self.register_buffer("embed", init)  # (K, D) the codebook
        else:
            self.embed = nn.Parameter(init)  # (K, D), learned by gradient
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,) EMA of assigned counts
        self.register_buffer("embed_sum", init.clone())  # (K, D) EMA of assigned sums
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> Tensor:
        return self.embed

    @torch.no_grad()
    def set_codebook(self, codebook: Tensor, counts: Tensor | None = None) -> None:
        """Replace the codebook and reset the EMA state: each code starts with a prior count of 1 at its value, or
        ``counts`` (K,) (e.g. its k-means cluster size, as EnCodec's init): then ``embed_sum = codebook * counts``,
        so the code stays where it is until the data moves it, and a code with a small count is restarted first."""
        if codebook.shape != (self.codebook_size, self.dim):
            expected = (self.codebook_size, self.dim)
            raise ValueError(f"codebook must have shape {expected}, got {tuple(codebook.shape)}")
        _check_finite(codebook, "codebook")
        self.embed.copy_(codebook)
        if counts is None:
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(codebook)
        else:
            if counts.shape != (self.codebook_size,) or bool((counts < 0).any()):
                raise ValueError(f"counts must be ({self.codebook_size},) and >= 0, got {tuple(counts.shape)}")
            self.cluster_size.copy_(counts)
            self.embed_sum.copy_(codebook * counts.to(codebook.dtype)[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def fit(self, x: Tensor, *, iters: int | None = None) -> VectorQuantizer:
        """Set the codebook to the k-means centroids of ``x`` (..., dim) and the EMA counts to their cluster sizes
        (EnCodec's ``init_embed_``: dead-code restart then first replaces the codes k-means left (nearly) empty);
        returns self."""
        flat = self._flatten(x)
        iters = self.kmeans_iters if iters is None else iters
        centers, codes = kmeans(flat.to(self.embed.dtype), self.codebook_size, iters=iters, seed=self.seed)
        counts = torch.bincount(codes, minlength=self.codebook_size).to(centers.dtype)
        self.set_codebook(centers, counts)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Nearest code of each vector: (..., dim) -> (...,) int64."""
        flat = self._flatten(x).to(self.embed.dtype)
        book = self.embed.detach()
        if self.options.cosine:  # DAC: search on the unit sphere, return the raw code
            flat, book = F.normalize(flat, dim=-1), F.normalize(book, dim=-1)
        codes, _ = nearest_codes(flat[None], book[None], None)
        return codes[0].view(x.shape[:-1])

    def decode(self, codes: Tensor) -> Tensor:
        """Codebook vectors of ``codes``: (...,) integers in [0, codebook_size) -> (..., dim)."""
        check_codes(codes, 0, self.codebook_size, "VectorQuantizer.decode")
        return self._lookup(codes)

    def _lookup(self, codes: Tensor) -> Tensor:
        """``decode`` without the check, for codes this quantizer made."""
        return F.embedding(codes.long(), self.embed)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``x`` (..., dim); in training mode also update the codebook. Returns (x_hat, codes, loss)."""
        flat = self._flatten(x)  # (N, D)
        if self.training:
            _check_finite(flat.detach(), "VQ training batch")
        if self.training and not bool(self.initted):
            self.fit(flat)
        codes = self.encode(flat)  # (N,)
        q = self._lookup(codes).to(x.dtype)  # (N, D); carries the codebook's gradient when it is learned
        if self.training:
            self._ema_update(flat.detach(), codes)
        if flat.numel():
            loss = self.commitment_weight * F.mse_loss(flat, q.detach())
            if self.options.codebook_weight:
                loss = loss + self.options.codebook_weight * F.mse_loss(q, flat.detach())
        else:
            loss = flat.sum()
        x_hat = flat + (q - flat).detach()  # straight-through estimator
        return x_hat.view(x.shape), codes.view(x.shape[:-1]), loss

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, codes: Tensor) -> None:
        flat = flat.to(self.embed.dtype)
        sums, counts = _cluster_stats(flat[None], codes[None], self.codebook_size, None)
        sums, counts = sums[0], counts[0].to(self.embed.dtype)  # (K, D), (K,)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)  # also tracked for a learned codebook
        if self.options.ema:
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            if self.options.laplace_smoothing:  # EnCodec: (n_k + eps) / (sum n + K eps) * sum n
                total = self.cluster_size.sum()
                smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            else:
                smoothed = self.cluster_size.clamp_min(self.eps)
            self.embed.copy_(self.embed_sum / smoothed[:, None])
        if self.threshold_dead_code > 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor) -> None:
        """Codes whose EMA count fell below the threshold move to distinct random vectors of the batch (at most one
        per vector: with more dead codes than vectors, a random subset now, the rest at later batches) and restart
        with the count at the threshold (vector-quantize-pytorch's ``reset_cluster_size``), so a restarted code is
        not expired again before it had a batch to win vectors."""
        dead = (self.cluster_size < self.threshold_dead_code).nonzero().squeeze(1)
        n = flat.shape[0]
        if dead.numel() == 0 or n == 0:
            return
        if dead.numel() > n:
            dead = dead[torch.randperm(dead.numel(), generator=self._generator)[:n].to(dead.device)]
        pick = torch.randperm(n, generator=self._generator)[: dead.numel()].to(flat.device)
        count = max(self.threshold_dead_code, 1.0)
        self.embed[dead] = flat[pick].to(self.embed.dtype)
        self.embed_sum[dead] = flat[pick].to(self.embed.dtype) * count
        self.cluster_size[dead] = count

    def _flatten(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim} in the last dim, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, decay={self.decay}"


class FactorizedVQ(nn.Module):
    """DAC's factorized codes (Kumar et al. 2023, "High-Fidelity Audio Compression with Improved RVQGAN"; code
    descriptinc/descript-audio-codec ``dac/nn/quantize.py``): a weight-normalized projection dim -> code_dim, a
    ``VectorQuantizer`` there (default ``CODEBOOK_PRESETS["dac"]``: a learned codebook searched by cosine, codebook
    loss 1 and commitment 0.25 on the projected vectors) and a weight-normalized projection back. The lookup returns
    the raw (unnormalized) code, projected up. Codes (...,) as a ``VectorQuantizer``'s."""

    code_dims = 0

    def __init__(
        self,
        *,
        dim: int,
        code_dim: int,
        codebook_size: int,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_dead_code: float = 0.0,
        decay: float = 0.99,
        seed: int = 0,
        options: CodebookOptions | None = None,
    ) -> None:
        """``code_dim``: the projected size (DAC: 8). Other arguments: as ``VectorQuantizer`` (on the projections)."""
        super().__init__()
        if code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {code_dim}")
        self.dim, self.code_dim, self.codebook_size = dim, code_dim, codebook_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.in_proj = nn.utils.parametrizations.weight_norm(nn.Linear(dim, code_dim))
            self.out_proj = nn.utils.parametrizations.weight_norm(nn.Linear(code_dim, dim))
        self.vq = VectorQuantizer(
            dim=code_dim, codebook_size=codebook_size, decay=decay, commitment_weight=commitment_weight,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, threshold_dead_code=threshold_dead_code, seed=seed,
            options=options if options is not None else CODEBOOK_PRESETS["dac"])

    @property
    def embed(self) -> Tensor:
        """The (K, code_dim) codebook, in the projected space."""
        return self.vq.embed

    @torch.no_grad()
    def fit(self, x: Tensor, *, iters: int | None = None) -> "FactorizedVQ":
        """k-means of the projected vectors of ``x`` (..., dim); returns self."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim} in the last dim, got shape {tuple(x.shape)}")
        self.vq.fit(self.in_proj(x.reshape(-1, self.dim)), iters=iters)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(..., dim) -> codes (...,): nearest code of the projection (by cosine with the DAC preset)."""
        return self.vq.encode(self.in_proj(x))

    def _lookup(self, codes: Tensor) -> Tensor:
        return self.out_proj(self.vq._lookup(codes))

    def decode(self, codes: Tensor) -> Tensor:
        """codes (...,) in [0, K) -> out_proj(raw code) (..., dim)."""
        check_codes(codes, 0, self.codebook_size, "FactorizedVQ.decode")
        return self._lookup(codes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(out_proj(z_e + sg(e - z_e)): gradients reach both projections, codes, the projected-space loss)."""
        z_q, codes, loss = self.vq(self.in_proj(x))
        return self.out_proj(z_q), codes, loss

    def extra_repr(self) -> str:
        return f"dim={self.dim}, code_dim={self.code_dim}, codebook_size={self.codebook_size}"


# ---------------------------------------------------------------------------------------------------------------------
# Residual VQ


class ResidualVQ(nn.Module):
    """Residual VQ: each stage quantizes the previous stages' error (Zeghidour et al. 2021, "SoundStream")."""

    code_dims = 1  # codes (..., n): one axis of stages (see GroupedVQ)

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantizer_dropout: bool = False,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_dead_code: float = 0.0,
        seed: int = 0,
        options: CodebookOptions | None = None,
        encodec_residual: bool = False,
        factorized_dim: int | None = None,
    ) -> None:
        """
        Args:
            num_quantizers: number of stages n_q.
            quantizer_dropout: in training, use only the first n ~ U{1..n_q} stages per forward (codes of the
                dropped stages are -1), so that fewer stages still decode well (SoundStream's bitrate scalability).
            encodec_residual: reproduce EnCodec's residual (``residual - quantized`` with the straight-through output,
                encodec issue #25): the next stage's residual carries no gradient, so only the first stage's
                commitment loss trains the encoder. Off: the residual subtracts the detached code, so every stage's
                commitment loss reaches the input (vector-quantize-pytorch's fix #33).
            factorized_dim: DAC's stages: each a ``FactorizedVQ`` with codes in this many dims (DAC: 8; ``options``
                default ``CODEBOOK_PRESETS["dac"]``). The output is then the sum of the stages' outputs and the
                residual subtracts them undetached (DAC's ``ResidualVectorQuantize``, issue #107), so the
                projections and codebooks train through the codec's loss; ``encodec_residual`` does not apply.
            Other arguments: as ``VectorQuantizer`` (stage i uses seed + i).
        """
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.quantizer_dropout = quantizer_dropout
        self.encodec_residual = encodec_residual
        self.factorized_dim = factorized_dim
        self._generator = torch.Generator().manual_seed(seed)
        stage: dict[str, Any] = dict(codebook_size=codebook_size, decay=decay, commitment_weight=commitment_weight,
                                     kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                                     threshold_dead_code=threshold_dead_code, options=options)
        if factorized_dim is not None:
            self.layers = nn.ModuleList(FactorizedVQ(dim=dim, code_dim=factorized_dim, seed=seed + i, **stage)
                                        for i in range(num_quantizers))
        else:
            self.layers = nn.ModuleList(VectorQuantizer(dim=dim, seed=seed + i, **stage)
                                        for i in range(num_quantizers))

    @property
    def codebooks(self) -> Tensor:
        """The stages' codebooks stacked (num_quantizers, K, dim): what ``polyquant.kernels.rvq_assign`` /
        ``rvq_decode`` take (Euclidean search; a cosine-searched codebook needs its normalized copy). Factorized
        stages have no codebook in the input space: ``ValueError``."""
        if self.factorized_dim is not None:
            raise ValueError("factorized (DAC) stages search projected codes: no stacked codebooks in the input space")
        return torch.stack([layer.embed.detach() for layer in self.layers])

    @torch.no_grad()
    def fit(self, x: Tensor, *, iters: int | None = None) -> ResidualVQ:
        """Greedy stage-wise k-means on the residuals of ``x`` (..., dim); returns self."""
        residual = x.reshape(-1, self.dim)
        for layer in self.layers:
            layer.fit(residual, iters=iters)
            residual = residual - layer._lookup(layer.encode(residual)).to(residual.dtype)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor, *, num_quantizers: int | None = None) -> Tensor:
        """Codes of the first ``num_quantizers`` stages (default all): (..., dim) -> (..., n)."""
        n = self._check_n(num_quantizers)
        residual = x
        codes = []
        for layer in self.layers[:n]:
            c = layer.encode(residual)
            residual = residual - layer._lookup(c).to(residual.dtype)
            codes.append(c)
        return torch.stack(codes, dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        """Sum of the stage codewords: (..., n) -> (..., dim) with n <= num_quantizers; code -1 means skipped.

        Codes must lie in [-1, codebook_size) (``ValueError`` otherwise).
        """
        if codes.dim() == 0 or codes.shape[-1] > self.num_quantizers:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected (..., n) with n <= {self.num_quantizers} "
                             "stages")
        check_codes(codes, -1, self.layers[0].codebook_size, "ResidualVQ.decode")
        out = torch.zeros(*codes.shape[:-1], self.dim, dtype=self.layers[0].embed.dtype, device=codes.device)
        for i in range(codes.shape[-1]):
            c = codes[..., i]
            out = out + self.layers[i]._lookup(c.clamp_min(0)) * (c >= 0)[..., None]
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (x_hat with straight-through gradient, codes (..., n_q), summed commitment loss)."""
        n = self.num_quantizers
        if self.training and self.quantizer_dropout:
            n = int(torch.randint(1, self.num_quantizers + 1, (1,), generator=self._generator))
        residual = x
        total = torch.zeros_like(x)
        loss = x.new_zeros(())
        codes = torch.full((*x.shape[:-1], self.num_quantizers), -1, dtype=torch.int64, device=x.device)
        for i, layer in enumerate(self.layers[:n]):
            q, c, stage_loss = layer(residual)  # the loss reaches x through the residual
            if self.factorized_dim is not None:  # DAC: the stage outputs keep their gradients
                residual = residual - q
            elif self.encodec_residual:
                residual = residual - q  # q = residual + sg(e - residual): the new residual has no gradient
                q = q.detach()
            else:
                q = q.detach()
                residual = residual - q
            total = total + q
            loss = loss + stage_loss
            codes[..., i] = c
        x_hat = total if self.factorized_dim is not None else x + (total - x).detach()
        return x_hat, codes, loss

    def _check_n(self, n: int | None) -> int:
        if n is None:
            return self.num_quantizers
        if not 1 <= n <= self.num_quantizers:
            raise ValueError(f"num_quantizers must be in 1..{self.num_quantizers}, got {n}")
        return n


class GroupedVQ(nn.Module):
    """The features split into slices, each quantized by its own quantizer: the one combinator under
    ``GroupedResidualVQ`` (an RVQ per slice: HiFi-Codec's GRVQ) and ``ProductVQ`` (a VQ per slice: sub-vector VQ).

    ``quantizers[g]`` takes slice g: ``sizes[g]`` features (default: equal slices of ``dim / len(quantizers)``); its
    codes ``(..., *inner)`` (inner: ``()`` for a ``VectorQuantizer``, ``(n,)`` for a ``ResidualVQ``: its
    ``code_dims``) stack into ``(..., groups, *inner)``.
    """

    code_dims: int

    def __init__(self, quantizers: list[nn.Module], *, dim: int, sizes: "Sequence[int] | None" = None) -> None:
        super().__init__()
        groups = len(quantizers)
        if sizes is None:
            if groups < 1 or dim % groups:
                raise ValueError(f"dim={dim} must be divisible by groups={groups}")
            sizes = [dim // groups] * groups
        sizes = [int(v) for v in sizes]
        if groups < 1 or len(sizes) != groups or min(sizes) < 1 or sum(sizes) != dim:
            raise ValueError(f"slice sizes {sizes} must be {groups} positive sizes summing to dim={dim}")
        inner = {int(getattr(q, "code_dims", -1)) for q in quantizers}
        if len(inner) != 1 or -1 in inner:
            raise ValueError("GroupedVQ needs quantizers of one kind with a code_dims attribute")
        self.dim = dim
        self.groups = groups
        self.sizes = sizes
        self.inner_code_dims = inner.pop()
        self.code_dims = self.inner_code_dims + 1
        self.quantizers = nn.ModuleList(quantizers)

    @property
    def _axis(self) -> int:  # where the group axis sits in the codes
        return -(self.inner_code_dims + 1)

    def _split(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim} in the last dim, got shape {tuple(x.shape)}")
        return x.split(self.sizes, dim=-1)

    @torch.no_grad()
    def fit(self, x: Tensor, *, iters: int | None = None) -> "GroupedVQ":
        """Fit each group's quantizer on its slice of ``x`` (..., dim); returns self."""
        _check_finite(x, "kmeans")  # before any group's codebook moves
        for q, part in zip(self.quantizers, self._split(x)):
            q.fit(part, iters=iters)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(..., dim) -> codes (..., groups, *inner): each group's quantizer on its slice."""
        return torch.stack([q.encode(p) for q, p in zip(self.quantizers, self._split(x))], dim=self._axis)

    def _check_group_codes(self, codes: Tensor) -> None:
        if codes.dim() < self.code_dims or codes.shape[self._axis] != self.groups:
            inner = ", n" if self.inner_code_dims else ""
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected (..., groups={self.groups}{inner})")

    def decode(self, codes: Tensor) -> Tensor:
        """(..., groups, *inner) -> (..., dim)."""
        self._check_group_codes(codes)
        return torch.cat([q.decode(c) for q, c in zip(self.quantizers, codes.unbind(self._axis))], dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (x_hat, codes (..., groups, *inner), summed loss)."""
        if self.training:
            _check_finite(x.detach(), "VQ training batch")  # before any group's codebook moves
        outs = [q(p) for q, p in zip(self.quantizers, self._split(x))]
        x_hat = torch.cat([o[0] for o in outs], dim=-1)
        codes = torch.stack([o[1] for o in outs], dim=self._axis)
        loss = torch.stack([o[2] for o in outs]).sum()
        return x_hat, codes, loss


class GroupedResidualVQ(GroupedVQ):
    """Group-residual VQ: the features split into groups, each with its own RVQ (Yang et al. 2023, "HiFi-Codec")."""

    def __init__(
        self,
        *,
        dim: int,
        groups: int,
        num_quantizers: int,
        codebook_size: int,
        quantizer_dropout: bool = False,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_dead_code: float = 0.0,
        seed: int = 0,
        options: CodebookOptions | None = None,
        encodec_residual: bool = False,
    ) -> None:
        """``dim`` must be divisible by ``groups``; group g uses seed + g * num_quantizers. Else as ``ResidualVQ``."""
        if groups < 1 or dim % groups:
            raise ValueError(f"dim={dim} must be divisible by groups={groups}")
        super().__init__([
            ResidualVQ(
                dim=dim // groups,
                num_quantizers=num_quantizers,
                codebook_size=codebook_size,
                quantizer_dropout=quantizer_dropout,
                decay=decay,
                commitment_weight=commitment_weight,
                kmeans_init=kmeans_init,
                kmeans_iters=kmeans_iters,
                threshold_dead_code=threshold_dead_code,
                seed=seed + g * num_quantizers,
                options=options,
                encodec_residual=encodec_residual,
            )
            for g in range(groups)
        ], dim=dim)

    def encode(self, x: Tensor, *, num_quantizers: int | None = None) -> Tensor:
        """(..., dim) -> (..., groups, n)."""
        parts = self._split(x)
        return torch.stack([q.encode(p, num_quantizers=num_quantizers) for q, p in zip(self.quantizers, parts)],
                           dim=-2)


class ProductVQ(GroupedVQ):
    """Product (sub-vector) quantization: one codebook per slice of the features (Jegou et al. 2011, "PQ"); slices
    and codebooks may differ in size (OMG's sub-vector quantization: e.g. scale 3 x 1-d with K = 64, rotation 2 x 2-d
    with K = 512)."""

    def __init__(
        self,
        *,
        dim: int,
        num_subvectors: int | None = None,
        codebook_size: int | Sequence[int],
        slices: Sequence[int] | None = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_dead_code: float = 0.0,
        seed: int = 0,
        options: CodebookOptions | None = None,
    ) -> None:
        """
        Args:
            num_subvectors: M equal slices (``dim`` divisible by M); or give ``slices``.
            codebook_size: K of every slice, or one K per slice.
            slices: the slice lengths in order (summing to ``dim``); M = len(slices).
            Other arguments: as ``VectorQuantizer`` (sub-vector m uses seed + m).
        """
        if slices is None:
            if num_subvectors is None or num_subvectors < 1 or dim % num_subvectors:
                raise ValueError(f"dim={dim} must be divisible by num_subvectors={num_subvectors}")
            slices = [dim // num_subvectors] * num_subvectors
        elif num_subvectors is not None and num_subvectors != len(slices):
            raise ValueError(f"num_subvectors={num_subvectors} but {len(slices)} slices")
        slices = [int(v) for v in slices]
        sizes = [int(codebook_size)] * len(slices) if isinstance(codebook_size, int) else [int(k) for k in codebook_size]
        if len(sizes) != len(slices) or min(sizes, default=0) < 1:
            raise ValueError(f"codebook_size must be one K >= 1 or one per slice ({len(slices)}), got {codebook_size}")
        super().__init__([
            VectorQuantizer(
                dim=d,
                codebook_size=k,
                decay=decay,
                commitment_weight=commitment_weight,
                kmeans_init=kmeans_init,
                kmeans_iters=kmeans_iters,
                threshold_dead_code=threshold_dead_code,
                seed=seed + m,
                options=options,
            )
            for m, (d, k) in enumerate(zip(slices, sizes))
        ], dim=dim, sizes=slices)
        self.num_subvectors = len(slices)
        self.kmeans_iters = kmeans_iters
        self.seed = seed

    @property
    def codebook_sizes(self) -> list[int]:
        """K of each slice's codebook."""
        return [vq.codebook_size for vq in self.quantizers]

    @torch.no_grad()
    def fit(self, x: Tensor, *, iters: int | None = None) -> "ProductVQ":
        """k-means of every slice, with the EMA counts at the cluster sizes: all slices at once (``batched_kmeans``)
        when they share their length and K, else slice by slice (sub-vector m seeded seed + m); returns self."""
        iters = self.kmeans_iters if iters is None else iters
        first = self.quantizers[0]
        if len(set(self.sizes)) == 1 and len(set(self.codebook_sizes)) == 1:
            sub = x.reshape(-1, self.num_subvectors, self.sizes[0]).transpose(0, 1)  # (M, N, d)
            centers, codes = batched_kmeans(sub.to(first.embed.dtype), first.codebook_size, iters=iters,
                                            seed=self.seed)
            for m, vq in enumerate(self.quantizers):
                counts = torch.bincount(codes[m], minlength=vq.codebook_size).to(centers.dtype)
                vq.set_codebook(centers[m], counts)
            return self
        super().fit(x, iters=iters)  # slice by slice
        return self

    def decode(self, codes: Tensor) -> Tensor:
        """(..., num_subvectors) -> (..., dim); codes of slice m must lie in [0, K_m) (one range check over all the
        codes when every K is the same, else one per slice)."""
        if codes.dim() == 0 or codes.shape[-1] != self.num_subvectors:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected (..., num_subvectors={self.num_subvectors})")
        if len(set(self.codebook_sizes)) == 1:
            check_codes(codes, 0, self.codebook_sizes[0], "ProductVQ.decode")
        else:
            for m, k in enumerate(self.codebook_sizes):
                check_codes(codes[..., m], 0, k, f"ProductVQ.decode (sub-vector {m})")
        return torch.cat([vq._lookup(codes[..., m]) for m, vq in enumerate(self.quantizers)], dim=-1)


@torch.no_grad()
def train_codebooks(quantizer: nn.Module, batches: "list[Tensor]", *, epochs: int = 1, progress: bool = False,
                    desc: str = "codebooks") -> nn.Module:
    """EMA training passes over batches of vectors (..., dim): each batch goes through the quantizer's training
    forward (k-means init on the first batch if the codebook is not initialized yet, the EMA update, dead-code
    restart), ``epochs`` times; returns the quantizer in eval mode. Post-training codebook fitting for EMA
    codebooks (a learned codebook, ``CodebookOptions(ema=False)``, needs gradients: refused)."""
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    learned = [m for m in quantizer.modules() if isinstance(m, VectorQuantizer) and not m.options.ema]
    if learned:
        raise ValueError("train_codebooks updates EMA codebooks; this quantizer has codebooks learned by gradient")
    quantizer.train()
    try:
        for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
            for batch in batches:
                quantizer(batch)
    finally:
        quantizer.eval()
    return quantizer
