"""AdaLog: adaptive-base logarithmic quantizer (Wu et al., ECCV 2024, arXiv 2407.12951).

The base is b = 2^(q/r) with r = 37 fixed and the integer q searched in 10 .. 137 (b from 1.21 to 13.0). With
n bits and scale s (reference code: GoatWu/AdaLog ``quantizers/logarithm.py``):

    u    = clamp((x + shift) / s, 1e-15, 1)
    k    = round(-log2(u) * r / q)              codes k >= 2^n are flushed to 0 (a mask), the rest clamped
    float:    x_hat = s * 2^(-k q / r)                                  (training / reconstruction path, STE)
    hardware: x_hat = s * T2[k] * 2^(-T1[k])    T1[k] = floor(k q / r)  (a right shift)
                                                T2[k] = round(2^(-((k q) mod r) / r) * D) / D,  D = 2^(n+1) - 2
    then x_hat - shift, unless the shift has been folded into the next layer's bias (``fold_shift``).

T2's entries lie in (0.5, 1] and are rounded to a step of 1/D, so the hardware value differs from the float one
by at most s * 2^(-T1[k]) / (2 D): a relative error of at most ``lut_error_bound(n)`` = 2^((r-1)/r) / (2 D)
(3.3 % at 4 bits, 7.0 % at 3 bits, 0.8 % at 6 bits). Both tables have 2^n entries and follow q.

Post-GELU inputs use the shifted form (shift = ``GELU_SHIFT`` = -min GELU) and fold -shift into fc2's bias:
fc2(Q(x + shift) - shift) = W_q Q(x + shift) + (b - shift * W_q 1). Post-softmax probabilities use scale 1 and
only q is searched. ``AdaLogConfig`` configures the full method (placement, FPCS, LayerNorm reparameterization),
run by ``polyquant.quantize`` through the harness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from polyquant.config import int_field
from polyquant.formats import LogFormat, round_ste
from polyquant.nn import QuantSpec
from polyquant.search import lowest, progressive_search

from .fpcs import positive_quantile
from .quantizers import GELU_SHIFT, VitQuantizer
from .recipe import HarnessConfig, Recipe

__all__ = [
    "R",
    "Q_MIN",
    "Q_MAX",
    "GELU_SHIFT",
    "adalog_codes",
    "adalog_tables",
    "adalog_dequant_float",
    "adalog_dequant_lut",
    "adalog_fq",
    "adalog_fq_from_log2",
    "adalog_levels",
    "lut_error_bound",
    "AdaLogQuantizer",
    "fold_shift",
    "search_log_base",
    "adalog_activation_fpcs",
    "AdaLogConfig",
]

R = 37  # denominator of log2(base) = q / r (fixed in the paper and the code)
# Searched numerators: the reference builds range(10, 11 + eq_n) (10..138 at eq_n = 128) but its loop scores only
# the first eq_n of them (``for p_st in range(0, self.eq_n, ...)``), so q is searched in 10..137. A q of 138 still
# loads (artifacts written before this change).
Q_MIN, Q_MAX = 10, 137
Q_LIMIT = 138


_MAX_NEG_LOG2 = -math.log2(1e-15)  # u is clamped to [1e-15, 1]: -log2(u) in [0, 49.83]


def _neg_log2_u(log2_x: Tensor, scale: Tensor) -> Tensor:
    """-log2(clamp(x / s, 1e-15, 1)) from log2(x) (x already shifted; log2 of non-positive x is very negative)."""
    return (torch.log2(scale) - log2_x).clamp_(0.0, _MAX_NEG_LOG2)


def _log2_shifted(x: Tensor, shift: float) -> Tensor:
    return torch.log2((x + shift).clamp_min(1e-38))


def adalog_codes(x: Tensor, scale: Tensor, q: Tensor | float, bits: int, *, r: int = R,
                 shift: float = 0.0) -> tuple[Tensor, Tensor]:
    """Codes k (float tensor of integers in [0, 2^n - 1]) and the keep mask (False: flushed to zero).

    ``scale`` and ``q`` broadcast against ``x`` (a leading candidate dimension evaluates many at once).
    """
    e = _neg_log2_u(_log2_shifted(x, shift), scale) * r / q
    k = round_ste(e)
    keep = k < 2**bits
    return k.clamp(0, 2**bits - 1), keep


def _table_step(bits: int) -> float:
    return 1.0 / (2 ** (bits + 1) - 2)


def _frac_table(bits: int, r: int = R) -> Tensor:
    """round(2^(-j/r) / step) * step for j = 0 .. r - 1: every value T2 can take (the reference's ``table``)."""
    step = _table_step(bits)
    j = torch.arange(r, dtype=torch.float64)
    return (torch.round(torch.exp2(-j / r) / step) * step).float()


def adalog_tables(q: int, bits: int, *, r: int = R) -> tuple[Tensor, Tensor]:
    """The hardware tables for integer ``q``: T1 (int64 shifts) and T2 (fixed-point multipliers), 2^n entries."""
    k = torch.arange(2**bits, dtype=torch.int64)
    t1 = torch.div(k * int(q), r, rounding_mode="floor")
    t2 = _frac_table(bits, r)[(k * int(q)) % r]
    return t1, t2


def adalog_levels(q: Tensor | float, bits: int, *, r: int = R, lut: bool = True) -> Tensor:
    """Dequantized value (scale 1) of every code, plus a trailing 0 for flushed codes: (..., 2^n + 1).

    ``lut``: T2[k] * 2^(-T1[k]) (hardware); else 2^(-k q / r). ``q`` of shape (K,) gives one row per candidate.
    """
    q_t = torch.as_tensor(q, dtype=torch.float32).reshape(-1, 1)  # (K, 1)
    k = torch.arange(2**bits, dtype=torch.float32)[None]  # (1, L)
    if lut:
        kq = torch.round(k * q_t)  # exact integers
        t1 = torch.floor(kq / r)
        t2 = _frac_table(bits, r)[(kq - t1 * r).long().clamp(0, r - 1)]
        vals = t2 * torch.exp2(-t1)
    else:
        vals = torch.exp2(-k * q_t / r)
    vals = torch.cat([vals, torch.zeros(vals.shape[0], 1)], dim=1)
    return vals if torch.as_tensor(q).dim() > 0 else vals[0]


def adalog_dequant_float(k: Tensor, keep: Tensor, scale: Tensor, q: Tensor | float, *, r: int = R) -> Tensor:
    """s * 2^(-k q / r) where kept, else 0."""
    return torch.exp2(-k * q / r) * scale * keep.to(k.dtype)


def adalog_dequant_lut(k: Tensor, keep: Tensor, scale: Tensor, q: Tensor | float, bits: int, *, r: int = R) -> Tensor:
    """s * T2[k] * 2^(-T1[k]) where kept, else 0 (elementwise formula; q may be a tensor of candidates)."""
    q_t = torch.as_tensor(q, dtype=torch.float32)
    kq = torch.round(k.detach() * q_t)  # exact integers
    t1 = torch.floor(kq / r)
    t2 = _frac_table(bits, r).to(k.device)[(kq - t1 * r).long().clamp(0, r - 1)]
    return t2 * torch.exp2(-t1) * scale * keep.to(k.dtype)


def adalog_fq_from_log2(log2_x: Tensor, scale: Tensor, q: Tensor | float, bits: int, *, r: int = R,
                        shift: float = 0.0, lut: bool = True, subtract_shift: bool = True) -> Tensor:
    """``adalog_fq`` from precomputed log2(x + shift) (searches reuse it across candidates).

    ``scale`` / ``q`` are scalars / (1,) or carry a leading candidate dimension K (shape (K, 1, ..., 1)).
    """
    if lut and not (torch.is_grad_enabled() and (log2_x.requires_grad or torch.is_tensor(scale) and scale.requires_grad)):
        # Fused inference path (searches): codes -> index into the table of dequantized values (the 2^n + 1
        # levels times the scale, minus the shift: the float operations of the element-wise path, on the table).
        q_t = torch.as_tensor(q)
        codes = (_neg_log2_u(log2_x, scale) * (r / q_t)).round_().clamp_(0, 2**bits)
        table = adalog_levels(q_t.reshape(-1), bits, r=r).to(codes.device, log2_x.dtype)  # (1 or K, 2^n + 1)
        table = table * scale.reshape(-1, 1)  # rows: 1 or K (candidates of q or of the scale)
        if subtract_shift and shift:
            table = table.sub_(shift)
        if table.shape[0] == 1:  # one table: index_select with int32 indices is the fastest gather on CPU
            return table[0].index_select(0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)
        # K tables: the codes carry the same K rows (they broadcast the same scale and q candidates)
        return table.gather(1, codes.reshape(table.shape[0], -1).long()).reshape(codes.shape)
    e = _neg_log2_u(log2_x, scale) * r / q
    k = round_ste(e)
    if lut:
        idx = k.detach().clamp(0, 2**bits).long()  # code 2^n (and above): flushed -> the trailing 0 level
        q_t = torch.as_tensor(q)
        levels = adalog_levels(q_t.reshape(-1), bits, r=r, lut=True).to(idx.device, log2_x.dtype)  # (K, L + 1)
        kk = levels.shape[0]
        if kk == 1:  # one q for every element
            out = torch.take(levels[0], idx) * scale
        else:
            idx = idx.expand(kk, *idx.shape[1:]) if idx.shape[0] != kk else idx
            out = levels.gather(1, idx.reshape(kk, -1)).reshape(idx.shape) * scale
    else:
        keep = (k < 2**bits).to(log2_x.dtype)
        out = torch.exp2(-k.clamp(0, 2**bits - 1) * q / r) * scale * keep
    return out - shift if subtract_shift else out


def adalog_fq(x: Tensor, scale: Tensor, q: Tensor | float, bits: int, *, r: int = R, shift: float = 0.0,
              lut: bool = True, subtract_shift: bool = True) -> Tensor:
    """AdaLog fake-quant: hardware (``lut``) or float dequantization, minus the shift unless it was folded.

    The float path is differentiable (straight-through rounding); the table path is not (inference only).
    """
    return adalog_fq_from_log2(_log2_shifted(x, shift), scale, q, bits, r=r, shift=shift, lut=lut,
                               subtract_shift=subtract_shift)


def lut_error_bound(bits: int, r: int = R) -> float:
    """Largest relative error |x_lut - x_float| / x_float of the hardware path (see the module docstring)."""
    return 2 ** ((r - 1) / r) * _table_step(bits) / 2


class AdaLogQuantizer(VitQuantizer):
    """AdaLog quantizer, layer-wise: scale s, base numerator q (buffers), optional post-GELU shift.

    ``lut`` selects the hardware dequantization (default, inference) or the float one (straight-through,
    used while reconstructing). ``bias_folded`` (a buffer) records that -shift now lives in the next bias.
    """

    def __init__(self, bits: int, *, shift: float = 0.0, r: int = R, name: str = "") -> None:
        super().__init__(QuantSpec(LogFormat(bits, base_ratio=(int(r), int(r)), lut=True)), bits=bits, name=name)
        self.r = int(r)
        self.shift = float(shift)
        self.lut = True
        self.scale = torch.ones(1)
        self.register_buffer("q", torch.full((1,), float(r)))
        self.register_buffer("bias_folded", torch.zeros((), dtype=torch.bool))

    @property
    def base_log2(self) -> float:
        return float(self.q) / self.r

    @property
    def fmt(self) -> LogFormat:
        """The real format: 0 and 2^(-k q / r), k < 2^bits (the hardware levels when ``lut``); follows q."""
        return LogFormat(self.bits, base_ratio=(int(self.q), self.r), lut=self.lut)

    def set_params(self, scale: Tensor | float, q: Tensor | int) -> None:
        """Freeze a searched scale and base numerator q (an integer in [Q_MIN, Q_LIMIT])."""
        qv = int(round(float(q)))
        if not Q_MIN <= qv <= Q_LIMIT:
            raise ValueError(f"AdaLog q must be an integer in [{Q_MIN}, {Q_LIMIT}], got {q}")
        self.q = torch.full((1,), float(qv))
        self.freeze(torch.as_tensor(scale, dtype=torch.float32).reshape(1), spec=QuantSpec(self.fmt))

    def tables(self) -> tuple[Tensor, Tensor]:
        return adalog_tables(int(self.q), self.bits, r=self.r)

    def fake_quant(self, x: Tensor) -> Tensor:
        out = adalog_fq(x, self.scale, self.q, self.bits, r=self.r, shift=self.shift, lut=self.lut,
                        subtract_shift=False)
        if not self.shift:
            return out
        return out - self.shift * (~self.bias_folded).to(out.dtype)  # a tensor flag: no read-back (torch.compile)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, base=2^({int(self.q)}/{self.r}), shift={self.shift:g}, "
                f"folded={bool(self.bias_folded)}, lut={self.lut}, state={self.state}")


