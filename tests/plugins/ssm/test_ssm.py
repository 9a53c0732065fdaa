"""The SSM plugin: Quamba's quantizer placement, the mixer's float math, the Hadamard fold, the percentile update,
the SmoothQuant factors and fold, and bits per byte of the shipped byte-level Mamba (float vs quamba vs naive,
normal and outlier-injected)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import polyquant as pq  # noqa: E402
from polyquant import kernels  # noqa: E402
from polyquant.config import UsageError  # noqa: E402
from polyquant.nn import ActQuantizer, QuantConv1d, QuantLinear, Quantizer, RotatedLinear  # noqa: E402
from polyquant.observers import quantile  # noqa: E402
from polyquant.primitives import PerTensor  # noqa: E402
from polyquant.transforms import hadamard_matrix  # noqa: E402
from polyquant.plugins.ssm.mixer import QuantMambaMixer, replace_mixers  # noqa: E402
from polyquant.plugins.ssm.models import (  # noqa: E402
    SHIPPED, SHIPPED2, bits_per_byte, build_model, byte_batches, inject_outliers, text_bytes)
from polyquant.plugins.ssm.naive import NaiveConfig  # noqa: E402
from polyquant.plugins.ssm.quamba import QuambaConfig  # noqa: E402
from polyquant.plugins.ssm.sizes import quamba_hadamard_size  # noqa: E402
from polyquant.plugins.ssm.quarot import QuaRotConfig  # noqa: E402
from polyquant.plugins.ssm.smoothquant import SmoothQuantConfig, smooth_mixers, smoothing_factors  # noqa: E402

# Every quantizer of one mixer, as the Quamba table lists them (relative name -> observer); nothing else is quantized.
MIXER_QUANTIZERS = {
    "in_proj.input_quantizer": "minmax", "in_proj.weight_quantizer": "minmax", "in_proj.output_quantizer": "minmax",
    "conv1d.weight_quantizer": "minmax",
    "u_quantizer": "abs_percentile",
    "x_proj.weight_quantizer": "minmax", "x_proj.output_quantizer": "minmax",
    "dt_proj.weight_quantizer": "minmax", "dt_proj.output_quantizer": "minmax",
    "A_log_quantizer": "minmax", "D_quantizer": "minmax", "dt_bias_quantizer": "minmax",
    "out_proj.input_quantizer": "minmax", "out_proj.weight_quantizer": "minmax",
}


@pytest.fixture(scope="module")
def shipped() -> nn.Module:
    return build_model({"name": SHIPPED})


@pytest.fixture(scope="module")
def data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    calib = byte_batches(text_bytes("train"), batches=8, batch_size=4, seq_len=128, seed=1)
    held_out = byte_batches(text_bytes("test"), batches=4, batch_size=8, seq_len=128, seed=2)
    return calib, held_out


@pytest.mark.parametrize("config", [QuambaConfig(), NaiveConfig(), SmoothQuantConfig(), QuaRotConfig()],
                         ids=["quamba", "naive", "smoothquant", "quarot"])
def test_every_quantizer_is_placed_exactly(shipped: nn.Module, config) -> None:
    calib = byte_batches(text_bytes("train", limit=50_000), batches=1, batch_size=2, seq_len=32, seed=1)
    model = pq.quantize(shipped, config, calib=calib, progress=False).model
    found = {name: q for name, q in model.named_modules() if isinstance(q, Quantizer)}
    prefix = "lm.backbone.layers.{}.mixer."
    expected = {prefix.format(i) + rel for i in range(2) for rel in MIXER_QUANTIZERS}
    assert set(found) == expected
    for name, q in found.items():
        rel = name.split(".mixer.")[1]
        observer = MIXER_QUANTIZERS[rel] if isinstance(config, QuambaConfig) else "minmax"
        assert (q.spec.fmt.name, type(q.spec.granularity), q.spec.symmetric, q.spec.dynamic) == \
            ("int8", PerTensor, True, False), name
        assert q.spec.observer == observer, name
        assert q.state == "quantized" and q.scale.numel() == 1 and float(q.zero_point) == 0.0, name
    for i in range(2):
        m = model.get_submodule(f"lm.backbone.layers.{i}.mixer")
        assert isinstance(m, QuantMambaMixer) and m.dt_proj.bias is None  # the bias moved into the scan
        assert type(m.x_proj) is QuantLinear and type(m.dt_proj) is QuantLinear and type(m.conv1d) is QuantConv1d
        # quarot rotates both projections' inputs, quamba out_proj's only
        assert type(m.in_proj) is (RotatedLinear if isinstance(config, QuaRotConfig) else QuantLinear)
        rotated_out = isinstance(config, (QuambaConfig, QuaRotConfig))
        assert type(m.out_proj) is (RotatedLinear if rotated_out else QuantLinear)
        assert m.x_proj.input_quantizer is None and m.dt_proj.input_quantizer is None  # int8 from the previous point
        assert all(type(getattr(m, f"{p}_quantizer")) is ActQuantizer for p in ("u", "A_log", "D", "dt_bias"))
    # embedding, norms, lm_head (and the residual stream) stay float
    lm = model.lm
    assert type(lm.backbone.embeddings) is nn.Embedding and type(lm.lm_head) is nn.Linear
    assert not any(isinstance(q, Quantizer) for q in lm.backbone.norm_f.modules())
    assert all(not any(isinstance(q, Quantizer) for q in layer.norm.modules()) for layer in lm.backbone.layers)


def test_quant_mixer_float_path_equals_transformers(shipped: nn.Module) -> None:
    x = byte_batches(text_bytes("test", limit=50_000), batches=1, batch_size=2, seq_len=48, seed=3)[0]
    model = copy.deepcopy(shipped)
    with torch.no_grad():
        ref = model(x)
        replace_mixers(model)
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [128, 12 * 8, 40 * 4])
def test_hadamard_is_orthogonal_and_folds_into_out_proj(n: int) -> None:
    h = hadamard_matrix(n, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    y = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kernels.fwht(y), y @ h.float(), rtol=1e-5, atol=1e-5)  # the online transform
    out_proj = nn.Linear(n, 64, bias=False)
    rotated = RotatedLinear(out_proj, name="out_proj")  # weight W H, input y H: (y H)(W H)^T = y W^T
    torch.testing.assert_close(rotated.weight, out_proj.weight @ h.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rotated(y), out_proj(y), rtol=1e-5, atol=1e-5)


def test_quamba_hadamard_sizes_and_errors() -> None:
    assert [n for n in range(1, 200) if quamba_hadamard_size(n)] == \
        [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192]
    model = build_model({"hidden_size": 10, "num_hidden_layers": 1})  # d_inner 20: no Quamba size
    calib = [torch.zeros(1, 8, dtype=torch.long)]
    with pytest.raises(UsageError, match=r"d_inner of .* is 20, .*2\^k, 12 \* 2\^k or 40 \* 2\^k"):
        pq.quantize(model, QuambaConfig(), calib=calib, progress=False)
    pq.quantize(model, QuambaConfig(hadamard=False), calib=calib, progress=False)  # no rotation: any d_inner
    with pytest.raises(UsageError, match="not a Mamba model"):
        pq.quantize(nn.Sequential(nn.Linear(4, 4)), NaiveConfig(), calib=[torch.zeros(1, 4)], progress=False)


def test_percentile_running_update_on_u(shipped: nn.Module) -> None:
    calib = byte_batches(text_bytes("train", limit=50_000), batches=3, batch_size=2, seq_len=32, seed=5)
    alpha = 0.999
    # the float u of layer 0 per batch (the float model's conv1d + SiLU output)
    mixer = copy.deepcopy(shipped)
    replace_mixers(mixer)
    seen: list[torch.Tensor] = []
    m0 = mixer.lm.backbone.layers[0].mixer
    m0.u_quantizer = _Record(seen)
    with torch.no_grad():
        for batch in calib:
            mixer(batch)
    w = float(quantile(seen[0].abs().reshape(1, -1), alpha, dim=1))  # first batch: w = cur
    for u in seen[1:]:
        w = w + 0.01 * (float(quantile(u.abs().reshape(1, -1), alpha, dim=1)) - w)
    qm = pq.quantize(shipped, QuambaConfig(alpha=alpha), calib=calib, progress=False)
    scale = qm.model.lm.backbone.layers[0].mixer.u_quantizer.scale
    assert float(scale) == pytest.approx(w / 127, rel=1e-5)


class _Record(nn.Module):
    def __init__(self, out: list[torch.Tensor]) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.out.append(x.detach().clone())
        return x


def _bpb(shipped: nn.Module, data, *, outliers: bool) -> dict[str, float]:
    calib, held_out = data
    model = copy.deepcopy(shipped)
    if outliers:
        inject_outliers(model)
    out = {"float": bits_per_byte(model, held_out)}
    configs = [("quamba", QuambaConfig()), ("naive", NaiveConfig())]
    if outliers:
        configs.append(("quamba alpha=0.99", QuambaConfig(alpha=0.99)))
    for name, config in configs:
        out[name] = bits_per_byte(pq.quantize(model, config, calib=calib, progress=False).model, held_out)
    return out


@pytest.mark.parametrize("name", [SHIPPED, SHIPPED2])
def test_quamba_within_one_percent_of_float(name: str, shipped: nn.Module, data) -> None:
    bpb = _bpb(shipped if name == SHIPPED else build_model({"name": name}), data, outliers=False)
    assert bpb["float"] < 3.0, bpb  # the checkpoint is the trained one (a random byte model is ~8 bits per byte)
    assert bpb["quamba"] <= bpb["float"] * 1.01, bpb


def test_outliers_break_naive_not_quamba(shipped: nn.Module, data) -> None:
    # benchmarks/ssm.md, 3 seeds: naive +12.4%, quamba (alpha 0.99999) +5.6%, alpha 0.99 +0.9%
    bpb = _bpb(shipped, data, outliers=True)
    assert bpb["naive"] >= bpb["float"] * 1.05, bpb
    assert bpb["quamba"] < bpb["naive"] - 0.5 * (bpb["naive"] - bpb["float"]), bpb  # at least half the loss back
    assert bpb["quamba alpha=0.99"] <= bpb["float"] * 1.02, bpb


# --- smoothquant ---------------------------------------------------------------------------------------------------


def test_smoothing_factors_hand_values() -> None:
    act_max = torch.tensor([4.0, 1.0, 0.0])
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.0, -3.0]])  # per input channel max |W_j|: 1, 2, 3
    torch.testing.assert_close(smoothing_factors(act_max, weight, 0.5),
                               torch.tensor([2.0, 0.5 ** 0.5, (1e-5 / 3.0) ** 0.5]))
    torch.testing.assert_close(smoothing_factors(act_max, weight, 1.0), torch.tensor([4.0, 1.0, 1e-5]))
    torch.testing.assert_close(smoothing_factors(act_max, weight, 0.0), torch.tensor([1.0, 0.5, 1.0 / 3.0]))


def test_smoothing_fold_preserves_float_outputs(shipped: nn.Module) -> None:
    calib = byte_batches(text_bytes("train", limit=50_000), batches=2, batch_size=2, seq_len=32, seed=4)
    x = byte_batches(text_bytes("test", limit=50_000), batches=1, batch_size=2, seq_len=48, seed=3)[0]
    model = copy.deepcopy(shipped)
    norm0 = model.lm.backbone.layers[0].norm.weight.detach().clone()
    w0 = model.lm.backbone.layers[0].mixer.in_proj.weight.detach().clone()
    factors = smooth_mixers(model, calib, 0.5)
    assert sorted(factors) == [f"lm.backbone.layers.{i}.mixer" for i in range(2)]
    s = factors["lm.backbone.layers.0.mixer"]
    assert not torch.allclose(s, torch.ones_like(s))  # a real migration, not the identity
    torch.testing.assert_close(model.lm.backbone.layers[0].norm.weight, norm0 / s)
    torch.testing.assert_close(model.lm.backbone.layers[0].mixer.in_proj.weight, w0 * s)
    with torch.no_grad():
        torch.testing.assert_close(model(x), shipped(x), rtol=1e-4, atol=1e-4)
    # with alpha 0.5 the smoothed input's and weight's per-channel maxima meet: max|X'_j| = max|W'_j| (calib set)
    seen: list[torch.Tensor] = []
    hook = model.lm.backbone.layers[0].mixer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for batch in calib:
            model(batch)
    hook.remove()
    x_max = torch.cat(seen).abs().reshape(-1, s.numel()).amax(0)
    torch.testing.assert_close(x_max, model.lm.backbone.layers[0].mixer.in_proj.weight.abs().amax(0),
                               rtol=1e-4, atol=1e-6)


def test_smoothquant_is_naive_w8a8_after_the_fold(shipped: nn.Module) -> None:
    calib = byte_batches(text_bytes("train", limit=50_000), batches=2, batch_size=2, seq_len=32, seed=4)
    model = pq.quantize(shipped, SmoothQuantConfig(), calib=calib, progress=False).model
    found = {name.split(".mixer.")[1]: q for name, q in model.named_modules() if isinstance(q, Quantizer)}
    assert set(found) == set(MIXER_QUANTIZERS)
    assert all(q.spec.observer == "minmax" for q in found.values())
    assert type(model.lm.backbone.layers[0].mixer.out_proj) is QuantLinear  # no rotation


@pytest.mark.parametrize("config", [QuambaConfig(), NaiveConfig(), SmoothQuantConfig(), QuaRotConfig()],
                         ids=["quamba", "naive", "smoothquant", "quarot"])
def test_every_method_places_mamba2_quantizers_exactly(config) -> None:
    from polyquant.plugins.ssm.mixer2 import MAMBA2_POINTS, QuantMamba2Mixer

    model = build_model({"name": SHIPPED2})
    calib = byte_batches(text_bytes("train", limit=50_000), batches=1, batch_size=2, seq_len=32, seed=1)
    qmodel = pq.quantize(model, config, calib=calib, progress=False).model
    found = {name: q for name, q in qmodel.named_modules() if isinstance(q, Quantizer)}
    assert set(found) == {f"lm.backbone.layers.{i}.mixer.{rel}" for i in range(2) for rel in MAMBA2_POINTS}
    for name, q in found.items():
        percentile = isinstance(config, QuambaConfig) and name.endswith(".u_quantizer")
        assert q.spec.observer == ("abs_percentile" if percentile else "minmax"), name
        assert (q.spec.fmt.name, type(q.spec.granularity), q.spec.symmetric, q.spec.dynamic) == \
            ("int8", PerTensor, True, False), name
    for i in range(2):
        m = qmodel.get_submodule(f"lm.backbone.layers.{i}.mixer")
        assert isinstance(m, QuantMamba2Mixer) and type(m.conv1d) is QuantConv1d
        assert type(m.in_proj) is (RotatedLinear if isinstance(config, QuaRotConfig) else QuantLinear)
        assert type(m.out_proj) is (RotatedLinear if isinstance(config, (QuambaConfig, QuaRotConfig)) else QuantLinear)
        assert not any(isinstance(q, Quantizer) for q in m.norm.modules())  # the gated norm stays float


def test_smoothing_fold_preserves_mamba2_float_outputs() -> None:
    model = build_model({"name": SHIPPED2})
    calib = byte_batches(text_bytes("train", limit=50_000), batches=2, batch_size=2, seq_len=32, seed=1)
    ids = calib[0]
    with torch.no_grad():
        ref = model(ids)
        smoothed = copy.deepcopy(model)
        factors = smooth_mixers(smoothed, calib, 0.5)
        assert len(factors) == 2 and all(not torch.allclose(s, torch.ones_like(s)) for s in factors.values())
        torch.testing.assert_close(smoothed(ids), ref, rtol=1e-4, atol=1e-4)
