"""Q-HyViT (Lee et al., IEEE IoT-J 2024, arXiv 2303.12557): post-training quantization of hybrid vision transformers.

Hybrid ViTs (MobileViT v1/v2, EfficientFormer v1/v2) break ViT PTQ recipes in four ways; Q-HyViT's remedies:

| challenge                                      | remedy here                                                          |
|------------------------------------------------|----------------------------------------------------------------------|
| (i) highly dynamic activation ranges           | per-layer choice of granularity: layer-wise or channel(head)-wise    |
| (ii) zero-point overflow in bridge layers      | per-layer symmetric / asymmetric choice: an overflowing asymmetric   |
|                                                | zero point is clamped as b-bit hardware would, so the metric rejects |
|                                                | it (``zero_point_overflow="widen"``: extension, range includes 0)     |
| (iii) BN / LN / GroupNorm(1) normalizations    | BN folded into the preceding conv; LN / GN stay float and the        |
|                                                | activations after them get the same granularity / scheme search      |
| (iv) small models, sensitive bridges           | Hessian-guided metric + bridge-block calibration (and optional joint |
|                                                | bridge-block reconstruction)                                         |

Algorithm (``run_qhyvit``), following the released ``batching_hybrid_calib`` (PTQ4ViT's Hessian calibrator):

1. Fold every BatchNorm into the conv that feeds it (``polyquant.surgery.fold_batchnorm``); wrap every Conv2d /
   Linear (weight + input quantizer) and every attention product (``matmul_qk`` / ``matmul_av``: q @ k^T,
   attn @ v; MobileViTv2's key * scores and value * context products) of the timm attention modules registered
   in ``attention.py`` (``polyquant.surgery`` product patches).
2. For each quantized unit, in forward order: capture its inputs, its float output O and the gradient
   g = dL/dO with L = KL(softmax(z_fp) || softmax(z)), z the logits of the model in its current calibration
   state. Initialise every operand with min-max scales (symmetric: max|x| / (2^(b-1) - 0.5); asymmetric:
   (max - min) / (2^b - 1)). Then, for ``search_rounds`` rounds alternating operands (weights, then inputs),
   for every candidate (granularity, scheme) search the scale multiplier (``polyquant.search.grid_search``) over
   {lo + i (hi - lo) / grid : i = 0..grid} (paper: 0.01..1.2, 100 steps) minimising the Hessian proxy
   ``sum g^2 (O_q - O)^2``; per-channel (per-head) scales whose channel maps to one output channel are
   chosen channel by channel. The (granularity, scheme) with the lowest metric wins.
3. Bridge-block calibration ("v2" in the released code): a calibrated unit stays quantized for the rest of the
   calibration only if it is a bridge unit (the layers at a conv -> transformer transition), so the layers after
   a bridge are calibrated on (and their gradients see) quantized bridge outputs. ``calib_mode="sequential"``
   keeps every unit quantized (PTQ4ViT sequential), ``"parallel"`` none.
4. Optional (``recon_iters > 0``): the blocks holding a bridge (e.g. a MobileViT block) are reconstructed jointly
   with AdaRound + learned activation scales under the same Hessian-weighted loss (``polyquant.reconstruct``).

Deviation (documented in the report): when no quantized unit lies upstream, KL(p_fp || p) has an exactly zero
gradient (PTQ4ViT issue #23). There the gradient comes from the cross-entropy with labels sampled from the float
model's own softmax, an unbiased one-sample estimate of the Fisher information, which is the Hessian of that KL
at the float point. ``UnitReport.grad_source`` says which was used. Second guard: an activation is offered
channel-wise scales only if the calibration set gives ``min_channel_samples`` values per channel (the classifier's
pooled input has one per image; per-channel ranges from 32 values clip unseen images).

What is simulated: everything is fake-quant (float compute on dequantized values); norms, softmax, activations and
biases stay float, as in PTQ4ViT / Q-HyViT. Channel-wise scales of a Linear's *input* are not integer-GEMM
friendly; the search may choose them, as the paper's per-layer granularity choice does.

    import polyquant as pq
    from polyquant.plugins.vit.qhyvit import QHyViTConfig
    qm = pq.quantize(model, QHyViTConfig(wbits=4, abits=4), calib=[calib_images])
    qm.report.summary()
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.capture import capture
from polyquant.config import ConfigError, QuantConfig, bits_field, float_field, int_field
from polyquant.formats import IntFormat
from polyquant.nn import QuantConv2d, QuantLinear, QuantMatMul, QuantRule, QuantSpec, Quantizer, prepare
from polyquant.primitives import PerChannel, PerTensor
from polyquant.search import grid_search
from polyquant.surgery import PRODUCT_PATCHES, ProductSite, fold_batchnorm, is_product_patched

from .attention import QuantMul, patch_attention

__all__ = [
    "HybridBaselineConfig",
    "HybridMinMaxConfig",
    "HybridPercentileConfig",
    "HYBRID_BASELINES",
    "QHyViTConfig",
    "QHyViTReport",
    "UnitReport",
    "OperandChoice",
    "run_qhyvit",
    "quantize_hybrid_baseline",
    "prepare_hybrid",
    "quant_units",
    "find_bridges",
    "sym_qparams",
    "asym_qparams",
    "fake_quant",
    "hessian_metric",
    "kl_output_grads",
]

_OVERFLOW = ("widen", "clamp")
_EPS = 1e-8


@dataclass
class QHyViTConfig(QuantConfig):
    """Q-HyViT settings (defaults follow the released code: 32 images, grid 0.01..1.2 in 100 steps, 3 rounds;
    W4A4, the default of every vit method).

    Args:
        wbits: weight bits (2..8).
        abits: activation bits (2..8): inputs of every Conv / Linear and both operands of attention products.
        calib_size: at most this many calibration images are used (the first ones given).
        batch_size: images per forward / backward pass while capturing inputs and gradients.
        granularity: "groups" (default, the released code's rule: conv weights per channel, linear weights per
            tensor, conv inputs channel-wise only for grouped / depthwise convs, Linear and dense-conv inputs
            layer-wise, attention operands head-wise: what integer GEMMs can run), "search" (per operand:
            layer-wise vs channel-wise by the metric, which lets Linear and dense-conv inputs take per-channel
            scales: fake-quant only, no integer GEMM runs them), "integer" (weights searched per layer / channel,
            activations by the released rule: what integer kernels run, with the baselines' freedom on weights),
            "layer" or "channel".
        scheme: "search" (symmetric vs asymmetric by the metric), "symmetric" or "asymmetric".
        metric: "hessian" (sum g^2 (O_q - O)^2, g = dKL/dO) or "mse" (sum (O_q - O)^2).
        calib_mode: which calibrated units stay quantized while later units are calibrated: "bridge" (only bridge
            units, Q-HyViT v2), "sequential" (all) or "parallel" (none).
        zero_point_overflow: asymmetric blocks whose zero point falls outside [0, 2^b - 1] (range excluding 0,
            or a scale that rounds to 0): "clamp" the zero point into range as b-bit integer hardware would (the
            paper: the overflow shows up in the metric and the scheme search picks symmetric instead), or
            "widen" the range to include 0 so the zero point fits (an extension; on the digits hybrids it gives
            the same choices and accuracy within one test image).
        grid: number of steps of the scale-multiplier grid (grid + 1 candidates).
        grid_range: (lo, hi) multipliers of the min-max scale.
        search_rounds: alternating weight / activation search rounds.
        min_channel_samples: an activation is offered channel-wise granularity only if the calibration set gives
            at least this many values per channel; fewer (e.g. a classifier's pooled input: one value per image)
            overfit the calibration images and clip unseen ones.
        recon_iters: AdaRound iterations of the joint bridge-block reconstruction; 0 turns it off.
        recon_batch_size: samples per reconstruction step.
        bridge_units: names of the bridge units; None detects them (the last unit before, and the first unit of,
            every conv -> transformer transition).
        ignore: fnmatch patterns of Conv / Linear module names kept float.
        quantize_matmul: also quantize attention products.
        seed: seeds the Fisher label sampling and the reconstruction.
    """

    VERSION: ClassVar[int] = 1
    wbits: int = bits_field(4)
    abits: int = bits_field(4)
    calib_size: int = int_field(32, 1, 1 << 20, cli=("--calib",))
    batch_size: int = int_field(32, 1, 1 << 20)
    granularity: Literal["search", "layer", "channel", "groups", "integer"] = "groups"
    scheme: Literal["search", "symmetric", "asymmetric"] = "search"
    metric: Literal["hessian", "mse"] = "hessian"
    calib_mode: Literal["bridge", "sequential", "parallel"] = "bridge"
    zero_point_overflow: Literal["widen", "clamp"] = "clamp"
    grid: int = int_field(100, 1, 10000)
    grid_range: tuple[float, float] = (0.01, 1.2)
    search_rounds: int = int_field(3, 1, 16)
    min_channel_samples: int = int_field(256, 1)
    recon_iters: int = int_field(0, 0, 1 << 24)
    recon_batch_size: int = int_field(32, 1, 1 << 20)
    bridge_units: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    quantize_matmul: bool = True
    seed: int = int_field(0, 0, 2**31 - 1)

    def validate(self) -> None:
        lo, hi = self.grid_range
        if not 0.0 < lo <= hi:
            raise ConfigError(f"grid_range must satisfy 0 < lo <= hi, got {self.grid_range!r}")

    def multipliers(self) -> Tensor:
        """The grid + 1 candidate multipliers of the min-max scale."""
        lo, hi = self.grid_range
        return torch.tensor([lo + i * (hi - lo) / self.grid for i in range(self.grid + 1)])


# --- report --------------------------------------------------------------------------------------------------


@dataclass
class OperandChoice:
    """What the search picked for one quantized tensor of a unit.

    Args:
        role: "weight", "input", "a" or "b" (matmul operands).
        granularity: "layer" or "channel" (channel = output channel for weights, head for attention operands).
        symmetric: symmetric (int, zero point 0) or asymmetric (uint with zero point).
        bits: bit width.
        overflow_blocks: channels whose tight asymmetric min-max zero point overflows [0, 2^b - 1] (or whose
            scale rounds to 0) at initialisation: the zero-point-overflow count of the paper's challenge (ii).
        widened_blocks: blocks of the chosen quantizer whose range was widened to include 0.
    """

    role: str
    granularity: str
    symmetric: bool
    bits: int
    overflow_blocks: int = 0
    widened_blocks: int = 0


@dataclass
class UnitReport:
    """One quantized unit (Conv / Linear / attention product)."""

    name: str
    kind: str
    bridge: bool
    grad_source: str
    operands: list[OperandChoice]
    metric_init: float
    metric_final: float


@dataclass
class QHyViTReport:
    """What ``run_qhyvit`` did: units in forward order, bridges, folded BNs, reconstructed blocks."""

    config: QHyViTConfig
    units: list[UnitReport] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    folded_bn: list[str] = field(default_factory=list)
    recon_blocks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def zero_point_overflows(self, bridge_only: bool = True) -> int:
        """Activation channels whose asymmetric zero point overflows at initialisation (bridge units by default)."""
        return sum(o.overflow_blocks for u in self.units if u.bridge or not bridge_only
                   for o in u.operands if o.role != "weight")

    def choice_counts(self) -> dict[str, int]:
        """How often each (role, granularity, scheme) was chosen."""
        counts: dict[str, int] = {}
        for u in self.units:
            for o in u.operands:
                key = f"{'weight' if o.role == 'weight' else 'act'}:{o.granularity}:{'sym' if o.symmetric else 'asym'}"
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        c = self.config
        lines = [f"Q-HyViT W{c.wbits}A{c.abits}: {len(self.units)} units, {len(self.folded_bn)} BN folded, "
                 f"bridges {self.bridges}, reconstructed {self.recon_blocks or 'none'}, {self.seconds:.1f} s",
                 f"choices {self.choice_counts()}, zero-point overflows in bridges {self.zero_point_overflows()}"]
        for u in self.units:
            ops = ", ".join(f"{o.role}={o.granularity}/{'sym' if o.symmetric else 'asym'}" for o in u.operands)
            lines.append(f"  {'*' if u.bridge else ' '} {u.name:<48} {u.kind:<6} {u.grad_source:<6} {ops}  "
                         f"metric {u.metric_init:.3g} -> {u.metric_final:.3g}")
        return "\n".join(lines)


# --- quantizer maths (pure functions) ------------------------------------------------------------------------


def sym_qparams(lo: Tensor, hi: Tensor, bits: int, *, eps: float = _EPS) -> tuple[Tensor, Tensor]:
    """Symmetric min-max qparams as in PTQ4ViT: scale = max(|lo|, |hi|) / (2^(b-1) - 0.5), zero point 0.

    Zero-range blocks (all zeros) get scale ``eps``. The grid is the signed integers [-2^(b-1), 2^(b-1) - 1].
    """
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = (amax / (2 ** (bits - 1) - 0.5)).clamp_min(eps)
    return scale, torch.zeros_like(scale)


def asym_qparams(
    lo: Tensor, hi: Tensor, bits: int, *, overflow: str = "widen", eps: float = _EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max qparams on the unsigned grid [0, 2^b - 1]: (scale, zero_point, overflowed).

    The tight range [lo, hi] gives scale = (hi - lo) / (2^b - 1) and zero point round(-lo / scale). A block
    *overflows* when that zero point falls outside [0, 2^b - 1] (its range excludes 0: a nearly constant channel
    far from 0 gets a tiny scale and a huge zero point) or when its scale rounds to 0 (hi == lo). Remedies:

    - "widen": the block's range is extended to include 0 (scale = (max(hi, 0) - min(lo, 0)) / (2^b - 1)); its
      zero point then lies in range and every calibration value stays representable.
    - "clamp": the zero point is clamped into [0, 2^b - 1] and the scale kept, as a b-bit zero-point register
      would; the block's values then saturate (the failure Q-HyViT's challenge (ii) describes).
    """
    if overflow not in _OVERFLOW:
        raise ValueError(f"unknown overflow remedy {overflow!r}; choose one of {_OVERFLOW}")
    qmax = 2**bits - 1
    lo, hi = lo.float(), hi.float()
    scale = ((hi - lo) / qmax).clamp_min(eps)
    zp = torch.round(-lo / scale)
    overflowed = (zp < 0) | (zp > qmax) | ((hi - lo) <= 0)
    if overflow == "clamp":
        return scale, zp.clamp(0, qmax), overflowed
    lo_w = torch.where(overflowed, torch.minimum(lo, torch.zeros_like(lo)), lo)
    hi_w = torch.where(overflowed, torch.maximum(hi, torch.zeros_like(hi)), hi)
    scale = ((hi_w - lo_w) / qmax).clamp_min(eps)
    zp = torch.round(-lo_w / scale).clamp(0, qmax)
    return scale, zp, overflowed


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool) -> Tensor:
    """(clamp(round(x / s) + z) - z) * s on the signed (symmetric) or unsigned (asymmetric) b-bit grid.

    Identical to ``polyquant.primitives.fake_quantize`` with ``IntFormat(bits, signed=symmetric)``; scale and
    zero point broadcast against ``x``.
    """
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    return (torch.clamp(torch.round(x / scale + zero_point), qmin, qmax) - zero_point) * scale


def hessian_metric(out_q: Tensor, out_fp: Tensor, grad: Tensor | None, *, keep_dim: int | None = None) -> Tensor:
    """PTQ4ViT / Q-HyViT Hessian proxy: sum of grad^2 * (out_q - out_fp)^2 (plain squared error if grad is None).

    ``keep_dim`` keeps one axis (a per-channel metric, summed over every other axis); otherwise a scalar.
    Lower is better (the released code maximises its negative).
    """
    err = (out_q - out_fp).pow(2)
    if grad is not None:
        err = err * grad.pow(2)
    return _reduce(err, keep_dim)


def _reduce(err: Tensor, keep_dim: int | None) -> Tensor:
    if keep_dim is None:
        return err.sum()
    keep_dim = keep_dim % err.dim()
    return err.sum(dim=[d for d in range(err.dim()) if d != keep_dim])


def kl_output_grads(logits: Tensor, fp_logits: Tensor) -> Tensor:
    """The Q-HyViT task loss: KL(softmax(fp_logits) || softmax(logits)), summed over the batch."""
    return F.kl_div(F.log_softmax(logits, dim=-1), F.softmax(fp_logits, dim=-1), reduction="sum")


# --- model preparation ---------------------------------------------------------------------------------------


def prepare_hybrid(
    model: nn.Module,
    *,
    wbits: int = 8,
    abits: int = 8,
    ignore: Sequence[str] = (),
    quantize_matmul: bool = True,
) -> nn.Module:
    """Wrap every Conv2d / Linear (QuantConv2d / QuantLinear with weight and input quantizers) and every product
    of the registered attention modules (QuantMatMul / QuantMul); in place. Quantizers start raw.

    The placeholder specs are min-max int specs; ``run_qhyvit`` replaces them with the searched ones. Attention
    products are patched through ``attention.patch_attention`` (``polyquant.surgery``); timm ``Attention``'s
    first product sees q * scale (timm's order).
    """
    w_spec = QuantSpec(IntFormat(wbits), PerChannel(0))
    a_spec = QuantSpec(IntFormat(abits), PerTensor())
    ignore = list(ignore)
    if any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules()):
        prepare(model, [QuantRule((nn.Conv2d, nn.Linear), weight=w_spec, input=a_spec)], ignore=ignore, inplace=True)
    if quantize_matmul:

        def make_product(site: ProductSite) -> QuantMatMul:
            return site.product_type(a=a_spec, b=a_spec, name=site.name)

        patch_attention(model, make_product, scaled_query=True, ignore=ignore)
    for m in model.modules():  # in-place activations would overwrite captured tensors
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    return model


