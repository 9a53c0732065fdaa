"""DeepCache-style feature caching for diffusers denoisers (Ma et al. 2024, "DeepCache"; the substrate of CacheQuant,
Liu et al. 2025, code BienLuky/CacheQuant ``openaimodel.py::forward``, branch 0), inside a real scheduler loop.

A refresh step runs the whole network and keeps the deep part's output; a cached step recomputes only the shallow
ends and reuses the deep part from the last refresh step:

- UNet (diffusers ``UNet2DModel`` / ``UNet2DConditionModel``): cached steps run ``conv_in``, ``down_blocks[0]`` and
  ``up_blocks[-1]``; the other down blocks, the mid block and ``up_blocks[:-1]`` return what they returned at the
  refresh step, so ``up_blocks[-1]`` gets the cached feature F = output of ``up_blocks[-2]`` beside the fresh skip
  connections of ``conv_in`` / ``down_blocks[0]``.
- DiT (``transformer_blocks``, e.g. ``DiTTransformer2DModel``): cached steps run the first and the last block; the
  blocks between add the residual they added at the refresh step (F = h_out - h_in of blocks 1..L-2).

``FeatureCache(model, schedule)`` counts the model's forward calls (one per scheduler step; classifier-free guidance
sends both halves in one batch), so it works unchanged inside a diffusers pipeline or ``models.sample``; use
``with cache:`` or ``enable()`` / ``disable()`` as DeepCache's ``DeepCacheSDHelper``. ``corrections`` (step ->
(a, b), one value per channel of F) replace the cached feature by a * F + b on that cached step (CacheQuant's DEC
for the cache error, ``dec_cache``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["CacheSchedule", "FeatureCache", "uniform_schedule", "group_costs", "dps_schedule", "schedule_cost",
           "fit_channel_affine", "record_features", "dec_cache"]


@dataclass(frozen=True)
class CacheSchedule:
    """Which of ``num_steps`` scheduler steps refresh the cache (``refresh``: sorted, starting at 0)."""

    num_steps: int
    refresh: tuple[int, ...]

    def __post_init__(self) -> None:
        r = self.refresh
        if self.num_steps < 1 or not r or r[0] != 0 or list(r) != sorted(set(r)) or r[-1] >= self.num_steps:
            raise ValueError(f"a cache schedule refreshes at sorted, distinct steps in [0, {self.num_steps}) starting "
                             f"at 0, got {list(r)}")

    def source(self, step: int) -> int:
        """The refresh step whose features ``step`` uses (itself on a refresh step)."""
        return max(r for r in self.refresh if r <= step)

    def groups(self) -> list[tuple[int, int]]:
        """(start, end) of each group: a refresh step and the cached steps after it."""
        ends = list(self.refresh[1:]) + [self.num_steps]
        return list(zip(self.refresh, ends))

    @property
    def average_interval(self) -> float:
        return self.num_steps / len(self.refresh)


def _check_interval(num_steps: int, interval: int) -> None:
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"the cache interval N must be an integer >= 1, got {interval!r}")
    if interval > num_steps:
        raise ValueError(f"the cache interval N = {interval} exceeds the {num_steps} sampling steps")


def uniform_schedule(num_steps: int, interval: int) -> CacheSchedule:
    """DeepCache's schedule: refresh every ``interval`` steps (0, N, 2N, ...)."""
    _check_interval(num_steps, interval)
    return CacheSchedule(num_steps, tuple(range(0, num_steps, interval)))


def group_costs(features: Tensor) -> Tensor:
    """D (T, T + 1), float64: D[j, n] = sum_{i=j}^{n-1} |F_i - F_j|_1 for j < n (inf elsewhere), the error of
    refreshing at step j and reusing F_j through step n - 1 (CacheQuant's DPS cost). ``features``: (T, ...)."""
    t = features.shape[0]
    flat = features.reshape(t, -1).double()
    dist = torch.cdist(flat, flat, p=1)  # (T, T): |F_i - F_j|_1
    d = torch.full((t, t + 1), math.inf, dtype=torch.float64)
    for j in range(t):
        d[j, j + 1:] = torch.cumsum(dist[j, j:], 0)
    return d


def schedule_cost(schedule: CacheSchedule, costs: Tensor) -> float:
    """The summed group costs of a schedule under ``group_costs``."""
    return float(sum(costs[s, e] for s, e in schedule.groups()))


