"""Q-HyViT: quantizer maths, scheme / granularity choice, zero-point overflow, BN folding, the Hessian metric,
bridges, timm module coverage, and accuracy on the shipped digits hybrid."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import polyquant as pq  # noqa: E402
from polyquant.nn import QuantConv2d, QuantLinear, QuantMatMul, Quantizer  # noqa: E402
from polyquant.surgery import PRODUCT_PATCHES, fold_batchnorm  # noqa: E402
from polyquant.plugins.vit.data import calib_set, evaluate, load_digits_data  # noqa: E402
from polyquant.plugins.vit.attention import register_timm_attention  # noqa: E402
from polyquant.plugins.vit.hybrid import load_digits_hybrid  # noqa: E402
from polyquant.plugins.vit.qhyvit import (  # noqa: E402
    QHyViTConfig,
    asym_qparams,
    fake_quant,
    hessian_metric,
    kl_output_grads,
    prepare_hybrid,
    quantize_hybrid_baseline,
    run_qhyvit,
    sym_qparams,
)

FAST = dict(grid=4, search_rounds=1)  # structure tests: the search itself is exercised, cheaply


# --- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(wbits=1), "wbits"),
        (dict(abits=9), "abits"),
        (dict(granularity="tensor"), "granularity"),
        (dict(scheme="sym"), "scheme"),
        (dict(metric="kl"), "metric"),
        (dict(calib_mode="seq"), "calib_mode"),
        (dict(zero_point_overflow="wrap"), "zero_point_overflow"),
        (dict(grid=0), "grid"),
        (dict(grid_range=(1.2, 0.01)), "grid_range"),
        (dict(recon_iters=-1), "recon_iters"),
        (dict(granularity="rows"), "granularity"),
        (dict(ignore="head"), "ignore"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QHyViTConfig(**kwargs)
    with pytest.raises(ValueError, match="version"):
        QHyViTConfig.from_dict({**QHyViTConfig().to_dict(), "version": 2})


def test_config_grid_is_the_papers() -> None:
    m = QHyViTConfig().multipliers()
    assert m.numel() == 101
    assert m[0].item() == pytest.approx(0.01) and m[-1].item() == pytest.approx(1.2)
    assert m[1].item() == pytest.approx(0.01 + 1.19 / 100)
    with pytest.raises(ValueError, match="bridge_units"):
        QHyViTConfig(bridge_units="stages.3.0.conv_1x1")  # a tuple of names, not one string


def quantize_qhyvit(model: nn.Module, calib: torch.Tensor | list[torch.Tensor], config: QHyViTConfig
                    ) -> pq.QuantizedModel:
    """Q-HyViT through the core contract (``calib``: images or a list of image batches)."""
    return pq.quantize(model, config, calib=[calib] if isinstance(calib, torch.Tensor) else calib)


# --- quantizer maths -----------------------------------------------------------------------------------------


def test_sym_qparams_hand_computed() -> None:
    s, z = sym_qparams(torch.tensor([-1.0, 0.0]), torch.tensor([0.5, 0.0]), 4)
    assert s[0].item() == pytest.approx(1 / 7.5)  # max|x| / (2^(b-1) - 0.5), PTQ4ViT's init
    assert s[1].item() == pytest.approx(1e-8)  # zero-range block: eps, dequantizes to exactly 0
    assert torch.equal(z, torch.zeros(2))
    x = torch.tensor([-0.9, 0.3, 0.5, 2.0])
    # x / s = -6.75 -> -7, 2.25 -> 2, 3.75 -> 4, 15 -> clamped to 7 on the signed 4-bit grid [-8, 7]
    assert torch.allclose(fake_quant(x, s[0], z[0], 4, True), torch.tensor([-7.0, 2.0, 4.0, 7.0]) / 7.5)


def test_asym_qparams_and_zero_point_overflow() -> None:
    lo = torch.tensor([-1.0, 5.0, 3.0, 0.0])
    hi = torch.tensor([3.0, 5.1, 3.0, 0.0])
    s, z, over = asym_qparams(lo, hi, 8, overflow="clamp")
    # channel 0: s = 4/255, zp = round(1 / s) = round(63.75) = 64, in range
    assert s[0].item() == pytest.approx(4 / 255) and z[0].item() == 64
    # channel 1: nearly constant, far from 0: s = 0.1/255, zp = -5/s = -12750 overflows and clamps to 0
    assert s[1].item() == pytest.approx(0.1 / 255) and z[1].item() == 0
    # channel 2: constant -> scale rounds to 0 (eps): overflow; channel 3: all zeros, no overflow
    assert over.tolist() == [False, True, True, True]
    clamped = fake_quant(torch.tensor(5.05), s[1], z[1], 8, False)
    assert clamped.item() == pytest.approx(0.1, abs=1e-6)  # saturates at 255 * s: an error of ~4.95

    s, z, over = asym_qparams(lo, hi, 8, overflow="widen")
    assert over.tolist() == [False, True, True, True]
    assert s[1].item() == pytest.approx(5.1 / 255) and z[1].item() == 0  # range widened to [0, 5.1]
    assert s[2].item() == pytest.approx(3.0 / 255) and z[2].item() == 0
    assert s[3].item() == pytest.approx(1e-8) and z[3].item() == 0
    assert s[0].item() == pytest.approx(4 / 255) and z[0].item() == 64  # non-overflowing blocks unchanged
    widened = fake_quant(torch.tensor(5.05), s[1], z[1], 8, False)
    assert abs(widened.item() - 5.05) <= s[1].item() / 2 + 1e-6
    assert ((z >= 0) & (z <= 255)).all()
    with pytest.raises(ValueError, match="overflow remedy"):
        asym_qparams(lo, hi, 8, overflow="wrap")


def test_fake_quant_matches_core_primitive() -> None:
    from polyquant.formats import IntFormat
    from polyquant.primitives import fake_quantize

    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    for sym in (True, False):
        s, z = sym_qparams(lo, hi, 4) if sym else asym_qparams(lo, hi, 4)[:2]
        ref = fake_quantize(x, IntFormat(4, signed=sym), s, z, (1, 6))
        assert torch.equal(fake_quant(x, s, z, 4, sym), ref)


def test_hessian_metric_hand_computed() -> None:
    out_q = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    out_fp = torch.zeros(2, 2)
    grad = torch.tensor([[1.0, 0.5], [2.0, 0.0]])
    # sum g^2 (O_q - O)^2 = 1*1 + 0.25*4 + 4*0 + 0*1 = 2
    assert hessian_metric(out_q, out_fp, grad).item() == pytest.approx(2.0)
    assert hessian_metric(out_q, out_fp, grad, keep_dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert hessian_metric(out_q, out_fp, grad, keep_dim=0).tolist() == pytest.approx([2.0, 0.0])
    assert hessian_metric(out_q, out_fp, None).item() == pytest.approx(6.0)  # plain squared error


def test_kl_task_loss_and_its_gradient() -> None:
    z = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    z_fp = torch.tensor([[1.0, 0.5, 0.0]])
    p, p_fp = F.softmax(z, -1), F.softmax(z_fp, -1)
    loss = kl_output_grads(z, z_fp)
    p = p.detach()
    assert loss.item() == pytest.approx(float((p_fp * (p_fp.log() - p.log())).sum()), rel=1e-6)
    loss.backward()
    assert torch.allclose(z.grad, p - p_fp, atol=1e-6)  # dKL/dz = softmax(z) - softmax(z_fp)


# --- the search picks granularity and scheme -----------------------------------------------------------------


def _linear_model(weight: torch.Tensor) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight)
    return nn.Sequential(lin)


def test_outlier_channel_makes_channel_wise_weights_win() -> None:
    torch.manual_seed(0)
    w = torch.tensor([[0.01, -0.02, 0.015, -0.005], [10.0, 0.5, -0.3, 0.2]])
    x = torch.randn(64, 4)
    cfg = dict(wbits=4, abits=8, metric="mse", grid=20, search_rounds=2)
    q, rep = run_qhyvit(_linear_model(w), x, QHyViTConfig(granularity="search", **cfg))
    weight = rep.units[0].operands[0]
    assert weight.role == "weight" and weight.granularity == "channel"
    q_layer, rep_layer = run_qhyvit(_linear_model(w), x, QHyViTConfig(granularity="layer", **cfg))
    assert rep_layer.units[0].operands[0].granularity == "layer"
    ref = x @ w.T
    with torch.no_grad():
        err_channel = (q(x) - ref)[:, 0].abs().max()
        err_layer = (q_layer(x) - ref)[:, 0].abs().max()
    assert err_layer > 10 * err_channel  # per tensor, the small row rounds to zero at 4 bits
    assert rep.units[0].metric_final < rep_layer.units[0].metric_final


def test_positive_activations_pick_the_asymmetric_scheme() -> None:
    torch.manual_seed(0)
    x = torch.rand(512, 8)  # all positive, like a post-ReLU input
    w = torch.randn(4, 8)
    _, rep = run_qhyvit(_linear_model(w), x, QHyViTConfig(wbits=8, abits=4, metric="mse", grid=20, search_rounds=2,
                                                          calib_size=512, batch_size=512))
    act = rep.units[0].operands[1]
    assert act.role == "input" and act.symmetric is False


def test_zero_point_overflow_clamp_vs_widen() -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 3)
    x[:, 0] = 5.0 + 0.01 * torch.rand(300)  # a nearly constant channel far from 0 (a bridge-layer pathology)
    w = torch.randn(2, 3)
    ref = x @ w.T
    errs, overflows = {}, {}
    for remedy in ("clamp", "widen"):
        cfg = QHyViTConfig(wbits=8, abits=8, granularity="channel", scheme="asymmetric", zero_point_overflow=remedy,
                           metric="mse", grid=10, search_rounds=1, calib_size=300, batch_size=300,
                           bridge_units=("0",))
        q, rep = run_qhyvit(_linear_model(w), x, cfg)
        with torch.no_grad():
            errs[remedy] = float((q(x) - ref).abs().max())
        overflows[remedy] = rep.zero_point_overflows()
        assert rep.units[0].bridge
    assert overflows == {"clamp": 1, "widen": 1}  # counted at initialisation, per channel
    assert errs["widen"] < 0.05 < 1.0 < errs["clamp"]
    # The paper's remedy (the default): with the scheme searched, the clamped asymmetric zero point costs so much
    # in the metric that the overflowing input is quantized symmetrically instead.
    cfg = QHyViTConfig(wbits=8, abits=8, granularity="channel", metric="mse", grid=10, search_rounds=1,
                       calib_size=300, batch_size=300, bridge_units=("0",))
    assert cfg.zero_point_overflow == "clamp" and cfg.scheme == "search"
    q, rep = run_qhyvit(_linear_model(w), x, cfg)
    assert {o.role: o.symmetric for o in rep.units[0].operands}["input"] is True
    with torch.no_grad():
        assert float((q(x) - ref).abs().max()) < 0.1


# --- BatchNorm folding ---------------------------------------------------------------------------------------


def test_fold_batchnorm_is_exact_on_the_hybrid() -> None:
    model, _ = load_digits_hybrid()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = load_digits_data().x_test[:64]
    folded = copy.deepcopy(model)
    names = fold_batchnorm(folded, x[:2])
    assert len(names) == n_bn == 14
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert (ref - got).abs().max().item() < 1e-5


def test_fold_batchnorm_toy_and_timm_bn_act() -> None:
    from timm.layers import ConvNormAct

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), ConvNormAct(4, 5, 3, act_layer="silu"))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    folded = copy.deepcopy(net)
    assert fold_batchnorm(folded, x) == ["0", "3.conv"]
    assert isinstance(folded[1], nn.Identity)
    assert isinstance(folded[3].bn, nn.Sequential) and isinstance(folded[3].bn[1], nn.SiLU)  # act kept
    assert torch.allclose(folded(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(copy.deepcopy(net).train(), x)


# --- structure on the digits hybrid --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hybrid() -> nn.Module:
    return load_digits_hybrid()[0]


def test_bridges_grad_sources_and_states(hybrid: nn.Module) -> None:
    calib = calib_set(16, seed=0)
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    q = quantize_qhyvit(hybrid, calib, QHyViTConfig(wbits=6, abits=6, **FAST))
    rep = q.report
    assert rep.bridges == ["stages.3.0.conv_1x1", "stages.3.0.transformer.0.attn.qkv"]
    names = [u.name for u in rep.units]
    cut = names.index("stages.3.0.conv_1x1")
    # Nothing is quantized upstream until the first bridge unit is frozen: KL has no gradient there (Fisher).
    assert {u.grad_source for u in rep.units[: cut + 1]} == {"fisher"}
    assert {u.grad_source for u in rep.units[cut + 1:] if u.grad_source != "mse"} == {"kl"}
    assert len(rep.units) == 24 + 4  # 24 Conv / Linear + 2 products x 2 attention layers
    assert not q.model.training
    assert all(m.state == "quantized" and m.scale is not None for m in q.model.modules() if isinstance(m, Quantizer))
    assert "Q-HyViT W6A6" in rep.summary()
    # the input model is untouched
    assert not any(isinstance(m, Quantizer) for m in hybrid.modules())
    assert all(torch.equal(v, before[k]) for k, v in hybrid.state_dict().items())
    # parallel mode never quantizes upstream, so every gradient is the Fisher one
    _, rep_par = run_qhyvit(hybrid, calib, QHyViTConfig(wbits=6, abits=6, calib_mode="parallel", **FAST))
    assert {u.grad_source for u in rep_par.units} <= {"fisher", "mse"}
    _, rep_mse = run_qhyvit(hybrid, calib, QHyViTConfig(wbits=6, abits=6, metric="mse", **FAST))
    assert {u.grad_source for u in rep_mse.units} == {"mse"}


def test_seeded_and_deterministic(hybrid: nn.Module) -> None:
    calib = calib_set(16, seed=1)
    x = load_digits_data().x_test[:32]
    outs = []
    for _ in range(2):
        q = quantize_qhyvit(hybrid, [calib[:8], calib[8:]], QHyViTConfig(wbits=4, abits=4, **FAST))
        with torch.no_grad():
            outs.append(q(x))
    assert torch.equal(outs[0], outs[1])


def test_rejects_bad_calibration(hybrid: nn.Module) -> None:
    with pytest.raises(ValueError, match="empty"):
        quantize_qhyvit(hybrid, [], QHyViTConfig())
    bad = calib_set(4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_qhyvit(hybrid, bad, QHyViTConfig())
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_qhyvit(hybrid, calib_set(4), {"wbits": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bridge_units"):
        quantize_qhyvit(hybrid, calib_set(4), QHyViTConfig(bridge_units=("nope",), **FAST))


def test_bridge_block_reconstruction_runs(hybrid: nn.Module) -> None:
    calib = calib_set(16, seed=0)
    q = quantize_qhyvit(hybrid, calib, QHyViTConfig(wbits=4, abits=4, recon_iters=5, recon_batch_size=8, **FAST))
    assert q.report.recon_blocks == ["stages.3.0"]  # the MobileViT block holding the bridge
    conv = q.model.get_submodule("stages.3.0.conv_1x1")
    assert torch.equal(conv.quant_weight(), conv.weight)  # hardened AdaRound weights lie on the grid
    with torch.no_grad():
        assert torch.isfinite(q(load_digits_data().x_test[:8])).all()


# --- timm module coverage (random weights) -------------------------------------------------------------------

TIMM_MODELS = [
    ("mobilevit_xxs", {}, 64),
    ("mobilevitv2_050", {}, 64),
    ("efficientformer_l1", {}, 224),  # attention biases are fixed at 7x7 tokens: 224 x 224 input
    ("efficientformerv2_s0", {"img_size": 64}, 64),
]


@pytest.mark.parametrize("name, kwargs, size", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_hybrid_coverage(name: str, kwargs: dict, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    n_linear_conv = sum(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    register_timm_attention()
    n_attn = sum(type(m) in PRODUCT_PATCHES for m in model.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_attn > 0
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    qm = quantize_qhyvit(model, x[:1], QHyViTConfig(wbits=8, abits=8, calib_size=1, grid=2, search_rounds=1))
    q, rep = qm.model, qm.report
    # every Conv2d / Linear is wrapped and both of its quantizers are frozen
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())
    wrapped = [m for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(wrapped) == n_linear_conv
    assert all(m.weight_quantizer.state == m.input_quantizer.state == "quantized" for m in wrapped)
    # every attention module computes its two products through quantized QuantMatMul / QuantMul modules
    products = [m for m in q.modules() if isinstance(m, QuantMatMul)]
    assert len(products) == 2 * n_attn
    assert not any(type(m) in PRODUCT_PATCHES for m in q.modules())  # all patched
    called: list[str] = []
    for m in products:
        assert m.a_quantizer.state == m.b_quantizer.state == "quantized"
        m.register_forward_hook(lambda mod, a, o: called.append(mod.a_quantizer.name))

    def no_fused(*a, **k):  # the fused kernel would bypass the quantized products
        raise AssertionError("scaled_dot_product_attention called in a quantized model")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_fused)
    with torch.no_grad():
        out = q(x)
    assert len(called) == len(products)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 0.5  # W8A8 stays close to the float model
    assert len(rep.units) == n_linear_conv + 2 * n_attn
    assert len(rep.bridges) >= 2
    if name.startswith("mobilevit"):
        assert len(rep.folded_bn) == n_bn  # every BN follows a conv
        assert len(rep.bridges) == 6  # one (conv_1x1, first qkv) pair per MobileViT block
    else:
        assert len(rep.folded_bn) >= n_bn - 1  # EfficientFormerV2's final BN follows a residual sum


# --- accuracy on the shipped digits hybrid -------------------------------------------------------------------

ACC_CONFIG = dict(grid=20, search_rounds=3)  # the paper's grid is 100 steps; 20 keeps the test fast


@pytest.fixture(scope="module")
def results(hybrid: nn.Module) -> dict:
    """Accuracy and KL to the float model on the test split, seed-0 calibration set of 32 images."""
    data = load_digits_data()
    calib = calib_set(32, seed=0)
    with torch.no_grad():
        z_fp = hybrid(data.x_test)

    def measure(model: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            z = model(data.x_test)
        kl = float(F.kl_div(F.log_softmax(z, -1), F.softmax(z_fp, -1), reduction="batchmean"))
        return evaluate(model, data), kl

    out: dict = {"float": evaluate(hybrid, data)}
    for bits in (4, 6, 8):
        for obs in ("minmax", "percentile"):
            out[bits, obs] = measure(quantize_hybrid_baseline(hybrid, calib, wbits=bits, abits=bits, observer=obs))
        out[bits, "qhyvit"] = measure(quantize_qhyvit(hybrid, calib, QHyViTConfig(wbits=bits, abits=bits,
                                                                                   **ACC_CONFIG)).model)
    return out


def test_w4a4_beats_minmax_and_percentile(results: dict) -> None:
    best_acc = max(results[4, "minmax"][0], results[4, "percentile"][0])
    best_kl = min(results[4, "minmax"][1], results[4, "percentile"][1])
    assert results[4, "qhyvit"][0] > best_acc  # seed 0 on this machine: 97.6 vs 96.3 (percentile), 88.0 (minmax)
    assert results[4, "qhyvit"][0] > results["float"] - 4.0
    assert results[4, "qhyvit"][1] < 0.6 * best_kl  # ~0.04 vs ~0.10


def test_w6a6_beats_minmax_and_percentile(results: dict) -> None:
    # 6 bits is within two test images of float for every method (one image = 0.19 points), so the KL to the
    # float model's predictions is what separates them robustly (about 3x lower for Q-HyViT).
    assert results[6, "qhyvit"][0] >= max(results[6, "minmax"][0], results[6, "percentile"][0]) - 0.2
    assert results[6, "qhyvit"][1] < 0.6 * min(results[6, "minmax"][1], results[6, "percentile"][1])


def test_w8a8_within_half_a_point_of_float(results: dict) -> None:
    assert abs(results[8, "qhyvit"][0] - results["float"]) <= 0.5


def test_mobilevitv2_hybrid_w4a4() -> None:
    # On this model the released granularity rule (the default, integer-GEMM-valid) does not beat percentile at
    # W4A4 (seed 0: 91.3 vs 92.8, see benchmarks/vit.md); the searched rule, which lets Linear / dense-conv inputs
    # take per-channel scales (fake-quant only), does, by a wide margin.
    model, info = load_digits_hybrid("mobilevitv2")
    calib = calib_set(32, seed=0)
    base = max(evaluate(quantize_hybrid_baseline(model, calib, wbits=4, abits=4, observer=o))
               for o in ("minmax", "percentile"))
    q = quantize_qhyvit(model, calib, QHyViTConfig(wbits=4, abits=4, granularity="search", **ACC_CONFIG))
    assert any(isinstance(m, nn.GroupNorm) for m in q.model.modules())  # GroupNorm(1) stays float
    assert evaluate(q.model) > base + 1.0