def quant_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every QuantConv2d / QuantLinear / QuantMatMul of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear, QuantMatMul))]


# --- units ---------------------------------------------------------------------------------------------------


@dataclass
class _Operand:
    role: str
    quantizer: Quantizer
    channel_axis: int  # axis of channel-wise granularity, relative to the operand's shape (may be negative)
    out_axis: int | None  # output axis channel c maps to one-to-one (separable per-channel search) or None
    is_weight: bool
    choices: list[tuple[str, bool]] = field(default_factory=list)  # (granularity, symmetric) candidates
    # current choice
    gran: str = "layer"
    sym: bool = True
    scale: Tensor | None = None
    zp: Tensor | None = None
    widened: int = 0
    overflow_init: int = 0


@dataclass
class _Unit:
    name: str
    module: nn.Module
    kind: str  # "conv", "linear", "matmul", "mul"
    operands: list[_Operand]
    bridge: bool = False

    def op(self, xs: list[Tensor]) -> Tensor:
        """The unit's float computation on (possibly fake-quantized) operands, in operand order."""
        m = self.module
        if self.kind == "linear":
            return F.linear(xs[1], xs[0], m.bias)
        if self.kind == "conv":
            return m.conv_forward(xs[1], xs[0])
        if self.kind == "mul":
            return xs[0] * xs[1]
        return xs[0] @ xs[1]

    def quantizers(self) -> list[Quantizer]:
        return [o.quantizer for o in self.operands]


