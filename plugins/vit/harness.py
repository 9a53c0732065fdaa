"""The shared PTQ harness: where quantizers go in a timm ViT / DeiT / Swin, how they are calibrated.

Every method of this plugin (AdaLog and the baselines) is a ``Recipe`` run by ``quantize_with_recipe``; recipes
differ only in their quantizers and in how the parameters are found, never in the data or the placement.

Placement (AdaLog's ``utils/wrap_net.py``; every ``nn.Linear`` / ``nn.Conv2d`` is replaced, timm ``Attention`` and
Swin ``WindowAttention`` get their product patch from ``attention.py`` (``polyquant.surgery``), whose two products
``matmul_qk`` and ``matmul_av`` are ``QuantMatMul``s; the matmul sees the raw q, the softmax scale multiplies its
output, as in the reference):

| role        | tensor                                             | AdaLog quantizer                              |
|-------------|----------------------------------------------------|-----------------------------------------------|
| weight      | every Linear / Conv weight                         | uniform asymmetric, per output channel         |
| post_ln     | input of qkv, fc1, Swin reduction                  | per-channel search, folded into the LayerNorm, |
|             |                                                    | then layer-wise uniform                        |
| post_gelu   | input of fc2                                       | AdaLog with shift (-shift folded into the bias)|
| linear      | other Linear / Conv inputs (proj, head, ...)       | uniform layer-wise                             |
| conv        | input of the first Conv (patch embedding / stem)   | float at ``conv_abits`` >= 8 or None (the      |
|             |                                                    | reference's quant_input), else uniform         |
| qk          | both operands of q @ k^T                           | uniform per head                               |
| v           | v in attn @ v                                      | uniform per head                               |
| softmax     | attention probabilities in attn @ v                | AdaLog, scale 1, q searched                    |

LayerNorm, softmax, GELU and residual additions stay in float. BatchNorms (hybrids) are folded into their convs. Calibration is *parallel*: the float model runs the
calibration set once and every layer's input and output are captured (forward hooks), then each layer searches
its own parameters from its float input (``calibrate_layer``). Parameter searches minimize the MSE of the layer's
output (linear / conv / matmul), except the first weight pass and the per-channel post-LayerNorm pass, which use
the tensor's own MSE (as in the reference code).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.capture import capture as capture_modules
from polyquant.nn import QuantConv2d, QuantLinear, QuantMatMul, Quantizer
from polyquant.primitives import qparams_from_minmax
from polyquant.search import Evaluate, SearchResult, chunked, quantile_rows, uniform_grid
from polyquant.surgery import ProductSite, fold_batchnorm, is_product_patched, set_submodule

from . import fpcs as fp
from .adalog import (
    AdaLogQuantizer,
    adalog_activation_fpcs,
    adalog_fq_from_log2,
    fold_shift,
    search_log_base,
)
from .quantizers import (
    GELU_SHIFT,
    LogQuantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    VitQuantizer,
    twin_fq,
    uniform_fq,
)
from .attention import patch_attention, vit_attention_classes
from .recipe import Recipe

__all__ = [
    "ROLES",
    "Recipe",
    "LayerInfo",
    "wrap",
    "capture",
    "calibrate_layer",
    "quantize_with_recipe",
    "reparam_layernorm",
    "finalize",
    "vit_quantizers",
    "set_lut",
]

ROLES = ("weight", "post_ln", "post_gelu", "linear", "conv", "qk", "v", "softmax")


@dataclass
class LayerInfo:
    """One quantized layer: its module name, kind, input role, the LayerNorm before it (post_ln) and heads."""

    name: str
    kind: str  # "linear" | "conv" | "matmul_qk" | "matmul_av"
    role: str
    norm: str | None = None
    heads: int = 1


# --- wrapping ---------------------------------------------------------------------------------------------------


def _parent(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _norm_name(model: nn.Module, name: str) -> str | None:
    """The LayerNorm whose output is ``name``'s input, for qkv (norm1), fc1 (norm2) and Swin's reduction."""
    parts = name.split(".")
    child, parent_name = parts[-1], ".".join(parts[:-1])
    candidates: list[str] = []
    if child == "qkv" and len(parts) >= 2:
        candidates.append(".".join(parts[:-2] + ["norm1"]))
    elif child == "fc1" and len(parts) >= 2:
        candidates.append(".".join(parts[:-2] + ["norm2"]))
    elif child == "reduction":
        candidates.append(f"{parent_name}.norm" if parent_name else "norm")
    for cand in candidates:
        try:
            m = model.get_submodule(cand)
        except AttributeError:
            continue
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None:
            return cand
    return None


def _linear_role(model: nn.Module, name: str) -> tuple[str, str | None]:
    parent, child = _parent(model, name)
    if child == "qkv" and parent is not None and is_product_patched(parent):
        return "post_ln", _norm_name(model, name)
    if child == "fc1" and hasattr(parent, "fc2"):
        return "post_ln", _norm_name(model, name)
    if child == "reduction" and isinstance(getattr(parent, "norm", None), nn.LayerNorm):
        return "post_ln", _norm_name(model, name)
    if child == "fc2" and isinstance(getattr(parent, "act", None), nn.GELU) and isinstance(
        getattr(parent, "norm", nn.Identity()), nn.Identity
    ):
        return "post_gelu", None
    return "linear", None


def _act_quantizer(role: str, recipe: Recipe, heads: int, name: str) -> VitQuantizer:
    a = recipe.abits
    per_head = (1, heads, 1, 1) if recipe.head_wise else (1,)
    if role in ("post_ln", "linear"):
        return UniformQuantizer(a, (1,), name=name)
    if role == "conv":
        if recipe.conv_abits is None or recipe.conv_abits >= 8:
            raise ValueError("a conv input at >= 8 bits stays in float (no quantizer)")
        return UniformQuantizer(recipe.conv_abits, (1,), name=name)
    if role == "post_gelu":
        if recipe.gelu == "adalog":
            return AdaLogQuantizer(a, shift=GELU_SHIFT, name=name)
        if recipe.gelu == "twin":
            return TwinUniformQuantizer(a, "signed", name=name)
        if recipe.gelu in ("log2", "logsqrt2"):
            return LogQuantizer(a, 1.0 if recipe.gelu == "log2" else 0.5, shift=GELU_SHIFT, name=name)
        return UniformQuantizer(a, (1,), name=name)
    if role in ("qk", "v"):
        return UniformQuantizer(a, per_head, name=name)
    if role == "softmax":
        s = recipe.softmax_bits
        if recipe.softmax == "adalog":
            return AdaLogQuantizer(s, name=name)
        if recipe.softmax == "log2":
            return LogQuantizer(s, 1.0, name=name)
        if recipe.softmax == "logsqrt2":
            return LogQuantizer(s, 0.5, name=name)
        if recipe.softmax == "twin":
            return TwinUniformQuantizer(s, "softmax", name=name)
        return UniformQuantizer(s, (1,), name=name)
    raise ValueError(f"unknown role {role!r}")


def wrap(model: nn.Module, recipe: Recipe, example: Tensor | None = None) -> tuple[nn.Module, list[LayerInfo]]:
    """A deep copy of ``model`` with every Linear / Conv2d and attention product quantized per ``recipe``
    (quantizers raw, parameters unset), and the list of quantized layers in module order.

    Hybrids' BatchNorms are folded into their convs first (``polyquant.surgery.fold_batchnorm``) with one forward
    of ``example`` (a few input images; None: zeros of the model's input size).
    """
    qmodel = copy.deepcopy(model).eval()
    if any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()):
        # Hybrids: BatchNorm folded into the conv before it (as Q-HyViT does), so the folded weight is quantized.
        if example is None:
            from .models import input_spec

            size, chans = input_spec(qmodel)
            example = torch.zeros(2, chans, size, size)
        fold_batchnorm(qmodel, example)

    def make_product(site: ProductSite) -> QuantMatMul:
        heads = int(site.module.num_heads)
        a_role, b_role = ("qk", "qk") if site.product == "matmul_qk" else ("softmax", "v")
        product = QuantMatMul(name=site.name)
        product.a_quantizer = _act_quantizer(a_role, recipe, heads, f"{site.name}.a")
        product.b_quantizer = _act_quantizer(b_role, recipe, heads, f"{site.name}.b")
        return product

    patch_attention(qmodel, make_product, scaled_query=False, classes=vit_attention_classes())

    plan: list[LayerInfo] = []
    seen_conv = False
    for name, module in list(qmodel.named_modules()):
        if is_product_patched(module):
            continue
        if type(module) is nn.Linear:
            role, norm = _linear_role(qmodel, name)
            if role == "post_gelu" and recipe.gelu == "adalog" and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features))  # room for the folded shift
            if role == "post_ln" and norm is not None and recipe.ln_reparam and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features))  # room for the reparam offset
            new: nn.Module = QuantLinear(module, name=name)
            kind = "linear"
        elif type(module) is nn.Conv2d:
            # The first conv sees the image (patch embedding / stem): conv_abits; any other conv: abits.
            role, norm, kind = ("conv" if not seen_conv else "linear"), None, "conv"
            seen_conv = True
            new = QuantConv2d(module, name=name)
        else:
            continue
        w = module.weight
        new.weight_quantizer = UniformQuantizer(recipe.wbits, (w.shape[0],) + (1,) * (w.dim() - 1), weight=True,
                                                name=f"{name}.weight")
        float_input = role == "conv" and (recipe.conv_abits is None or recipe.conv_abits >= 8)
        # The reference's quant_input returns the image unquantized at >= 8 bits (qconv_a_bit = 8).
        new.input_quantizer = None if float_input else _act_quantizer(role, recipe, 1, f"{name}.input")
        set_submodule(qmodel, name, new)
        plan.append(LayerInfo(name, kind, role, norm=norm if recipe.ln_reparam else None))
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantMatMul):
            heads = int(_parent(qmodel, name)[0].num_heads)  # type: ignore[union-attr]
            kind = "matmul_qk" if name.endswith("matmul_qk") else "matmul_av"
            plan.append(LayerInfo(name, kind, "qk" if kind == "matmul_qk" else "softmax", heads=heads))
    order = {n: i for i, (n, _) in enumerate(qmodel.named_modules())}
    plan.sort(key=lambda info: order[info.name])
    if not plan:
        raise ValueError("the model has no Linear, Conv2d or timm attention module to quantize")
    return qmodel, plan


def vit_quantizers(model: nn.Module) -> list[VitQuantizer]:
    return [m for m in model.modules() if isinstance(m, VitQuantizer)]


def set_lut(model: nn.Module, lut: bool) -> None:
    """Switch every AdaLog quantizer between hardware (table) and float dequantization."""
    for q in model.modules():
        if isinstance(q, AdaLogQuantizer):
            q.lut = lut


def _set_all(model: nn.Module, state: str) -> None:
    for q in model.modules():
        if isinstance(q, Quantizer):
            q.set_state(state)  # type: ignore[arg-type]


# --- capture ----------------------------------------------------------------------------------------------------


def capture(qmodel: nn.Module, plan: list[LayerInfo], images: Tensor, batch_size: int, *,
            progress: bool = False) -> dict[str, list[Tensor]]:
    """Float inputs and outputs of every planned layer: name -> [input(s)..., output] (CPU, float32, every call
    concatenated); the input is the layer's first positional argument, both operands for a QuantMatMul."""
    from polyquant.progress import progress_iter

    batches = progress_iter(list(images.split(batch_size)), desc="capturing layer inputs", bars=progress)
    caps = capture_modules(qmodel, [info.name for info in plan], batches)
    data: dict[str, list[Tensor]] = {}
    for info in plan:
        cap = caps.pop(info.name)
        n_in = 2 if isinstance(qmodel.get_submodule(info.name), QuantMatMul) else 1
        data[info.name] = [cap.input(j).float() for j in range(n_in)] + [cap.output().float()]
    return data


# --- loss evaluators --------------------------------------------------------------------------------------------


def _rows_for(x: Tensor, groups: str, heads: int = 1) -> Tensor:
    """Data of each parameter group as rows: 'tensor' (1, M), 'channel' (C, M), 'head' (H, M) for (B, H, N, D)."""
    if groups == "tensor":
        return x.reshape(1, -1)
    if groups == "channel":
        return x.reshape(-1, x.shape[-1]).t()
    if groups == "head":
        return x.transpose(0, 1).reshape(heads, -1)
    raise ValueError(groups)


def _weight_self_eval(w: Tensor, bits: int) -> Evaluate:
    rows = w.reshape(w.shape[0], -1)  # (out, D)

    def evaluate(s: Tensor, z: Tensor) -> Tensor:
        def part(sl: slice) -> Tensor:
            wq = uniform_fq(rows[None], s[sl, :, None], z[sl, :, None], bits)
            return (wq - rows[None]).pow(2).mean(-1)

        return chunked(part, s.shape[0], rows.numel())

    return evaluate


class _LinearProblem:
    """A Linear / Conv2d layer with captured float input x and output y, as least-squares pieces.

    The output MSE of weight candidates is evaluated in closed form from the Gram matrix of the (quantized)
    input: mean_m (x_m . w_o + b_o - y_mo)^2 = (w G w - 2 w c_o + |b_o - y_o|^2) / M, G = X^T X, c = X^T (y - b),
    exactly the layer-output MSE of the reference code at a fraction of the cost (float64).
    """

    def __init__(self, layer: nn.Module, x: Tensor, y: Tensor) -> None:
        self.layer = layer
        self.x = x
        self.y = y
        self.conv = isinstance(layer, QuantConv2d)
        self.gram_ok = not self.conv or (layer.groups == 1 and layer.padding_mode == "zeros")

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        if self.conv:
            return F.conv2d(x, w, self.layer.bias, self.layer.stride, self.layer.padding, self.layer.dilation,
                            self.layer.groups)
        return F.linear(x, w, self.layer.bias)

    def _flat(self, xq: Tensor) -> tuple[Tensor, Tensor]:
        """(X (M, D), Y - b (M, out)) in float64."""
        layer = self.layer
        b = layer.bias.detach().double() if layer.bias is not None else 0.0
        if self.conv:
            cols = F.unfold(xq, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                            stride=layer.stride)  # (B, D, L)
            X = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            Y = self.y.flatten(2).transpose(1, 2).reshape(-1, self.y.shape[1])
        else:
            X = xq.reshape(-1, xq.shape[-1])
            Y = self.y.reshape(-1, self.y.shape[-1])
        return X.double(), Y.double() - b

    def weight_eval(self, xq: Tensor, bits: int) -> Evaluate:
        """Per-output-channel layer-output MSE of weight candidates (K, out) -> (K, out), given the input xq."""
        w = self.layer.weight.detach()
        rows = w.reshape(w.shape[0], -1)  # (out, D)
        if not self.gram_ok:
            return self._weight_eval_loop(xq, bits)
        X, Yb = self._flat(xq)
        m, d = X.shape
        if d < m:  # closed form through the Gram matrix: K * out * D^2 instead of K * M * D * out
            G = X.t() @ X  # (D, D)
            C = X.t() @ Yb  # (D, out)
            yy = Yb.pow(2).sum(0)  # (out,)

            def evaluate(s: Tensor, z: Tensor) -> Tensor:
                def part(sl: slice) -> Tensor:
                    wq = uniform_fq(rows[None], s[sl, :, None], z[sl, :, None], bits).double()  # (k, out, D)
                    quad = torch.einsum("kod,de,koe->ko", wq, G, wq)
                    lin = torch.einsum("kod,do->ko", wq, C)
                    return ((quad - 2 * lin + yy) / m).float()

                return chunked(part, s.shape[0], rows.numel() * max(1, d // 8))

            return evaluate
        Xf, Yf = X.float(), Yb.float()

        def evaluate_direct(s: Tensor, z: Tensor) -> Tensor:
            def part(sl: slice) -> Tensor:
                wq = uniform_fq(rows[None], s[sl, :, None], z[sl, :, None], bits)  # (k, out, D)
                k = wq.shape[0]
                out = (Xf @ wq.reshape(-1, d).t()).reshape(m, k, -1)  # (M, k, out)
                return (out - Yf[:, None, :]).pow(2).mean(0)

            return chunked(part, s.shape[0], m * rows.shape[0] + rows.numel())

        return evaluate_direct

    def _weight_eval_loop(self, xq: Tensor, bits: int) -> Evaluate:
        w = self.layer.weight.detach()
        rows = w.reshape(w.shape[0], -1)

        def evaluate(s: Tensor, z: Tensor) -> Tensor:
            out = []
            for i in range(s.shape[0]):
                wq = uniform_fq(rows, s[i, :, None], z[i, :, None], bits).reshape(w.shape)
                err = (self.forward(xq, wq) - self.y).pow(2)
                out.append(err.transpose(0, 1).reshape(err.shape[1], -1).mean(1))
            return torch.stack(out)

        return evaluate

    def act_eval(self, fq: Callable[[Tensor, slice], Tensor], k_total: int) -> Tensor:
        """Layer-output MSE of every activation candidate; ``fq(x, sl)`` fake-quantizes x for candidates ``sl``
        and returns (k, *x.shape). Returns (K, 1).

        A Linear whose input is narrower than its output (qkv, fc1: D < out) is evaluated in Gram form on the
        input error e = xq - x: |e W^T + r|^2 = e (W^T W) e + 2 e (r W) + |r|^2, r = x W^T + b - y, which costs
        M D^2 instead of M D out per candidate (the same loss, other rounding)."""
        wq = self.layer.quant_weight().detach()
        if not self.conv and wq.shape[1] < wq.shape[0]:
            return self._act_eval_gram(fq, k_total, wq)
        per = self.x.numel() + self.y.numel()

        def part(sl: slice) -> Tensor:
            xq = fq(self.x, sl)  # (k, *x.shape)
            k = xq.shape[0]
            if self.conv:
                out = self.forward(xq.reshape(-1, *self.x.shape[1:]), wq).reshape(k, *self.y.shape)
            else:
                out = self.forward(xq, wq)
            return (out - self.y[None]).pow(2).reshape(k, -1).mean(1, keepdim=True)

        return chunked(part, k_total, per)

    def _act_eval_gram(self, fq: Callable[[Tensor, slice], Tensor], k_total: int, wq: Tensor) -> Tensor:
        d = wq.shape[1]
        x = self.x.reshape(-1, d)  # (M, D)
        r = self.forward(x, wq) - self.y.reshape(-1, wq.shape[0])  # (M, out)
        gram = wq.t() @ wq  # (D, D)
        lin = 2 * (r @ wq)  # (M, D)
        base = r.pow(2).sum()
        count = self.y.numel()

        def part(sl: slice) -> Tensor:
            e = fq(self.x, sl).reshape(-1, *x.shape) - x  # (k, M, D)
            return ((e * (e @ gram).add_(lin)).reshape(e.shape[0], -1).sum(1, keepdim=True) + base) / count

        return chunked(part, k_total, 3 * self.x.numel())


def _bshape(x: Tensor, params: Tensor, groups: str) -> Tensor:
    """Candidate params (k, G) -> broadcastable against (k, *x.shape) for the group layout."""
    k = params.shape[0]
    if groups == "tensor":
        return params.reshape(k, *([1] * x.dim()))
    if groups == "channel":
        return params.reshape(k, *([1] * (x.dim() - 1)), -1)
    if groups == "head":  # x (B, H, N, D)
        return params.reshape(k, 1, -1, 1, 1)
    raise ValueError(groups)


def _uniform_search(rows: Tensor, bits: int, evaluate: Evaluate, recipe: Recipe, *, zp_levels: int,
                    min_scale: float, centre: str = "range") -> SearchResult:
    """FPCS (or a flat grid) over ``uniform_grid`` candidates. Activations centre their zero points on the observed
    range ("range": a shifted range is not clipped); weights on 2^(b-1) as the reference ("mid")."""
    scales, zps, step = uniform_grid(rows, bits, eq_n=recipe.eq_n, zp_levels=zp_levels, centre=centre)
    if recipe.fpcs:
        return fp.fpcs(scales, zps, step, evaluate, steps=recipe.steps, eq_n=recipe.eq_n, min_scale=min_scale)
    return fp.flat_grid_search(scales.clamp_min(min_scale), zps, evaluate)


def _search_weight(layer: nn.Module, evaluate: Evaluate, recipe: Recipe) -> SearchResult:
    """Search ``layer``'s per-row asymmetric weight quantizer with ``evaluate`` (its own MSE on the first pass,
    the layer output afterwards) and set it; min(16, 2^(b-1)) zero points as in the reference."""
    wq: UniformQuantizer = layer.weight_quantizer
    w = layer.weight.detach()
    res = _uniform_search(w.reshape(w.shape[0], -1), wq.bits, evaluate, recipe, zp_levels=2 ** (wq.bits - 1),
                          min_scale=1e-8, centre="mid")
    wq.set_params(res.scale.reshape(wq.scale.shape), res.zero_point.reshape(wq.scale.shape))
    return res


# --- LayerNorm reparameterization -------------------------------------------------------------------------------


@torch.no_grad()
def reparam_layernorm(norm: nn.LayerNorm, layer: nn.Module, scale: Tensor, zero_point: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold per-channel input quantizer parameters into the LayerNorm affine and ``layer`` (RepQ-ViT / AdaLog
    ``reparam_step1``). With r = s_c / mean(s) and b = min_c / r - min_t (min_c = -z_c s_c, min_t the target):
    gamma <- gamma / r, beta <- beta / r - b, W <- W * r (per input column), bias <- bias + W_new b.

    The float output of norm -> layer is unchanged; the new LayerNorm output x / r - b has the same range in
    every channel, so one layer-wise (scale, zero point) replaces the per-channel ones.
    Returns (r, b, target scale, target zero point).
    """
    s_c = scale.float().reshape(-1)
    z_c = zero_point.float().reshape(-1)
    s_t = s_c.mean()
    z_t = z_c.mean().round()
    r = s_c / s_t
    b = (-z_c * s_c) / r - (-z_t * s_t)
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(b)
    layer.weight.mul_(r.reshape(1, -1))
    if layer.bias is None:
        raise ValueError("the layer after a reparameterized LayerNorm needs a bias (wrap() creates one)")
    layer.bias.add_(layer.weight @ b)
    return r, b, s_t.reshape(1), z_t.reshape(1)


# --- per-layer calibration --------------------------------------------------------------------------------------


def _stats_qparams(x: Tensor, bits: int, recipe: Recipe, groups: str = "tensor") -> tuple[Tensor, Tensor]:
    rows = _rows_for(x, groups) if groups != "weight" else x.reshape(x.shape[0], -1)
    if recipe.calib == "percentile":
        lo, hi = quantile_rows(rows, [1 - recipe.percentile / 100.0, recipe.percentile / 100.0])
    else:
        lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    s, z = qparams_from_minmax(lo, hi, f"uint{bits}", symmetric=False)
    return s, z


def _calibrate_weight_layer_stats(layer: nn.Module, x: Tensor, recipe: Recipe) -> None:
    wq: UniformQuantizer = layer.weight_quantizer
    s, z = _stats_qparams(layer.weight.detach(), wq.bits, recipe, "weight")
    wq.set_params(s, z)
    aq: UniformQuantizer | None = layer.input_quantizer
    if aq is not None:  # None: a float conv input
        s, z = _stats_qparams(x, aq.bits, recipe)
        aq.set_params(s, z)


def _float_input_flow(layer: nn.Module, prob: _LinearProblem, recipe: Recipe) -> None:
    """A layer whose input stays in float (the patch embedding at conv_abits >= 8): one weight search on the
    layer output from the float input, as the reference's conv (``search_round`` breaks after one round)."""
    _search_weight(layer, prob.weight_eval(prob.x, layer.weight_quantizer.bits), recipe)


def _uniform_layer_flow(layer: nn.Module, prob: _LinearProblem, recipe: Recipe, info: LayerInfo) -> None:
    """Reference ``AsymmetricallyBatchingQuantLinear.hyperparameter_searching`` (weights, then inputs, then
    ``search_round`` alternations with the layer-output objective)."""
    wq: UniformQuantizer = layer.weight_quantizer
    aq: UniformQuantizer = layer.input_quantizer
    w = layer.weight.detach()
    a_levels = 2**aq.bits
    x = prob.x
    a_rows = _rows_for(x, "tensor")

    _search_weight(layer, _weight_self_eval(w, wq.bits), recipe)

    def a_self(s: Tensor, z: Tensor) -> Tensor:
        def part(sl: slice) -> Tensor:
            xq = uniform_fq(x[None], _bshape(x, s[sl], "tensor"), _bshape(x, z[sl], "tensor"), aq.bits)
            return (xq - x[None]).pow(2).reshape(xq.shape[0], -1).mean(1, keepdim=True)

        return chunked(part, s.shape[0], x.numel())

    res = _uniform_search(a_rows, aq.bits, a_self, recipe, zp_levels=a_levels, min_scale=1e-4)
    aq.set_params(res.scale, res.zero_point)
    evaluations = 0
    for _ in range(recipe.search_round):
        xq = uniform_fq(x, aq.scale, aq.zero_point, aq.bits)
        res = _search_weight(layer, prob.weight_eval(xq, wq.bits), recipe)
        evaluations += res.evaluations

        def a_out(s: Tensor, z: Tensor) -> Tensor:
            return prob.act_eval(
                lambda t, sl: uniform_fq(t[None], _bshape(t, s[sl], "tensor"), _bshape(t, z[sl], "tensor"),
                                         aq.bits),
                s.shape[0],
            )

        res = _uniform_search(a_rows, aq.bits, a_out, recipe, zp_levels=a_levels, min_scale=1e-4)
        aq.set_params(res.scale, res.zero_point)
        evaluations += res.evaluations


def _post_ln_flow(qmodel: nn.Module, layer: nn.Module, prob: _LinearProblem, recipe: Recipe, info: LayerInfo
                  ) -> None:
    """Per-channel self-MSE search, LayerNorm reparameterization, then the layer-wise flow on x / r - b."""
    aq: UniformQuantizer = layer.input_quantizer
    x = prob.x
    rows = _rows_for(x, "channel")  # (C, M)

    def a_self(s: Tensor, z: Tensor) -> Tensor:
        def part(sl: slice) -> Tensor:
            xq = uniform_fq(x[None], _bshape(x, s[sl], "channel"), _bshape(x, z[sl], "channel"), aq.bits)
            return (xq - x[None]).pow(2).reshape(xq.shape[0], -1, x.shape[-1]).mean(1)

        return chunked(part, s.shape[0], x.numel())

    res = _uniform_search(rows, aq.bits, a_self, recipe, zp_levels=2**aq.bits, min_scale=1e-4)
    norm = qmodel.get_submodule(info.norm)  # type: ignore[arg-type]
    r, b, _, _ = reparam_layernorm(norm, layer, res.scale, res.zero_point)
    prob.x = x / r - b
    _uniform_layer_flow(layer, prob, recipe, info)


def _adalog_gelu_flow(layer: nn.Module, prob: _LinearProblem, recipe: Recipe, info: LayerInfo) -> None:
    """Reference ``PostGeluLogBasedBatchingQuantLinear.hyperparameter_searching`` with FPCS.

    With a shifted log2 / log-sqrt2 input quantizer (the quantizer ablation) the search runs on a temporary AdaLog
    quantizer and the log quantizer then takes its scale, as the reference's ``tmp_quantizer`` does.
    """
    wq: UniformQuantizer = layer.weight_quantizer
    final = layer.input_quantizer
    aq = final if isinstance(final, AdaLogQuantizer) else AdaLogQuantizer(final.bits, shift=GELU_SHIFT)
    w = layer.weight.detach()
    x = prob.x
    _search_weight(layer, _weight_self_eval(w, wq.bits), recipe)
    lo, hi = (fp.positive_quantile(x, [0.9, 1.0]) + aq.shift).tolist()
    scale = lo + (hi - lo) * (recipe.eq_n - 2) / (recipe.eq_n - 1)  # linspace(lo, hi, eq_n)[-2]
    q = aq.r  # the reference starts from q = r (base 2)

    log2_x = torch.log2((x + aq.shift).clamp_min(1e-38))  # shared by every candidate

    def evaluate(scales: Tensor, qs: Tensor) -> Tensor:
        return prob.act_eval(
            lambda t, sl: adalog_fq_from_log2(log2_x[None], scales[sl].reshape(-1, *([1] * t.dim())),
                                              qs[sl].reshape(-1, *([1] * t.dim())), aq.bits, r=aq.r,
                                              shift=aq.shift, lut=recipe.lut),
            scales.shape[0],
        ).reshape(-1)

    for _ in range(recipe.search_round):
        if recipe.fpcs:
            scale, q, _, _ = adalog_activation_fpcs(x, evaluate, scale, shift=aq.shift, eq_n=recipe.eq_n,
                                                    steps=recipe.steps)
        else:
            q_top, _ = search_log_base(lambda qs: evaluate(torch.full_like(qs, scale), qs))
            q = int(q_top[0])
            grid = torch.linspace(lo, hi, recipe.eq_n).clamp_min(1e-8)
            loss = evaluate(grid, torch.full_like(grid, float(q)))
            scale = float(grid[int(torch.argmin(loss))])
        aq.set_params(scale, q)
        xq = aq.fake_quant(x)
        _search_weight(layer, prob.weight_eval(xq, wq.bits), recipe)
    if final is not aq:
        final.set_params(torch.tensor(scale))


def _twin_gelu_flow(layer: nn.Module, prob: _LinearProblem, recipe: Recipe, info: LayerInfo) -> None:
    """Reference ``PostGeluTwinUniformBatchingQuantLinear`` (PTQ4ViT): d_neg fixed by -min GELU, d_pos searched
    over d_neg * 2^i, i = -5 .. 24, alternating with the weight search."""
    wq: UniformQuantizer = layer.weight_quantizer
    aq: TwinUniformQuantizer = layer.input_quantizer
    w = layer.weight.detach()
    x = prob.x
    half = 2 ** (aq.bits - 1)
    d_neg = GELU_SHIFT / half
    d_pos = float(x.abs().max()) / (half - 0.5)
    _search_weight(layer, _weight_self_eval(w, wq.bits), recipe)
    cands = d_neg * torch.exp2(torch.arange(-5, 25, dtype=torch.float32))
    for _ in range(recipe.search_round):
        loss = prob.act_eval(
            lambda t, sl: twin_fq(t[None], torch.tensor(d_neg), cands[sl].reshape(-1, *([1] * t.dim())), aq.bits,
                                  "signed"),
            len(cands),
        ).reshape(-1)
        d_pos = float(cands[int(torch.argmin(loss))])
        aq.set_params(d_neg, d_pos)
        xq = aq.fake_quant(x)
        _search_weight(layer, prob.weight_eval(xq, wq.bits), recipe)


def _matmul_eval(other: Tensor, y: Tensor, operand: str, groups: str, t: Tensor | None = None
                 ) -> Callable[[Tensor], Tensor]:
    """Loss of candidate operands (k, *shape) against the float product y; per head or per tensor -> (k, G).

    With the float operand ``t`` given and a contracted dimension D smaller than the other operand's free
    dimension F (q @ k^T: D = head_dim < N), the loss is evaluated in Gram form on the operand error e = cand - t:
    |e O + r|^2 = e (O O^T) e + 2 e (O r^T) + |r|^2 with r = t O - y (for operand "a"; mirrored for "b"), which
    costs D^2 instead of D F per row and reads (.., D) instead of (.., F) errors. Same loss, other rounding.
    """

    def reduce(err: Tensor) -> Tensor:  # (k, B, H, ...) -> (k, G)
        if groups == "head":
            return err.transpose(1, 2).reshape(err.shape[0], err.shape[2], -1).sum(-1)
        return err.reshape(err.shape[0], -1).sum(1, keepdim=True)

    count = y.numel() // (y.shape[1] if groups == "head" else 1)  # output elements per group
    inner = other.shape[-2] if operand == "a" else other.shape[-1]
    free = other.shape[-1] if operand == "a" else other.shape[-2]
    if t is not None and inner < free:
        r = (t @ other if operand == "a" else other @ t) - y  # residual of the float operand
        if operand == "a":
            gram = other @ other.transpose(-1, -2)  # (B, H, D, D)
            lin = 2 * (r @ other.transpose(-1, -2))  # (B, H, N, D)
        else:
            gram = other.transpose(-1, -2) @ other  # (B, H, D, D)
            lin = 2 * (other.transpose(-1, -2) @ r)  # (B, H, D, F)
        base = reduce(r.pow(2)[None])  # (1, G)

        def gram_loss(cand: Tensor) -> Tensor:
            e = cand - t[None]
            quad = e @ gram[None] if operand == "a" else gram[None] @ e
            return (reduce(e * quad.add_(lin[None])) + base) / count

        return gram_loss

    def loss(cand: Tensor) -> Tensor:
        out = cand @ other[None] if operand == "a" else other[None] @ cand
        return reduce((out - y[None]).pow(2)) / count

    return loss


def _matmul_uniform_search(quant: UniformQuantizer, t: Tensor, other_q: Tensor, y: Tensor, operand: str,
                           recipe: Recipe, groups: str, heads: int) -> None:
    loss = _matmul_eval(other_q, y, operand, groups, t)

    def evaluate(s: Tensor, z: Tensor) -> Tensor:
        return chunked(
            lambda sl: loss(uniform_fq(t[None], _bshape(t, s[sl], groups), _bshape(t, z[sl], groups), quant.bits)),
            s.shape[0], 2 * t.numel() + y.numel())

    res = _uniform_search(_rows_for(t, groups, heads), quant.bits, evaluate, recipe,
                          zp_levels=2 ** (quant.bits - 1), min_scale=1e-8)
    quant.set_params(res.scale.reshape(quant.scale.shape), res.zero_point.reshape(quant.scale.shape))


def _init_from_grid(quant: UniformQuantizer, t: Tensor, recipe: Recipe, groups: str, heads: int) -> None:
    scales, zps, _ = uniform_grid(_rows_for(t, groups, heads), quant.bits, eq_n=recipe.eq_n, centre="range")
    quant.set_params(scales[-2].reshape(quant.scale.shape), zps[-2].reshape(quant.scale.shape))


def _calibrate_matmul(mm: QuantMatMul, info: LayerInfo, a: Tensor, b: Tensor, y: Tensor, recipe: Recipe) -> None:
    aq, bq = mm.a_quantizer, mm.b_quantizer
    heads = info.heads
    groups = "head" if recipe.head_wise else "tensor"
    if recipe.calib != "search":
        for quant, t in ((aq, a), (bq, b)):
            s, z = _stats_qparams(t, quant.bits, recipe)
            quant.set_params(s.reshape(quant.scale.shape), z.reshape(quant.scale.shape))
        return
    if info.kind == "matmul_qk":
        _init_from_grid(aq, a, recipe, groups, heads)
        _init_from_grid(bq, b, recipe, groups, heads)
        for _ in range(recipe.search_round):
            _matmul_uniform_search(aq, a, bq.fake_quant(b), y, "a", recipe, groups, heads)
            _matmul_uniform_search(bq, b, aq.fake_quant(a), y, "b", recipe, groups, heads)
        return
    # attn @ v: the post-softmax quantizer, then v (reference PostSoftmaxAsymmetricallyBatchingQuantMatMul)
    _init_from_grid(bq, b, recipe, groups, heads)
    if isinstance(aq, LogQuantizer):
        aq.set_params(torch.ones(1))
    for _ in range(recipe.search_round):
        bqt = bq.fake_quant(b)
        loss = _matmul_eval(bqt, y, "a", "tensor")
        if isinstance(aq, AdaLogQuantizer):
            one = torch.ones(1)
            log2_a = torch.log2(a.clamp_min(1e-38))

            def eval_q(qs: Tensor) -> Tensor:
                return chunked(
                    lambda sl: loss(adalog_fq_from_log2(log2_a[None], one, qs[sl].reshape(-1, 1, 1, 1, 1), aq.bits,
                                                        r=aq.r, lut=recipe.lut)),
                    len(qs), a.numel() + y.numel()).reshape(-1)

            q_top, _ = search_log_base(eval_q)
            aq.set_params(1.0, int(q_top[0]))
        elif isinstance(aq, TwinUniformQuantizer):
            half = 2 ** (aq.bits - 1)
            d_hi = 1.0 / half
            cands = d_hi / torch.exp2(torch.arange(0, 16, dtype=torch.float32))
            losses = chunked(
                lambda sl: loss(twin_fq(a[None], cands[sl].reshape(-1, 1, 1, 1, 1), torch.tensor(d_hi), aq.bits,
                                        "softmax")),
                len(cands), a.numel() + y.numel()).reshape(-1)
            aq.set_params(float(cands[int(torch.argmin(losses))]), d_hi)
        elif isinstance(aq, UniformQuantizer):
            _matmul_uniform_search(aq, a, bqt, y, "a", recipe, "tensor", heads)
        _matmul_uniform_search(bq, b, aq.fake_quant(a), y, "b", recipe, groups, heads)
        if not isinstance(aq, (AdaLogQuantizer, UniformQuantizer)):
            break


@torch.no_grad()
def calibrate_layer(qmodel: nn.Module, info: LayerInfo, tensors: list[Tensor], recipe: Recipe) -> None:
    """Find the parameters of one layer's quantizers from its captured float input(s) and output."""
    module = qmodel.get_submodule(info.name)
    if isinstance(module, QuantMatMul):
        a, b, y = tensors
        _calibrate_matmul(module, info, a, b, y, recipe)
        return
    x, y = tensors
    if recipe.calib != "search":
        _calibrate_weight_layer_stats(module, x, recipe)
        return
    prob = _LinearProblem(module, x, y)
    if info.role == "post_ln" and info.norm is not None and recipe.ln_reparam:
        _post_ln_flow(qmodel, module, prob, recipe, info)
    elif info.role == "post_gelu" and recipe.gelu in ("adalog", "log2", "logsqrt2"):
        _adalog_gelu_flow(module, prob, recipe, info)
    elif info.role == "post_gelu" and recipe.gelu == "twin":
        _twin_gelu_flow(module, prob, recipe, info)
    elif module.input_quantizer is None:
        _float_input_flow(module, prob, recipe)
    else:
        _uniform_layer_flow(module, prob, recipe, info)


def finalize(qmodel: nn.Module) -> nn.Module:
    """Fold post-GELU shifts into the biases, switch every quantizer to ``quantized``, eval mode."""
    for m in qmodel.modules():
        if isinstance(m, QuantLinear):
            fold_shift(m)
    _set_all(qmodel, "quantized")
    return qmodel.eval()


def _work(tensors: list[Tensor]) -> int:
    """Rough cost of calibrating a layer from its captures (multiply-adds of one output evaluation): the ETA
    weight of the progress bar, so a wide fc2 counts more than a small projection."""
    if len(tensors) == 3:  # a product a @ b
        a, b, _ = tensors
        return a.numel() * b.shape[-1]
    x, y = tensors
    return x.numel() * min(x.shape[-1] if x.dim() != 4 else x.shape[1], y.shape[-1] if y.dim() != 4 else y.shape[1])


def _calibrate_all(qmodel: nn.Module, plan: list[LayerInfo], data: dict[str, list[Tensor]], recipe: Recipe,
                   device: torch.device, progress: bool) -> None:
    """Calibrate every planned layer on ``device``; the bar advances by each layer's estimated work (ETA); off a
    terminal, one line per layer (``polyquant.progress``)."""
    from polyquant.progress import progress_bar

    bar = progress_bar(total=sum(_work(data[info.name]) for info in plan), desc=f"calibrating ({recipe.name})",
                       bars=progress, percent=True)
    try:
        for info in plan:
            tensors = data.pop(info.name)
            calibrate_layer(qmodel, info, [t.to(device) for t in tensors], recipe)
            bar.update(_work(tensors), step=info.name)
    finally:
        bar.close()


def quantize_with_recipe(model: nn.Module, calib: Tensor, recipe: Recipe, *, fold: bool = True,
                         progress: bool = False) -> nn.Module:
    """Wrap a copy of ``model``, capture the float layer inputs / outputs on ``calib[:recipe.calib_size]``,
    calibrate every layer (in parallel: each from float inputs), then ``finalize`` (``fold=False`` leaves the
    shifts unfolded and the quantizers in the ``quantized`` state, for a later reconstruction)."""
    if not isinstance(calib, Tensor) or calib.dim() != 4:
        raise ValueError("calib must be a (N, C, H, W) tensor of images")
    if len(calib) == 0:
        raise ValueError("the calibration set is empty")
    images = calib[: recipe.calib_size].float()
    qmodel, plan = wrap(model, recipe, images[:2])
    data = capture(qmodel, plan, images, recipe.calib_batch_size, progress=progress)
    # Captures wait on the host; each layer's searches run on the calibration device (candidate grids and
    # parameters are created there too: the default-device context).
    # (the context is a torch-function mode that sees every op: only where it is needed)
    with torch.device(images.device) if images.device.type != "cpu" else contextlib.nullcontext():
        _calibrate_all(qmodel, plan, data, recipe, images.device, progress)
    qmodel.to(images.device)  # parameters set by the searches join the model's device
    set_lut(qmodel, recipe.lut)  # inference dequantization: tables (hardware) or float
    if fold:
        return finalize(qmodel)
    _set_all(qmodel, "quantized")
    return qmodel.eval()
