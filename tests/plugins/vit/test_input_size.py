"""Issue 11, 6(c, d): a hybrid built for a non-default input size (timm EfficientFormerV2 at 64x64, whose attention
biases are sized for it) goes through every method, is saved and restored with identical outputs. Artifacts record
the calibration input size; restoring used to fold BatchNorms with a 224x224 zero input and fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

import polyquant as pq  # noqa: E402
from polyquant.plugins.vit.methods import METHODS  # noqa: E402
from polyquant.plugins.vit.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def hybrid() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = build_model("efficientformerv2_s0", img_size=64, num_classes=10)
    return model, torch.randn(6, 3, 64, 64)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_at_a_non_default_input_size(method: str, hybrid, tmp_path: Path) -> None:
    model, x = hybrid
    fields: dict = dict(wbits=6, abits=6, calib_size=4)
    if method == "qhyvit":
        fields.update(grid=4, search_rounds=1, batch_size=4)
    elif method.startswith("hybrid_"):
        fields.update(batch_size=4)
    elif method not in ("minmax", "percentile"):
        fields.update(search_round=1, eq_n=64, steps=1, calib_batch_size=4)
    qm = pq.quantize(model, METHODS[method](**fields), calib=[x[:4]], progress=False)
    assert qm.state["input_size"] == [3, 64, 64]
    back = pq.load(pq.save(qm, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(back.model(x[4:]), qm.model(x[4:]))