def _make_unit(name: str, module: nn.Module, config: QHyViTConfig) -> _Unit:
    def choices(is_weight: bool, heuristic: str) -> list[tuple[str, bool]]:
        searched = ["layer", "channel"]
        grans = {"search": searched, "layer": ["layer"], "channel": ["channel"], "groups": [heuristic],
                 "integer": searched if is_weight else [heuristic]}[config.granularity]
        schemes = {"search": [True, False], "symmetric": [True], "asymmetric": [False]}[config.scheme]
        return [(g, s) for g in grans for s in schemes]

    if isinstance(module, (QuantConv2d, QuantLinear)):
        conv = isinstance(module, QuantConv2d)
        w = _Operand("weight", module.weight_quantizer, 0, 1 if conv else -1, True)
        grouped = conv and module.groups > 1
        w.choices = choices(True, "channel" if conv else "layer")
        x = _Operand("input", module.input_quantizer, 1 if conv else -1, None, False)
        x.choices = choices(False, "channel" if grouped else "layer")
        return _Unit(name, module, "conv" if conv else "linear", [w, x])
    kind = "mul" if isinstance(module, QuantMul) else "matmul"
    ops = []
    for role, q in (("a", module.a_quantizer), ("b", module.b_quantizer)):
        o = _Operand(role, q, 1, 1, False)  # head (matmul) / channel (mul) axis maps to the same output axis
        o.choices = choices(False, "channel")
        ops.append(o)
    return _Unit(name, module, kind, ops)


