"""The vit plugin's fused fast paths against the core functions they stand for (random inputs, exact)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from polyquant.formats import IntFormat, LogFormat, TwinUniformFormat  # noqa: E402
from polyquant.nn import Quantizer, QuantSpec  # noqa: E402
from polyquant.plugins.vit.adalog import (  # noqa: E402
    R,
    AdaLogQuantizer,
    adalog_fq,
    adalog_fq_from_log2,
    adalog_levels,
)
from polyquant.plugins.vit.qhyvit import fake_quant as qhyvit_fake_quant  # noqa: E402
from polyquant.plugins.vit.quantizers import (  # noqa: E402
    TwinUniformQuantizer,
    UniformQuantizer,
    log_fq,
    twin_fq,
    uniform_fq,
)
from polyquant.primitives import PerChannel, PerTensor, block_size_for, fake_quantize  # noqa: E402


def _core_uniform(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    return fake_quantize(x, IntFormat(bits, signed=False), s, z, block_size_for(PerChannel(0), x.shape))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_fq_fused_and_ste_paths_match_the_core(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(64, 257) * 3
    s = torch.rand(64, 1) * 0.5 + 0.01
    z = torch.randint(0, 2**bits, (64, 1)).float()
    core = _core_uniform(x, s, z, bits)
    fused = uniform_fq(x, s, z, bits)  # in-place inference path
    ste = uniform_fq(x.clone().requires_grad_(True), s, z, bits).detach()  # differentiable path
    assert torch.equal(fused, ste)
    # The plugin rounds x / s and adds the integer zero point; the core rounds x / s + z. They agree except where
    # adding z in float32 moved x / s across a rounding tie (a one-step difference, rare).
    moved = torch.round(x / s) + z != torch.round(x / s + z)
    assert torch.equal(fused[~moved], core[~moved])
    assert int(moved.sum()) <= x.numel() // 1000


def test_uniform_quantizer_declares_its_format() -> None:
    q = UniformQuantizer(4, (3, 1), weight=True)
    assert q.fmt == IntFormat(4, signed=False) and q.spec.granularity == PerChannel(0) and not q.spec.symmetric
    assert UniformQuantizer(4, (1,)).spec.granularity == PerTensor()


@pytest.mark.parametrize("bits, base_log2", [(3, 1.0), (4, 1.0), (4, 0.5), (6, 0.5)])
@pytest.mark.parametrize("shift", [0.0, 0.17])
def test_log_fq_matches_the_core_log_format(bits: int, base_log2: float, shift: float) -> None:
    torch.manual_seed(bits)
    s = torch.tensor(1.7)
    x = torch.rand(5000) * 2.5 - shift + 1e-6  # (x + shift) / s in (1e-6, 1.5]: every code, some saturation
    x[:100] = torch.rand(100) * 1e-4  # tiny values: flushed to 0
    core = LogFormat(bits, base_log2=base_log2).round((x + shift) / s) * s - shift
    assert torch.equal(log_fq(x, s, bits, base_log2, shift=shift), core)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("lut", [True, False])
def test_adalog_fq_matches_the_core_log_format(bits: int, lut: bool) -> None:
    torch.manual_seed(bits)
    x = torch.rand(4000) * 1.2 + 1e-9  # includes values above the scale (saturate to code 0)
    for q in (10, 37, 58, 101, 138):
        fmt = LogFormat(bits, base_ratio=(q, R), lut=lut)
        assert torch.equal(adalog_fq(x, torch.ones(1), float(q), bits, lut=lut), fmt.round(x))
        levels = adalog_levels(float(q), bits, lut=lut)[:-1]  # the trailing entry is the flushed 0
        assert torch.equal(levels, fmt.magnitude(torch.arange(2**bits)))


def test_adalog_batched_candidates_match_one_at_a_time() -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(6, 40) * 2)
    shift = 0.17
    log2_x = torch.log2((x + shift).clamp_min(1e-38))
    scales = torch.rand(9) * 3 + 0.5
    qs = torch.randint(10, 139, (9,)).float()
    batched = adalog_fq_from_log2(log2_x[None], scales.reshape(-1, 1, 1), qs.reshape(-1, 1, 1), 4, shift=shift)
    for i in range(9):
        one = adalog_fq(x, scales[i].reshape(1), float(qs[i]), 4, shift=shift)
        assert torch.equal(batched[i], one)
        # the differentiable (straight-through) path gives the same values
        ste = adalog_fq(x.clone().requires_grad_(True), scales[i].reshape(1), float(qs[i]), 4, shift=shift)
        assert torch.equal(ste.detach(), one)


def test_adalog_quantizer_declares_its_real_format() -> None:
    q = AdaLogQuantizer(4)
    q.set_params(0.5, 58)
    assert q.fmt == LogFormat(4, base_ratio=(58, R), lut=True) and q.spec.fmt == q.fmt
    assert q.fmt.name == "log58r37lut_4" and q.searched and q.state == "raw"
    q.lut = False
    assert q.fmt == LogFormat(4, base_ratio=(58, R))


@pytest.mark.parametrize("symmetric", [True, False])
def test_qhyvit_fake_quant_matches_the_core(symmetric: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 5, 6, 6) * 2
    scale = torch.rand(1, 5, 1, 1) * 0.1 + 0.01
    zp = torch.zeros_like(scale) if symmetric else torch.randint(0, 16, scale.shape).float()
    core = fake_quantize(x, IntFormat(4, signed=symmetric), scale, zp, block_size_for(PerChannel(1), x.shape))
    assert torch.equal(qhyvit_fake_quant(x, scale, zp, 4, symmetric), core)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_twin_fq_is_two_core_uniform_ranges(bits: int) -> None:
    torch.manual_seed(bits)
    half = 2 ** (bits - 1)
    sub = IntFormat(bits - 1, signed=False)  # each range: k - 1 bits
    one = (3000,)  # per tensor: one block
    p = torch.rand(3000) ** 4  # softmax-like values in [0, 1]
    d1, d2 = torch.tensor(1 / 2**9), torch.tensor(1 / half)
    core = torch.where(p < half * d1, fake_quantize(p, sub, d1, None, one), fake_quantize(p, sub, d2, None, one))
    assert torch.equal(twin_fq(p, d1, d2, bits, "softmax"), core)
    g = torch.nn.functional.gelu(torch.randn(3000) * 3)
    d_neg, d_pos = torch.tensor(0.17 / half), torch.tensor(0.05)
    pos = fake_quantize(g.clamp_min(0), sub, d_pos, None, one)
    neg = fake_quantize(g.clamp_max(0), IntFormat(bits, signed=True), d_neg, None, one)
    assert torch.equal(twin_fq(g, d_neg, d_pos, bits, "signed"), pos + neg)


def test_core_quantizer_freeze_matches_the_spec() -> None:
    # what Q-HyViT's search freezes is what the core quantizer's forward computes
    q = Quantizer(QuantSpec("int8"))
    q.freeze(torch.full((1, 5, 1, 1), 0.05), torch.zeros(1, 5, 1, 1),
             spec=QuantSpec(IntFormat(4, signed=False), PerChannel(1), symmetric=False))
    assert q.state == "raw" and q.fmt == IntFormat(4, signed=False)
    q.set_state("quantized")
    x = torch.rand(2, 5, 3, 3)
    assert torch.equal(q(x), qhyvit_fake_quant(x, q.scale, q.zero_point, 4, False))


@pytest.mark.parametrize("mode, d1, d2", [("softmax", 1 / 512, 1 / 8), ("signed", 0.17 / 8, 0.17 / 8 * 2**3),
                                          ("signed", 0.17 / 8, 0.17 / 8 / 4)])
def test_twin_uniform_quantizer_declares_its_real_format(mode: str, d1: float, d2: float) -> None:
    q = TwinUniformQuantizer(4, mode)
    q.set_params(d1, d2)
    fmt = q.fmt
    assert isinstance(fmt, TwinUniformFormat) and q.spec.fmt == fmt and fmt.signed == (mode == "signed")
    assert 2.0**fmt.ratio_log2 == pytest.approx(d2 / d1)
    torch.manual_seed(0)
    x = torch.rand(2000) if mode == "softmax" else torch.nn.functional.gelu(torch.randn(2000) * 3)
    s = q.scale[0]
    assert torch.equal(twin_fq(x, q.scale[0], q.scale[1], 4, mode), fmt.round(x / s) * s)
    assert set((fmt.round(x / s)).tolist()) <= set(fmt.grid().tolist())


@pytest.mark.parametrize("operand", ["a", "b"])
@pytest.mark.parametrize("groups", ["head", "tensor"])
def test_matmul_gram_loss_equals_the_direct_product_loss(operand: str, groups: str) -> None:
    from polyquant.plugins.vit.harness import _matmul_eval

    torch.manual_seed(0)
    B, H, N, D = 2, 3, 20, 8  # D < N: the Gram form applies
    if operand == "a":
        t, other = torch.randn(B, H, N, D), torch.randn(B, H, D, N)
        y = t @ other + 0.1 * torch.randn(B, H, N, N)
    else:
        t, other = torch.randn(B, H, D, N), torch.randn(B, H, N, D)
        y = other @ t + 0.1 * torch.randn(B, H, N, N)
    cand = t[None] + 0.05 * torch.randn(4, *t.shape)
    out = cand @ other[None] if operand == "a" else other[None] @ cand
    err = (out - y[None]).pow(2)
    direct = (err.transpose(1, 2).reshape(4, H, -1).mean(-1) if groups == "head"
              else err.reshape(4, -1).mean(1, keepdim=True))
    gram = _matmul_eval(other, y, operand, groups, t)(cand)
    torch.testing.assert_close(gram, direct, rtol=1e-5, atol=0)
    torch.testing.assert_close(_matmul_eval(other, y, operand, groups)(cand), direct, rtol=1e-6, atol=0)


def test_linear_activation_gram_loss_equals_the_layer_output_loss() -> None:
    import torch.nn.functional as F

    from polyquant.plugins.vit.adalog import AdaLogConfig
    from polyquant.plugins.vit.harness import _LinearProblem, capture, wrap
    from polyquant.plugins.vit.models import build_model

    torch.manual_seed(0)
    model, _ = build_model("digits-vit")
    images = torch.randn(4, 1, 32, 32)
    qmodel, plan = wrap(model, AdaLogConfig(wbits=4, abits=4).recipe(), images[:2])
    info = next(i for i in plan if i.name.endswith("qkv"))
    x, y = capture(qmodel, [info], images, 4)[info.name]
    layer = qmodel.get_submodule(info.name)
    wq = layer.quant_weight().detach()
    assert wq.shape[1] < wq.shape[0]  # qkv: D < out, the Gram form
    s = torch.tensor([0.02, 0.05, 0.1])
    z = torch.tensor([8.0, 7.0, 9.0])

    def fq(t: torch.Tensor, sl: slice) -> torch.Tensor:
        return uniform_fq(t[None], s[sl].reshape(-1, 1, 1, 1), z[sl].reshape(-1, 1, 1, 1), 4)

    gram = _LinearProblem(layer, x, y).act_eval(fq, 3)
    direct = torch.stack([(F.linear(fq(x, slice(i, i + 1))[0], wq, layer.bias) - y).pow(2).mean() for i in range(3)])
    torch.testing.assert_close(gram[:, 0], direct, rtol=1e-5, atol=0)
