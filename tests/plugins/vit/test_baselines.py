"""Baseline quantizers of the vit harness against hand-computed values, and the baselines' recipes."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import polyquant as pq  # noqa: E402
from polyquant.config import ConfigError  # noqa: E402
from polyquant.plugins.vit.baselines import (  # noqa: E402
    BASELINES,
    Log2Config,
    LogSqrt2Config,
    MinMaxConfig,
    PercentileConfig,
)
from polyquant.plugins.vit.data import calib_set  # noqa: E402
from polyquant.plugins.vit.harness import vit_quantizers  # noqa: E402
from polyquant.plugins.vit.models import load_digits_vit  # noqa: E402
from polyquant.plugins.vit.quantizers import (  # noqa: E402
    LogQuantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    log_fq,
    twin_fq,
    uniform_codes,
    uniform_fq,
)

S2 = math.sqrt(2.0)


def test_uniform_by_hand() -> None:
    # 3 bits, step 0.25, zero point 4: codes clamp(round(x / 0.25) + 4, 0, 7)
    x = torch.tensor([-1.0, 0.0, 0.26, 0.37, 2.0, -3.0])
    s, z = torch.tensor(0.25), torch.tensor(4.0)
    assert uniform_codes(x, s, z, 3).tolist() == [0.0, 4.0, 5.0, 5.0, 7.0, 0.0]
    assert uniform_fq(x, s, z, 3).tolist() == [-1.0, 0.0, 0.25, 0.25, 0.75, -1.0]


def test_uniform_grad_path_matches_inference_path() -> None:
    x = torch.randn(64) * 3
    s, z = torch.tensor(0.3), torch.tensor(7.0)
    xg = x.clone().requires_grad_(True)
    y = uniform_fq(xg, s, z, 4)
    assert torch.equal(y.detach(), uniform_fq(x, s, z, 4))
    y.sum().backward()
    code = (x / s).round() + z
    inside = (code > 0) & (code < 15)  # torch.clamp passes no gradient at the bounds themselves
    assert torch.equal(xg.grad, inside.float())  # clipped straight-through


def test_uniform_quantizer_codes_decode_round_trip() -> None:
    q = UniformQuantizer(4, (3, 1), weight=True)
    w = torch.randn(3, 8)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = (hi - lo) / 15
    q.set_params(scale, -lo / scale)
    q.set_state("quantized")
    codes = q.codes(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.allclose(q.decode(codes), q(w))
    assert float((q(w) - w).abs().max()) <= float(scale.max()) / 2 + 1e-6


def test_log2_by_hand() -> None:
    # -log2(x) = 1, 1.737 -> 2, 3.32 -> 3, 6.64 -> 7 (>= 2^2 = 4 levels at 2 bits: flushed to 0)
    x = torch.tensor([0.5, 0.3, 0.1, 0.01, 1.0])
    out = log_fq(x, torch.tensor(1.0), 2, 1.0)
    assert torch.allclose(out, torch.tensor([0.5, 0.25, 0.125, 0.0, 1.0]))


def test_log_sqrt2_by_hand_and_inference_form() -> None:
    # base sqrt2: k = round(-2 log2 x): 0.5 -> 2, 0.3 -> 3.47 -> 3, 0.01 -> 13.3 >= 8 levels -> 0
    x = torch.tensor([0.5, 0.3, 0.01, 0.9])
    out = log_fq(x, torch.tensor(1.0), 3, 0.5)
    assert torch.allclose(out, torch.tensor([0.5, 2 ** -1.5, 0.0, 1.0]))
    # the reference code's inference form 2^(-ceil(k/2)) * (1 + (sqrt2 - 1) * (k mod 2)) gives the same levels
    for k in range(8):
        assert math.isclose(2 ** (-k / 2), 2 ** (-math.ceil(k / 2)) * (1 + (S2 - 1) * (k % 2)), rel_tol=1e-12)


def test_log_quantizer_scale_and_shift() -> None:
    q = LogQuantizer(3, 1.0, shift=0.17)
    q.set_params(torch.tensor(2.0))
    q.set_state("quantized")
    # (x + 0.17) / 2: 0.25 -> k = 2; 0.335 -> k = round(1.58) = 2; 0.5 -> k = 1; then 2 * 2^-k - 0.17
    out = q(torch.tensor([0.33, 0.5, 0.83]))
    assert torch.allclose(out, torch.tensor([0.33, 0.33, 0.83]), atol=1e-6)
    assert float(q(torch.tensor([-0.17]))) == pytest.approx(-0.17)  # the GELU minimum maps to exactly -shift


def test_twin_uniform_softmax_by_hand() -> None:
    # 3 bits: 2 bits per range (4 levels); R1 step 0.01 covers [0, 0.04), R2 step 0.25
    x = torch.tensor([0.023, 0.039, 0.6, 0.95, 0.0])
    out = twin_fq(x, torch.tensor(0.01), torch.tensor(0.25), 3, "softmax")
    assert torch.allclose(out, torch.tensor([0.02, 0.03, 0.5, 0.75, 0.0]))


def test_twin_uniform_signed_by_hand() -> None:
    # negatives on step 0.05 (codes -4..0), non-negatives on step 0.5 (codes 0..3)
    x = torch.tensor([-0.12, -0.5, 1.3, 9.0, 0.1])
    out = twin_fq(x, torch.tensor(0.05), torch.tensor(0.5), 3, "signed")
    assert torch.allclose(out, torch.tensor([-0.1, -0.2, 1.5, 1.5, 0.0]))


def test_twin_uniform_quantizer_validation_and_ste() -> None:
    with pytest.raises(ValueError, match="at least 2 bits"):
        TwinUniformQuantizer(1, "softmax")
    with pytest.raises(ValueError, match="mode"):
        TwinUniformQuantizer(4, "gelu")
    q = TwinUniformQuantizer(4, "softmax")
    with pytest.raises(ValueError, match="calibrate"):
        q.set_state("quantized")
    q.set_params(1 / 512, 1 / 8)
    q.set_state("quantized")
    x = torch.rand(10, requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_recipes_follow_the_table(method: str) -> None:
    r = BASELINES[method](wbits=3, abits=5).recipe()
    assert (r.name, r.wbits, r.abits, r.softmax_bits) == (method, 3, 5, 5)
    expected = {"minmax": ("uniform", "uniform", False), "percentile": ("uniform", "uniform", False),
                "log2": ("log2", "adalog", True), "logsqrt2": ("logsqrt2", "adalog", True),
                "twin_uniform": ("twin", "twin", True)}[method]
    assert (r.softmax, r.gelu) == expected[:2]
    assert not r.ln_reparam  # abits != wbits: no LayerNorm reparameterization (reference wrap_net.py)
    assert BASELINES[method](wbits=4, abits=4).recipe().ln_reparam == expected[2]
    assert r.calib == (method if method in ("minmax", "percentile") else "search")


def test_log_baselines_gelu_setting() -> None:
    # one change from AdaLog by default; the reference's other post-GELU settings on request
    assert Log2Config().recipe().gelu == "adalog"
    assert Log2Config(gelu="uniform").recipe().gelu == "uniform"
    assert Log2Config(gelu="log").recipe().gelu == "log2"
    assert LogSqrt2Config(gelu="log").recipe().gelu == "logsqrt2"


def test_adalog_reparameterizes_layernorm_only_at_equal_bits() -> None:
    from polyquant.plugins.vit.adalog import AdaLogConfig

    assert AdaLogConfig(wbits=4, abits=4).recipe().ln_reparam
    assert not AdaLogConfig(wbits=4, abits=8).recipe().ln_reparam
    assert not AdaLogConfig(wbits=4, abits=4, ln_reparam=False).recipe().ln_reparam


def test_bad_baseline_configs() -> None:
    for cls, bad in ((MinMaxConfig, {"wbits": 9}), (MinMaxConfig, {"abits": 1}), (PercentileConfig, {"percentile": 40.0}),
                     (PercentileConfig, {"percentile": 50.0}), (MinMaxConfig, {"search_round": 0})):
        with pytest.raises(ConfigError):
            cls(**bad)
    with pytest.raises(TypeError):
        MinMaxConfig(gelu="log")  # type: ignore[call-arg]  # only the log baselines have the post-GELU setting
    with pytest.raises(TypeError):
        MinMaxConfig(percentile=99.0)  # type: ignore[call-arg]


def test_percentile_clips_activations_tighter_than_minmax() -> None:
    model = load_digits_vit()
    calib = calib_set(16, seed=0)
    cfg = dict(wbits=8, abits=4, calib_size=16)
    scales = {}
    for method in ("minmax", "percentile"):
        q = pq.quantize(model, BASELINES[method](**cfg), calib=[calib]).model
        scales[method] = {qz.name: qz.scale.clone() for qz in vit_quantizers(q)
                          if isinstance(qz, UniformQuantizer) and qz.scale.numel() == 1}
    assert scales["minmax"].keys() == scales["percentile"].keys() and len(scales["minmax"]) > 10
    tighter = [n for n in scales["minmax"] if float(scales["percentile"][n]) < float(scales["minmax"][n]) * 0.999]
    looser = [n for n in scales["minmax"] if float(scales["percentile"][n]) > float(scales["minmax"][n]) * 1.001]
    assert not looser and len(tighter) >= len(scales["minmax"]) // 2


def test_log_gelu_ablation_recipe_and_quantizers() -> None:
    r = LogSqrt2Config(gelu="log").recipe()
    assert (r.softmax, r.gelu) == ("logsqrt2", "logsqrt2")
    model = load_digits_vit()
    cfg = Log2Config(wbits=6, abits=6, calib_size=8, search_round=1, eq_n=64, gelu="log")
    q = pq.quantize(model, cfg, calib=[calib_set(8, seed=0)]).model
    gelu_qs = [blk.mlp.fc2.input_quantizer for blk in q.blocks]
    assert all(isinstance(g, LogQuantizer) and g.base_log2 == 1.0 and g.shift > 0.16 and g.searched
               for g in gelu_qs)
    x = calib_set(16, seed=3)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert float((out - ref).norm() / ref.norm()) < 0.2  # W6A6 with log2 after GELU stays close to float


def test_patch_embedding_input_stays_float_at_8_bits() -> None:
    # the reference's quant_input returns the image unquantized at >= 8 bits (qconv_a_bit = 8)
    from polyquant.plugins.vit.harness import wrap

    model = load_digits_vit()
    qmodel, plan = wrap(model, MinMaxConfig().recipe())
    assert qmodel.patch_embed.proj.input_quantizer is None
    assert next(info for info in plan if info.name == "patch_embed.proj").role == "conv"
    qmodel, _ = wrap(model, MinMaxConfig(conv_abits=6).recipe())
    assert qmodel.patch_embed.proj.input_quantizer.bits == 6
    assert MinMaxConfig(conv_abits=None).recipe().conv_abits is None


def test_quantized_image_is_not_clipped_when_not_centred() -> None:
    # A searched input quantizer must cover a range that is not centred on zero: [-0.96, 1.84] at 7 bits. Zero
    # points centred on 2^(b-1) (64 +- 8) could not reach the needed ~44 and clipped the bright pixels.
    from polyquant.plugins.vit.models import affine_input_model

    model = affine_input_model(load_digits_vit(), 1.4, 0.44)
    calib = calib_set(8, seed=0) * 1.4 + 0.44
    cfg = Log2Config(wbits=6, abits=6, conv_abits=7, calib_size=8, search_round=1, eq_n=64)
    q = pq.quantize(model, cfg, calib=[calib], progress=False).model
    iq = q.patch_embed.proj.input_quantizer
    lo = float(-iq.zero_point.reshape(-1)[0] * iq.scale.reshape(-1)[0])
    hi = float((2**7 - 1 - iq.zero_point.reshape(-1)[0]) * iq.scale.reshape(-1)[0])
    clipped = ((calib < lo - 1e-6) | (calib > hi + 1e-6)).float().mean()
    assert float(clipped) < 0.01, (lo, hi, float(clipped))