def _transformer_roots(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: the nearest known-block ancestor of every attention module."""
    known = {"Block", "LinearTransformerBlock", "MetaBlock1d", "EfficientFormerV2Block"}
    names = [n for n, m in model.named_modules() if is_product_patched(m) or type(m) in PRODUCT_PATCHES]
    roots = []
    for n in names:
        parts = n.split(".")
        root = n
        for i in range(len(parts) - 1, 0, -1):
            anc = ".".join(parts[:i])
            if type(model.get_submodule(anc)).__name__ in known:
                root = anc
                break
        roots.append(root)
    return sorted(set(roots))


def find_bridges(model: nn.Module, order: Sequence[str]) -> list[tuple[str, str]]:
    """Conv -> transformer transitions: (last unit before, first unit inside) a transformer block, in forward order.

    ``order`` lists unit names in forward order. On MobileViT this gives the released code's ``block_list`` (the
    1x1 conv that feeds the unfold and the first qkv projection of each MobileViT block); the released lists of
    other families (e.g. a three-unit bridge for efficientformer_l1) can be given as ``config.bridge_units``.
    """
    roots = _transformer_roots(model)

    def in_transformer(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    pairs = []
    for prev, cur in zip(order, order[1:]):
        if in_transformer(cur) and not in_transformer(prev):
            pairs.append((prev, cur))
    return pairs


# --- capture -------------------------------------------------------------------------------------------------


@dataclass
class _Captured:
    inputs: list[Tensor]  # activation operands, concatenated over the calibration set
    out: Tensor
    grad: Tensor | None
    source: str


def _unit_order(model: nn.Module, units: dict[str, _Unit], example: Tensor) -> list[str]:
    order: list[str] = []
    hooks = []
    for name, u in units.items():
        hooks.append(u.module.register_forward_pre_hook(lambda m, a, name=name: order.append(name)
                                                         if name not in order else None))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return order


def _capture(
    model: nn.Module,
    chunks: list[Tensor],
    fp_logits: list[Tensor],
    units: list[_Unit],
    need_grad: bool,
    gen: torch.Generator,
) -> dict[str, _Captured]:
    """One pass over the calibration chunks (``polyquant.capture``, kept on the compute device): the activation
    operands, float outputs and output gradients of the first call of each of ``units`` per chunk."""
    sources: set[str] = set()
    upstream_quantized = any(q.state == "quantized" for q in model.modules() if isinstance(q, Quantizer))

    def forward(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return m(batch[0].clone().requires_grad_(need_grad))

    def task_loss(z: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        z_fp = batch[1]
        if upstream_quantized:
            sources.add("kl")
            return kl_output_grads(z, z_fp)
        # KL(p_fp || p_fp) has a zero gradient: one-sample Fisher of the KL at the float point
        probs = F.softmax(z_fp.float(), dim=-1).cpu()
        labels = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(z.device)
        sources.add("fisher")
        return F.cross_entropy(z, labels, reduction="sum")

    caps = capture(model, [u.name for u in units], list(zip(chunks, fp_logits)), forward_fn=forward,
                   loss_fn=task_loss if need_grad else None, calls="first", offload=None)
    source = "mixed" if len(sources) > 1 else (sources.pop() if sources else "none")
    out: dict[str, _Captured] = {}
    for u in units:
        cap = caps[u.name]
        operands = [[a for a in c.args[:2] if isinstance(a, Tensor)] for c in cap.calls]
        inputs = [torch.cat([ops[j] for ops in operands], 0) for j in range(len(operands[0]))]
        grad = cap.grad() if need_grad else None
        out[u.name] = _Captured(inputs, cap.output(), grad, source if grad is not None else "none")
    return out


# --- search --------------------------------------------------------------------------------------------------


def _range(x: Tensor, gran: str, axis: int) -> tuple[Tensor, Tensor]:
    """Per-block min / max with keepdim shapes (the scale shape of the block)."""
    if gran == "layer":
        return x.amin().view([1] * x.dim()), x.amax().view([1] * x.dim())
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def _qparams(lo: Tensor, hi: Tensor, m: Tensor | float, bits: int, sym: bool, overflow: str) -> tuple[Tensor, Tensor, Tensor]:
    if sym:
        s, z = sym_qparams(lo * m, hi * m, bits)
        return s, z, torch.zeros_like(s, dtype=torch.bool)
    return asym_qparams(lo * m, hi * m, bits, overflow=overflow)


def _search_operand(
    unit: _Unit,
    j: int,
    xs: list[Tensor],
    xq: list[Tensor],
    out_fp: Tensor,
    g2: Tensor | None,
    bits: int,
    mults: Tensor,
    overflow: str,
) -> float:
    """Search operand j's (granularity, scheme, multiplier) with the other operands fixed at ``xq``.

    For each (granularity, scheme) choice ``polyquant.search.grid_search`` picks the multiplier of the min-max
    scale, one candidate at a time (channel by channel when a channel maps to one output channel); the choice with
    the lowest metric wins. Ties go to the first candidate, as in the released loop.
    """
    o = unit.operands[j]
    x = xs[j]
    best: tuple[float, str, bool, Tensor, Tensor, int] | None = None
    for gran, sym in o.choices:
        lo, hi = _range(x, gran, o.channel_axis)
        separable = gran == "channel" and o.out_axis is not None and lo.numel() > 1 \
            and out_fp.shape[o.out_axis] == lo.numel()

        def evaluate(m: Tensor, zero_points: Tensor | None) -> Tensor:  # called at once, in this iteration
            losses = []
            for row in m:  # one candidate multiplier, shared by every block
                s, z, _ = _qparams(lo, hi, float(row[0]), bits, sym, overflow)
                args = list(xq)
                args[j] = fake_quant(x, s, z, bits, sym)
                err = (unit.op(args) - out_fp).pow(2)
                if g2 is not None:
                    err = err * g2
                losses.append(_reduce(err, o.out_axis) if separable else err.sum().reshape(1))
            return torch.stack(losses)  # (k, groups)

        groups = lo.numel() if separable else 1
        res = grid_search(mults[:, None].expand(-1, groups), None, evaluate, chunk=1, tie_break="first")
        found = torch.isfinite(res.loss)  # no finite metric: keep the min-max scale (multiplier 1)
        loss = torch.where(found, res.loss, torch.full_like(res.loss, float("inf")))
        chosen = torch.where(found, res.scale, torch.ones_like(res.scale))
        if separable:
            total = float(loss.sum())
            mult: Tensor | float = chosen.view(lo.shape)
        else:
            total, mult = float(loss[0]), float(chosen[0])
        if best is None or total < best[0]:
            s, z, over = _qparams(lo, hi, mult, bits, sym, overflow)
            best = (total, gran, sym, s, z, int(over.sum()) if not sym and overflow == "widen" else 0)
    assert best is not None
    o.gran, o.sym, o.scale, o.zp, o.widened = best[1], best[2], best[3], best[4], best[5]
    xq[j] = fake_quant(x, o.scale, o.zp, bits, o.sym)
    return best[0]


def _init_operand(o: _Operand, x: Tensor, bits: int, overflow: str) -> None:
    gran, sym = o.choices[0]
    lo, hi = _range(x, gran, o.channel_axis)
    o.gran, o.sym = gran, sym
    o.scale, o.zp, _ = _qparams(lo, hi, 1.0, bits, sym, overflow)
    clo, chi = _range(x, "channel", o.channel_axis)
    o.overflow_init = int(asym_qparams(clo, chi, bits, overflow="clamp")[2].sum())


def _calibrate_unit(unit: _Unit, cap: _Captured, config: QHyViTConfig, weights: list[Tensor]) -> tuple[float, float]:
    """Hessian-guided search of every operand of ``unit``; freezes its quantizers. Returns (init, final) metric."""
    xs: list[Tensor] = []
    k = 0
    for o in unit.operands:
        if o.is_weight:
            xs.append(weights[0].detach())
        else:
            xs.append(cap.inputs[k])
            k += 1
    bits = [config.wbits if o.is_weight else config.abits for o in unit.operands]
    for o, x, b in zip(unit.operands, xs, bits):
        if not o.is_weight and x.numel() // x.shape[o.channel_axis] < config.min_channel_samples:
            o.choices = [("layer", s) for s in dict.fromkeys(s for _, s in o.choices)]
        _init_operand(o, x, b, config.zero_point_overflow)
    grad = cap.grad if config.metric == "hessian" else None
    if grad is not None and not bool(grad.abs().amax() > 0):
        grad = None  # degenerate gradient (e.g. a dead branch): fall back to the squared error
        cap.source = "mse"
    elif grad is None:
        cap.source = "mse"
    with torch.no_grad():
        xq = [fake_quant(x, o.scale, o.zp, b, o.sym) for o, x, b in zip(unit.operands, xs, bits)]
        init = float(hessian_metric(unit.op(xq), cap.out, grad))
        final = init
        g2 = None if grad is None else grad.pow(2)
        mults = config.multipliers()
        for _ in range(config.search_rounds):
            for j in range(len(unit.operands)):
                final = _search_operand(unit, j, xs, xq, cap.out, g2, bits[j], mults, config.zero_point_overflow)
    for o, b in zip(unit.operands, bits):
        _freeze(o, b)
    return init, final


def _freeze(o: _Operand, bits: int) -> None:
    gran = PerTensor() if o.gran == "layer" else PerChannel(o.channel_axis)
    assert o.scale is not None and o.zp is not None
    o.quantizer.freeze(o.scale, o.zp, spec=QuantSpec(IntFormat(bits, signed=o.sym), gran, symmetric=o.sym))
    o.quantizer.set_state("quantized")


# --- driver --------------------------------------------------------------------------------------------------


def _as_images(calib: Tensor | Sequence[Tensor], limit: int) -> Tensor:
    if isinstance(calib, Tensor):
        x = calib
    else:
        parts = [c[0] if isinstance(c, (tuple, list)) else c for c in calib]
        if not parts:
            raise ValueError("the calibration set is empty")
        if not all(isinstance(p, Tensor) for p in parts):
            raise TypeError("calib must be a Tensor of images or a list of image Tensors (or (images, labels) pairs)")
        x = torch.cat(parts, 0)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"the calibration set is empty or has no batch dimension (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError("calibration images contain NaN or Inf")
    return x[:limit].detach()


def _unit_name(unit: _Unit) -> str:
    return unit.name


def run_qhyvit(
    model: nn.Module, calib: Tensor | Sequence[Tensor], config: QHyViTConfig | None = None, *, progress: bool = False
) -> tuple[nn.Module, QHyViTReport]:
    """Quantize a copy of ``model`` with Q-HyViT; returns (fake-quantized model in eval mode, report).

    ``calib``: a Tensor of images (N, C, H, W) or a list of image batches; the first ``config.calib_size``
    images are used. The input model is left untouched.
    """
    from polyquant.progress import progress_iter

    config = config if config is not None else QHyViTConfig()
    if not isinstance(config, QHyViTConfig):
        raise TypeError(f"config must be a QHyViTConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    images = _as_images(calib, config.calib_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    images = images.to(device)
    chunks = list(images.split(config.batch_size))
    report = QHyViTReport(config=config)

    fp = copy.deepcopy(model).eval()
    report.folded_bn = fold_batchnorm(fp, chunks[0][:2])
    with torch.no_grad():
        fp_logits = [fp(c).detach() for c in chunks]
    qmodel = prepare_hybrid(fp, wbits=config.wbits, abits=config.abits, ignore=config.ignore,
                            quantize_matmul=config.quantize_matmul)
    units = {n: _make_unit(n, m, config) for n, m in quant_units(qmodel)}
    order = _unit_order(qmodel, units, chunks[0][:2])
    missing = [n for n in units if n not in order]
    if missing:
        warnings.warn(f"Q-HyViT: {len(missing)} quantizable modules never run in forward (left float): "
                      f"{missing[:5]}", stacklevel=2)
        for n in missing:
            for q in units[n].quantizers():
                q.state = "raw"
    ordered = [units[n] for n in order]
    if config.bridge_units is not None:
        unknown = [b for b in config.bridge_units if b not in units]
        if unknown:
            raise ValueError(f"bridge_units {unknown} are not quantized units (names look like {order[:3]})")
        bridge_names = list(config.bridge_units)
        pairs: list[tuple[str, str]] = []
    else:
        pairs = find_bridges(qmodel, order)
        bridge_names = [n for pair in pairs for n in pair]
    for u in ordered:
        u.bridge = u.name in bridge_names
    report.bridges = [u.name for u in ordered if u.bridge]

    def keeps_state(u: _Unit) -> bool:
        return config.calib_mode == "sequential" or (config.calib_mode == "bridge" and u.bridge)

    gen = torch.Generator().manual_seed(config.seed)
    captured: dict[str, _Captured] = {}
    bar = progress_iter(ordered, desc=f"Q-HyViT W{config.wbits}A{config.abits}", bars=progress, step=_unit_name)
    for i, u in enumerate(bar):
        if u.name not in captured:
            # Capture every unit up to (and including) the next one that changes the calibration state.
            seg = []
            for v in ordered[i:]:
                seg.append(v)
                if keeps_state(v):
                    break
            captured = _capture(qmodel, chunks, fp_logits, seg, config.metric == "hessian", gen)
        cap = captured.pop(u.name)
        weights = [u.module.weight] if u.kind in ("conv", "linear") else []
        init, final = _calibrate_unit(u, cap, config, weights)
        report.units.append(UnitReport(
            name=u.name, kind=u.kind, bridge=u.bridge, grad_source=cap.source,
            operands=[OperandChoice(o.role, o.gran, o.sym, config.wbits if o.is_weight else config.abits,
                                    0 if o.is_weight else o.overflow_init, o.widened) for o in u.operands],
            metric_init=init, metric_final=final))
        if not keeps_state(u):
            for q in u.quantizers():
                q.state = "raw"
        del cap
    for u in ordered:
        for q in u.quantizers():
            q.state = "quantized"

    if config.recon_iters > 0 and pairs:
        report.recon_blocks = _reconstruct_bridges(qmodel, chunks, fp_logits, pairs, config, progress)
    qmodel.eval()
    report.seconds = time.perf_counter() - t0
    return qmodel, report


@dataclass
class HybridBaselineConfig(QuantConfig):
    """The hybrid baselines of Q-HyViT (``quantize_hybrid_baseline``): Q-HyViT's placement (BatchNorms folded,
    every Conv / Linear / attention product), calibrated by a plain observer; only the calibration differs.

    Args:
        wbits: weight bits (asymmetric, per output channel).
        abits: activation bits (asymmetric, per tensor): inputs of every Conv / Linear, both operands of products.
        calib_size: at most this many calibration images are used (the first ones given).
        batch_size: images per calibration forward pass.
    """

    VERSION: ClassVar[int] = 1
    OBSERVER: ClassVar[str] = ""
    wbits: int = bits_field(4)
    abits: int = bits_field(4)
    calib_size: int = int_field(32, 1, 1 << 20, cli=("--calib",))
    batch_size: int = int_field(32, 1, 1 << 20)

    def clip_percentile(self) -> float:
        """The observer's percentile (unused by min-max)."""
        return 99.99


