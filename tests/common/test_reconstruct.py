"""Block reconstruction: AdaRound / FlexRound pieces by hand, the hardening invariant, capture, the method test (a
digits MLP at W3 per-channel: both roundings beat round-to-nearest on block error and accuracy), and AdaRound on
minifloat (ExMy) weight grids with FP4DiT's scale-aware variant (V' = step * V, arXiv 2503.15465)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from polyquant.formats import FloatFormat
from polyquant.nn import QuantConv2d, QuantLinear, QuantRule, QuantSpec, calibrate, prepare, quantizers
from polyquant.primitives import PerChannel, PerGroup, dequantize, quantize_tensor
from polyquant.reconstruct import (
    LOSSES,
    AdaRoundWeight,
    FlexRoundWeight,
    ReconContext,
    ReconstructConfig,
    adaround_init,
    adaround_regularizer,
    beta_schedule,
    block_output_mse,
    capture_block_io,
    fisher_grad_weights,
    mse_loss,
    reconstruct,
    rectified_sigmoid,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: one thread (conftest)


def _quant_linear(weight: Tensor, spec: QuantSpec) -> QuantLinear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    q = QuantLinear(lin, weight=spec, name="fc")
    q.calibrate_weight()
    return q


def _on_grid(m: QuantLinear | QuantConv2d) -> None:
    """The float weight is a fixed point of the (unchanged) weight quantizer: export sees the learned rounding."""
    wq = m.weight_quantizer
    assert wq is not None and wq.state == "quantized"
    assert torch.equal(m.quant_weight(), m.weight)
    assert torch.equal(wq(m.weight.detach()), m.weight.detach())


# --- AdaRound pieces by hand ---------------------------------------------------------------------------------


def test_rectified_sigmoid_hand_values() -> None:
    v = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 50.0, -50.0])
    # sigmoid: 0.5, 0.75, 0.25, 1, 0 -> * 1.2 - 0.1 = 0.5, 0.8, 0.2, 1.1 -> 1, -0.1 -> 0
    torch.testing.assert_close(rectified_sigmoid(v), torch.tensor([0.5, 0.8, 0.2, 1.0, 0.0]))


def test_adaround_init_inverts_the_rectified_sigmoid() -> None:
    rest = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.8, 0.999])
    v0 = adaround_init(rest)
    torch.testing.assert_close(rectified_sigmoid(v0), rest, atol=1e-6, rtol=0)
    assert float(v0[3]) == 0.0  # h = 0.5 <=> V = 0, the hardening threshold
    torch.testing.assert_close(v0[0], torch.tensor(-math.log(11.0)))  # -log(1.2 / 0.1 - 1)


def test_regularizer_hand_values() -> None:
    h = torch.tensor([0.0, 1.0, 0.5, 0.25])
    # 1 - |2h - 1|^2: 0, 0, 1, 0.75
    assert float(adaround_regularizer(h, 2.0)) == pytest.approx(1.75)
    assert float(adaround_regularizer(h, 20.0)) == pytest.approx(1.0 + 1.0 - 0.5**20)


def test_beta_schedule_warmup_then_linear() -> None:
    kw = dict(warmup=0.2, beta_range=(20.0, 2.0))
    assert beta_schedule(0, 100, **kw) == (20.0, False)
    assert beta_schedule(19, 100, **kw) == (20.0, False)
    assert beta_schedule(20, 100, **kw) == (20.0, True)
    assert beta_schedule(60, 100, **kw) == (pytest.approx(11.0), True)
    assert beta_schedule(100, 100, **kw) == (pytest.approx(2.0), True)


def test_adaround_soft_init_is_the_float_weight_and_hardening_rule() -> None:
    # scale 0.5 (int4 symmetric, amax 3.5 / 7): W / s = [0.52, 1.3, -0.6, 7, -4.9, 2.5]
    w = torch.tensor([[0.26, 0.65, -0.3, 3.5, -2.45, 1.25]])
    m = _quant_linear(w, QuantSpec("int4", PerChannel(0)))
    assert float(m.weight_quantizer.scale) == pytest.approx(0.5)
    r = AdaRoundWeight(m.weight, m.weight_quantizer)
    torch.testing.assert_close(r(m.weight), w)  # h(V0) = frac(W / s): the soft weight starts at W
    torch.testing.assert_close(r.h(), torch.tensor([[0.52, 0.3, 0.4, 0.0, 0.1, 0.5]]), atol=1e-5, rtol=0)
    # Init hardening rounds to nearest (half up): floor + [frac >= 0.5]
    torch.testing.assert_close(r.hard_weight(), torch.tensor([[0.5, 0.5, -0.5, 3.5, -2.5, 1.5]]))
    # Hardening: V >= 0 rounds up, V < 0 down, clamped to [qmin, qmax] = [-8, 7].
    with torch.no_grad():
        r.v.copy_(torch.tensor([[-0.1, 2.0, -3.0, 5.0, 0.0, -0.01]]))
    # floor(W/s) = [0, 1, -1, 7, -5, 2] + [0, 1, 0, 1, 1, 0] -> [0, 2, -1, 8 -> 7, -4, 2]
    torch.testing.assert_close(r.hard_weight(), torch.tensor([[0.0, 1.0, -0.5, 3.5, -2.0, 1.0]]))
    r.soft = False
    torch.testing.assert_close(r(m.weight), r.hard_weight())


def test_adaround_asymmetric_zero_point() -> None:
    w = torch.tensor([[0.0, 0.3, 0.74, 1.5]])  # uint2-like range on int2 asym: scale 0.5, zero point -2
    m = _quant_linear(w, QuantSpec("int2", PerChannel(0), symmetric=False))
    s, z = float(m.weight_quantizer.scale), float(m.weight_quantizer.zero_point)
    assert (s, z) == (pytest.approx(0.5), -2.0)
    r = AdaRoundWeight(m.weight, m.weight_quantizer)
    with torch.no_grad():
        r.v.copy_(torch.tensor([[1.0, 1.0, -1.0, 1.0]]))
    # floor(W/s) = [0, 0, 1, 3] + [1, 1, 0, 1] + z -> [-1, -1, -1, 2 -> 1] - z -> [1, 1, 1, 3] * 0.5
    torch.testing.assert_close(r.hard_weight(), torch.tensor([[0.5, 0.5, 0.5, 1.5]]))


def test_adaround_rejects_other_formats_and_uncalibrated_quantizers() -> None:
    m = _quant_linear(torch.randn(4, 8), QuantSpec("log2_4"))  # INT and ExMy grids only (FP: test_reconstruct_fp)
    with pytest.raises(ValueError, match="integer or minifloat"):
        AdaRoundWeight(m.weight, m.weight_quantizer)
    raw = QuantLinear(nn.Linear(8, 4), weight=QuantSpec("int4"))
    with pytest.raises(ValueError, match="calibrate"):
        AdaRoundWeight(raw.weight, raw.weight_quantizer)


# --- FlexRound -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int3", PerChannel(0), symmetric=False),
        QuantSpec("int4", PerChannel(0)),
        QuantSpec("int4", PerGroup(4, axis=1), symmetric=False),
        QuantSpec("int8"),
        QuantSpec("e2m1", PerChannel(0)),
    ],
    ids=lambda s: f"{s.fmt.name}-{type(s.granularity).__name__}-{'sym' if s.symmetric else 'asym'}",
)
def test_flexround_at_init_equals_round_to_nearest_exactly(spec: QuantSpec) -> None:
    m = _quant_linear(torch.randn(6, 16), spec)
    r = FlexRoundWeight(m.weight, m.weight_quantizer)
    assert torch.equal(r(m.weight), m.quant_weight())
    assert torch.equal(r.hard_weight(), m.quant_weight())


def test_flexround_conv_has_input_channel_factor_and_equals_rtn_at_init() -> None:
    conv = QuantConv2d(nn.Conv2d(3, 5, 3), weight=QuantSpec("int4", PerChannel(0), symmetric=False))
    conv.calibrate_weight()
    r = FlexRoundWeight(conv.weight, conv.weight_quantizer)
    assert r.log_s3.shape == (5, 1, 1, 1) and r.log_s4 is not None and r.log_s4.shape == (1, 3, 1, 1)
    assert torch.equal(r(conv.weight), conv.quant_weight())
    # Every factor gets a gradient (straight-through rounding).
    r(conv.weight).pow(2).sum().backward()
    for p in (r.log_s1, r.log_s2, r.log_s3, r.log_s4):
        assert p.grad is not None and p.grad.abs().sum() > 0


# --- config and losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rounding="stochastic"), "unknown rounding"),
        (dict(iters=-1), "iters"),
        (dict(iters=2.5), "iters"),
        (dict(lr=0.0), "lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(reg_weight=-1.0), "reg_weight"),
        (dict(beta_range=(20.0,)), "beta_range"),
        (dict(beta_range=(20.0, 0.0)), "beta_range"),
        (dict(warmup=1.0), "warmup"),
        (dict(loss="l1"), "unknown loss"),
        (dict(drop_prob=1.5), "drop_prob"),
        (dict(act_lr=0.0), "act_lr"),
        (dict(max_samples=0), "max_samples"),
        (dict(block_inputs="fp"), "block_inputs"),
        (dict(block_inputs="float", drop_prob=0.5), "QDrop"),
        (dict(version=2), "version"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReconstructConfig(**kwargs)


def test_config_defaults_and_learning_rates() -> None:
    cfg = ReconstructConfig()
    assert (cfg.rounding, cfg.iters, cfg.reg_weight, cfg.beta_range, cfg.warmup, cfg.loss) == (
        "adaround", 2000, 0.01, (20.0, 2.0), 0.2, "mse")
    assert cfg.learning_rate == pytest.approx(1e-2)
    assert ReconstructConfig(iters=20000).learning_rate == pytest.approx(1e-3)
    assert ReconstructConfig("flexround").learning_rate == pytest.approx(1e-3)
    assert ReconstructConfig(lr=5e-4).learning_rate == 5e-4
    with pytest.raises(TypeError, match="loss"):
        ReconstructConfig(loss=3)  # type: ignore[arg-type]
    assert set(LOSSES) >= {"mse", "fisher"}


def test_mse_loss_sums_channels_and_averages_the_rest() -> None:
    a, b = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert float(mse_loss(a, 2 * b, ReconContext("x", 0, 1))) == pytest.approx(3 * 4.0)
    assert float(LOSSES["fisher"](a, b, ReconContext("x", 0, 1, grad_weight=2 * b))) == pytest.approx(3 * 2.0)
    with pytest.raises(ValueError, match="grad_weights"):
        LOSSES["fisher"](a, b, ReconContext("x", 0, 1))


# --- models --------------------------------------------------------------------------------------------------


def _mlp(hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, hidden), nn.ReLU()),
        nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()),
        nn.Linear(hidden, 10),
    )


@pytest.fixture(scope="module")
def digits() -> dict:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        for idx in torch.randperm(1347, generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval().zero_grad(set_to_none=True)
    return dict(model=model, x_test=x[1347:], y_test=y[1347:], calib=list(x[:512].split(64)),
                calib_xy=list(zip(x[:512].split(64), y[:512].split(64))))


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


BLOCKS = ["0", "1", "2"]
W3 = QuantSpec("int3", PerChannel(0))


def _rtn(model: nn.Module, calib: list, weight: QuantSpec = W3, input: QuantSpec | None = None) -> nn.Module:
    return calibrate(prepare(model, [QuantRule("*", weight=weight, input=input)]), calib, progress=False)


# --- the method test -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["adaround", "flexround"])
def test_reconstruction_beats_round_to_nearest_on_digits_w3(digits: dict, rounding: str) -> None:
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib)
    rec = reconstruct(copy.deepcopy(rtn), BLOCKS, calib, ReconstructConfig(rounding, iters=1000), fp_model=fp,
                      progress=False)
    for b in BLOCKS:  # every block's output error (fed the reconstructed model's own inputs) goes down
        mse_rtn = block_output_mse(rtn, fp, b, calib)
        mse_rec = block_output_mse(rec, fp, b, calib)
        assert mse_rec < 0.7 * mse_rtn, (b, mse_rec, mse_rtn)
    x, y = digits["x_test"], digits["y_test"]
    acc_fp, acc_rtn, acc_rec = _accuracy(fp, x, y), _accuracy(rtn, x, y), _accuracy(rec, x, y)
    assert acc_rec >= acc_rtn, (acc_rec, acc_rtn, acc_fp)
    for m in rec.modules():
        if isinstance(m, QuantLinear):
            _on_grid(m)


def test_hardened_weights_are_fixed_points_of_the_weight_quantizer(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    fp_state = {k: v.clone() for k, v in fp.state_dict().items()}
    for rounding, spec in [("adaround", QuantSpec("int2", PerChannel(0), symmetric=False)),
                           ("flexround", QuantSpec("int3", PerGroup(16, axis=1), symmetric=False))]:
        rtn = _rtn(fp, calib, spec)
        rec = reconstruct(copy.deepcopy(rtn), BLOCKS, calib, ReconstructConfig(rounding, iters=50), fp_model=fp,
                          progress=False)
        changed = 0
        for m, m0 in zip(rec.modules(), rtn.modules()):
            if isinstance(m, QuantLinear):
                _on_grid(m)
                assert type(m.weight_quantizer).__name__ == "Quantizer"  # the rounding module is gone
                assert m.weight.requires_grad and m.weight.grad is None
                wq = m.weight_quantizer
                codes = quantize_tensor(m.weight.detach(), wq.fmt, wq.scale, wq.zero_point, wq.block_size(m.weight))
                torch.testing.assert_close(dequantize(codes, wq.scale, wq.zero_point, wq.block_size(m.weight)),
                                           m.weight.detach(), rtol=0, atol=0)
                changed += int((m.quant_weight() != m0.quant_weight()).sum())
        assert changed > 0  # the rounding was learned, not copied
    assert all(torch.equal(v, fp_state[k]) for k, v in fp.state_dict().items())  # the float model is untouched


def test_flexround_with_zero_iterations_keeps_round_to_nearest(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib, QuantSpec("int4", PerChannel(0), symmetric=False))
    rec = reconstruct(copy.deepcopy(rtn), BLOCKS, calib, ReconstructConfig("flexround", iters=0), progress=False)
    for m, m0 in zip(rec.modules(), rtn.modules()):
        if isinstance(m, QuantLinear):
            assert torch.equal(m.quant_weight(), m0.quant_weight())
            assert torch.equal(m.weight_quantizer.scale, m0.weight_quantizer.scale)


def test_layer_wise_block_and_default_fp_copy_match_explicit_float_model(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib)
    cfg = ReconstructConfig(iters=100, seed=3)
    a = reconstruct(copy.deepcopy(rtn), ["0.0", "2"], calib, cfg, fp_model=fp, progress=False)
    state = torch.get_rng_state()
    b = reconstruct(copy.deepcopy(rtn), ["0.0", "2"], calib, cfg, progress=False)  # fp = raw copy of the model
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for ma, mb, m0 in zip(a.modules(), b.modules(), rtn.modules()):
        if isinstance(ma, QuantLinear):
            assert torch.equal(ma.weight, mb.weight)
    assert torch.equal(a[1][0].weight, rtn[1][0].weight)  # block "1" was not in the list
    assert not torch.equal(a[0][0].weight, rtn[0][0].weight)


@pytest.mark.parametrize("seed", [1, 3])
def test_float_block_inputs_make_each_block_independent_of_the_earlier_ones(digits: dict, seed: int) -> None:
    # "float": block "2" learns from the float model's block-2 inputs, and its mini-batches come from its own
    # (seed, block name) stream, so reconstructing "0" first changes nothing for it, bit for bit, on any machine;
    # "quantized" (BRECQ): block "2" sees the reconstructed block "0" and its result changes.
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib)
    results = {}
    for inputs in ("float", "quantized"):
        cfg = ReconstructConfig(iters=60, seed=seed, block_inputs=inputs)
        alone = reconstruct(copy.deepcopy(rtn), ["2"], calib, cfg, fp_model=fp, progress=False)
        after = reconstruct(copy.deepcopy(rtn), ["0", "2"], calib, cfg, fp_model=fp, progress=False)
        results[inputs] = torch.equal(alone[2].weight, after[2].weight)
    assert results == {"float": True, "quantized": False}


# --- activations: BRECQ / QDrop / LSQ, Fisher ----------------------------------------------------------------


def test_qdrop_with_activation_quantization_and_learned_act_scales(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib, W3, input=QuantSpec("int4", symmetric=False))
    act_scales = {q.name: q.scale.clone() for q in quantizers(rtn) if q.name.endswith("input")}
    cfg = ReconstructConfig("adaround", iters=300, drop_prob=0.5, learn_act_scale=True, act_lr=1e-3)
    rec = reconstruct(copy.deepcopy(rtn), BLOCKS, calib, cfg, fp_model=fp, progress=False)
    moved = 0
    for q in quantizers(rec):
        assert q.state == "quantized" and q.scale is not None and not q.scale.requires_grad
        assert bool((q.scale > 0).all())
        if q.name in act_scales:
            moved += int(not torch.equal(q.scale, act_scales[q.name]))
    assert moved > 0
    assert all(not q._forward_hooks for q in quantizers(rec))  # the QDrop hooks are gone
    for b in BLOCKS:
        assert block_output_mse(rec, fp, b, calib) < block_output_mse(rtn, fp, b, calib)


def test_weight_only_reconstruction_restores_activation_quantizer_states(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib, W3, input=QuantSpec("int8"))
    seen: list[str] = []
    for q in quantizers(rtn):
        if q.name.endswith("input"):
            q.register_forward_hook(lambda m, i, o: seen.append(m.state))
    reconstruct(rtn, ["1"], calib, ReconstructConfig(iters=5, act_quant=False), fp_model=fp, progress=False)
    assert seen and set(seen) == {"raw"}
    assert {q.state for q in quantizers(rtn)} == {"quantized"}


def test_fisher_weights_and_fisher_loss(digits: dict) -> None:
    fp, calib_xy = digits["model"], digits["calib_xy"]

    def task_loss(out: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(out, batch[1])

    gw = fisher_grad_weights(fp, "1", calib_xy, task_loss)
    assert [g.shape for g in gw] == [(64, 64)] * 8
    assert float(torch.cat(gw).mean()) == pytest.approx(1.0, rel=1e-5) and bool((torch.cat(gw) >= 0).all())
    assert all(p.grad is None for p in fp.parameters())
    rtn = _rtn(fp, [x for x, _ in calib_xy])
    cfg = ReconstructConfig(iters=300, loss="fisher")
    with pytest.raises(ValueError, match="grad_weights"):
        reconstruct(copy.deepcopy(rtn), ["1"], calib_xy, cfg, fp_model=fp, progress=False)
    rec = reconstruct(copy.deepcopy(rtn), ["1"], calib_xy, cfg, fp_model=fp, progress=False,
                      grad_weights=lambda b: fisher_grad_weights(fp, b, calib_xy, task_loss))
    assert block_output_mse(rec, fp, "1", calib_xy) < block_output_mse(rtn, fp, "1", calib_xy)


def test_callable_loss_receives_context(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    calls: list[tuple[str, int, int]] = []

    def l1(out_q: Tensor, out_fp: Tensor, ctx: ReconContext) -> Tensor:
        calls.append((ctx.block, ctx.iteration, int(ctx.index.numel())))
        return (out_q - out_fp).abs().mean()

    reconstruct(_rtn(fp, calib), ["2"], calib, ReconstructConfig(iters=3, loss=l1, batch_size=16), fp_model=fp,
                progress=False)
    assert calls == [("2", 0, 16), ("2", 1, 16), ("2", 2, 16)]


# --- capture: memory and early stop --------------------------------------------------------------------------


class _Boom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise AssertionError("a module after the block ran during capture")


class _Counted(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x)


def test_capture_stops_after_the_block_and_holds_only_its_tensors() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 8), nn.Identity())
    q = _rtn_random(model)
    model[2] = q[2] = _Boom()
    batches = [torch.randn(5, 8) for _ in range(3)] + [torch.randn(2, 8)]
    data = capture_block_io(q, model, "1", batches)
    assert data.num_samples == 17
    assert len(data.tensors()) == 2  # one concatenated input and one target, nothing of other modules
    assert data.args[0].shape == (17, 8) and data.target[0].shape == (17, 8)
    assert data.batched_args == (True,) and data.target_is_tensor
    assert all(t.device.type == "cpu" and not t.requires_grad for t in data.tensors())
    # Capture runs the models batch by batch and concatenates, so it is bit-equal to the same modules run on the
    # same batches. It is not bit-equal to one forward of all 17 rows: the GEMM's blocking (hence its summation
    # order) depends on the batch size (on an AVX-512 BF16 / AMX Xeon 33 of 136 elements differed by 1 ulp).
    with torch.no_grad():
        assert torch.equal(data.args[0], torch.cat([q[0](b) for b in batches]))
        assert torch.equal(data.target[0], torch.cat([model[1](model[0](b)) for b in batches]))
    with_fp = capture_block_io(q, model, "1", batches, fp_inputs=True)
    assert len(with_fp.tensors()) == 3  # + the float model's block input (QDrop)
    # block_inputs="float": the inputs are the float model's, and the quantized model does not run at all.
    from_fp = capture_block_io(nn.Sequential(_Boom(), q[1]), model, "1", batches, block_inputs="float")
    assert len(from_fp.tensors()) == 2 and from_fp.fp_args is None
    with torch.no_grad():
        assert torch.equal(from_fp.args[0], torch.cat([model[0](b) for b in batches]))
        assert not torch.equal(from_fp.args[0], data.args[0])  # the float inputs, not the quantized model's
        assert torch.equal(from_fp.target[0], data.target[0])


def test_reconstruct_never_runs_modules_after_the_current_block() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), _Counted(nn.Linear(8, 8)),
                          _Counted(nn.Linear(8, 4)))
    q = _rtn_random(model)
    q[1].calls = q[2].calls = 0
    batches = [torch.randn(16, 8) for _ in range(2)]
    reconstruct(q, ["0"], batches, ReconstructConfig(iters=5), fp_model=model, progress=False)
    assert q[1].calls == 0 and q[2].calls == 0 and model[1].calls == 0
    reconstruct(q, ["1"], batches, ReconstructConfig(iters=5), fp_model=model, progress=False)
    assert q[1].calls == 5  # the optimisation steps only: capture stops in the pre-hook, before the block runs
    assert q[2].calls == 0 and model[2].calls == 0


def _rtn_random(model: nn.Module) -> nn.Module:
    return calibrate(prepare(model, [QuantRule("*", weight=QuantSpec("int4", PerChannel(0)))]),
                     [torch.randn(8, 8)], progress=False)


def test_tuple_outputs_and_keyword_inputs() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: Tensor, *, bias: Tensor, scale: float = 1.0) -> tuple[Tensor, None]:
            return self.fc(x) * scale + bias, None

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.block = Block()
            self.register_buffer("b", torch.ones(8))

        def forward(self, x: Tensor) -> Tensor:
            return self.block(self.stem(x), bias=self.b, scale=2.0)[0]

    net = Net()
    q = calibrate(prepare(net, [QuantRule("*", weight=QuantSpec("int3", PerChannel(0)))]),
                  [torch.randn(8, 8)], progress=False)
    batches = [torch.randn(32, 8) for _ in range(2)]
    data = capture_block_io(q, net, "block", batches)
    assert data.batched_kwargs == {"bias": False, "scale": False} and data.kwargs["bias"].shape == (8,)
    assert not data.target_is_tensor and data.target[1] is None
    before = block_output_mse(q, net, "block", batches)
    reconstruct(q, ["block"], batches, ReconstructConfig("flexround", iters=200), fp_model=net, progress=False)
    assert block_output_mse(q, net, "block", batches) < before


def test_conv_net_reconstruction_both_roundings() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
                        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU()))
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    rtn = calibrate(prepare(net, [QuantRule("*", weight=QuantSpec("int3", PerChannel(0), symmetric=False))]),
                    batches, progress=False)
    for rounding in ("adaround", "flexround"):
        rec = reconstruct(copy.deepcopy(rtn), ["0", "1"], batches, ReconstructConfig(rounding, iters=150),
                          fp_model=net, progress=False)
        for m in rec.modules():
            if isinstance(m, QuantConv2d):
                _on_grid(m)
        assert block_output_mse(rec, net, "1", batches) < block_output_mse(rtn, net, "1", batches)


# --- errors --------------------------------------------------------------------------------------------------


def test_reconstruct_errors(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib)
    cfg = ReconstructConfig(iters=1)
    with pytest.raises(ValueError, match="no module named"):
        reconstruct(rtn, ["9"], calib, cfg, progress=False)
    with pytest.raises(ValueError, match="nested"):
        reconstruct(rtn, ["0", "0.0"], calib, cfg, progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        reconstruct(rtn, ["0", "0"], calib, cfg, progress=False)
    with pytest.raises(TypeError, match="list of module names"):
        reconstruct(rtn, "0", calib, cfg, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no QuantLinear"):
        reconstruct(rtn, ["0.1"], calib, cfg, progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        reconstruct(rtn, ["0"], iter(calib), cfg, progress=False)
    with pytest.raises(ValueError, match="calibrate"):
        reconstruct(prepare(fp, [QuantRule("*", weight=W3)]), ["0"], calib, cfg, progress=False)
    with pytest.raises(ValueError, match="empty"):
        reconstruct(rtn, ["0"], [], cfg, progress=False)

    class Skip(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: Tensor) -> Tensor:
            return x

    with pytest.raises(ValueError, match="not called"):
        reconstruct(Skip(rtn), ["m.0"], calib, cfg, progress=False)
    # A failed run leaves the quantizers in place.
    assert all(type(m.weight_quantizer).__name__ == "Quantizer" for m in rtn.modules() if isinstance(m, QuantLinear))


def test_learned_act_scale_that_is_already_a_parameter(digits: dict) -> None:
    fp, calib = digits["model"], digits["calib"]
    rtn = _rtn(fp, calib, W3, input=QuantSpec("int4", symmetric=False))
    q = rtn[1][0].input_quantizer
    s0 = q.scale.clone()
    del q._buffers["scale"]
    q.scale = nn.Parameter(s0.clone(), requires_grad=False)  # a plugin quantizer with a learnable scale
    cfg = ReconstructConfig(iters=50, learn_act_scale=True, act_lr=1e-2)
    reconstruct(rtn, ["1"], calib, cfg, fp_model=fp, progress=False)
    assert isinstance(q.scale, nn.Parameter) and not q.scale.requires_grad and q.scale.grad is None
    assert not torch.equal(q.scale.detach(), s0)


# --- AdaRound on minifloat grids, scale-aware AdaRound (FP4DiT) ---------------------------------------------

E2M1 = FloatFormat(2, 1)  # grid 0, .5, 1, 1.5, 2, 3, 4, 6: step .5 below 2, 1 in [2, 4), 2 in [4, 6]


# absmax 6 -> scale 1: W / s is W. Steps d: .5 .5 2 1 .5 1 .5 .5 (2 for the 6).
W = torch.tensor([[6.0, 0.2, 4.8, 2.4, -0.7, -3.5, 1.3, 0.0]])
STEP = torch.tensor([[2.0, 0.5, 2.0, 1.0, 0.5, 1.0, 0.5, 0.5]])
# x / d = 3, .4, 2.4, 2.4, -1.4, -3.5, 2.6, 0 -> floor 3, 0, 2, 2, -2, -4, 2, 0 and rest:
REST = torch.tensor([[0.0, 0.4, 0.4, 0.4, 0.6, 0.5, 0.6, 0.0]])


@pytest.mark.parametrize("scale_aware", [False, True])
def test_fp_init_hand_values(scale_aware: bool) -> None:
    m = _quant_linear(W, QuantSpec("e2m1", PerGroup(8, axis=1)))
    assert float(m.weight_quantizer.scale) == 1.0
    r = AdaRoundWeight(m.weight, m.weight_quantizer, scale_aware=scale_aware)
    torch.testing.assert_close(r.step, STEP)
    torch.testing.assert_close(r.w_floor, torch.tensor([[3.0, 0, 2, 2, -2, -4, 2, 0]]))
    torch.testing.assert_close(r.h(), REST, atol=1e-6, rtol=0)  # h = rest: the soft weight starts at W
    torch.testing.assert_close(r(m.weight), W, atol=1e-6, rtol=0)
    v0 = adaround_init(REST)
    torch.testing.assert_close(r.v.detach(), v0 * STEP if scale_aware else v0, atol=1e-5, rtol=1e-5)  # V' = s V
    # Init hardening: floor + [rest >= 0.5] (half up), on the grid
    torch.testing.assert_close(r.hard_weight(), torch.tensor([[6.0, 0.0, 4.0, 2.0, -0.5, -3.0, 1.5, 0.0]]))


def test_scale_aware_on_an_int_grid_uses_the_scale() -> None:
    w = torch.tensor([[0.26, 0.65, -0.3, 3.5, -2.45, 1.25]])  # int4, scale 0.5 (as test_reconstruct's hand test)
    m = _quant_linear(w, QuantSpec("int4", PerChannel(0)))
    plain = AdaRoundWeight(m.weight, m.weight_quantizer)
    aware = AdaRoundWeight(m.weight, m.weight_quantizer, scale_aware=True)
    torch.testing.assert_close(aware.v.detach(), 0.5 * plain.v.detach())
    torch.testing.assert_close(aware.h(), plain.h())
    torch.testing.assert_close(aware(m.weight), plain(m.weight))
    torch.testing.assert_close(aware.hard_weight(), plain.hard_weight())


@pytest.mark.parametrize("scale_aware", [False, True])
def test_hard_rounding_picks_the_two_grid_neighbours(scale_aware: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w = (torch.rand(8, 256, generator=gen) * 2 - 1) * 6.0
    w[:, ::128] = 6.0  # every group's absmax is 6: scale 1, the weight is in format units
    m = _quant_linear(w, QuantSpec("e2m1", PerGroup(128, axis=1)))
    r = AdaRoundWeight(m.weight, m.weight_quantizer, scale_aware=scale_aware)
    with torch.no_grad():
        r.v.fill_(-1.0)
        lo = r.hard_weight()
        r.v.fill_(1.0)
        hi = r.hard_weight()
    grid = E2M1.grid()
    i = torch.searchsorted(grid, lo)  # lo is on the grid; hi is the next grid value up (6 saturates)
    assert torch.equal(grid[i], lo)
    assert torch.equal(hi, grid[(i + 1).clamp(max=grid.numel() - 1)])
    assert bool((lo <= w).all() and (w <= hi).all())
    assert bool((hi > lo)[w < 6].all())
    wq = m.weight_quantizer
    for hard in (lo, hi):  # fixed points of the unchanged quantizer: export sees the learned rounding
        assert torch.equal(wq(hard), hard)


def test_gradient_wrt_v_prime_does_not_scale_with_the_step() -> None:
    """Three weights with rest .4 in binades of step .5, 1, 2 (times the group scale .01): dL/dV scales with the
    step, dL/dV' = dL/dV / step does not (FP4DiT's motivation)."""
    w = 0.01 * W
    m = _quant_linear(w, QuantSpec("e2m1", PerGroup(8, axis=1)))
    idx = [1, 3, 2]  # steps .5, 1, 2
    grads = {}
    for aware in (False, True):
        r = AdaRoundWeight(m.weight, m.weight_quantizer, scale_aware=aware)
        r(m.weight).sum().backward()  # dL/dW~ = 1
        grads[aware] = r.v.grad[0, idx]
    plain, aware = grads[False], grads[True]
    torch.testing.assert_close(plain / plain[0], torch.tensor([1.0, 2.0, 4.0]))  # proportional to the step
    torch.testing.assert_close(aware / aware[0], torch.ones(3))  # the same in every binade
    # dW~/dV' = h'(V) (d h / d V at rest .4): .01 * step * h'(V) for V
    torch.testing.assert_close(plain, 0.01 * STEP[0, idx] * aware, rtol=1e-4, atol=0)


def test_config_scale_aware() -> None:
    cfg = ReconstructConfig("adaround", iters=500, scale_aware=True)
    assert cfg.learning_rate == 1e-4  # FP4DiT's Adam lr on V'
    assert ReconstructConfig("adaround", iters=500).learning_rate == pytest.approx(1e-2)  # plain: unchanged
    assert ReconstructConfig("adaround", iters=500, scale_aware=True, lr=3e-4).learning_rate == 3e-4
    with pytest.raises(ValueError, match="AdaRound option"):
        ReconstructConfig("flexround", scale_aware=True)
    with pytest.raises(ValueError, match="bool"):
        ReconstructConfig("adaround", scale_aware=1)  # type: ignore[arg-type]


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def layer_results() -> dict[int, dict[str, float]]:
    """Output MSE of a Linear(256, 64) with E2M1 group-128 weights on Gaussian inputs: round-to-nearest vs
    AdaRound, plain and scale-aware, 500 iterations each (each with its default lr: 1e-2 on V, 1e-4 on V')."""
    out: dict[int, dict[str, float]] = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        fp = nn.Sequential(nn.Linear(256, 64))
        x = torch.randn(512, 256)
        calib = list(x.split(64))
        rtn = calibrate(prepare(fp, [QuantRule("*", weight=QuantSpec("e2m1", PerGroup(128, axis=1)))]), calib,
                        progress=False)

        def mse(model: nn.Module) -> float:
            with torch.no_grad():
                return float((model(x) - fp(x)).pow(2).mean())

        res = {"rtn": mse(rtn)}
        for name, aware in (("plain", False), ("scale_aware", True)):
            cfg = ReconstructConfig("adaround", iters=500, scale_aware=aware, seed=seed)
            rec = reconstruct(copy.deepcopy(rtn), ["0"], calib, cfg, fp_model=fp, progress=False)
            layer = rec[0]
            assert torch.equal(layer.quant_weight(), layer.weight)  # hardened onto the FP grid
            res[name] = mse(rec)
        out[seed] = res
    return out


@pytest.mark.parametrize("variant", ["plain", "scale_aware"])
def test_layer_reconstruction_on_an_e2m1_grid_beats_round_to_nearest(layer_results: dict, variant: str) -> None:
    # Measured (MSE / RTN MSE, seeds 0, 1, 2): plain .824 .830 .822, scale-aware .853 .857 .850. Scale-aware is
    # not better here at the two defaults; at lr 1e-3 on V' it is .813 .817 .814 (plain's best, lr 0.1: .79).
    for seed, res in layer_results.items():
        assert res[variant] < 0.95 * res["rtn"], (seed, res)


def test_nearest_rounding_learns_only_activation_scales() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    rules = [QuantRule(nn.Linear, weight=QuantSpec("int4", PerChannel(0)), input=QuantSpec("int4"))]
    data = [torch.randn(32, 8) for _ in range(2)]
    qmodel = calibrate(prepare(model, rules), data, progress=False)
    w_rtn = [m.quant_weight().detach().clone() for m in qmodel if isinstance(m, QuantLinear)]
    scales = [m.input_quantizer.scale.clone() for m in qmodel if isinstance(m, QuantLinear)]
    before = block_output_mse(qmodel, model, "2", data)
    reconstruct(qmodel, ["0", "2"], data, ReconstructConfig("nearest", iters=60, learn_act_scale=True, act_lr=1e-2),
                fp_model=model, progress=False)
    assert block_output_mse(qmodel, model, "2", data) < before  # the learned scales lower the output error
    layers = [m for m in qmodel if isinstance(m, QuantLinear)]
    for m, w in zip(layers, w_rtn):
        assert torch.equal(m.weight, w) and torch.equal(m.quant_weight(), w)  # round to nearest, hardened as is
    assert any(not torch.equal(m.input_quantizer.scale, s) for m, s in zip(layers, scales))
    with pytest.raises(ValueError, match="learn_act_scale"):
        ReconstructConfig("nearest")
