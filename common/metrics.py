"""Signal and image fidelity metrics shared by the plugins (float64 accumulation, plain floats out).

- ``sqnr``: signal-to-quantization-noise ratio in dB of an approximation (weights, latents, attributes, audio).
- ``psnr``: peak signal-to-noise ratio in dB for a given data range (images in [0, 1]: 1; in [-1, 1]: 2).
- ``ssim``: structural similarity (Wang et al. 2004) with the usual 11-tap Gaussian window (sigma 1.5) and
  K1 = 0.01, K2 = 0.03, as scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``
  and the 3DGS training code compute it; ``ssim_map`` keeps its gradients (a D-SSIM loss).
- ``MacCounter``: multiply-accumulates of the convolutions and linear layers a model runs (float, fake-quant and
  packed alike), counted from the weight and output shapes, for theoretical speedups of caching or pruning
  (counted, not timed).
"""

from __future__ import annotations

import math

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sqnr", "psnr", "ssim", "ssim_map", "MacCounter", "layer_macs"]


def _same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def sqnr(x_hat: Tensor, x: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - x_hat)^2) (inf when exact)."""
    _same_shape(x_hat, x)
    noise = float(((x.double() - x_hat.double()) ** 2).sum())
    signal = float((x.double() ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``b`` against ``a`` over all elements: 10 log10(range^2 / MSE).
    Identical tensors give inf."""
    _same_shape(a, b)
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def _window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(a: Tensor, b: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> Tensor:
    """The SSIM map of images (C, H, W) or (B, C, H, W) over the valid window positions (differentiable)."""
    _same_shape(a, b)
    if a.dim() == 3:
        a, b = a[None], b[None]
    if a.dim() != 4:
        raise ValueError(f"ssim takes (C, H, W) or (B, C, H, W) images, got shape {tuple(a.shape)}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"images of {a.shape[-2]} x {a.shape[-1]} px are smaller than the {window}-px window")
    w = _window(window, sigma, a.shape[1], a)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of ``b`` against ``a`` (images (C, H, W) or (B, C, H, W)), computed in float64."""
    return float(ssim_map(a.double(), b.double(), data_range).mean())



def layer_macs(module: nn.Module, x: Tensor, y: Tensor) -> int | None:
    """Multiply-accumulates of one call ``y = module(x)`` of a linear layer (``in_features``: each output element
    costs in_features) or a convolution (``in_channels``, ``out_channels``, ``kernel_size``, ``groups``: each output
    element costs in / groups * prod(kernel); a transposed one, each input element out / groups * prod(kernel)),
    float, fake-quant and packed alike (they keep these attributes); None for any other module."""
    in_features = getattr(module, "in_features", None)
    if isinstance(in_features, int) and isinstance(getattr(module, "out_features", None), int):
        return y.numel() * in_features
    attrs = [getattr(module, a, None) for a in ("in_channels", "out_channels", "kernel_size", "groups")]
    if not all(a is not None for a in attrs) or not hasattr(module, "stride"):
        return None
    c_in, c_out, kernel, groups = attrs
    taps = math.prod(kernel) if isinstance(kernel, (tuple, list)) else int(kernel)
    if getattr(module, "transposed", False):
        return x.numel() * (c_out // groups) * taps
    return y.numel() * (c_in // groups) * taps


class MacCounter:
    """Counts the multiply-accumulates of the linear layers and convolutions of ``model`` while entered:
    ``with MacCounter(model) as c: model(x)``; ``c.total`` the sum, ``c.calls`` how many layer calls. For
    theoretical speedups (counted, not timed); attention products, norms and elementwise ops are not counted
    (state it beside a result)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.total = 0
        self.calls = 0
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            macs = layer_macs(module, args[0], output)
            if macs is not None:
                self.total += macs
                self.calls += 1

    def __enter__(self) -> "MacCounter":
        self.total, self.calls = 0, 0
        for module in self.model.modules():
            self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *_: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
