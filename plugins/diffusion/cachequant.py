"""CacheQuant (Liu, Li, Gu, "CacheQuant: Comprehensively Accelerated Diffusion Models", CVPR 2025, arXiv
2503.01323; code BienLuky/CacheQuant): DeepCache feature caching and W8A8 / W4A8 quantization of a diffusers UNet,
made to work together.

- the cache (``cache.py``): refresh steps run the whole UNet, cached steps only ``conv_in``, ``down_blocks[0]`` and
  ``up_blocks[-1]`` on the feature F of the last refresh step;
- DPS (``cache.dps_schedule``): the refresh steps chosen by dynamic programming over the float model's recorded
  features, group lengths in [ceil(N / 2), 2N] (the uniform schedule's average interval N);
- DEC for the cache error (``cache.dec_cache``): per cached step t and channel, F_t ~ a_t F_r + b_t by least squares;
- quantization: weights channel-wise asymmetric with an MSE-searched range (``conv_in`` / ``conv_out``, the first and
  last layers, at 8 bit); activations per-tensor asymmetric with one (scale, zero point) per timestep
  (``TimestepQuantizer``, the step read by a ``StepClock`` hook on the UNet), fitted along the cached path: the
  calibration runs are replayed under the cache, so a cached step's scales see the cached inputs
  (``set_act_quantize_params_cond`` with ``prv_f = cache``);
- DEC for the quantization error: the first layers consuming the cache, ``up_blocks[-1].resnets[0]``'s ``conv1``
  and ``conv_shortcut`` on concat(cache, skip), are split by input channels (Q-Diffusion's split:
  ``SplitConv2d``, each part its own quantizers); per step and output channel, the float cache part
  Y = W_c * X (no bias) is fitted as a_t P + b_t from the quantized part P = Q(W_c) * Q(X), and the layer computes
  a_t P + b_t + Q(W_s) * Q(X_s) + bias. The code's form, a_t P + b'_t + bias' with the bias inside the target, is
  the same affine map (b' = b + (a - 1) bias): here the bias stays with the skip part, counted once.

The quantized model is a ``CachedDenoiser``: the UNet with its quant layers, the schedule and DEC(cache)'s (a, b)
as buffers; ``with model.feature_cache(): models.sample(model, labels, steps=50, scheduler="ddim")`` samples with
the cache (one sampling run per ``with``). A single call outside the cache is a full step at the nearest
calibrated timestep's activation scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.config import QuantConfig, UsageError, bits_field, int_field
from polyquant.nn import Quantizer, QuantSpec

from .cache import CacheSchedule, FeatureCache, dec_cache, dps_schedule, fit_channel_affine, uniform_schedule
from .unet import UNetDenoiser

__all__ = ["CacheQuantConfig", "StepClock", "TimestepQuantizer", "SplitConv2d", "CachedDenoiser", "split_runs",
           "cache_split_layers", "build_cached", "quantize_cachequant", "cached_sample", "schedule_macs"]


@dataclass
class CacheQuantConfig(QuantConfig):
    """CacheQuant on a diffusers UNet: DeepCache with a DPS schedule, per-timestep W8A8 / W4A8 quantization and
    decoupled error correction.

    Args:
        wbits: weight bits: 8 (W8A8) or 4 (W4A8); the first and last layers (conv_in, conv_out) keep 8 bits.
        abits: activation bits (per tensor, asymmetric, one range per timestep).
        steps: model calls of one sampling run (DDIM: its steps; PLMS: steps + 1). The calibration is whole runs
            of this many consecutive calls, in sampling order.
        interval: the cache interval N (1: no caching, every step refreshes: quantization only).
        schedule: "dps" (dynamic programming over the float features) or "uniform" (DeepCache's every N steps).
        dec_cache: correct the cached feature per step and channel (DEC for the cache error).
        dec_quant: correct the quantization error of the split layers consuming the cache (DEC for quantization).
        calib_cached: fit the activation ranges along the cached path (the paper's); False: on full steps only,
            as a quantizer that knows nothing of the cache (the naive combination).
    """

    wbits: int = bits_field(8, 4, 8)
    abits: int = bits_field(8, 8, 8)
    steps: int = int_field(50, 1, 1000)
    interval: int = int_field(5, 1, 1000)
    schedule: Literal["dps", "uniform"] = "dps"
    dec_cache: bool = True
    dec_quant: bool = True
    calib_cached: bool = True


# --- per-timestep activation quantization ---------------------------------------------------------------------------


class StepClock:
    """Which calibrated timestep the denoiser is at: ``attach(unet)`` installs it as a forward pre-hook that reads
    the call's ``timestep`` (the first element of a batch) and sets ``index`` to the nearest of ``timesteps``."""

    def __init__(self, timesteps: Sequence[int]) -> None:
        if len(timesteps) == 0:
            raise ValueError("a step clock needs at least one timestep")
        self.timesteps = [int(t) for t in timesteps]
        self.index = 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def set_timestep(self, t: float) -> None:
        self.index = min(range(len(self.timesteps)), key=lambda i: (abs(self.timesteps[i] - t), i))

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise TypeError(f"{type(module).__name__} was called without a timestep")
        self.set_timestep(float(torch.as_tensor(t).reshape(-1)[0]))

    def attach(self, module: nn.Module) -> Any:
        return module.register_forward_pre_hook(self, with_kwargs=True)


class TimestepQuantizer(Quantizer):
    """A per-tensor activation quantizer with one (scale, zero point) per calibrated timestep (``scale`` and
    ``zero_point`` of shape (T,)), the row picked by ``clock.index``. While calibrating, one observer per step
    sees that step's inputs; a step where the layer never ran (a cached step of a skipped block) takes the nearest
    observed timestep's range."""

    def __init__(self, spec: QuantSpec, clock: StepClock, *, name: str = "") -> None:
        super().__init__(spec, name=name)
        if spec.dynamic or type(spec.granularity).__name__ != "PerTensor":
            raise ValueError("a TimestepQuantizer is static and per tensor")
        self.clock = clock
        self.step_observers: dict[int, Any] = {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, timesteps={len(self.clock)}"

    def set_state(self, state: Any) -> None:
        if state not in ("raw", "calibrating", "quantized"):
            raise ValueError(f"unknown state {state!r}")
        if state == "calibrating":
            self.step_observers = {}
        elif state == "quantized" and self.scale is None:
            seen = sorted(i for i, o in self.step_observers.items() if o.min_val is not None)
            if not seen:
                where = f" {self.name}" if self.name else ""
                raise ValueError(f"quantizer{where} was never calibrated: the calibration set is empty or unused")
            params = {i: self.step_observers[i].calculate_qparams() for i in seen}
            ts = self.clock.timesteps
            rows = [params[min(seen, key=lambda j: (abs(ts[j] - ts[i]), j))] for i in range(len(ts))]
            self.scale = torch.stack([s.reshape(()) for s, _ in rows]).float()
            self.zero_point = None if rows[0][1] is None else torch.stack([z.reshape(()) for _, z in rows]).float()
            self.step_observers = {}
        self.state = state

    def observe(self, x: Tensor) -> None:
        from polyquant.observers import make_observer

        i = self.clock.index
        obs = self.step_observers.get(i)
        if obs is None:
            s = self.spec
            obs = make_observer(s.observer, self.fmt, s.granularity, symmetric=s.symmetric, averaging=s.averaging,
                                percentile=s.percentile, name=f"{self.name}@t{self.clock.timesteps[i]}")
            self.step_observers[i] = obs
        obs.update(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "calibrating":
            self.observe(x.detach())
            return x
        return super().forward(x)

    def fake_quant(self, x: Tensor) -> Tensor:
        from polyquant.primitives import fake_quantize

        if x.numel() == 0:
            return x
        i = self.clock.index
        scale = self.scale.reshape(-1)[i:i + 1]
        zp = None if self.zero_point is None else self.zero_point.reshape(-1)[i:i + 1]
        return fake_quantize(x, self.fmt, scale.to(x.device), None if zp is None else zp.to(x.device),
                             self.block_size(x))


# --- DEC for the quantization error: the split layers consuming the cache ------------------------------------------


class SplitConv2d(nn.Module):
    """A convolution over concat(cache, skip) channels as two (Q-Diffusion's split, each part with its own
    quantizers once ``prepare`` wraps ``cache`` and ``skip``): out = a_t * cache(x[:, :split]) + b_t +
    skip(x[:, split:]), with ``cache`` holding W[:, :split] (no bias) and ``skip`` W[:, split:] and the bias;
    (a_t, b_t) = ``dec_a`` / ``dec_b`` rows (T, out) picked by ``clock.index`` (1 and 0 until ``finish_fit``)."""

    def __init__(self, conv: nn.Conv2d, split: int, clock: StepClock) -> None:
        super().__init__()
        if not 0 < split < conv.in_channels or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"cannot split a {conv.in_channels}-channel convolution (groups {conv.groups}, "
                             f"padding {conv.padding_mode}) at channel {split}")
        self.split = split
        self.clock = clock
        w = conv.weight.detach()
        kw = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        self.cache = nn.Conv2d(split, conv.out_channels, bias=False, **kw)
        self.skip = nn.Conv2d(conv.in_channels - split, conv.out_channels, bias=conv.bias is not None, **kw)
        with torch.no_grad():
            self.cache.weight.copy_(w[:, :split])
            self.skip.weight.copy_(w[:, split:])
            if conv.bias is not None:
                self.skip.bias.copy_(conv.bias.detach())
        self.register_buffer("dec_a", torch.ones(len(clock), conv.out_channels))
        self.register_buffer("dec_b", torch.zeros(len(clock), conv.out_channels))
        self.fit_records: dict[int, list[tuple[Tensor, Tensor]]] | None = None

    def start_fit(self) -> None:
        """Record, per step, the quantized cache part P and its float target Y = W_c * X on the same input."""
        self.fit_records = {}

    def finish_fit(self) -> None:
        """Set (a_t, b_t) per recorded step: the per-channel least squares of Y ~ a P + b (``fit_channel_affine``)."""
        if not self.fit_records:
            raise ValueError("DEC(quant): the split layer saw no calibration input")
        for i, pairs in self.fit_records.items():
            p, y = torch.cat([q for q, _ in pairs]), torch.cat([f for _, f in pairs])
            a, b = fit_channel_affine(p, y)
            self.dec_a[i], self.dec_b[i] = a.to(self.dec_a), b.to(self.dec_b)
        self.fit_records = None

    def forward(self, x: Tensor) -> Tensor:
        xc, xs = x[:, :self.split], x[:, self.split:]
        p = self.cache(xc)
        i = self.clock.index
        if self.fit_records is not None:
            c = self.cache
            y = F.conv2d(xc, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
            self.fit_records.setdefault(i, []).append((p.detach().float(), y.detach().float()))
        a = self.dec_a[i].to(p).view(1, -1, 1, 1)
        b = self.dec_b[i].to(p).view(1, -1, 1, 1)
        return a * p + b + self.skip(xs)


def cache_split_layers(unet: nn.Module) -> list[str]:
    """The layers of a diffusers UNet that first consume the cached feature: ``conv1`` and (when the channels
    change) ``conv_shortcut`` of ``up_blocks[-1].resnets[0]``, whose input is concat(cache, skip), names relative
    to the UNet."""
    up = getattr(unet, "up_blocks", None)
    if up is None or len(up) < 2 or not getattr(up[-1], "resnets", None):
        raise ValueError(f"{type(unet).__name__} is not a diffusers UNet with up blocks of resnets")
    prefix = f"up_blocks.{len(up) - 1}.resnets.0"
    resnet = up[-1].resnets[0]
    names = [f"{prefix}.conv1"]
    if isinstance(getattr(resnet, "conv_shortcut", None), nn.Conv2d):
        names.append(f"{prefix}.conv_shortcut")
    return names


# --- the quantized model --------------------------------------------------------------------------------------------


class CachedDenoiser(UNetDenoiser):
    """A ``UNetDenoiser`` quantized by CacheQuant, with its refresh ``schedule`` (model calls per run:
    ``schedule.num_steps``), DEC(cache)'s (a, b) per call and cache channel (``cache_a`` / ``cache_b`` (T, C),
    identity on refresh steps) and the ``clock`` its per-timestep quantizers read. ``feature_cache()`` is the
    cache of one sampling run."""

    def __init__(self, unet: nn.Module, schedule: CacheSchedule, clock: StepClock, channels: int) -> None:
        super().__init__(unet)
        self.schedule = schedule
        self.clock = clock
        self.register_buffer("cache_a", torch.ones(schedule.num_steps, channels))
        self.register_buffer("cache_b", torch.zeros(schedule.num_steps, channels))

    def corrections(self) -> dict[int, tuple[Tensor, Tensor]]:
        out = {}
        for t in range(self.schedule.num_steps):
            a, b = self.cache_a[t], self.cache_b[t]
            if t not in self.schedule.refresh and not (bool((a == 1).all()) and bool((b == 0).all())):
                out[t] = (a, b)
        return out

    def feature_cache(self) -> FeatureCache:
        return FeatureCache(self.unet, self.schedule, self.corrections())


def build_cached(unet: nn.Module, config: CacheQuantConfig, state: dict[str, Any]) -> CachedDenoiser:
    """CacheQuant's quant layers on a float diffusers UNet, in place, wrapped as a ``CachedDenoiser`` (``state``:
    ``timesteps``, ``refresh``, ``num_steps``, ``channels``, as ``quantize_cachequant`` records them): the split
    layers, every Conv2d / Linear quantized (conv_in / conv_out at 8-bit weights), per-timestep input quantizers.
    Unset quantizers (``calibrate`` freezes them)."""
    from polyquant.nn import QuantRule, QuantWeightModule, prepare, set_submodule
    from polyquant.primitives import PerChannel, PerTensor

    clock = StepClock(state["timesteps"])
    schedule = CacheSchedule(int(state["num_steps"]), tuple(int(r) for r in state["refresh"]))
    for name in cache_split_layers(unet):
        set_submodule(unet, name, SplitConv2d(unet.get_submodule(name), int(state["channels"]), clock))
    model = CachedDenoiser(unet, schedule, clock, int(state["channels"]))
    act = QuantSpec(f"int{config.abits}", PerTensor(), symmetric=False, observer="mse")

    def weight(bits: int) -> QuantSpec:
        return QuantSpec(f"int{bits}", PerChannel(0), symmetric=False, observer="mse")

    rules = [QuantRule(p, weight=weight(8), input=act) for p in ("unet.conv_in", "unet.conv_out")]
    rules.append(QuantRule((nn.Conv2d, nn.Linear), weight=weight(config.wbits), input=act))
    prepare(model, rules, inplace=True)
    for m in model.modules():
        if isinstance(m, QuantWeightModule) and m.input_quantizer is not None:
            m.input_quantizer = TimestepQuantizer(m.input_quantizer.spec, clock, name=m.input_quantizer.name)
    clock.attach(unet)
    return model


# --- the method ---------------------------------------------------------------------------------------------------


def _timestep(batch: Any) -> int:
    t = batch.get("t") if isinstance(batch, dict) else None
    if not isinstance(t, Tensor) or t.numel() == 0 or bool((t.reshape(-1) != t.reshape(-1)[0]).any()):
        raise UsageError("diffusion/cachequant: each calibration batch is one model call {'x_t', 't', 'labels'} "
                         "with one timestep (calib.timestep_batches)")
    return int(t.reshape(-1)[0])


def split_runs(batches: Sequence[Any], steps: int) -> list[list[Any]]:
    """The calibration batches as sampling runs of ``steps`` consecutive model calls, each run with the same
    timesteps in the same order (UsageError otherwise: CacheQuant replays whole runs under the cache)."""
    batches = list(batches)
    if not batches or len(batches) % steps:
        raise UsageError(f"diffusion/cachequant: {len(batches)} calibration batches are not whole sampling runs of "
                         f"steps = {steps} model calls (record them with timestep_batches, DDIM {steps} steps)")
    runs = [batches[i:i + steps] for i in range(0, len(batches), steps)]
    ref = [_timestep(b) for b in runs[0]]
    for k, run in enumerate(runs[1:], 1):
        if [_timestep(b) for b in run] != ref:
            raise UsageError(f"diffusion/cachequant: calibration run {k} has other timesteps than run 0: the batches "
                             "must be whole sampling runs in sampling order, all with one scheduler and step count")
    return runs


def _replay(model: nn.Module, runs: Sequence[Sequence[Any]], forward_fn: Callable[[nn.Module, Any], Any],
            cache: Callable[[], FeatureCache] | None) -> None:
    for run in runs:
        if cache is None:
            for batch in run:
                forward_fn(model, batch)
        else:
            with cache():
                for batch in run:
                    forward_fn(model, batch)


@torch.no_grad()
def quantize_cachequant(model: nn.Module, config: CacheQuantConfig, batches: Sequence[Any],
                        forward_fn: Callable[[nn.Module, Any], Any], *, progress: bool = False
                        ) -> tuple[CachedDenoiser, dict[str, Any]]:
    """CacheQuant on a ``UNetDenoiser`` (changed in place) from calibration ``batches`` (whole sampling runs of
    ``config.steps`` calls, ``split_runs``): float features -> DPS (or uniform) schedule -> DEC(cache) -> quant
    layers -> per-timestep activation ranges along the cached path -> DEC(quant). Returns the ``CachedDenoiser``
    and the JSON state that ``build_cached`` rebuilds it from."""
    from polyquant.nn import Calibration, calibrate

    from .cache import record_features

    unet = getattr(model, "unet", None)
    if unet is None or not hasattr(unet, "up_blocks"):
        raise UsageError(f"diffusion/cachequant quantizes diffusers UNets (a UNetDenoiser); got {type(model).__name__}"
                         " (a DiT takes cache.FeatureCache with fp4dit)")
    if config.interval > config.steps:
        raise UsageError(f"diffusion/cachequant: the cache interval N = {config.interval} exceeds the {config.steps} "
                         "sampling steps")
    runs = split_runs(batches, config.steps)
    timesteps = list(dict.fromkeys(_timestep(b) for b in runs[0]))  # PLMS calls one timestep twice
    feats = torch.cat([record_features(model, lambda r=run: _replay(model, [r], forward_fn, None)) for run in runs],
                      dim=1)  # (T, B, C, H, W): the float cache feature of every call
    try:
        schedule = (dps_schedule(feats, config.interval) if config.schedule == "dps"
                    else uniform_schedule(config.steps, config.interval))
    except ValueError as e:
        raise UsageError(f"diffusion/cachequant: {e}") from None
    state = {"timesteps": timesteps, "refresh": list(schedule.refresh), "num_steps": config.steps,
             "channels": int(feats.shape[2])}
    cached = build_cached(unet, config, state)
    if config.dec_cache:
        for t, (a, b) in dec_cache(feats, schedule, 1).items():
            cached.cache_a[t], cached.cache_b[t] = a, b
    calibrate(cached, Calibration(runs, lambda m, r: _replay(
        m, [r], forward_fn, cached.feature_cache if config.calib_cached else None)), progress=progress,
        desc="calibrating (cached path)" if config.calib_cached else "calibrating")
    if config.dec_quant:
        splits = [m for m in cached.modules() if isinstance(m, SplitConv2d)]
        for m in splits:
            m.start_fit()
        _replay(cached, runs, forward_fn, cached.feature_cache)
        for m in splits:
            m.finish_fit()
    return cached.eval(), state


def cached_sample(model: nn.Module, labels: Tensor, *, scheduler: str = "ddim", seed: int = 0,
                  schedule: CacheSchedule | None = None, guidance_scale: float = 1.0,
                  return_trajectory: bool = False) -> Any:
    """``models.sample`` of a ``CachedDenoiser`` under its feature cache (its ``schedule.num_steps`` model calls:
    DDIM steps, or PLMS steps + 1), or of a float ``UNetDenoiser`` under ``schedule`` (None: no cache)."""
    from .models import sample

    sched = getattr(model, "schedule", None) if schedule is None else schedule
    if sched is None:
        raise ValueError("cached_sample needs a schedule for a model without one")
    steps = sched.num_steps - (1 if scheduler == "plms" else 0)
    cache = model.feature_cache() if schedule is None else FeatureCache(model, schedule)
    with cache:
        return sample(model.unet, labels, steps=steps, scheduler=scheduler, seed=seed,
                      guidance_scale=guidance_scale, return_trajectory=return_trajectory)


@torch.no_grad()
def schedule_macs(model: nn.Module, schedule: CacheSchedule, batch: dict[str, Tensor]) -> dict[str, float]:
    """CacheQuant's theoretical speedup, counted (``polyquant.metrics.MacCounter``: convolutions and linear layers)
    on one ``batch``: the MACs of a full step and of a cached step, and full / mean MACs per step under
    ``schedule``."""
    from polyquant.metrics import MacCounter

    with MacCounter(model) as full:
        model(batch)
    with FeatureCache(model, CacheSchedule(2, (0,))):
        model(batch)
        with MacCounter(model) as cached:
            model(batch)
    n, r = schedule.num_steps, len(schedule.refresh)
    mean = (r * full.total + (n - r) * cached.total) / n
    return {"full_macs": float(full.total), "cached_macs": float(cached.total), "speedup": full.total / mean}