@dataclass
class HybridMinMaxConfig(HybridBaselineConfig):
    """Min-max ranges on Q-HyViT's placement (the fair min-max baseline on hybrids)."""

    OBSERVER: ClassVar[str] = "minmax"


@dataclass
class HybridPercentileConfig(HybridBaselineConfig):
    """Percentile-clipped ranges on Q-HyViT's placement (the fair percentile baseline on hybrids).

    Args:
        percentile: upper percentile of the ranges (the lower one is 100 - percentile).
    """

    OBSERVER: ClassVar[str] = "percentile"
    percentile: float = float_field(99.99, 50.0, 100.0)

    def validate(self) -> None:
        if self.percentile == 50.0:
            raise ConfigError("percentile must be in (50, 100], got 50.0")

    def clip_percentile(self) -> float:
        return self.percentile


HYBRID_BASELINES: dict[str, type[HybridBaselineConfig]] = {
    "hybrid_minmax": HybridMinMaxConfig,
    "hybrid_percentile": HybridPercentileConfig,
}


def quantize_hybrid_baseline(
    model: nn.Module,
    calib: Tensor | Sequence[Tensor],
    *,
    wbits: int = 8,
    abits: int = 8,
    observer: str = "minmax",
    percentile: float = 99.99,
    calib_size: int = 32,
    batch_size: int = 32,
) -> nn.Module:
    """The same placement as Q-HyViT (BN folded, every Conv / Linear / attention product) calibrated by a plain
    observer ("minmax" or "percentile", as in ``baselines.py``): weights asymmetric per output channel,
    activations asymmetric per tensor. The fair baseline: only the calibration differs."""
    from polyquant.nn import calibrate

    images = _as_images(calib, calib_size)
    chunks = list(images.split(batch_size))
    qmodel = copy.deepcopy(model).eval()
    fold_batchnorm(qmodel, chunks[0][:2])
    prepare_hybrid(qmodel, wbits=wbits, abits=abits)
    w_spec = QuantSpec(IntFormat(wbits, signed=False), PerChannel(0), symmetric=False, observer=observer,
                       percentile=percentile)
    a_spec = QuantSpec(IntFormat(abits, signed=False), PerTensor(), symmetric=False, observer=observer,
                       percentile=percentile)
    for _, m in quant_units(qmodel):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.weight_quantizer.spec = w_spec
            m.input_quantizer.spec = a_spec
        else:
            m.a_quantizer.spec = a_spec
            m.b_quantizer.spec = a_spec
    return calibrate(qmodel, chunks, progress=False).eval()


