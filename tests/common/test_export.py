"""export() / restore(): packed quantized artifacts that reproduce the fake-quant model exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from polyquant.artifact import ArtifactError, load, save
from polyquant.export import export, restore
from polyquant.nn import QuantRule, QuantSpec, calibrate, prepare
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
    other = [QuantRule("*", weight=QuantSpec("int8", PerChannel(0)))]
    with pytest.raises(ArtifactError, match="format"):
        restore(prepare(nn.Sequential(nn.Linear(4, 4)), other), art)
