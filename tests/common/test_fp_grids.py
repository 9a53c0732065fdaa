"""FP4DiT's weight grids (arXiv 2503.15465) are the core's FloatFormat with a per-group absmax scale.

FP4DiT (``qdiff/quantizers/fp8_quantizer.py::quantize_to_fp8_ste_MM``, from Kuzmin et al.'s FP8 code) gives each
group of 128 weights maxval alpha = its absmax and a real-valued exponent bias
b = 2^E - log2(alpha) + log2(2 - 2^-M) - 1, so that the top code equals alpha. With the standard integer bias
B = 2^(E-1) - 1 and c = alpha / max_value, b = B - log2(c), and the element step 2^(floor(log2|x| + b) - M - b)
(exponent clamped at 1: subnormals) is c * 2^(floor(log2|x / c|) - M) clamped at the smallest normal binade:
exactly ``FloatFormat(E, M)._step`` of x / c, times c. So PerGroup(128) + FloatFormat(E, M) + the minmax observer
reproduces it (``_fp4dit_reference`` below, checked on random weights).

Two differences, neither reachable by ordinary weights: FP4DiT clamps alpha at >= 1e-4 (a group whose absmax is
below 1e-4 gets a coarser grid than its range; the core's scale floor is 1e-8 / max_value), and elements at a
binade boundary (|x| = c 2^k up to float error) may take either neighbouring step, which rounds them to the
same value except at exact ties.

Note on the spec's text: it writes l = max(floor(log2|xc|) + b, 1), but the code floors the sum,
``torch.floor(torch.log2(torch.abs(xc)) + bias)``. Flooring only log2|xc| puts the binade boundaries at absolute
powers of two; where alpha / max_value is not a power of two (E2M1, E2M3, E3M4 at alpha = 1) that is another
grid: E2M1 {0, 1/12, 1/6, 1/4, 3/8, 1/2, 3/4, 1}, the grid the spec lists, which is not {0, .5, ..., 6} / 6.
``test_the_spec_texts_floor_gives_another_grid`` pins that difference.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from polyquant.formats import FloatFormat
from polyquant.nn import QuantSpec, Quantizer
from polyquant.primitives import PerGroup

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: one thread (conftest)

GROUP = 128
FORMATS = {"e2m1": (2, 1), "e3m0": (3, 0), "e1m2": (1, 2), "e2m3": (2, 3), "e3m4": (3, 4)}


def _fp4dit_reference(x: Tensor, exp_bits: int, man_bits: int, alpha: Tensor, *, floor_of_sum: bool = True
                      ) -> tuple[Tensor, Tensor]:
    """FP4DiT's ``quantize_to_fp8_ste_MM`` (forward only, float64): (x_hat, step s). ``floor_of_sum=False`` is the
    spec's text, l = max(floor(log2|xc|) + b, 1)."""
    x, alpha = x.double(), alpha.double().clamp_min(1e-4)
    b = 2**exp_bits - torch.log2(alpha) + math.log2(2 - 2.0**-man_bits) - 1
    xc = torch.minimum(torch.maximum(x, -alpha), alpha)
    lg = torch.log2(xc.abs())
    level = torch.floor(lg + b) if floor_of_sum else torch.floor(lg) + b
    s = 2.0 ** (level.clamp_min(1.0) - man_bits - b)
    return torch.round(xc / s) * s, s


def _core(w: Tensor, fmt: str) -> Tensor:
    """The core's fake quantization of ``w`` with FloatFormat ``fmt``, one absmax scale per group of 128."""
    q = Quantizer(QuantSpec(fmt, PerGroup(GROUP, axis=1)))
    q.calibrate_from(w)
    return q(w)


def _dense_alpha_one(n: int = 4) -> Tensor:
    """(n, 256): every group of 128 holds +-1 (so alpha = 1) and a dense sweep of [-1, 1]."""
    w = torch.linspace(-1.0, 1.0, n * 2 * GROUP).reshape(n * 2, GROUP)
    w[:, 0] = 1.0
    return w.reshape(n, 2 * GROUP)


@pytest.mark.parametrize(
    "fmt, positive",
    [
        ("e2m1", [v / 6 for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)]),  # standard FP4, top code 6 -> alpha
        ("e3m0", [0.0] + [2.0**-k for k in range(6, -1, -1)]),  # powers of two, dense near 0
        ("e1m2", [k / 7 for k in range(8)]),  # uniform steps of 1/7, as symmetric INT4
    ],
)
def test_core_grids_at_alpha_one_are_fp4dits(fmt: str, positive: list[float]) -> None:
    w = _dense_alpha_one()
    got = torch.unique(_core(w, fmt))
    want = torch.tensor(sorted({-v for v in positive} | set(positive)))
    torch.testing.assert_close(got, want, rtol=2e-7, atol=0)  # k/6, k/7: k * fl(1/6) vs fl(k/6), an ulp apart


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_core_equals_fp4dits_formula_on_random_weights(fmt: str) -> None:
    exp_bits, man_bits = FORMATS[fmt]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 2 * GROUP, generator=gen) * torch.rand(64, 1, generator=gen)  # groups of other ranges
    alpha = w.reshape(-1, GROUP).abs().amax(1, keepdim=True)
    ref, s = _fp4dit_reference(w.reshape(-1, GROUP), exp_bits, man_bits, alpha)
    ref, s = ref.reshape(w.shape), s.reshape(w.shape)
    got = _core(w, fmt).double()
    a = alpha.double().repeat_interleave(GROUP, 1).reshape(w.shape)
    x_s = torch.minimum(torch.maximum(w.double(), -a), a) / s
    frac = x_s - torch.floor(x_s)
    tie = (frac - 0.5).abs() < 1e-6
    assert int(tie.sum()) < w.numel() // 100
    torch.testing.assert_close(got[~tie], ref[~tie], rtol=1e-6, atol=1e-12)
    top = w.abs().reshape(-1, GROUP).argmax(1)  # the absmax element is the top code, alpha itself
    torch.testing.assert_close(got.reshape(-1, GROUP).gather(1, top[:, None]).abs(), alpha.double(), rtol=1e-6, atol=0)


def test_levels_per_format() -> None:
    # 2 * 2^(E+M) codes, +0 and -0 the same value (no specials): 15, 15, 15, 63, 255 values.
    for fmt, (e, m) in FORMATS.items():
        assert FloatFormat(e, m).grid().numel() == 2 ** (1 + e + m) - 1, fmt


def test_the_spec_texts_floor_gives_another_grid() -> None:
    x = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64)
    alpha = torch.ones(())
    as_coded = torch.unique(_fp4dit_reference(x, 2, 1, alpha)[0])
    as_written = torch.unique(_fp4dit_reference(x, 2, 1, alpha, floor_of_sum=False)[0])
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64) / 6
    torch.testing.assert_close(as_coded[as_coded >= 0], fp4)
    spec_list = torch.tensor([0, 1 / 12, 1 / 6, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1], dtype=torch.float64)
    torch.testing.assert_close(as_written[as_written >= 0], spec_list)
    for e, m in ((3, 0), (1, 2)):  # alpha / max_value a power of two: both readings agree
        a = torch.unique(_fp4dit_reference(x, e, m, alpha)[0])
        b = torch.unique(_fp4dit_reference(x, e, m, alpha, floor_of_sum=False)[0])
        torch.testing.assert_close(a, b)