# --- bridge block reconstruction -----------------------------------------------------------------------------


def _common_ancestor(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    common = []
    for x, y in zip(pa[:-1], pb[:-1]):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _reconstruct_bridges(
    qmodel: nn.Module, chunks: list[Tensor], fp_logits: list[Tensor], pairs: list[tuple[str, str]],
    config: QHyViTConfig, progress: bool,
) -> list[str]:
    """Jointly reconstruct the blocks holding the bridges (AdaRound + activation scales, Hessian-weighted loss)."""
    from polyquant.reconstruct import ReconstructConfig, reconstruct

    blocks: list[str] = []
    for a, b in pairs:
        blk = _common_ancestor(a, b)
        if blk and blk not in blocks:
            blocks.append(blk)
    blocks = [b for b in blocks if not any(b != o and b.startswith(o + ".") for o in blocks)]
    if not blocks:
        return []
    # Gradient weights: dKL/dO at each block output in the fully quantized model, squared, mean-normalised.
    caps = capture(qmodel, blocks, list(zip(chunks, fp_logits)), inputs=False, outputs=False, offload=None,
                   forward_fn=lambda m, b: m(b[0].clone().requires_grad_(True)),
                   loss_fn=lambda z, b: kl_output_grads(z, b[1]))
    weights = {}
    for b in blocks:
        g2 = caps[b].grad().pow(2)  # type: ignore[union-attr]
        weights[b] = [g2 / g2.mean().clamp_min(1e-30)]
    rc = ReconstructConfig(rounding="adaround", iters=config.recon_iters, batch_size=config.recon_batch_size,
                           loss="fisher", learn_act_scale=True, seed=config.seed)
    fp = copy.deepcopy(qmodel)
    for q in fp.modules():
        if isinstance(q, Quantizer):
            q.state = "raw"
    reconstruct(qmodel, blocks, chunks, rc, fp_model=fp, grad_weights=weights, progress=progress)
    return blocks
