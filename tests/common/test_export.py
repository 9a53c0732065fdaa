"""export() / restore(): packed quantized artifacts that reproduce the fake-quant model exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from polyquant.artifact import Artifact, ArtifactError, load, save
from polyquant.export import export, restore
from polyquant.nn import QuantLinear, QuantRule, QuantSpec, calibrate, prepare
from polyquant.primitives import PerChannel, PerGroup


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                         nn.Linear(16, 4)).eval()


@pytest.mark.parametrize(
    "weight",
    [
        QuantSpec("int4", PerChannel(0), symmetric=False),
        QuantSpec("int8", PerChannel(0)),
        QuantSpec("int3", PerChannel(0)),
        QuantSpec("e2m1", PerChannel(0)),
        QuantSpec("e4m3", PerChannel(0)),
    ],
    ids=lambda s: s.fmt.name,
)
def test_roundtrip_is_exact(tmp_path: Path, weight: QuantSpec) -> None:
    rules = [QuantRule("*", weight=weight, input=QuantSpec("int8"))]
    model = _model()
    q = prepare(model, rules)
    calib = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    calibrate(q, calib, progress=False)
    path = tmp_path / "m.safetensors"
    save(export(q, plugin="core", method="test"), path)
    restored = restore(prepare(_model(), rules), load(path))
    x = torch.randn(5, 3, 6, 6)
    assert torch.equal(restored(x), q(x))


def test_packed_weights_are_smaller(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 256))
    rules = [QuantRule("*", weight=QuantSpec("int4", PerGroup(64)))]
    q = prepare(model, rules)
    calibrate(q, [torch.randn(2, 256)], progress=False)
    art = export(q)
    assert art.tensors["0.weight_packed"].numel() == 256 * 256 // 2
    assert "float.0.weight" not in art.tensors and "float.0.bias" in art.tensors
    path = tmp_path / "a.safetensors"
    save(art, path)
    assert path.stat().st_size < 256 * 256 * 4 / 4  # well under a quarter of the fp32 weight


def test_export_requires_calibration() -> None:
    q = prepare(nn.Sequential(nn.Linear(4, 4)), [QuantRule("*", weight=QuantSpec("int4", PerChannel(0)))])
    with pytest.raises(ValueError, match="calibrate"):
        export(q)


def test_restore_into_mismatched_model_fails() -> None:
    rules = [QuantRule("*", weight=QuantSpec("int4", PerChannel(0)))]
    q = prepare(nn.Sequential(nn.Linear(4, 4)), rules)
    calibrate(q, [torch.randn(2, 4)], progress=False)
    art = export(q)
    with pytest.raises(ArtifactError, match="shape"):
        restore(prepare(nn.Sequential(nn.Linear(4, 8)), rules), art)
    # the manifest records every quantizer's spec, and restore applies it: a skeleton prepared for int8 weights
    # gets the artifact's int4 (a method's searched formats and granularities need no state of their own)
    other = [QuantRule("*", weight=QuantSpec("int8", PerChannel(0)))]
    restored = restore(prepare(nn.Sequential(nn.Linear(4, 4)), other), art)
    assert restored[0].weight_quantizer.fmt.name == "int4"
    x = torch.randn(3, 4)
    assert torch.equal(restored(x), q(x))
    legacy = Artifact(art.tensors, meta={"quantizers": {"0.weight_quantizer": {"format": "int4", "bits": 4}}})
    with pytest.raises(ArtifactError, match="format"):  # an artifact without a manifest description: checked
        restore(prepare(nn.Sequential(nn.Linear(4, 4)), other), legacy)


def _calibrated(model: nn.Module, rules: list[QuantRule], dtype: torch.dtype = torch.float32) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    return calibrate(prepare(model, rules), [torch.randn(8, 64, generator=g).to(dtype) for _ in range(2)],
                     progress=False)


def test_export_refuses_non_finite_weights() -> None:
    # Issue 10, case 7: a weight that became NaN after calibration was packed as some code and restored as 0.0.
    from polyquant.export import export_tensors

    torch.manual_seed(0)
    rules = [QuantRule("*", weight=QuantSpec("int4", PerChannel(0)), input=QuantSpec("int8"))]
    qmodel = _calibrated(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), rules)
    with torch.no_grad():
        qmodel[2].weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^2\.weight: 1 of 128 values are NaN or Inf"):
        export(qmodel)
    with torch.no_grad():
        qmodel[2].weight[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"^2\.weight: .*NaN or Inf"):
        export_tensors(qmodel)


def test_check_finite() -> None:
    from polyquant.export import check_finite

    check_finite("w", torch.randn(3, 3))
    check_finite("codes", torch.arange(4))  # integer tensors are always finite
    with pytest.raises(ValueError, match=r"^blocks\.0\.fc1\.weight: 2 of 4 values"):
        check_finite("blocks.0.fc1.weight", torch.tensor([1.0, float("nan"), float("-inf"), 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "weight", [QuantSpec("int4", PerGroup(16)), QuantSpec("int4", PerChannel(0), symmetric=False),
               QuantSpec("e2m1", PerGroup(16))], ids=["int4-group", "int4-asym-channel", "e2m1-group"],
)
def test_half_precision_roundtrip_is_exact(dtype: torch.dtype, weight: QuantSpec) -> None:
    # Issue 10, case 8: fake-quant rounded the float32 scale to the model's dtype, the packed codes did not, so a
    # restored fp16 / bf16 model differed from the exported one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).to(dtype).eval()
    rules = [QuantRule("*", weight=weight, input=QuantSpec("int8", symmetric=False))]
    qmodel = _calibrated(model, rules, dtype)
    restored = restore(prepare(model, rules), export(qmodel))
    x = torch.randn(32, 64).to(dtype)
    with torch.no_grad():
        for a, b in zip(qmodel.children(), restored.children()):
            if isinstance(a, QuantLinear):
                assert torch.equal(a.quant_weight(), b.quant_weight())
        y = qmodel(x)
        assert y.dtype == dtype
        assert torch.equal(y, restored(x))


def _exported(rules: list[QuantRule]) -> tuple[nn.Module, Artifact]:
    q = prepare(_model(), rules)
    calibrate(q, [torch.randn(4, 3, 6, 6) for _ in range(2)], progress=False)
    return q, export(q, plugin="core", method="test")


def _forged(art: Artifact, key: str, value: torch.Tensor) -> Artifact:
    return Artifact({**art.tensors, key: value}, art.plugin, art.method, art.config, art.meta)


def test_restore_checks_float_tensors_against_the_model() -> None:
    # Issue 21, class 1: a checksum-valid float tensor of another shape or dtype raised a raw torch RuntimeError
    # in load_state_dict; a NaN one loaded silently and gave NaN outputs.
    rules = [QuantRule("*", weight=QuantSpec("int8", PerChannel(0)), input=QuantSpec("int8"))]
    q, art = _exported(rules)
    bias = art.tensors["float.3.bias"]
    nan = bias.clone()
    nan[3] = float("nan")
    for value, match in [(bias[:8], r"float\.3\.bias: float32 \[8\] in the artifact, the model has float32 \[16\]"),
                         (bias.to(torch.int32), r"float\.3\.bias: int32 \[16\]"),
                         (nan, r"float\.3\.bias: 1 of 16 values are NaN or Inf")]:
        with pytest.raises(ArtifactError, match=match):
            restore(prepare(_model(), rules), _forged(art, "float.3.bias", value))
    # another floating-point dtype of the same shape is cast to the model's (a half-precision artifact)
    restored = restore(prepare(_model(), rules), _forged(art, "float.3.bias", bias.to(torch.bfloat16)))
    assert restored[3].bias.dtype == torch.float32
    assert torch.equal(restored[3].bias, bias.to(torch.bfloat16).float())


def test_restore_checks_activation_qparam_shapes() -> None:
    # Issue 21, class 1: an activation scale of shape [5] loaded and raised a RuntimeError at the first forward.
    rules = [QuantRule("*", weight=QuantSpec("int8", PerChannel(0)), input=QuantSpec("int8", symmetric=False))]
    _, art = _exported(rules)
    key = "3.input_quantizer.scale"
    with pytest.raises(ArtifactError, match=r"3\.input_quantizer\.scale: a per-tensor quantizer has one scale"):
        restore(prepare(_model(), rules), _forged(art, key, art.tensors[key].reshape(-1).expand(5).clone()))
    zp = "3.input_quantizer.zero_point"
    with pytest.raises(ArtifactError, match=r"3\.input_quantizer\.zero_point: shape \[1, 2\]"):
        restore(prepare(_model(), rules), _forged(art, zp, torch.zeros(1, 2)))
    with pytest.raises(ArtifactError, match=r"3\.input_quantizer\.scale: 1 values are not finite and > 0"):
        restore(prepare(_model(), rules), _forged(art, key, torch.zeros_like(art.tensors[key])))
