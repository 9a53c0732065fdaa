"""ZOODiP (Seo, Jeong, Lee, Chun, "Efficient Personalization of Quantized Diffusion Model without
Backpropagation", CVPR 2025, arXiv 2503.14868; code ignoww/ZOODiP ``train_zoodip.py``): textual-inversion-style
personalization of a quantized diffusion model with forward passes only.

A new conditioning vector theta (for the digits UNet: a new row of ``class_embedding``, d = 128) is learned against
a frozen INT8 weight-only model under ``torch.no_grad()`` (no autograd graph):

- PUTS (partial uniform timestep sampling): t ~ U{t_low T, ..., t_high T - 1} (the paper's 500..899 of 1000);
  plain sampling is U{0, ..., T - 1}; then eps ~ N(0, I) and x_t = add_noise(x_0, eps, t) for a reference x_0;
- the zeroth-order estimator (``zo_gradient``, forward differences, MeZO-style seeded perturbations): L_0 =
  MSE(eps_hat(x_t, t, theta), eps); for i = 1..n, z_i ~ N(0, I_d) from seed s_i and g_i = (L(theta + mu z_i) -
  L_0) / mu on the same (x_t, t, eps); g = sum_i g_i z_i / (n sqrt((d' + n - 1) / n)), d' = d minus the removed
  directions; n + 1 forward passes per step, one after the other (the peak memory is one pass's);
- Subspace Gradient (``SubspaceTracker``): a ring buffer of the last tau token values theta; every tau steps they
  are standardized per dimension, PCA'd (tau components), and the directions after the smallest i whose cumulative
  explained-variance ratio exceeds 1 - nu (the low-variance ones, U) are projected out of every later g:
  g <- g - (g U^T) U;
- Adam (betas 0.9 / 0.999, eps 1e-3, constant lr, no weight decay) on theta.

``backprop_embedding`` is the upper bound the paper compares memory with: the same loop with autograd's exact
gradient on the float model (textual inversion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.config import QuantConfig, float_field, int_field

__all__ = ["ZOODiPConfig", "weight_only_rules", "zo_gradient", "SubspaceTracker", "ZOAdam", "sample_timesteps",
           "EmbeddingTrainer",
           "zo_train", "train_embedding", "backprop_embedding", "grow_class_embedding"]


@dataclass
class ZOODiPConfig(QuantConfig):
    """ZOODiP: a new class embedding learned with zeroth-order gradients against an INT8 weight-only model.

    Args:
        iters: optimization steps (each n + 1 forward passes of ``batch`` reference images).
        queries: n, perturbations per step (the script's 2).
        mu: perturbation size of the forward differences (1e-3).
        lr: Adam's constant learning rate. Adam moves each coordinate by about lr per step, so it scales with the
            table's values: 0.5 suits the digits UNet's class rows (std about 1); the paper's 1e-2 is for Stable
            Diffusion's token table, whose rows are about 50 times smaller.
        adam_eps: Adam's denominator epsilon (the code's 1e-3).
        batch: reference images per step (the script's 1).
        subspace: use Subspace Gradient (a PCA of the last tau token values).
        tau: the token-value buffer and the refit period of Subspace Gradient (the script's 128 for d = 768; scale
            it with d).
        nu: the explained-variance tail whose directions are removed (the script's 1e-3).
        puts: partial uniform timestep sampling in [t_low, t_high) x T; False: t ~ U{0..T - 1}.
        t_low: PUTS' lower bound as a fraction of T (0.5: the paper's 500 of 1000).
        t_high: PUTS' upper bound as a fraction of T (0.9: the paper's T - 100).
        wbits: weight bits of the frozen model (symmetric per output channel, weight-only; the paper's qint8).
        init_class: the existing class whose row initializes theta (the class word); -1: the null class.
        seed: seed of images, timesteps, noise and perturbations.
    """

    iters: int = int_field(300, 1, 1_000_000)
    queries: int = int_field(2, 1, 64)
    mu: float = float_field(1e-3, 1e-8, 1.0)
    lr: float = float_field(0.5, 1e-6, 10.0)
    adam_eps: float = float_field(1e-3, 1e-12, 1.0)
    batch: int = int_field(1, 1, 4096)
    subspace: bool = True
    tau: int = int_field(32, 2, 4096)
    nu: float = float_field(1e-3, 0.0, 1.0)
    puts: bool = True
    t_low: float = float_field(0.5, 0.0, 1.0)
    t_high: float = float_field(0.9, 0.0, 1.0)
    wbits: int = int_field(8, 2, 8)
    init_class: int = int_field(-1, -1, 1_000_000)
    seed: int = int_field(0, 0, 2**31 - 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.puts and not self.t_low < self.t_high:
            raise ValueError(f"PUTS needs t_low < t_high, got {self.t_low} and {self.t_high}")


def weight_only_rules(bits: int) -> list:  # -> list[QuantRule]
    """ZOODiP's frozen model: every Conv2d / Linear with symmetric INT weights per output channel, weight-only
    (``optimum.quanto``'s qint8 in the paper; ``polyquant.nn.quantize_weights`` applies it). Embedding tables (the
    trained class / token rows) stay float."""
    from polyquant.nn import QuantRule, QuantSpec
    from polyquant.primitives import PerChannel

    return [QuantRule((nn.Conv2d, nn.Linear), weight=QuantSpec(f"int{bits}", PerChannel(0)))]


def sample_timesteps(n: int, num_train_timesteps: int, gen: torch.Generator, *, puts: bool, t_low: float = 0.5,
                     t_high: float = 0.9) -> Tensor:
    """(n,) int64 timesteps: PUTS' U{floor(t_low T), ..., floor(t_high T) - 1} (the code's randint(500, T - 100)
    at T = 1000), or U{0, ..., T - 1}."""
    lo, hi = (int(t_low * num_train_timesteps), int(t_high * num_train_timesteps)) if puts else (0, num_train_timesteps)
    return torch.randint(lo, max(hi, lo + 1), (n,), generator=gen)


def zo_gradient(losses: Callable[[Tensor], Tensor], theta: Tensor, *, queries: int, mu: float, seed: int,
                removed: int = 0, project: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, float]:
    """ZOODiP's forward-difference estimate at ``theta`` (d,): ``losses(thetas)`` maps (n + 1, d) candidate vectors
    (theta, then theta + mu z_i) to their (n + 1,) losses on one shared (x_t, t, eps); z_i ~ N(0, I_d) drawn from a
    generator seeded with ``seed`` (so a step can be replayed). Returns (g, L_0): g = sum_i g_i z_i / (n sqrt((d'
    + n - 1) / n)), g_i = (L_i - L_0) / mu, d' = d - ``removed``; ``project`` (Subspace Gradient) is applied to g."""
    d = theta.numel()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(queries, d, generator=gen, dtype=torch.float64).to(theta)
    cand = torch.cat([theta.reshape(1, d), theta.reshape(1, d) + mu * z])
    loss = losses(cand).double()
    g_i = (loss[1:] - loss[0]) / mu  # (n,)
    d_eff = d - removed
    g = (g_i.to(z) @ z) / (queries * math.sqrt((d_eff + queries - 1) / queries))
    if project is not None:
        g = project(g)
    return g.to(theta), float(loss[0])


