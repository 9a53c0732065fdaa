"""Block reconstruction with learnable weight rounding: AdaRound and FlexRound, BRECQ / QDrop style.

Given a ``prepare``d + ``calibrate``d model (weight quantizers frozen with scale / zero point), ``reconstruct``
walks the named blocks in order. For each block it captures the block's inputs in the quantized model and the
block's outputs in the float model (``polyquant.capture``; the forward is stopped right after the block, so only
the current block's tensors are ever held, on CPU), then learns how each weight of every QuantLinear / QuantConv
inside the block is rounded so the block output matches the float one, then hardens the rounding: the module's
float weight is replaced by the dequantized hardened weight, which its (unchanged) weight quantizer maps to
itself exactly. The next block's inputs come from the already reconstructed model (as in BRECQ).

| rounding   | learnable                                                                | paper                      |
|------------|--------------------------------------------------------------------------|----------------------------|
| adaround   | V per weight; W~ = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)     | Nagel et al., ICML 2020    |
|            | ExMy: W~ = s * clamp((floor(x/d) + h(V)) * d), d = x's binade step        |                            |
|  + scale_  | V' = step * V, h(V' / step): gradients no longer scale with the step      | FP4DiT, arXiv 2503.15465   |
|    aware   | (``ReconstructConfig(scale_aware=True)``)                                 |                            |
| flexround  | log s1 (grid), log S2 (per weight), log s3 (per out ch), log s4 (conv in) | Lee et al., ICML 2023      |
| nearest    | nothing: weights round to nearest; only the activation scales learn       | LSQ-style scale refinement |
|            | (``learn_act_scale=True`` is required)                                    | (LiDAR-PTQ's "+ TGPL" step)|

    from polyquant.reconstruct import ReconstructConfig, reconstruct
    qmodel = calibrate(prepare(model, rules), calib)
    reconstruct(qmodel, ["blocks.0", "blocks.1"], calib, ReconstructConfig("adaround", iters=2000), fp_model=model)

A block name may also name a single QuantLinear / QuantConv (layer-wise AdaRound). The loss is pluggable
(``ReconLoss``): "mse" (default), "fisher" (squared task-loss gradients w.r.t. the block output weight the
error; see ``fisher_grad_weights``) or any callable ``(out_q, out_fp, ctx) -> scalar``.

What is simulated: everything here is fake-quant; the hardened weights lie on the quantizer's grid, so packing
them (``export``) is exact.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, Union

import torch
from torch import Tensor, nn

from .capture import Call, capture
from .formats import FloatFormat, IntFormat
from .nn import Quantizer, default_forward, QuantWeightModule
from .primitives import block_expand

__all__ = [
    "ReconstructConfig",
    "ReconContext",
    "ReconLoss",
    "LOSSES",
    "register_loss",
    "mse_loss",
    "fisher_loss",
    "rectified_sigmoid",
    "adaround_init",
    "adaround_regularizer",
    "beta_schedule",
    "AdaRoundWeight",
    "FlexRoundWeight",
    "NearestWeight",
    "BlockData",
    "capture_block_io",
    "fisher_grad_weights",
    "block_output_mse",
    "reconstruct",
]

_log = logging.getLogger(__name__)

ZETA = 1.1  # rectified sigmoid stretch (AdaRound)
GAMMA = -0.1


# --- losses --------------------------------------------------------------------------------------------------


@dataclass
class ReconContext:
    """What a loss may look at besides the two outputs.

    Args:
        block: name of the block being reconstructed.
        iteration: optimisation step (0-based).
        iters: total number of steps.
        grad_weight: per-sample weights with the shape of ``out_fp`` for this mini-batch (``fisher``), or None.
        index: the sample indices of this mini-batch in the captured set.
    """

    block: str
    iteration: int
    iters: int
    grad_weight: Tensor | None = None
    index: Tensor | None = None


class ReconLoss(Protocol):
    """``loss(out_q, out_fp, ctx) -> scalar``: the reconstruction objective of one block output tensor."""

    def __call__(self, out_q: Tensor, out_fp: Tensor, ctx: ReconContext) -> Tensor: ...


LOSSES: dict[str, ReconLoss] = {}  # name -> loss; ReconstructConfig(loss="name") looks names up here


def register_loss(name: str) -> Callable[[ReconLoss], ReconLoss]:
    """Decorator: make a ``ReconLoss`` selectable by name in ``ReconstructConfig(loss=name)``."""

    def deco(fn: ReconLoss) -> ReconLoss:
        LOSSES[name] = fn
        return fn

    return deco


def _channel_sum_mean(err: Tensor) -> Tensor:
    # BRECQ's lp_loss: sum over dim 1 (channels / features), mean over the rest, so reg_weight keeps its scale.
    return err.sum(1).mean() if err.dim() >= 2 else err.mean()


@register_loss("mse")
def mse_loss(out_q: Tensor, out_fp: Tensor, ctx: ReconContext) -> Tensor:
    """Squared error summed over dim 1 and averaged over the other dims (BRECQ's ``lp_loss``, p = 2)."""
    return _channel_sum_mean((out_q - out_fp).pow(2))


@register_loss("fisher")
def fisher_loss(out_q: Tensor, out_fp: Tensor, ctx: ReconContext) -> Tensor:
    """Squared error weighted per element by ``ctx.grad_weight`` (diagonal Fisher / Hessian proxy, BRECQ)."""
    if ctx.grad_weight is None:
        raise ValueError(f"loss='fisher' needs per-sample gradient weights for block {ctx.block!r}: pass "
                         "reconstruct(..., grad_weights=...) (see fisher_grad_weights)")
    return _channel_sum_mean(ctx.grad_weight * (out_q - out_fp).pow(2))


_ROUNDINGS = ("adaround", "flexround", "nearest")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class ReconstructConfig:
    """Block reconstruction settings (defaults follow BRECQ / AdaRound, with fewer iterations).

    Args:
        rounding: "adaround", "flexround" or "nearest" (weights round to nearest and stay fixed; only the
            activation scales learn, so ``learn_act_scale`` must be True).
        iters: optimisation steps per block (papers: 20000; 2000 is usually within a few 0.1% of that).
        lr: Adam learning rate of the rounding variables. None: adaround keeps the papers' budget of lr 1e-3
            over 20000 steps, lr = min(1e-2, 1e-3 * 20000 / iters) (1e-2 at 2000 steps: on the digits MLP at W3
            this matches 20000 steps at 1e-3, while 2000 steps at 1e-3 leave ~3x the block error);
            scale-aware adaround uses FP4DiT's 1e-4 on V' (2500 steps there; V' is in weight units, so this
            lr assumes weights of a transformer's magnitude); flexround uses 1e-3.
        batch_size: samples per step, drawn at random from the captured calibration set.
        reg_weight: AdaRound regularizer weight lambda (ignored by flexround); relative to the losses above,
            which sum over dim 1 and average the rest as BRECQ does, so the papers' 0.01 keeps its meaning.
        beta_range: AdaRound regularizer exponent annealed linearly from beta_range[0] to beta_range[1].
        warmup: fraction of ``iters`` with no regularizer (and beta held at beta_range[0]).
        loss: "mse", "fisher", another name registered with ``register_loss``, or a ``ReconLoss`` callable.
        drop_prob: QDrop: probability that an activation quantizer inside the block (and the block input)
            passes its float value instead during optimisation; 0 turns QDrop off (BRECQ). QDrop uses 0.5.
        act_quant: keep the model's activation quantizers active (True, BRECQ/QDrop) or set them raw for the
            whole reconstruction (False: weight-only reconstruction); their state is restored afterwards.
        learn_act_scale: also learn the scales of the activation quantizers inside the block (LSQ style).
        act_lr: Adam learning rate of the activation scales.
        block_inputs: where a block's inputs come from: "quantized" (the model being reconstructed, which holds
            the earlier, already reconstructed blocks: BRECQ / QDrop) or "float" (the float model's block
            inputs, as the AdaLog reference's ``block_recon.py`` does). QDrop needs "quantized".
        max_samples: keep at most this many captured samples (random subset); None keeps all.
        scale_aware: adaround only: learn V' = step * V with h(V' / step) (FP4DiT's scale-aware AdaRound,
            see ``AdaRoundWeight``); meant for minifloat (ExMy) weights, whose steps differ by binade.
        seed: seed of the mini-batch sampling, the ``max_samples`` subset and the QDrop masks. Each block draws
            from its own stream, seeded by (seed, block name), so a block's result does not depend on which
            blocks were reconstructed before it (with ``block_inputs="float"`` it is bit-identical); the
            global RNG state is left untouched.
        version: config schema version.
    """

    rounding: str = "adaround"
    iters: int = 2000
    lr: float | None = None
    batch_size: int = 32
    reg_weight: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    loss: Union[str, ReconLoss] = "mse"
    drop_prob: float = 0.0
    act_quant: bool = True
    learn_act_scale: bool = False
    act_lr: float = 4e-5
    block_inputs: str = "quantized"
    max_samples: int | None = None
    seed: int = 0
    scale_aware: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose one of {sorted(_ROUNDINGS)}")
        if not _is_int(self.iters) or self.iters < 0:
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")
        if self.block_inputs not in ("quantized", "float"):
            raise ValueError(f"block_inputs must be 'quantized' or 'float', got {self.block_inputs!r}")
        if self.block_inputs == "float" and self.drop_prob > 0:
            raise ValueError("QDrop (drop_prob > 0) mixes float and quantized inputs: use block_inputs='quantized'")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive (or None for the rounding's default), got {self.lr!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not self.reg_weight >= 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight!r}")
        try:
            b0, b1 = (float(b) for b in self.beta_range)
        except (TypeError, ValueError):
            raise ValueError(f"beta_range must be two numbers (start, end), got {self.beta_range!r}") from None
        if not (b0 > 0 and b1 > 0):
            raise ValueError(f"beta_range values must be positive, got {self.beta_range!r}")
        self.beta_range = (b0, b1)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of iters in [0, 1), got {self.warmup!r}")
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise ValueError(f"unknown loss {self.loss!r}; choose one of {sorted(LOSSES)} or pass a callable")
        elif not callable(self.loss):
            raise TypeError(f"loss must be a name or a callable (out_q, out_fp, ctx) -> Tensor, got {self.loss!r}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob is a probability in [0, 1], got {self.drop_prob!r}")
        if not self.act_lr > 0:
            raise ValueError(f"act_lr must be positive, got {self.act_lr!r}")
        if self.max_samples is not None and (not _is_int(self.max_samples) or self.max_samples < 1):
            raise ValueError(f"max_samples must be a positive integer or None, got {self.max_samples!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.scale_aware, bool):
            raise ValueError(f"scale_aware must be a bool, got {self.scale_aware!r}")
        if self.rounding == "nearest" and not self.learn_act_scale:
            raise ValueError("rounding='nearest' learns nothing but activation scales: set learn_act_scale=True")
        if self.scale_aware and self.rounding != "adaround":
            raise ValueError(f"scale_aware is an AdaRound option; rounding={self.rounding!r} has no V to rescale")
        if self.version != 1:
            raise ValueError(f"unsupported ReconstructConfig version {self.version!r}; this polyquant reads 1")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the rounding's default when ``lr`` is None."""
        if self.lr is not None:
            return self.lr
        if self.rounding == "adaround":
            if self.scale_aware:
                return 1e-4  # FP4DiT, on V'
            return min(1e-2, 1e-3 * 20000 / max(self.iters, 1))
        return 1e-3


# --- AdaRound pieces (pure functions) ------------------------------------------------------------------------


def rectified_sigmoid(v: Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def adaround_init(rest: Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """The V with h(V) = rest for a fractional part rest in [0, 1): V = -log((zeta - gamma) / (rest - gamma) - 1)."""
    return -torch.log((zeta - gamma) / (rest - gamma) - 1.0)


def adaround_regularizer(h: Tensor, beta: float) -> Tensor:
    """f_reg = sum(1 - |2 h - 1| ** beta): 0 when every h is 0 or 1, pushes h there as beta decreases."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_schedule(iteration: int, iters: int, *, warmup: float, beta_range: tuple[float, float]) -> tuple[float, bool]:
    """(beta, regularizer on?) at ``iteration``: beta_range[0] during warm-up, then linear to beta_range[1].

    Same schedule as BRECQ's ``LinearTempDecay``: warm-up ends at ``warmup * iters``; beta reaches
    beta_range[1] at the last iteration.
    """
    start_b, end_b = beta_range
    start = warmup * iters
    if iteration < start:
        return float(start_b), False
    rel = (iteration - start) / max(iters - start, 1.0)
    return float(end_b + (start_b - end_b) * max(0.0, 1.0 - rel)), True


# --- learnable rounding modules ------------------------------------------------------------------------------


def _check_weight_quantizer(quantizer: Quantizer, what: str) -> None:
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"{what} needs a polyquant Quantizer, got {type(quantizer).__name__}")
    if quantizer.spec.dynamic:
        raise ValueError(f"{what}: weight quantizer {quantizer.name} is dynamic; reconstruction needs a frozen scale")
    if quantizer.state != "quantized" or quantizer.scale is None:
        raise ValueError(f"{what}: weight quantizer {quantizer.name or ''} is not calibrated (state "
                         f"{quantizer.state!r}); call calibrate() first")


class AdaRoundWeight(nn.Module):
    """AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down; on INT and minifloat grids.

    Stands in for a frozen weight ``Quantizer`` (``state == "quantized"``), so ``QuantLinear.quant_weight()``
    returns the soft (``soft=True``) or hard rounded weight. ``hard_weight()`` is the hardened result.

    IntFormat (s: the block's scale, z: its zero point):
        soft:  W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)
        hard:  W_q = s * (clamp(floor(W / s) + [V >= 0] + z, qmin, qmax) - z)     (h(V) >= 0.5  <=>  V >= 0)
    FloatFormat (x = clamp(W / s, -max, max) in format units; d = ``fmt.step(x)``, the grid spacing of x's
    binade, so floor(x / d) * d and (floor(x / d) + 1) * d are x's two grid neighbours):
        soft:  W~ = s * clamp((floor(x / d) + h(V)) * d, -max, max)
        hard:  W_q = s * clamp((floor(x / d) + [V >= 0]) * d, -max, max)
    V starts at ``adaround_init(rest)``, rest = frac(W / s) (INT) or frac(x / d) (FP), so the soft weight
    starts at W (clamped to the grid's range).

    ``scale_aware`` (FP4DiT, Chen et al., arXiv 2503.15465, Eq. 8): the learnable variable is V' = step * V,
    with step the element's absolute grid spacing (s for INT, s * d for FP), and h'(V') = h(V' / step). The
    gradient w.r.t. V' then no longer scales with the step (it does w.r.t. V), so elements of every binade
    learn at the same pace; the hard rule V' >= 0 is V >= 0. ``v`` holds V' then, ``v_scale`` the step.
    """

    def __init__(self, weight: Tensor, quantizer: Quantizer, *, scale_aware: bool = False) -> None:
        super().__init__()
        _check_weight_quantizer(quantizer, "AdaRound")
        fmt = quantizer.fmt
        if not isinstance(fmt, (IntFormat, FloatFormat)):
            raise ValueError(f"AdaRound rounds onto an integer or minifloat (ExMy) grid; {quantizer.name} uses "
                             f"{fmt.name}")
        self.fmt = fmt
        self.scale_aware = bool(scale_aware)
        self.state = "quantized"  # read by QuantWeightModule.quant_weight()
        self.soft = True
        self.block_size = quantizer.block_size(weight)
        w = weight.detach()
        self.register_buffer("scale", quantizer.scale.detach().to(w.device).float().clone())
        zp = quantizer.zero_point if quantizer.zero_point is not None else torch.zeros_like(quantizer.scale)
        self.register_buffer("zero_point", zp.detach().to(w.device).float().clone())
        s = block_expand(self.scale, w.shape, self.block_size)
        x = w.float() / s
        if isinstance(fmt, FloatFormat):
            x = torch.clamp(x, -fmt.max_value, fmt.max_value)
            step = fmt.step(x)  # grid spacing of each element's binade, in format units
            x = x / step
            self.register_buffer("step", step)
        else:
            step = None
            self.register_buffer("step", None)
        floor = torch.floor(x)
        self.register_buffer("w_floor", floor)
        v = adaround_init((x - floor).clamp(0.0, 1.0))
        if self.scale_aware:
            v_scale = s if step is None else s * step  # absolute grid spacing of each element
            self.register_buffer("v_scale", v_scale.clone())
            v = v * v_scale
        else:
            self.register_buffer("v_scale", None)
        self.v = nn.Parameter(v)

    def h(self) -> Tensor:
        """The rectified sigmoid of V (of V' / step when scale-aware): the soft rounding offset in [0, 1]."""
        return rectified_sigmoid(self.v if self.v_scale is None else self.v / self.v_scale)

    def _dequant(self, offset: Tensor, dtype: torch.dtype) -> Tensor:
        # Same arithmetic as primitives.fake_quantize, so the hard weight is a fixed point of the quantizer.
        s = block_expand(self.scale.to(dtype), self.w_floor.shape, self.block_size)
        if self.step is not None:
            m = self.fmt.max_value
            return torch.clamp((self.w_floor.to(dtype) + offset.to(dtype)) * self.step.to(dtype), -m, m) * s
        z = block_expand(self.zero_point.to(dtype), self.w_floor.shape, self.block_size)
        q = torch.clamp(self.w_floor.to(dtype) + offset.to(dtype) + z, self.fmt.qmin, self.fmt.qmax)
        return (q - z) * s

    def forward(self, weight: Tensor) -> Tensor:
        if weight.shape != self.w_floor.shape:
            raise ValueError(f"AdaRound was built for a weight of shape {tuple(self.w_floor.shape)}, "
                             f"got {tuple(weight.shape)}")
        if not self.soft:
            return self.hard_weight().to(weight.dtype)
        return self._dequant(self.h(), torch.float32).to(weight.dtype)

    def regularizer(self, beta: float) -> Tensor:
        """``adaround_regularizer(h(V), beta)``."""
        return adaround_regularizer(self.h(), beta)

    @torch.no_grad()
    def hard_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The hardened dequantized weight (V >= 0, or V' >= 0, rounds up)."""
        return self._dequant((self.v >= 0).to(dtype), dtype)

    def extra_repr(self) -> str:
        aware = ", scale_aware" if self.scale_aware else ""
        return f"{self.fmt.name}, shape={tuple(self.v.shape)}, soft={self.soft}{aware}"


class FlexRoundWeight(nn.Module):
    """FlexRound (Lee et al., ICML 2023): W~ = s1 * round(W / (s1 * S2 * s3 [* s4])), all factors learnable.

    s1: the common grid size (the quantizer's scale shape, so per-tensor / per-channel / per-group scales keep
    their granularity), S2: one factor per weight, s3: one per output channel, s4: one per input channel (conv
    only). Every factor is ``init * exp(p)`` with p initialised to 0, so at initialisation the forward equals
    round-to-nearest fake quantization exactly. Asymmetric INT formats add the (fixed) zero point inside the
    rounding: s1 * (clamp(round(W / (s1 S2 s3) + z)) - z). Rounding is straight-through.
    ``hard_weight()`` / ``hard_scale()`` give the hardened weight and the learned grid size s1.
    """

    def __init__(self, weight: Tensor, quantizer: Quantizer) -> None:
        super().__init__()
        _check_weight_quantizer(quantizer, "FlexRound")
        self.fmt = quantizer.fmt
        self.state = "quantized"
        self.soft = True  # no soft / hard distinction: kept for symmetry with AdaRoundWeight
        self.block_size = quantizer.block_size(weight)
        w = weight.detach()
        if w.dim() < 2:
            raise ValueError(f"FlexRound needs a weight with an output-channel axis, got shape {tuple(w.shape)}")
        self.register_buffer("w_fp", w.float().clone())
        self.register_buffer("s1_init", quantizer.scale.detach().to(w.device).float().clone())
        zp = quantizer.zero_point
        use_zp = self.fmt.supports_zero_point and zp is not None
        self.register_buffer("zero_point", zp.detach().to(w.device).float().clone() if use_zp else None)
        self.log_s1 = nn.Parameter(torch.zeros_like(self.s1_init))
        self.log_s2 = nn.Parameter(torch.zeros_like(self.w_fp))
        self.log_s3 = nn.Parameter(torch.zeros((w.shape[0],) + (1,) * (w.dim() - 1), device=w.device))
        self.log_s4 = (
            nn.Parameter(torch.zeros((1, w.shape[1]) + (1,) * (w.dim() - 2), device=w.device)) if w.dim() > 2 else None
        )

    def grid_size(self) -> Tensor:
        """s1, with the quantizer's scale shape."""
        return self.s1_init * torch.exp(self.log_s1)

    def _quantize(self, w: Tensor) -> Tensor:
        # Mirrors primitives.fake_quantize: at init every exp() is exactly 1 and the result is bit-identical.
        dtype = w.dtype
        s1 = block_expand(self.grid_size().to(dtype), w.shape, self.block_size)
        div = s1 * torch.exp(self.log_s2).to(dtype) * torch.exp(self.log_s3).to(dtype)
        if self.log_s4 is not None:
            div = div * torch.exp(self.log_s4).to(dtype)
        x = w / div
        if self.zero_point is None:
            return self.fmt.round_ste(x) * s1
        z = block_expand(self.zero_point.to(dtype), w.shape, self.block_size)
        return (self.fmt.round_ste(x + z) - z) * s1

    def forward(self, weight: Tensor) -> Tensor:
        if weight.shape != self.w_fp.shape:
            raise ValueError(f"FlexRound was built for a weight of shape {tuple(self.w_fp.shape)}, "
                             f"got {tuple(weight.shape)}")
        return self._quantize(self.w_fp).to(weight.dtype)

    @torch.no_grad()
    def hard_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The hardened dequantized weight; on the grid of ``hard_scale()``."""
        return self._quantize(self.w_fp.to(dtype))

    @torch.no_grad()
    def hard_scale(self) -> Tensor:
        """The learned grid size s1 (becomes the weight quantizer's scale)."""
        return self.grid_size().detach().clone()

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, shape={tuple(self.w_fp.shape)}"


class NearestWeight(nn.Module):
    """Round-to-nearest stand-in for a frozen weight ``Quantizer`` (``ReconstructConfig(rounding="nearest")``):
    nothing to learn, the weight is the quantizer's fake-quantized weight, and so is ``hard_weight()``."""

    def __init__(self, weight: Tensor, quantizer: Quantizer) -> None:
        super().__init__()
        _check_weight_quantizer(quantizer, "nearest rounding")
        self.quantizer = quantizer
        self.register_buffer("w_fp", weight.detach().clone())
        self.state = "quantized"  # read by QuantWeightModule.quant_weight()

    def forward(self, weight: Tensor) -> Tensor:
        return self.quantizer(weight)

    def regularizer(self, beta: float) -> Tensor:
        return self.w_fp.new_zeros(())

    @torch.no_grad()
    def hard_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.quantizer(self.w_fp).to(dtype)


# rounding name -> the rounder of one weight (weight, its frozen quantizer, the config)
_ROUNDERS: dict[str, Callable[[Tensor, Quantizer, "ReconstructConfig"], nn.Module]] = {
    "adaround": lambda w, q, config: AdaRoundWeight(w, q, scale_aware=config.scale_aware),
    "flexround": lambda w, q, config: FlexRoundWeight(w, q),
    "nearest": lambda w, q, config: NearestWeight(w, q),
}


# --- capture -------------------------------------------------------------------------------------------------


@dataclass
class BlockData:
    """A block's captured calibration data, on CPU, concatenated over batches along dim 0.

    Args:
        args / kwargs: the block's inputs in the quantized model (the float model's with
            ``block_inputs="float"``); tensors whose dim 0 is the batch are concatenated, everything else is
            taken from the first batch (constants such as masks).
        batched_args / batched_kwargs: which positional / keyword inputs are per-sample tensors.
        target: the float model's block output: a list of Tensors (or None entries), one per output.
        target_is_tensor: the block returns a single Tensor (``target`` then has one entry).
        num_samples: number of captured samples.
        fp_args / fp_kwargs: the block's inputs in the float model (only for QDrop), else None.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    batched_args: tuple[bool, ...]
    batched_kwargs: dict[str, bool]
    target: list[Tensor | None]
    target_is_tensor: bool
    num_samples: int
    fp_args: tuple[Any, ...] | None = None
    fp_kwargs: dict[str, Any] | None = None

    def tensors(self) -> list[Tensor]:
        """Every captured tensor (for memory accounting)."""
        groups = (self.args, self.kwargs.values(), self.fp_args or (), (self.fp_kwargs or {}).values(), self.target)
        return [t for group in groups for t in group if isinstance(t, Tensor)]

    def subset(self, index: Tensor) -> "BlockData":
        """The samples ``index`` (batched inputs and targets only; constants are shared)."""
        def take(v: Any, batched: bool) -> Any:
            return v[index] if batched else v

        fp_args = None if self.fp_args is None else tuple(take(a, b) for a, b in zip(self.fp_args, self.batched_args))
        return BlockData(
            args=tuple(take(a, b) for a, b in zip(self.args, self.batched_args)),
            kwargs={k: take(v, self.batched_kwargs[k]) for k, v in self.kwargs.items()},
            batched_args=self.batched_args,
            batched_kwargs=self.batched_kwargs,
            target=[None if t is None else t[index] for t in self.target],
            target_is_tensor=self.target_is_tensor,
            num_samples=int(index.numel()),
            fp_args=fp_args,
            fp_kwargs=None if self.fp_kwargs is None else {
                k: take(v, self.batched_kwargs[k]) for k, v in self.fp_kwargs.items()},
        )


def _get_block(model: nn.Module, name: str, what: str = "model") -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:6]
        raise ValueError(f"{what} has no module named {name!r} (names look like {names})") from None


def _flat_outputs(out: Any, block: str) -> tuple[list[Tensor | None], bool]:
    if isinstance(out, Tensor):
        return [out], True
    if isinstance(out, (tuple, list)) and all(o is None or isinstance(o, Tensor) for o in out):
        return list(out), False
    raise TypeError(f"block {block!r} returns {type(out).__name__}; reconstruction supports a Tensor or a "
                    "tuple / list of Tensors")


def _batch_len(args: tuple[Any, ...], kwargs: dict[str, Any], block: str) -> int:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError(f"block {block!r} has no tensor input to reconstruct from")


def _first_call(model: nn.Module, block: str, batch: Any, forward_fn: Callable[[nn.Module, Any], Any], *,
                inputs: bool, outputs: bool, offload: str | None = "cpu") -> Call:
    """The block's first call in the forward of one batch; the forward stops right after it (before, without
    outputs), so no later module runs."""
    caps = capture(model, [block], [batch], forward_fn=forward_fn, inputs=inputs, outputs=outputs, calls="first",
                   early_stop=True, offload=offload)
    return caps[block].calls[0]


def _collate(records: list[tuple[tuple[Any, ...], dict[str, Any]]], sizes: list[int]) -> tuple[
        tuple[Any, ...], dict[str, Any], tuple[bool, ...], dict[str, bool]]:
    def batched(values: list[Any]) -> bool:
        return all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n for v, n in zip(values, sizes))

    def merge(values: list[Any]) -> tuple[Any, bool]:
        if batched(values):
            return torch.cat(values, 0), True
        return values[0], False

    n_args = len(records[0][0])
    args, flags = [], []
    for i in range(n_args):
        v, b = merge([r[0][i] for r in records])
        args.append(v)
        flags.append(b)
    kwargs, kflags = {}, {}
    for k in records[0][1]:
        kwargs[k], kflags[k] = merge([r[1][k] for r in records])
    return tuple(args), kwargs, tuple(flags), kflags


def capture_block_io(
    model: nn.Module,
    fp_model: nn.Module,
    block: str,
    batches: Iterable[Any],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    fp_inputs: bool = False,
    block_inputs: str = "quantized",
) -> BlockData:
    """Capture ``block``'s inputs in ``model`` and its output in ``fp_model`` for every batch.

    Uses ``polyquant.capture`` per batch (the batches are read once): the forward in ``model`` stops right before
    the block, the one in ``fp_model`` right after it, so no module after the block runs and only this block's
    tensors are ever held (copies, on CPU). With ``fp_inputs`` the float model's block inputs are kept too
    (QDrop). With ``block_inputs="float"`` the block's inputs are the float model's and ``model`` does not run.
    Runs under ``torch.no_grad()``; the caller chooses train / eval mode. If the block is called several times
    in one forward, the first call is captured. Raises ValueError when the block is not called by a forward.
    """
    if block_inputs not in ("quantized", "float"):
        raise ValueError(f"block_inputs must be 'quantized' or 'float', got {block_inputs!r}")
    forward_fn = forward_fn or default_forward
    _get_block(model, block)
    _get_block(fp_model, block, "fp_model")
    from_float = block_inputs == "float"
    q_records: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    f_records: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    outs: list[list[Tensor | None]] = []
    is_tensor = True
    for batch in batches:
        if not from_float:
            q = _first_call(model, block, batch, forward_fn, inputs=True, outputs=False)
            q_records.append((q.args, q.kwargs))
        f = _first_call(fp_model, block, batch, forward_fn, inputs=fp_inputs or from_float, outputs=True)
        flat, is_tensor = _flat_outputs(f.output, block)
        outs.append(flat)
        if fp_inputs or from_float:
            f_records.append((f.args, f.kwargs))
    if not outs:
        raise ValueError("the calibration set is empty: reconstruction needs at least one batch")
    records = f_records if from_float else q_records
    sizes = [_batch_len(a, k, block) for a, k in records]
    args, kwargs, bargs, bkwargs = _collate(records, sizes)
    del q_records
    target: list[Tensor | None] = []
    for j in range(len(outs[0])):
        parts = [o[j] for o in outs]
        if parts[0] is None:
            target.append(None)
            continue
        if not all(isinstance(p, Tensor) and p.dim() > 0 and p.shape[0] == n for p, n in zip(parts, sizes)):
            raise ValueError(f"output {j} of block {block!r} is not batched along dim 0 like its input")
        target.append(torch.cat(parts, 0))  # type: ignore[arg-type]
    del outs
    fp_args = fp_kwargs = None
    if fp_inputs and not from_float:
        fp_args, fp_kwargs, _, _ = _collate(f_records, sizes)
    return BlockData(args, kwargs, bargs, bkwargs, target, is_tensor, sum(sizes), fp_args, fp_kwargs)


def fisher_grad_weights(
    model: nn.Module,
    block: str,
    batches: Iterable[Any],
    task_loss: Callable[[Any, Any], Tensor],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    normalize: bool = True,
) -> list[Tensor]:
    """Squared gradients of ``task_loss(model_output, batch)`` w.r.t. ``block``'s output, one tensor per batch.

    Use the float model (BRECQ's diagonal Fisher). The gradients come from ``polyquant.capture`` (the first
    call of the block in each forward): the backward stops at the block output and no parameter gradient is
    computed or accumulated; a frozen model works too. The model runs in eval mode
    (its mode is restored). With ``normalize`` the weights are divided by their mean over the whole set, so
    ``reg_weight`` keeps the balance it has with the plain MSE. Pass them to ``reconstruct`` as
    ``grad_weights={block: weights}`` or lazily ``grad_weights=lambda b: fisher_grad_weights(fp, b, ...)``.
    The block must return a single Tensor. Results are on CPU.
    """
    _get_block(model, block)
    was_training = model.training
    model.eval()
    try:
        caps = capture(model, [block], batches, forward_fn=forward_fn or default_forward, inputs=False,
                       outputs=False, loss_fn=task_loss, calls="first")
    finally:
        model.train(was_training)
    grads: list[Tensor] = []
    for call in caps[block].calls:
        if not isinstance(call.grad, Tensor):
            raise TypeError(f"fisher_grad_weights needs block {block!r} to return a Tensor, got "
                            f"{type(call.grad).__name__}")
        grads.append(call.grad.pow(2))
    if normalize:
        mean = sum(float(g.double().sum()) for g in grads) / sum(g.numel() for g in grads)
        if not mean > 0 or not math.isfinite(mean):
            raise ValueError(f"the task-loss gradients at block {block!r} are all zero (or not finite); "
                             "check task_loss")
        grads = [g / mean for g in grads]
    return grads


def block_output_mse(
    model: nn.Module,
    fp_model: nn.Module,
    block: str,
    batches: Iterable[Any],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> float:
    """Mean squared error between ``block``'s output in ``model`` (fed its own inputs) and in ``fp_model``.

    Both forwards stop after the block. Averaged over every output element; tuple outputs are summed.
    """
    forward_fn = forward_fn or default_forward
    _get_block(model, block)
    _get_block(fp_model, block, "fp_model")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            got = [_flat_outputs(_first_call(m, block, batch, forward_fn, inputs=False, outputs=True,
                                             offload=None).output, block)[0] for m in (model, fp_model)]
            for q, f in zip(got[0], got[1]):
                if q is not None and f is not None:
                    total += float((q.float() - f.float().to(q.device)).pow(2).sum())
                    count += q.numel()
    if count == 0:
        raise ValueError("no output compared: the batch set is empty")
    return total / count


# --- engine --------------------------------------------------------------------------------------------------


def _block_seed(seed: int, block: str) -> int:
    """The RNG seed of one block: a function of ``seed`` and the block's name only (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63: a valid torch seed


def _weight_modules(block: nn.Module) -> list[QuantWeightModule]:
    return [m for m in block.modules() if isinstance(m, QuantWeightModule) and m.weight_quantizer is not None]


def _act_quantizers(module: nn.Module) -> list[Quantizer]:
    weight_qs = {id(m.weight_quantizer) for m in module.modules() if isinstance(m, QuantWeightModule)}
    return [q for q in module.modules() if isinstance(q, Quantizer) and id(q) not in weight_qs]


def _float_copy(model: nn.Module) -> nn.Module:
    fp = copy.deepcopy(model)
    for q in fp.modules():
        if isinstance(q, Quantizer):
            q.set_state("raw")
    return fp


def _check_blocks(model: nn.Module, blocks: Sequence[str]) -> None:
    if isinstance(blocks, str):
        raise TypeError("blocks is a list of module names, e.g. ['blocks.0', 'blocks.1']; got a single string")
    if not blocks:
        raise ValueError("reconstruct needs at least one block name")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"duplicate block names in {list(blocks)}")
    for b in blocks:
        if b == "":
            raise ValueError("the whole model cannot be a block ('' given); name its sub-modules")
        for other in blocks:
            if other != b and other.startswith(b + "."):
                raise ValueError(f"block {other!r} is nested inside block {b!r}")
        mods = _weight_modules(_get_block(model, b))
        if not mods:
            raise ValueError(f"block {b!r} holds no QuantLinear / QuantConv with a weight quantizer")
        for m in mods:
            _check_weight_quantizer(m.weight_quantizer, f"block {b!r}")  # type: ignore[arg-type]


def _grad_weights_for(
    block: str,
    grad_weights: Mapping[str, Sequence[Tensor]] | Callable[[str], Sequence[Tensor]] | None,
    data: BlockData,
) -> list[Tensor | None] | None:
    if grad_weights is None:
        return None
    gw = grad_weights(block) if callable(grad_weights) else grad_weights.get(block)
    if gw is None:
        return None
    if isinstance(gw, Tensor):
        gw = [gw]
    cat = torch.cat([g.detach().float().cpu() for g in gw], 0)
    first = data.target[0]
    if first is None or cat.shape != first.shape:
        raise ValueError(f"grad_weights for block {block!r} have shape {tuple(cat.shape)} after concatenating the "
                         f"batches; the block output has {None if first is None else tuple(first.shape)}")
    return [cat] + [None] * (len(data.target) - 1)


def _inputs(data: BlockData, index: Tensor, device: torch.device, drop_prob: float) -> tuple[tuple[Any, ...],
                                                                                              dict[str, Any]]:
    def pick(q: Any, f: Any, batched: bool) -> Any:
        if not batched:
            return q.to(device) if isinstance(q, Tensor) else q
        q = q[index].to(device)
        if f is not None and drop_prob > 0 and q.is_floating_point():
            # QDrop on the block input: each element is the float model's value with probability drop_prob.
            f = f[index].to(device)
            q = torch.where(torch.rand_like(q) < drop_prob, f, q)
        return q

    fa = data.fp_args or (None,) * len(data.args)
    fk = data.fp_kwargs or {}
    args = tuple(pick(a, f, b) for a, f, b in zip(data.args, fa, data.batched_args))
    kwargs = {k: pick(v, fk.get(k), data.batched_kwargs[k]) for k, v in data.kwargs.items()}
    return args, kwargs


def _reconstruct_block(
    model: nn.Module,
    fp_model: nn.Module,
    name: str,
    batches: Iterable[Any],
    config: ReconstructConfig,
    forward_fn: Callable[[nn.Module, Any], Any],
    grad_weights: Mapping[str, Sequence[Tensor]] | Callable[[str], Sequence[Tensor]] | None,
    progress: bool,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    block = _get_block(model, name)
    data = capture_block_io(model, fp_model, name, batches, forward_fn=forward_fn, fp_inputs=config.drop_prob > 0,
                            block_inputs=config.block_inputs)
    gw = _grad_weights_for(name, grad_weights, data)
    loss_fn: ReconLoss = LOSSES[config.loss] if isinstance(config.loss, str) else config.loss
    if config.loss == "fisher" and gw is None:
        raise ValueError(f"loss='fisher' needs grad_weights for block {name!r} (see fisher_grad_weights)")
    captured = torch.arange(data.num_samples)  # a sample's index in the captured set (ReconContext.index)
    if config.max_samples is not None and data.num_samples > config.max_samples:
        keep = torch.randperm(data.num_samples)[: config.max_samples]
        captured = keep
        data = data.subset(keep)
        gw = None if gw is None else [None if g is None else g[keep] for g in gw]
    n = data.num_samples
    device = next((p.device for p in block.parameters()), torch.device("cpu"))

    modules = _weight_modules(block)
    originals = [m.weight_quantizer for m in modules]
    act_qs = [q for q in _act_quantizers(block) if q.state == "quantized"]
    learn_qs = [q for q in act_qs if config.learn_act_scale and not q.spec.dynamic and q.scale is not None]
    requires = {id(p): p.requires_grad for p in block.parameters()}
    hooks: list[Any] = []
    rounders: list[nn.Module] = []
    done = False
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for m, q in zip(modules, originals):
            r = _ROUNDERS[config.rounding](m.weight, q, config)  # type: ignore[arg-type]
            rounders.append(r)
            m.weight_quantizer = r  # type: ignore[assignment]
        for q in learn_qs:
            if isinstance(q.scale, nn.Parameter):  # a subclass's learnable scale: requires_grad restored below
                q.scale.requires_grad_(True)
            else:  # a buffer: swapped for a leaf that requires grad, detached again below
                q.scale = q.scale.detach().clone().requires_grad_(True)  # type: ignore[union-attr]
        if config.drop_prob > 0:
            p_drop = config.drop_prob

            def drop(module: nn.Module, inp: tuple[Any, ...], out: Tensor) -> Tensor:
                # QDrop: each element keeps its float value with probability drop_prob.
                return torch.where(torch.rand_like(out) < p_drop, inp[0], out)

            hooks = [q.register_forward_hook(drop) for q in act_qs]

        params = [p for r in rounders for p in r.parameters()]
        opt = torch.optim.Adam(params, lr=config.learning_rate) if params else None  # nearest: none
        act_opt = sched = None
        if learn_qs:
            act_opt = torch.optim.Adam([q.scale for q in learn_qs], lr=config.act_lr)  # type: ignore[misc]
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=max(config.iters, 1), eta_min=0.0)
        adaround = config.rounding == "adaround"
        first_rec = last_rec = float("nan")
        bar = tqdm(range(config.iters), desc=f"reconstruct {name}", disable=not progress, leave=False)
        with torch.enable_grad():
            for it in bar:
                index = torch.randperm(n)[: config.batch_size]
                args, kwargs = _inputs(data, index, device, config.drop_prob)
                outs, _ = _flat_outputs(block(*args, **kwargs), name)
                rec = torch.zeros((), device=device)
                for j, (o, t) in enumerate(zip(outs, data.target)):
                    if o is None or t is None:
                        continue
                    g = None if gw is None or gw[j] is None else gw[j][index].to(device)  # type: ignore[index]
                    ctx = ReconContext(name, it, config.iters, g, captured[index])
                    rec = rec + loss_fn(o.float(), t[index].to(device).float(), ctx)
                total = rec
                if adaround:
                    beta, reg_on = beta_schedule(it, config.iters, warmup=config.warmup, beta_range=config.beta_range)
                    if reg_on and config.reg_weight > 0:
                        reg = sum(r.regularizer(beta) for r in rounders)  # type: ignore[operator]
                        total = total + config.reg_weight * reg
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                if act_opt is not None:
                    act_opt.zero_grad(set_to_none=True)
                total.backward()
                if opt is not None:
                    opt.step()
                if act_opt is not None:
                    act_opt.step()
                    sched.step()  # type: ignore[union-attr]
                    with torch.no_grad():
                        for q in learn_qs:
                            q.scale.clamp_(min=1e-8)  # type: ignore[union-attr]
                if it % 100 == 0 or it == config.iters - 1:  # reading a loss syncs the device: not every step
                    last_rec = float(rec.detach())
                    first_rec = last_rec if it == 0 else first_rec
                    if progress:
                        bar.set_postfix(rec=f"{last_rec:.4g}", total=f"{float(total.detach()):.4g}")

        # Harden: the dequantized hard weight becomes the float weight; the unchanged quantizer maps it to itself.
        for m, q, r in zip(modules, originals, rounders):
            w_old = m.weight
            w_q = r.hard_weight(w_old.dtype)  # type: ignore[operator]
            if isinstance(r, FlexRoundWeight):
                q.scale = r.hard_scale().to(q.scale.dtype)  # type: ignore[union-attr]
            m.weight_quantizer = q
            m.weight = nn.Parameter(w_q.to(w_old.device), requires_grad=requires.get(id(w_old), True))
        done = True
        return {"first_loss": first_rec, "last_loss": last_rec}
    finally:
        for h in hooks:
            h.remove()
        for q in learn_qs:
            if isinstance(q.scale, nn.Parameter):
                q.scale.grad = None
            else:
                q.scale = q.scale.detach()  # type: ignore[union-attr]
        if not done:
            for m, q in zip(modules, originals):
                m.weight_quantizer = q
        for p in block.parameters():
            p.requires_grad_(requires.get(id(p), p.requires_grad))


def reconstruct(
    model: nn.Module,
    blocks: Sequence[str],
    calib_batches: Iterable[Any],
    config: ReconstructConfig | None = None,
    *,
    fp_model: nn.Module | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    grad_weights: Mapping[str, Sequence[Tensor]] | Callable[[str], Sequence[Tensor]] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Reconstruct ``blocks`` of a prepared + calibrated model in order, in place; returns ``model``.

    Args:
        model: ``prepare``d and ``calibrate``d model; its weight quantizers must be frozen ("quantized").
        blocks: module names in forward order ("blocks.0", "blocks.1", or a single "fc1" for layer-wise).
        calib_batches: calibration batches (re-iterated once per block; a list, not a one-shot iterator).
        config: ``ReconstructConfig``; None uses the defaults.
        fp_model: the float reference with the same module names (e.g. the model before ``prepare``); None
            uses a deep copy of ``model`` with every quantizer raw (costs one model copy).
        forward_fn: ``forward_fn(model, batch)`` runs a batch (as in ``calibrate``).
        grad_weights: per-sample loss weights for ``loss="fisher"``: block name -> one tensor per batch with
            the block output's shape, or a callable returning them (computed lazily, block by block).
        progress: tqdm bars over blocks and iterations.

    For each block: capture (``capture_block_io``: the block's inputs in ``model``, which already holds the
    reconstructed earlier blocks, and its output in ``fp_model``), optimise the rounding of every weight
    quantizer inside (Adam; AdaRound adds lambda * f_reg after the warm-up), harden, free the captured data.
    Both models run in eval mode (modes restored). Block parameters are frozen during the optimisation.

    After a block is reconstructed, each QuantLinear / QuantConv inside holds the hardened dequantized weight
    as its float ``weight`` (a new Parameter: a float model sharing the old one is left untouched; FlexRound
    also updates its weight quantizer's scale), so ``quant_weight()`` equals ``weight`` exactly and export /
    packing see the learned rounding.
    """
    from tqdm.auto import tqdm

    config = config if config is not None else ReconstructConfig()
    if not isinstance(config, ReconstructConfig):
        raise TypeError(f"config must be a ReconstructConfig, got {type(config).__name__}")
    _check_blocks(model, blocks)
    if isinstance(calib_batches, Iterator):
        raise TypeError("calib_batches is a one-shot iterator; pass a list or a DataLoader (it is re-iterated "
                        "once per block)")
    if config.loss == "fisher" and grad_weights is None:
        raise ValueError("loss='fisher' needs grad_weights (see fisher_grad_weights)")
    forward_fn = forward_fn or default_forward
    fp = fp_model if fp_model is not None else _float_copy(model)
    for b in blocks:
        _get_block(fp, b, "fp_model")
    modes = (model.training, fp.training)
    saved_states: list[tuple[Quantizer, str]] = []
    if not config.act_quant:
        saved_states = [(q, q.state) for q in _act_quantizers(model)]
        for q, _ in saved_states:
            q.state = "raw"  # raw is the identity and keeps scale / zero point: restored below
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    fp.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for name in tqdm(blocks, desc=f"{config.rounding}", disable=not progress):
                torch.manual_seed(_block_seed(config.seed, name))
                stats = _reconstruct_block(model, fp, name, calib_batches, config, forward_fn, grad_weights, progress)
                _log.info("reconstructed %s: loss %.4g -> %.4g", name, stats["first_loss"], stats["last_loss"])
    finally:
        for q, state in saved_states:
            q.state = state  # type: ignore[assignment]
        model.train(modes[0])
        fp.train(modes[1])
    return model
