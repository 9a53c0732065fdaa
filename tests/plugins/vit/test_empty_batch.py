"""Issue 10 for the vit plugin: a quantized model accepts an empty batch (case 11); its export refuses non-finite
weights (case 7)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import polyquant as pq  # noqa: E402
from polyquant.plugins.vit.methods import example  # noqa: E402


def test_minmax_digits_model_accepts_an_empty_batch() -> None:
    case = example("minmax")
    qm = pq.quantize(case.model, case.config, case.calib, progress=False)
    empty = torch.empty(0, *case.inputs.shape[1:])  # (0, 1, 32, 32)
    with torch.no_grad():
        expected = case.model(empty)
        out = qm(empty)
    assert out.shape == expected.shape == (0, 10)
    assert out.dtype == expected.dtype


def test_harness_export_refuses_non_finite_weights(tmp_path) -> None:
    # issue 10, case 7 for the vit harness's own export: a NaN weight must not become a valid code
    from polyquant.plugins import load as load_plugin

    ex = load_plugin("vit").example("minmax")
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False)
    with torch.no_grad():
        qm.model.blocks[0].mlp.fc1.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        pq.save(qm, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