def dps_schedule(features: Tensor, interval: int) -> CacheSchedule:
    """CacheQuant's dynamic-programming schedule (``Fisher.feature_to_interval_seq_optimal``): K = ceil(T / N)
    contiguous groups, each of ceil(N / 2) .. 2N steps, minimising the summed group costs; the group starts are the
    refresh steps. L[n, k] = min_j L[j, k - 1] + D(j, n), then backtracking from L[T, K]."""
    t = features.shape[0]
    _check_interval(t, interval)
    k_groups = math.ceil(t / interval)
    lo, hi = math.ceil(interval / 2), 2 * interval
    d = group_costs(features).tolist()
    inf = math.inf
    best = [[inf] * (t + 1) for _ in range(k_groups + 1)]
    back = [[-1] * (t + 1) for _ in range(k_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, k_groups + 1):
        for n in range(1, t + 1):
            for j in range(max(0, n - hi), n - lo + 1):
                c = best[k - 1][j] + d[j][n]
                if c < best[k][n]:
                    best[k][n], back[k][n] = c, j
    if best[k_groups][t] == inf:  # T < K ceil(N / 2): no feasible split (T < N is refused above)
        raise ValueError(f"{t} steps cannot be split into {k_groups} groups of {lo}..{hi} steps")
    starts, n = [], t
    for k in range(k_groups, 0, -1):
        n = back[k][n]
        starts.append(n)
    return CacheSchedule(t, tuple(reversed(starts)))


def fit_channel_affine(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel least squares y ~ a x + b over every axis but the channel axis 1 (CacheQuant's
    ``calculate_abCov``): a = Cov(x, y) / Var(x), b = E[y] - a E[x]; a = 1, b = E[y] - E[x] where Var(x) = 0."""
    if x.shape != y.shape or x.dim() < 2:
        raise ValueError(f"x and y must have one shape (B, C, ...), got {tuple(x.shape)} and {tuple(y.shape)}")
    c = x.shape[1]
    xs = x.transpose(0, 1).reshape(c, -1).double()
    ys = y.transpose(0, 1).reshape(c, -1).double()
    mx, my = xs.mean(1), ys.mean(1)
    var = (xs - mx[:, None]).pow(2).mean(1)
    cov = ((xs - mx[:, None]) * (ys - my[:, None])).mean(1)
    flat = var <= 1e-12 * (xs.abs().amax(1).pow(2) + 1e-30)
    a = torch.where(flat, torch.ones_like(var), cov / torch.where(flat, torch.ones_like(var), var))
    b = my - a * mx
    return a.to(x.dtype), b.to(x.dtype)


def _denoiser_core(model: nn.Module) -> tuple[str, nn.Module]:
    """("unet" | "dit", the diffusers network): the model itself or its ``.unet`` / ``.transformer``."""
    for m in (model, getattr(model, "unet", None), getattr(model, "transformer", None)):
        if isinstance(m, nn.Module) and hasattr(m, "up_blocks") and hasattr(m, "down_blocks"):
            if len(m.up_blocks) < 2:
                raise ValueError("DeepCache needs a UNet with at least 2 up blocks")
            return "unet", m
        if isinstance(m, nn.Module) and isinstance(getattr(m, "transformer_blocks", None), nn.ModuleList):
            if len(m.transformer_blocks) < 3:
                raise ValueError("DeepCache needs a transformer with at least 3 blocks (first, deep, last)")
            return "dit", m
    raise ValueError(f"{type(model).__name__} is not a diffusers UNet (down_blocks / up_blocks) or a DiT-style "
                     "transformer (transformer_blocks), nor wraps one as .unet / .transformer")


class FeatureCache:
    """DeepCache on a diffusers denoiser under a refresh schedule (see the module docstring).

    Args:
        model: a diffusers UNet / DiT, or a module holding one as ``.unet`` / ``.transformer``.
        schedule: which model calls refresh (``num_steps`` = model calls per sampling run).
        corrections: cached step -> (a, b) per channel of the cached feature (DEC for the cache error).
    """

    def __init__(self, model: nn.Module, schedule: CacheSchedule,
                 corrections: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        self.kind, self.net = _denoiser_core(model)
        self.schedule = schedule
        self.corrections = dict(corrections or {})
        self.step = -1
        self._stored: dict[int, Any] = {}
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []

    # --- bookkeeping ---
    def reset(self) -> None:
        """Start a new sampling run (the next model call is step 0)."""
        self.step = -1
        self._stored.clear()

    @property
    def refreshing(self) -> bool:
        return self.step in self.schedule.refresh

    def _count(self, *_: Any) -> None:
        self.step += 1
        if self.step >= self.schedule.num_steps:
            raise RuntimeError(f"model call {self.step + 1} of a {self.schedule.num_steps}-call cache schedule: "
                               "reset() the cache between sampling runs, or build the schedule for this many calls")

    def _correct(self, feature: Tensor, channel_dim: int) -> Tensor:
        ab = self.corrections.get(self.step)
        if ab is None:
            return feature
        shape = [1] * feature.dim()
        shape[channel_dim] = -1
        a, b = (t.to(feature).reshape(shape) for t in ab)
        return a * feature + b

    # --- patching ---
    def _patch(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        module.forward = forward  # an instance attribute: nn.Module.__call__ calls it
        self._patched.append(module)

    def _skipped(self, module: nn.Module, correct: bool = False) -> Callable[..., Any]:
        original = type(module).forward.__get__(module)
        key = id(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.refreshing:
                out = original(*args, **kwargs)
                self._stored[key] = out
                return out
            out = self._stored[key]
            return self._correct(out, 1) if correct else out

        return forward

    def enable(self) -> "FeatureCache":
        if self._patched:
            return self
        self.reset()
        self._handles.append(self.net.register_forward_pre_hook(self._count))
        if self.kind == "unet":
            for block in list(self.net.down_blocks)[1:] + [self.net.mid_block] + list(self.net.up_blocks)[:-2]:
                if block is not None:
                    self._patch(block, self._skipped(block))
            self._patch(self.net.up_blocks[-2], self._skipped(self.net.up_blocks[-2], correct=True))
        else:
            blocks = list(self.net.transformer_blocks)
            first, last = blocks[1], blocks[-2]
            first_fwd = type(first).forward.__get__(first)
            last_fwd = type(last).forward.__get__(last)

            def enter(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
                if self.refreshing:
                    self._stored["in"] = hidden_states
                    out = first_fwd(hidden_states, *args, **kwargs)
                    if first is last:
                        self._stored["residual"] = out - hidden_states
                    return out
                return hidden_states + self._correct(self._stored["residual"], -1)

            def leave(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
                if self.refreshing:
                    out = last_fwd(hidden_states, *args, **kwargs) if last is not first else hidden_states
                    self._stored["residual"] = out - self._stored["in"]
                    return out
                return hidden_states

            for block in blocks[2:-2]:
                fwd = type(block).forward.__get__(block)
                self._patch(block, self._pass_through(fwd))
            self._patch(first, enter)
            if last is not first:
                self._patch(last, leave)
        return self

    def _pass_through(self, original: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return original(hidden_states, *args, **kwargs) if self.refreshing else hidden_states
        return forward

    def disable(self) -> None:
        for module in self._patched:
            del module.forward
        self._patched.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def __enter__(self) -> "FeatureCache":
        return self.enable()

    def __exit__(self, *_: Any) -> None:
        self.disable()


@torch.no_grad()
def record_features(model: nn.Module, run: Callable[[], Any]) -> Tensor:
    """The cache feature F_t of every model call of ``run()`` (a float sampling run), stacked (T, ...): the output of
    ``up_blocks[-2]`` (UNet) or the deep blocks' residual (DiT), as DPS and DEC fit them."""
    kind, net = _denoiser_core(model)
    feats: list[Tensor] = []
    handles = []
    if kind == "unet":
        handles.append(net.up_blocks[-2].register_forward_hook(lambda m, i, o: feats.append(o.detach().clone())))
    else:
        blocks = net.transformer_blocks
        inputs: list[Tensor] = []

        def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.append(args[0] if args else kwargs["hidden_states"])

        handles.append(blocks[1].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(blocks[-2].register_forward_hook(
            lambda m, i, o: feats.append((o - inputs[-1]).detach().clone())))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if not feats:
        raise ValueError("the run made no model call")
    return torch.stack(feats)


def dec_cache(features: Tensor, schedule: CacheSchedule, channel_dim: int) -> dict[int, tuple[Tensor, Tensor]]:
    """CacheQuant's DEC for the cache error: for every cached step t reusing refresh step r, the per-channel least
    squares (a_t, b_t) of F_t ~ a_t F_r + b_t over the recorded features (T, B, ...); ``channel_dim`` is the channel
    axis of one feature (1 for a UNet's (B, C, H, W), -1 for a DiT's (B, N, C))."""
    if features.shape[0] != schedule.num_steps:
        raise ValueError(f"{features.shape[0]} recorded steps for a {schedule.num_steps}-step schedule")
    out = {}
    for t in range(schedule.num_steps):
        r = schedule.source(t)
        if r != t:
            x, y = features[r].movedim(channel_dim, 1), features[t].movedim(channel_dim, 1)
            out[t] = fit_channel_affine(x, y)
    return out
