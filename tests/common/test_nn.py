"""Fake-quant modules, prepare() surgery and calibrate()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyquant.nn import (
    ActQuantizer,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantLinear,
    QuantMatMul,
    QuantMatMulKT,
    QuantRule,
    QuantSpec,
    Quantizer,
    calibrate,
    cast_floats,
    half_dtype,
    prepare,
    quantizers,
    set_state,
    to_device,
)
from polyquant.primitives import PerChannel, PerGroup, PerToken, block_size_for, choose_qparams, fake_quantize


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv1d(4, 4, 1)
        self.c3 = nn.Conv3d(1, 2, 1)
        self.fc1 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, 4, 4, 4)
        y = self.c1(y.flatten(2)).flatten(1)  # (B, 64)
        z = self.c3(x[:, :1, None])  # (B, 2, 1, 4, 4)
        y = y[:, :16] + z.flatten(1)[:, :16]
        return self.head(torch.relu(self.fc1(y)))


def _batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(4, 3, 4, 4) for _ in range(n)]


W4 = QuantSpec("int4", PerChannel(0), symmetric=False)
A8 = QuantSpec("int8")


def test_prepare_replaces_every_supported_module() -> None:
    q = prepare(Net(), [QuantRule("*", weight=W4, input=A8)])
    assert isinstance(q.conv, QuantConv2d) and isinstance(q.c1, QuantConv1d) and isinstance(q.c3, QuantConv3d)
    assert isinstance(q.fc1, QuantLinear) and isinstance(q.head, QuantLinear)
    assert len(quantizers(q)) == 10


def test_prepare_patterns_types_regex_and_ignore() -> None:
    model = Net()
    q = prepare(model, [QuantRule("*", weight=W4)], ignore=["fc1", "c?"])
    assert isinstance(q.fc1, nn.Linear) and isinstance(q.c1, nn.Conv1d) and isinstance(q.head, QuantLinear)
    assert isinstance(q.conv, QuantConv2d)
    q = prepare(model, [QuantRule("re:(fc1|head)", weight=W4)])
    assert isinstance(q.fc1, QuantLinear) and isinstance(q.head, QuantLinear) and isinstance(q.conv, nn.Conv2d)
    q = prepare(model, [QuantRule(nn.Conv2d, weight=W4)], ignore=[nn.Linear])
    assert isinstance(q.conv, QuantConv2d) and isinstance(q.fc1, nn.Linear)
    # first matching rule wins
    q = prepare(model, [QuantRule("head", weight=QuantSpec("int8")), QuantRule("*", weight=W4)])
    assert q.head.weight_quantizer.fmt.name == "int8" and q.fc1.weight_quantizer.fmt.name == "int4"
    assert isinstance(model.fc1, nn.Linear)  # not in place by default


def test_prepare_errors() -> None:
    with pytest.raises(ValueError, match="no module matched"):
        prepare(Net(), [QuantRule("nothing*", weight=W4)])
    with pytest.raises(ValueError, match="at least one"):
        prepare(Net(), [])


def test_raw_state_is_identity_and_quantized_matches_reference() -> None:
    model = Net().eval()
    q = prepare(model, [QuantRule("*", weight=W4, input=A8)])
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(q(x), model(x))  # raw
    calibrate(q, _batches(), progress=False)
    # Reference for fc1's weight: per-channel asymmetric uint-range int4 fake quant from the weight itself.
    w = model.fc1.weight.detach()
    bs = block_size_for(PerChannel(0), w.shape)
    s, z = choose_qparams(w, "int4", bs, symmetric=False)
    assert torch.allclose(q.fc1.quant_weight(), fake_quantize(w, "int4", s, z, bs))
    assert not torch.equal(q(x), model(x))
    set_state(q, "raw")
    assert torch.equal(q(x), model(x))


def test_calibration_uses_float_inputs_everywhere() -> None:
    # Parallel calibration: the head's input statistics must equal those of the float model.
    model = Net().eval()
    q = prepare(model, [QuantRule("*", weight=W4, input=A8)])
    batches = _batches()
    calibrate(q, batches, progress=False)
    seen = []
    h = model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    for b in batches:
        model(b)
    h.remove()
    assert q.head.input_quantizer.scale.item() == pytest.approx(max(seen).item() / 127, rel=1e-6)


def test_w8a8_close_to_float_and_w2_far() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    data = [torch.randn(64, 32) for _ in range(4)]
    x = torch.randn(256, 32)
    ref = model(x)
    errs = {}
    for bits in (8, 2):
        q = prepare(model, [QuantRule("*", weight=QuantSpec(f"int{bits}", PerChannel(0)), input=QuantSpec(f"int{bits}"))])
        calibrate(q, data, progress=False)
        errs[bits] = ((q(x) - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert errs[8] < 1e-3 < errs[2]


def test_dynamic_per_token_and_per_group_weight() -> None:
    lin = nn.Linear(16, 4)
    q = prepare(nn.Sequential(lin), [QuantRule("*", weight=QuantSpec("int4", PerGroup(8)),
                                               input=QuantSpec("int8", PerToken(), dynamic=True))])
    calibrate(q, [torch.randn(2, 5, 16)], progress=False)
    x = torch.randn(3, 7, 16)
    out = q(x)
    xs, _ = choose_qparams(x, "int8", (1, 1, 16))
    xq = fake_quantize(x, "int8", xs, None, (1, 1, 16))
    assert torch.allclose(out, nn.functional.linear(xq, q[0].quant_weight(), lin.bias), atol=1e-6)
    assert q[0].weight_quantizer.scale.shape == (4, 2)


def test_quant_matmul_and_act_quantizer() -> None:
    mm = QuantMatMul(a=QuantSpec("int8"), b=QuantSpec("int8"))
    act = ActQuantizer(QuantSpec("uint4", symmetric=True), name="softmax")
    a, b = torch.randn(2, 4, 8), torch.randn(2, 8, 3)
    for m in (mm.a_quantizer, mm.b_quantizer, act):
        m.set_state("calibrating")
    mm(a, b)
    p = torch.softmax(a, -1)
    act(p)
    for m in (mm.a_quantizer, mm.b_quantizer, act):
        m.set_state("quantized")
    assert torch.allclose(mm(a, b), a @ b, atol=0.1)
    assert act(p).unique().numel() <= 16


def test_quant_matmul_kt_quantizes_b_by_its_own_rows() -> None:
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(QuantMatMulKT()(q, k), q @ k.transpose(-1, -2))
    token = QuantSpec("int8", PerToken(), dynamic=True)
    mm = QuantMatMulKT(b=token)
    mm.b_quantizer.set_state("quantized")  # dynamic: qparams from every input, no calibration
    k[..., 2, :] *= 100.0  # one token of k far larger: a per-token scale keeps the other tokens exact-ish
    want = q @ mm.b_quantizer(k).transpose(-1, -2)
    torch.testing.assert_close(mm(q, k), want)
    err = (mm(q, k) - q @ k.transpose(-1, -2)).abs()
    assert float(err[..., [0, 1, 3, 4, 5]].max()) < 0.05 * float(err[..., 2].max())


def test_calibrate_errors() -> None:
    q = prepare(Net(), [QuantRule("*", weight=W4, input=A8)])
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate(q, [], progress=False)
    bad = torch.randn(4, 3, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in conv.input"):
        calibrate(q, [bad], progress=False)
    with pytest.raises(ValueError, match="no quantizers"):
        calibrate(Net(), _batches(), progress=False)


def test_unused_module_is_reported() -> None:
    class Partial(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    q = prepare(Partial(), [QuantRule("*", weight=W4, input=A8)])
    with pytest.raises(ValueError, match="saw no data"):
        calibrate(q, _batches(), progress=False)


def test_quantspec_validation() -> None:
    with pytest.raises(ValueError, match="integer format"):
        QuantSpec("e4m3", symmetric=False)
    with pytest.raises(ValueError, match="unknown observer"):
        QuantSpec("int8", observer="no_such_observer")
    with pytest.raises(ValueError, match="unknown format"):
        QuantSpec("int17")


def test_gradients_flow_through_fake_quant() -> None:
    q = prepare(nn.Sequential(nn.Linear(4, 4)), [QuantRule("*", weight=W4, input=A8)])
    calibrate(q, [torch.randn(8, 4)], progress=False)
    q(torch.randn(8, 4)).sum().backward()
    assert q[0].weight.grad is not None and q[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_quantizer_promotes_integer_inputs(dynamic: bool) -> None:
    # Issue 10, case 10: an integer tensor gave zeros (the scale was cast to int); it is quantized as float32.
    from polyquant.nn import Quantizer

    spec = QuantSpec("int8", PerToken(), dynamic=True) if dynamic else QuantSpec("int8")
    q = Quantizer(spec)
    x = torch.arange(-20, 20).reshape(4, 10)
    q.calibrate_from(x)
    out = q(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, q(x.float()))
    assert out.abs().sum() > 0


@pytest.mark.parametrize(
    "input_spec",
    [
        QuantSpec("int8"),
        QuantSpec("int8", PerChannel(-1), symmetric=False),
        QuantSpec("int8", PerToken(), dynamic=True),
    ],
    ids=["per-tensor", "per-channel", "per-token-dynamic"],
)
def test_calibrated_model_accepts_an_empty_batch(input_spec: QuantSpec) -> None:
    # Issue 10, case 11: the float model maps a (0, K) batch to (0, N); the calibrated one raised
    # ZeroDivisionError (static) or ValueError (dynamic).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    rules = [QuantRule("*", weight=QuantSpec("int4", PerChannel(0)), input=input_spec, output=QuantSpec("int8"))]
    qmodel = calibrate(prepare(model, rules), [torch.randn(6, 8)], progress=False)
    empty = torch.empty(0, 8)
    with torch.no_grad():
        out = qmodel(empty)
        assert out.shape == model(empty).shape == (0, 4)
        assert qmodel(torch.randn(3, 8)).shape == (3, 4)  # still quantizes real batches


def test_freeze_refuses_scales_that_give_nan() -> None:
    # Issue 21, class 5: a zero or NaN scale was accepted and every output became NaN.
    q = Quantizer(QuantSpec("int8"), name="fc.input_quantizer")
    for bad in (torch.zeros(1), torch.tensor([float("nan")]), torch.tensor([-1.0]), torch.tensor([float("inf")])):
        with pytest.raises(ValueError, match=r"scale of fc\.input_quantizer must be positive and finite"):
            q.freeze(bad)
    with pytest.raises(ValueError, match="zero point of fc.input_quantizer must be finite"):
        q.freeze(torch.ones(1), torch.tensor([float("nan")]))
    q.freeze(torch.full((1,), 0.5))
    q.set_state("quantized")
    assert torch.equal(q(torch.tensor([1.0, -0.7])), torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_cast_around_float32_quantizers(dtype: torch.dtype) -> None:
    # Issue 21, class 6: half-precision models are quantized in float32 and cast back; the quantizers keep
    # float32 parameters and return their input's dtype.
    model = prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                    [QuantRule("*", weight=QuantSpec("int8"), input=QuantSpec("int8"))])
    assert half_dtype(model) is None and half_dtype(model.to(dtype)) is dtype
    model.float()
    calibrate(model, [torch.randn(4, 8)], progress=False)
    cast_floats(model, dtype)
    assert half_dtype(model) is dtype
    assert all(q.scale.dtype == torch.float32 for q in model.modules() if isinstance(q, Quantizer))
    assert model(torch.randn(3, 8, dtype=dtype)).dtype == dtype
    batch = {"x": torch.ones(2, dtype=dtype), "ids": torch.arange(2), "pair": (torch.ones(1, dtype=torch.float64),)}
    moved = to_device(batch, None, dtype=torch.float32)
    assert moved["x"].dtype == torch.float32 and moved["ids"].dtype == torch.int64
    assert moved["pair"][0].dtype == torch.float32


def test_to_device_copy_gives_fresh_tensors_in_nested_batches() -> None:
    from collections import namedtuple

    from polyquant.nn import to_device

    Pair = namedtuple("Pair", "a b")
    x = torch.arange(4.0)
    batch = {"x": x, "pair": Pair(x, 1), "none": None}
    same = to_device(batch, "cpu")
    assert same["x"] is x  # already there: no copy
    out = to_device(batch, "cpu", copy=True)
    x.add_(10)  # the caller changes its tensor in place afterwards
    assert out["x"].tolist() == [0.0, 1.0, 2.0, 3.0] and out["pair"].a.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert isinstance(out["pair"], Pair) and out["pair"].b == 1 and out["none"] is None


def test_quantize_weights_needs_no_data() -> None:
    from polyquant.nn import QuantLinear, QuantRule, QuantSpec, quantize_weights
    from polyquant.primitives import PerChannel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    q = quantize_weights(model, [QuantRule(nn.Linear, weight=QuantSpec("int8", PerChannel(0)))])
    assert isinstance(q[0], QuantLinear) and isinstance(model[0], nn.Linear)  # a copy by default
    w = model[0].weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127  # symmetric absmax per output channel
    assert torch.allclose(q[0].quant_weight(), torch.round(w / scale) * scale, atol=1e-7)
    assert q[0].input_quantizer is None
    with pytest.raises(ValueError, match="weights only"):
        quantize_weights(model, [QuantRule(nn.Linear, weight=QuantSpec("int8"), input=QuantSpec("int8"))])