@torch.no_grad()
def fold_shift(layer: nn.Module) -> bool:
    """Fold the input quantizer's -shift into ``layer``'s bias: b <- b + W_q (-shift * 1). Returns True if done.

    ``layer`` is a QuantLinear whose ``input_quantizer`` has a ``shift`` and a ``bias_folded`` flag (the
    post-GELU AdaLog quantizer); its weight quantizer must already be final (the fold uses W_q).
    """
    quant = getattr(layer, "input_quantizer", None)
    if quant is None or not hasattr(quant, "bias_folded") or getattr(quant, "shift", 0.0) == 0.0:
        return False
    if bool(quant.bias_folded):
        return True
    if layer.bias is None:
        raise ValueError(f"{quant.name}: the layer has no bias to fold the shift into")
    w_q = layer.quant_weight() if hasattr(layer, "quant_weight") else layer.weight
    layer.bias.add_(w_q.sum(dim=1) * (-quant.shift))
    quant.bias_folded = torch.ones((), dtype=torch.bool)
    return True


# --- searches ----------------------------------------------------------------------------------------------------


def search_log_base(evaluate_q: Callable[[Tensor], Tensor], *, topk: int = 1,
                    q_range: tuple[int, int] = (Q_MIN, Q_MAX)) -> tuple[Tensor, Tensor]:
    """Rank every integer q in ``q_range`` (inclusive) with ``evaluate_q(qs (K,)) -> loss (K,)``; returns the
    ``topk`` best q values and their losses (``polyquant.search.lowest``: NaN ranks last)."""
    qs = torch.arange(q_range[0], q_range[1] + 1, dtype=torch.float32)
    loss = torch.nan_to_num(evaluate_q(qs), nan=float("inf"))
    best = lowest(loss[:, None], topk)[:, 0]
    return qs[best], loss[best]


