"""Searched-parameter quantizers of the ViT harness (uniform, log2, log-sqrt2, twin-uniform).

Each quantizer is a ``polyquant.nn.SearchedQuantizer`` (states raw -> calibrating -> quantized, found by
``polyquant.nn.quantizers`` / ``set_state``) whose parameters are *set by a search* (``set_params``, which calls
the core ``freeze``) instead of an observer, so ``calibrating`` is a plain pass-through. Parameters are buffers
with shapes that broadcast against the tensor they quantize and are fixed at construction, so a ``state_dict``
round trip rebuilds the model exactly:

| tensor                    | x shape         | param shape        |
|---------------------------|-----------------|--------------------|
| Linear weight, per row    | (out, in)       | (out, 1)           |
| Conv weight, per filter   | (out, in, k, k) | (out, 1, 1, 1)     |
| activation, layer-wise    | (..., C)        | (1,)               |
| matmul operand, per head  | (B, H, N, D)    | (1, H, 1, 1)       |

Every ``fake_quant`` has a functional twin (``uniform_fq``, ``log_fq``, ``twin_fq``) that also accepts a leading
candidate dimension in its parameters; the searches evaluate many candidates with it at once. These are fused
fast paths of the core ``polyquant.primitives.fake_quantize`` on the format each quantizer declares (``uint<n>``,
``LogFormat``, ``TwinUniformFormat``); ``tests/plugins/vit/test_fast_paths.py`` compares them with it. AdaLog lives
in ``adalog.py`` and follows the same pattern.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polyquant.formats import IntFormat, LogFormat, TwinUniformFormat, round_ste
from polyquant.nn import QuantSpec, SearchedQuantizer
from polyquant.primitives import PerChannel, PerTensor

__all__ = [
    "GELU_SHIFT",
    "VitQuantizer",
    "UniformQuantizer",
    "LogQuantizer",
    "TwinUniformQuantizer",
    "uniform_fq",
    "uniform_codes",
    "log_fq",
    "twin_fq",
]

# -min over x of GELU(x) (at x ~ -0.7518): adding it makes every post-GELU activation non-negative.
GELU_SHIFT = 0.16997124254703522


class VitQuantizer(SearchedQuantizer):
    """A ``SearchedQuantizer`` with a bit width; ``fake_quant`` is used in the quantized state."""

    def __init__(self, spec: QuantSpec, *, bits: int, name: str = "") -> None:
        super().__init__(spec, name=name)
        self.bits = bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}, state={self.state}"


# --- uniform ---------------------------------------------------------------------------------------------------


def uniform_codes(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Asymmetric codes clamp(round(x / s) + z, 0, 2^bits - 1) (float tensor of integers)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)


def uniform_fq(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Asymmetric uniform fake-quant (clamp(round(x/s) + z, 0, 2^n - 1) - z) * s.

    Differentiable when autograd records: straight-through rounding, zero gradient outside the range (clipped
    STE); gradients reach x and the scale (LSQ style). Otherwise a fused in-place path computes the same values.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        out = (x / scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point)
        return out.mul_(scale)
    q = torch.clamp(round_ste(x / scale) + zero_point.detach(), 0, 2**bits - 1)
    return (q - zero_point.detach()) * scale


class UniformQuantizer(VitQuantizer):
    """Asymmetric uniform quantizer with integer zero point; parameters of shape ``param_shape``."""

    affine_grid = True  # uniform_fq is the core's affine int grid (ONNX: Q / DQ)

    def __init__(self, bits: int, param_shape: tuple[int, ...], *, weight: bool = False, name: str = "") -> None:
        # Weights are per output channel: the spec says so, which lets the core's AdaRound expand the scale.
        granularity = PerChannel(0) if weight else PerTensor()
        spec = QuantSpec(IntFormat(bits, signed=False), granularity=granularity, symmetric=False)
        super().__init__(spec, bits=bits, name=name)
        self.scale = torch.ones(param_shape)
        self.zero_point = torch.zeros(param_shape)

    def set_params(self, scale: Tensor, zero_point: Tensor) -> None:
        """Freeze searched parameters (reshaped to the parameter shape; the zero point rounded)."""
        self.freeze(scale.detach().float().reshape(self.scale.shape),
                    torch.round(zero_point.detach().float()).reshape(self.zero_point.shape))

    def fake_quant(self, x: Tensor) -> Tensor:
        return uniform_fq(x, self.scale, self.zero_point, self.bits)

    def codes(self, x: Tensor) -> Tensor:
        """Integer codes 0 .. 2^bits - 1 as uint8 (what an artifact stores for weights)."""
        return uniform_codes(x.detach().float(), self.scale, self.zero_point, self.bits).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        return (codes.float() - self.zero_point) * self.scale


# --- log2 / log-sqrt2 -------------------------------------------------------------------------------------------


def log_fq(x: Tensor, scale: Tensor, bits: int, base_log2: float, *, shift: float = 0.0) -> Tensor:
    """Log quantizer of RepQ-ViT / AdaLog's Log2Quantizer with base 2^base_log2 (1: log2, 0.5: log-sqrt2).

    u = clamp((x + shift) / s, 1e-15, 1); k = round(-log2(u) / base_log2); k >= 2^bits -> 0 (flushed, a mask);
    x_hat = s * 2^(-k * base_log2) - shift. For base sqrt2 the inference form of the reference code,
    2^(-ceil(k/2)) * (1 + (sqrt2 - 1) * (k mod 2)), gives the same values.
    """
    levels = 2**bits
    u = ((x + shift) / scale).clamp(1e-15, 1.0)
    e = -torch.log2(u) / base_log2
    k = round_ste(e)  # straight-through: the forward value is torch.round
    keep = (k < levels).to(x.dtype)
    k = k.clamp(0, levels - 1)
    return torch.exp2(-k * base_log2) * scale * keep - shift


class LogQuantizer(VitQuantizer):
    """log2 (``base_log2=1``) or log-sqrt2 (``0.5``) quantizer with a layer-wise scale and an optional shift."""

    def __init__(self, bits: int, base_log2: float, *, shift: float = 0.0, name: str = "") -> None:
        super().__init__(QuantSpec(LogFormat(bits, base_log2=base_log2)), bits=bits, name=name)
        self.base_log2 = float(base_log2)
        self.shift = float(shift)
        self.scale = torch.ones(1)

    def set_params(self, scale: Tensor) -> None:
        self.freeze(scale.detach().float().reshape(1))

    def fake_quant(self, x: Tensor) -> Tensor:
        return log_fq(x, self.scale, self.bits, self.base_log2, shift=self.shift)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base=2^{self.base_log2:g}, shift={self.shift:g}, state={self.state}"


# --- twin uniform (PTQ4ViT) -------------------------------------------------------------------------------------


def twin_fq(x: Tensor, scale_lo: Tensor, scale_hi: Tensor, bits: int, mode: str) -> Tensor:
    """PTQ4ViT twin-uniform quantization: two uniform ranges with k-1 bits each plus one range bit.

    mode "softmax" (values in [0, 1]): R1 = [0, 2^(k-1) * d1) with the fine step d1 = ``scale_lo``, R2 = [0, 1]
        with d2 = ``scale_hi`` (1 / 2^(k-1)); a value uses R1 when it is below R1's end, else R2.
    mode "signed" (post-GELU): negative values on R1 = [-2^(k-1) d1, 0] (d1 = ``scale_lo``), non-negative values
        on R2 = [0, (2^(k-1) - 1) d2] (d2 = ``scale_hi``), as in the AdaLog code's TwinUniformQuantizer.
    """
    half = 2 ** (bits - 1)
    if mode == "softmax":
        fine = torch.clamp(torch.round(x / scale_lo), 0, half - 1) * scale_lo
        coarse = torch.clamp(torch.round(x / scale_hi), 0, half - 1) * scale_hi
        return torch.where(x < half * scale_lo, fine, coarse)
    if mode == "signed":
        pos = torch.clamp(torch.round(x / scale_hi), 0, half - 1) * scale_hi
        neg = torch.clamp(torch.round(x / scale_lo), -half, 0) * scale_lo
        return pos + neg
    raise ValueError(f"twin-uniform mode must be 'softmax' or 'signed', got {mode!r}")


class TwinUniformQuantizer(VitQuantizer):
    """PTQ4ViT twin-uniform quantizer (see ``twin_fq``), layer-wise scales."""

    def __init__(self, bits: int, mode: str, *, name: str = "") -> None:
        if bits < 2:
            raise ValueError("twin-uniform quantization needs at least 2 bits (one of them selects the range)")
        if mode not in ("softmax", "signed"):
            raise ValueError(f"twin-uniform mode must be 'softmax' or 'signed', got {mode!r}")
        super().__init__(QuantSpec(TwinUniformFormat(bits, 0, signed=mode == "signed")), bits=bits, name=name)
        self.mode = mode
        self.scale = torch.ones(2)  # (d1 = scale_lo, d2 = scale_hi)

    @property
    def fmt(self) -> TwinUniformFormat:
        """The real format: step d1 (the scale) and d2 = 2^r d1 (the searches keep d2 / d1 a power of two)."""
        ratio = float(self.scale[1]) / float(self.scale[0])
        return TwinUniformFormat(self.bits, int(round(math.log2(ratio))), signed=self.mode == "signed")

    def set_params(self, scale_lo: Tensor | float, scale_hi: Tensor | float) -> None:
        self.scale = torch.tensor([float(scale_lo), float(scale_hi)])
        self.freeze(self.scale, spec=QuantSpec(self.fmt))

    def fake_quant(self, x: Tensor) -> Tensor:
        out = twin_fq(x, self.scale[0], self.scale[1], self.bits, self.mode)
        return x + (out - x).detach()  # straight-through

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, state={self.state}"

