"""polyquant.metrics: hand-computed SQNR, PSNR, SSIM and MAC counts."""

from __future__ import annotations

import math

import pytest
import torch

from polyquant.metrics import MacCounter, psnr, sqnr, ssim, ssim_map


def test_sqnr_and_psnr_by_hand() -> None:
    x = torch.tensor([3.0, 4.0])
    assert sqnr(x + torch.tensor([0.3, -0.4]), x) == pytest.approx(10 * math.log10(25 / 0.25))
    assert sqnr(x, x) == math.inf
    a = torch.zeros(4)
    b = torch.tensor([0.1, -0.1, 0.1, -0.1])
    assert psnr(a, b) == pytest.approx(20.0)  # MSE 0.01, range 1
    assert psnr(a, b, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:3])


def test_ssim_by_hand() -> None:
    # constant images: zero variances, so SSIM is the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = torch.full((3, 16, 16), 0.2), torch.full((3, 16, 16), 0.6)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 20, 20, generator=g)
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    assert 0.0 < ssim(img, noisy) < ssim(img, (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)) < 1.0
    assert ssim_map(img, noisy).shape == (2, 3, 10, 10)  # valid positions of the 11-px window
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_mac_counter_by_hand() -> None:
    from torch import nn

    from polyquant.nn import QuantRule, QuantSpec, calibrate, prepare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, stride=2),
                          nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 7, 7)
    conv1 = 2 * 8 * 7 * 7 * (3 * 9)         # each output element: in * k * k
    conv2 = 2 * 8 * 3 * 3 * (4 * 9)         # groups 2: in / groups = 4
    convt = 2 * 8 * 3 * 3 * (4 * 4)         # transposed: each input element, out * k * k
    linear = 2 * 5 * 144
    with MacCounter(model) as c:
        model(x)
    assert (c.total, c.calls) == (conv1 + conv2 + convt + linear, 4)
    model(x)  # hooks removed on exit
    assert c.total == conv1 + conv2 + convt + linear
    # fake-quant layers count the same (their own quantizers are not layers)
    q = prepare(model, [QuantRule((nn.Conv2d, nn.Linear), weight=QuantSpec("int8"), input=QuantSpec("int8"))])
    calibrate(q, [x], progress=False)
    with MacCounter(q) as cq:
        q(x)
    assert cq.total == c.total