class SubspaceTracker:
    """ZOODiP's Subspace Gradient: ``push(theta)`` after every update fills a ring buffer of ``tau`` token values;
    every ``tau`` pushes the buffer is standardized per dimension (sklearn's StandardScaler: population std, 1 where
    0) and PCA'd (``tau`` components, sklearn's full SVD of the centered matrix), and U = the components after the
    smallest i whose cumulative explained-variance ratio exceeds 1 - nu. ``project(g)`` = g - (g U^T) U; ``removed``
    = the rows of U (the d' of the estimator's normalization)."""

    def __init__(self, dim: int, tau: int, nu: float) -> None:
        self.dim, self.tau, self.nu = dim, tau, nu
        self.buffer: list[Tensor] = []
        self.pushes = 0
        self.basis: Tensor | None = None  # U: (k, d), orthonormal rows

    @property
    def removed(self) -> int:
        return 0 if self.basis is None else int(self.basis.shape[0])

    def push(self, theta: Tensor) -> None:
        self.buffer.append(theta.detach().reshape(-1).double().clone())
        if len(self.buffer) > self.tau:
            self.buffer.pop(0)
        self.pushes += 1
        if self.pushes % self.tau == 0:
            self.refit()

    def refit(self) -> None:
        x = torch.stack(self.buffer)  # (tau, d)
        std = x.std(0, unbiased=False)
        x = (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
        x = x - x.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (min(tau, d), d)
        k = min(self.tau, self.dim, vh.shape[0])
        var = s[:k].pow(2)
        ratio = torch.cumsum(var / var.sum().clamp_min(1e-300), 0)
        above = (ratio > 1 - self.nu).nonzero()
        i = int(above[0]) if len(above) else k - 1
        low = vh[i + 1:k]
        self.basis = low if low.shape[0] else None

    def project(self, g: Tensor) -> Tensor:
        if self.basis is None:
            return g
        u = self.basis.to(g)
        return g - (g @ u.T) @ u


class ZOAdam:
    """Adam on one vector (betas 0.9 / 0.999, eps outside the square root as torch's, bias-corrected, constant lr,
    no weight decay): ZOODiP's ``ZOAdam.update``."""

    def __init__(self, lr: float, eps: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.lr, self.eps, self.betas = lr, eps, betas
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.t = 0

    def step(self, theta: Tensor, g: Tensor) -> Tensor:
        b1, b2 = self.betas
        self.t += 1
        self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
        self.v = (1 - b2) * g * g if self.v is None else b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        return theta - self.lr * m_hat / (v_hat.sqrt() + self.eps)


def grow_class_embedding(unet: nn.Module, rows: Tensor) -> int:
    """Append ``rows`` (k, d) to a diffusers UNet's ``class_embedding`` table (in place, a new ``nn.Embedding``);
    returns the index of the first new row. ValueError for a UNet without a class table or rows of another width."""
    emb = getattr(unet, "class_embedding", None)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{type(unet).__name__} has no class embedding table (class_embedding: nn.Embedding) to "
                         "learn a new class in")
    if rows.dim() != 2 or rows.shape[1] != emb.embedding_dim:
        raise ValueError(f"the new class embedding has size {list(rows.shape[1:])}, the model's class embedding "
                         f"{emb.embedding_dim}")
    first = emb.num_embeddings
    new = nn.Embedding(first + rows.shape[0], emb.embedding_dim).to(emb.weight)
    with torch.no_grad():
        new.weight.copy_(torch.cat([emb.weight.detach(), rows.to(emb.weight)]))
    new.weight.requires_grad_(emb.weight.requires_grad)
    unet.class_embedding = new
    return first


class _ExtendedTable(nn.Module):
    """A class table with candidate rows appended (labels >= the table's rows pick them), gradients flowing to
    ``extra``."""

    def __init__(self, base: nn.Embedding, extra: Tensor) -> None:
        super().__init__()
        self.base, self.extra = base, extra

    def forward(self, labels: Tensor) -> Tensor:
        return F.embedding(labels, torch.cat([self.base.weight, self.extra.to(self.base.weight)]))


class EmbeddingTrainer:
    """The denoising loss of candidate class vectors on a diffusers UNet: ``losses(thetas)`` (k, d) -> (k,), each
    candidate on the same (x_t, t, eps) of the current step (``set_step``), one forward pass of B samples per
    candidate with the candidate appended as a new row of the model's class table (restored after)."""

    def __init__(self, unet: nn.Module, refs: Tensor, config: ZOODiPConfig) -> None:
        from .models import make_scheduler

        self.unet, self.refs, self.config = unet, refs, config
        self.ddpm = make_scheduler("ddpm")
        self.gen = torch.Generator().manual_seed(config.seed)
        self.forward_passes = 0
        self.x_t = self.t = self.eps = None

    def set_step(self) -> None:
        c, n = self.config, len(self.refs)
        idx = torch.randint(0, n, (c.batch,), generator=self.gen)
        x0 = self.refs[idx]  # (the code's random horizontal flip is left out: a flipped digit is another glyph)
        self.t = sample_timesteps(c.batch, int(self.ddpm.config.num_train_timesteps), self.gen, puts=c.puts,
                                  t_low=c.t_low, t_high=c.t_high)
        self.eps = torch.randn(x0.shape, generator=self.gen)
        self.x_t = self.ddpm.add_noise(x0, self.eps, self.t)

    def losses(self, thetas: Tensor) -> Tensor:
        base = self.unet.class_embedding
        label = torch.full((len(self.t),), base.num_embeddings)
        out = []
        try:
            for theta in thetas:  # one forward pass per candidate, as the code: memory of a single pass
                self.unet.class_embedding = _ExtendedTable(base, theta.reshape(1, -1))  # differentiable in theta
                pred = self.unet(self.x_t, timestep=self.t, class_labels=label, return_dict=False)[0]
                out.append((pred[:, : self.x_t.shape[1]] - self.eps).pow(2).mean())
                self.forward_passes += len(self.t)
        finally:
            self.unet.class_embedding = base
        return torch.stack(out)


def _init_theta(unet: nn.Module, config: ZOODiPConfig) -> Tensor:
    table = unet.class_embedding.weight.detach()
    row = table.shape[0] - 1 if config.init_class < 0 else config.init_class
    if row >= table.shape[0]:
        raise ValueError(f"init_class {config.init_class} is not a row of the {table.shape[0]}-row class table")
    return table[row].clone().float()


@torch.no_grad()
def zo_train(trainer: Any, theta: Tensor, config: ZOODiPConfig, *, progress: bool = False,
             on_step: Callable[[int, Tensor, float], None] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """ZOODiP's loop from ``theta`` (d,): per step ``trainer.set_step()`` draws (x_t, t, eps) and ``trainer.losses``
    scores candidates on it (``EmbeddingTrainer``, ``textual.TokenTrainer``); the estimate (``zo_gradient``),
    Subspace Gradient when ``config.subspace`` and Adam. Returns theta and a record (per-step L_0, forward passes,
    removed directions). ``on_step(step, theta, loss)`` after each update."""
    from tqdm.auto import tqdm

    tracker = SubspaceTracker(theta.numel(), config.tau, config.nu) if config.subspace else None
    opt = ZOAdam(config.lr, config.adam_eps)
    losses: list[float] = []
    for step in tqdm(range(config.iters), desc="ZOODiP", disable=not progress, leave=False):
        trainer.set_step()
        g, loss = zo_gradient(trainer.losses, theta, queries=config.queries, mu=config.mu,
                              seed=config.seed * 1_000_003 + step, removed=tracker.removed if tracker else 0,
                              project=tracker.project if tracker else None)
        theta = opt.step(theta, g)
        if tracker is not None:
            tracker.push(theta)
        losses.append(loss)
        if on_step is not None:
            on_step(step, theta, loss)
    return theta, {"losses": losses, "forward_passes": trainer.forward_passes,
                   "removed": tracker.removed if tracker else 0}


def train_embedding(unet: nn.Module, refs: Tensor, config: ZOODiPConfig, *, progress: bool = False,
                    on_step: Callable[[int, Tensor, float], None] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """ZOODiP on a (quantized, frozen) diffusers UNet with a class table: theta (d,) learned from reference images
    ``refs`` (N, C, S, S) in [-1, 1] with forward passes only (``zo_train`` on an ``EmbeddingTrainer``)."""
    return zo_train(EmbeddingTrainer(unet, refs, config), _init_theta(unet, config), config, progress=progress,
                    on_step=on_step)


def backprop_embedding(unet: nn.Module, refs: Tensor, config: ZOODiPConfig, *, progress: bool = False,
                       on_step: Callable[[int, Tensor, float], None] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Textual inversion with autograd (the upper bound): the same steps, data and Adam as ``train_embedding``, the
    exact gradient of L_0 through the (float) UNet instead of the estimate; one forward and one backward pass per
    step (B samples each)."""
    from tqdm.auto import tqdm

    theta = _init_theta(unet, config)
    trainer = EmbeddingTrainer(unet, refs, config)
    opt = ZOAdam(config.lr, config.adam_eps)
    losses: list[float] = []
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for step in tqdm(range(config.iters), desc="textual inversion", disable=not progress, leave=False):
            trainer.set_step()
            th = theta.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = trainer.losses(th.reshape(1, -1))[0]
                (g,) = torch.autograd.grad(loss, th)
            theta = opt.step(theta, g.detach())
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, theta, losses[-1])
    finally:
        for p in params:
            p.requires_grad_(True)
    return theta, {"losses": losses, "forward_passes": trainer.forward_passes, "removed": 0}
