"""AdaLog against its baselines on the shipped digits ViT (the issue's acceptance claims, seed-0 calibration).

Every method runs with its default settings (AdaLog's three FPCS rounds, 32 calibration images). Accuracy is top-1
on the 540 held-out digits; where accuracy saturates (one image is 0.19 points) the KL divergence between the
float and the quantized model's class distributions separates the methods. ``benchmarks/vit.py`` reports the
same comparison over five calibration seeds.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import polyquant as pq  # noqa: E402
from polyquant.plugins.vit.data import calib_set, evaluate, load_digits_data  # noqa: E402
from polyquant.plugins.vit.methods import METHODS  # noqa: E402
from polyquant.plugins.vit.models import load_digits_vit  # noqa: E402

BASELINES = ("log2", "logsqrt2", "minmax")
# The quantizer ablation of these claims changes both activation quantizers: log2 / log-sqrt2 after softmax with a
# uniform one after GELU. The one-change default of the log baselines (AdaLog's post-GELU quantizer) is reported
# by benchmarks/vit_ablations.py: on this small model it is within noise of AdaLog.
EXTRA = {"log2": {"gelu": "uniform"}, "logsqrt2": {"gelu": "uniform"}}


@pytest.fixture(scope="module")
def measure():
    model = load_digits_vit()
    data = load_digits_data()
    calib = calib_set(32, seed=0)
    with torch.no_grad():
        fp_logp = torch.log_softmax(model(data.x_test), -1)
    cache: dict = {"float": (evaluate(model, data), 0.0)}

    def run(method: str, bits: int) -> tuple[float, float]:
        if (method, bits) not in cache:
            config = METHODS[method](wbits=bits, abits=bits, calib_size=32, **EXTRA.get(method, {}))
            q = pq.quantize(model, config, calib=[calib], progress=False).model
            with torch.no_grad():
                logp = torch.log_softmax(q(data.x_test), -1)
            kl = float((fp_logp.exp() * (fp_logp - logp)).sum(-1).mean())
            cache[method, bits] = (evaluate(q, data), kl)
        return cache[method, bits]

    return run, cache


def test_adalog_beats_log2_logsqrt2_and_uniform_at_w3a3(measure) -> None:
    """KL to the float model: AdaLog below log2, far below log-sqrt2 and uniform; accuracy: far above log-sqrt2
    and uniform. AdaLog's accuracy lead over log2 at W3A3 is within noise, so only a bound is asserted.

    Measured on this 2-core Xeon (AVX-512, torch 2.14.1), default settings (3 search rounds), top-1 % / KL for
    calibration seeds 0 (the one this test runs), 1 and 2:
      adalog    96.48 / 0.0370   95.93 / 0.0556   97.22 / 0.0403
      log2      97.41 / 0.0388   96.11 / 0.0569   96.30 / 0.0486   AdaLog's KL / this: 0.95, 0.98, 0.83
      logsqrt2  78.52 / 0.4320   (seed 0 only)                     0.09
      minmax    85.19 / 0.3662   84.63 / 0.3597   88.15 / 0.2775   0.10, 0.15, 0.15
    An AVX-512 BF16 / AMX Xeon gave the same seed-0 AdaLog and log2 numbers. AdaLog's KL is below log2's on all
    three seeds, but log2 has the better accuracy on two of them; on a held-out ViT AdaLog leads log2 by 0.14
    points over 3 seeds, log2 winning 2 of 3.
    """
    run, _ = measure
    acc, kl = run("adalog", 3)
    log2_acc, log2_kl = run("log2", 3)
    assert kl < log2_kl  # a thin lead: 2 to 17% on seeds 0..2 (with one search round 0.3% above on seed 0)
    assert acc > log2_acc - 1.5  # within noise of log2 (8 images): -0.93, -0.19, +0.93 on seeds 0..2
    for method, points in (("logsqrt2", 10.0), ("minmax", 5.0)):
        b_acc, b_kl = run(method, 3)
        assert kl < 0.25 * b_kl, method  # measured <= 0.15x
        assert acc > b_acc + points, method  # measured +17.96 (log-sqrt2), +9.07 to +11.30 (uniform)


def test_adalog_beats_log2_logsqrt2_and_uniform_at_w4a4(measure) -> None:
    run, cache = measure
    acc, kl = run("adalog", 4)
    assert acc >= cache["float"][0] - 1.0
    for method in BASELINES:
        assert acc >= run(method, 4)[0], method
    # KL: clearly below log2 and uniform. log-sqrt2 is AdaLog's closest rival at 4 bits: over five calibration
    # seeds (benchmarks/vit.md) AdaLog's KL is 0.0076 +- 0.0007 against 0.0083 +- 0.0015, so one seed only
    # shows that they are comparable.
    assert kl < 0.8 * run("log2", 4)[1] and kl < 0.5 * run("minmax", 4)[1]
    assert kl < 1.25 * run("logsqrt2", 4)[1]


def test_adalog_w8a8_within_half_a_point_of_float(measure) -> None:
    run, cache = measure
    acc, kl = run("adalog", 8)
    assert abs(acc - cache["float"][0]) <= 0.5
    assert kl < 0.01


def test_adalog_on_inputs_not_centred_on_zero() -> None:
    """Issue 11: a ViT whose inputs are standardized but not centred ([-0.96, 1.84], the digits ViT with the affine
    map absorbed by its patch embedding). AdaLog leaves the image in float as the reference does (conv_abits = 8)
    and searches activation zero points around the observed range: within 1 point of float at W4A4 and better
    than min-max on KL. Before, the 8-bit image quantizer's zero points clipped ~12% of the pixels."""
    from polyquant.plugins.vit.models import affine_input_model

    scale, offset = 1.4, 0.44
    model = affine_input_model(load_digits_vit(), scale, offset)
    data = load_digits_data()
    x_test = data.x_test * scale + offset
    calib = calib_set(32, seed=0) * scale + offset
    with torch.no_grad():
        fp_logits = model(x_test)
    fp_logp = torch.log_softmax(fp_logits, -1)
    fp_acc = float((fp_logits.argmax(-1) == data.y_test).float().mean() * 100)

    def acc_kl(config) -> tuple[float, float]:
        q = pq.quantize(model, config, calib=[calib], progress=False).model
        with torch.no_grad():
            logits = q(x_test)
        kl = float((fp_logp.exp() * (fp_logp - torch.log_softmax(logits, -1))).sum(-1).mean())
        return float((logits.argmax(-1) == data.y_test).float().mean() * 100), kl

    acc, kl = acc_kl(METHODS["adalog"](wbits=4, abits=4, calib_size=32, search_round=1))
    mm_acc, mm_kl = acc_kl(METHODS["minmax"](wbits=4, abits=4, calib_size=32))
    assert acc >= fp_acc - 1.0  # seed 0: 98.33 vs float 97.96
    # seed 0: 0.0091 vs 0.0439 (0.21x); before the change 0.0185 vs 0.0396 (0.47x): the clipped image
    assert kl < 0.35 * mm_kl