def adalog_activation_fpcs(
    x: Tensor,
    evaluate: Callable[[Tensor, Tensor], Tensor],
    current_scale: float,
    *,
    shift: float = 0.0,
    eq_n: int = 128,
    steps: int = 6,
    base_num: int = 8,
    scale_num: int = 16,
    width: int = 32,
) -> tuple[float, int, float, int]:
    """FPCS for an AdaLog activation quantizer (reference ``activation_fpcs(base_num=8, scale_num=16, width=32)``).

    ``evaluate(scales (K,), qs (K,)) -> loss (K,)`` (lower is better). 1) rank every q at ``current_scale`` and
    keep ``base_num``; 2) cross them with ``scale_num`` scales spaced between (P90, P100 of the positive values
    of x) + shift, as the reference computes them; 3) the core ``progressive_search`` with q in the zero-point
    slot: keep ``width``, ``steps - 1`` rounds of ``eq_n / width`` new scales per survivor, the step shrinking by
    (eq_n / width - 0.5). Returns (scale, q, loss, evaluations).
    """
    scale0 = torch.tensor([float(current_scale)])
    q_top, _ = search_log_base(lambda qs: evaluate(scale0.expand_as(qs), qs), topk=base_num)
    lo, hi = (positive_quantile(x, [0.9, 1.0]) + shift).tolist()
    grid = lo + (hi - lo) * torch.linspace(0, 1, scale_num)
    delta = (hi - lo) / max(scale_num - 1, 1)
    scales = grid.repeat(len(q_top)).clamp_min(1e-8)
    qs = q_top.repeat_interleave(scale_num)

    def evaluate_columns(s: Tensor, q: Tensor | None) -> Tensor:  # (K, 1) columns <-> the (K,) callback
        assert q is not None
        return evaluate(s[:, 0], q[:, 0])[:, None]

    res = progressive_search(scales[:, None], qs[:, None], delta, evaluate_columns, rounds=steps, width=width,
                             new_per=max(1, eq_n // width), min_scale=1e-8, tie_break="first")
    assert res.zero_point is not None
    loss = float(torch.nan_to_num(res.loss, nan=float("inf"))[0])
    return float(res.scale[0]), int(res.zero_point[0]), loss, Q_MAX - Q_MIN + 1 + res.evaluations


# --- the method --------------------------------------------------------------------------------------------------


@dataclass
class AdaLogConfig(HarnessConfig):
    """AdaLog post-training quantization of a timm ViT / DeiT / Swin (or the digits models).

    The shared fields (bits, calibration sizes, search settings) are described in ``recipe.HarnessConfig``.

    Args:
        fpcs: True: FPCS; False: one flat grid of eq_n candidates per search (ablation).
        ln_reparam: per-channel search of post-LayerNorm inputs folded into the LayerNorm affine (RepQ-ViT); applied
            only when abits == wbits, as the reference (``wrap_net.py``: ``cur_a_bit == cfg.w_bit``).
        head_wise: per-head quantizers for the q, k, v matmul operands (reference matmul_head_channel_wise).
        lut: hardware (table) dequantization of AdaLog quantizers at inference; False: float path.
        retrain: BRECQ-style block reconstruction after calibration ("+retrain"), on the core engine.
        retrain_iters: reconstruction steps per block (paper: 20000; retrain only).
        retrain_size: images used by the reconstruction (paper: 1024; taken from the calibration set given).
        seed: seed of the reconstruction's sampling.
    """

    VERSION: ClassVar[int] = 1
    fpcs: bool = True
    ln_reparam: bool = True
    head_wise: bool = True
    lut: bool = True
    retrain: bool = False
    retrain_iters: int = int_field(2000, 0, 1 << 24)
    retrain_size: int = int_field(1024, 1, 1 << 20)
    seed: int = int_field(0, 0, 2**31 - 1)

    def recipe(self) -> Recipe:
        return Recipe(
            name="adalog", wbits=self.wbits, abits=self.abits, softmax_bits=self.softmax_bits or self.abits,
            conv_abits=self.conv_abits, calib="search", softmax="adalog", gelu="adalog",
            ln_reparam=self.ln_reparam and self.abits == self.wbits,  # reference wrap_net.py: cur_a_bit == w_bit
            head_wise=self.head_wise, eq_n=self.eq_n, steps=self.steps, search_round=self.search_round,
            fpcs=self.fpcs, lut=self.lut, calib_size=self.calib_size, calib_batch_size=self.calib_batch_size,
        )

    def images_needed(self) -> int:
        return max(self.calib_size, self.retrain_size) if self.retrain else self.calib_size
