"""Issue 29: the hybrid baselines of the benchmark (Q-HyViT's placement, a plain observer) are registered methods:
``polyquant.quantize`` gives exactly ``qhyvit.quantize_hybrid_baseline``'s model, and their artifacts save and
load (fake and packed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import polyquant as pq  # noqa: E402
from polyquant.plugins.vit.data import calib_set, load_digits_data  # noqa: E402
from polyquant.plugins.vit.methods import METHODS  # noqa: E402
from polyquant.plugins.vit.models import build_model  # noqa: E402
from polyquant.plugins.vit.qhyvit import HYBRID_BASELINES, quantize_hybrid_baseline  # noqa: E402


@pytest.mark.parametrize("method", sorted(HYBRID_BASELINES))
def test_registered_hybrid_baseline_is_the_benchmark_function(method: str, tmp_path: Path) -> None:
    model, _ = build_model("digits-hybrid")
    calib = calib_set(8, 3)
    x = load_digits_data().x_test[:64]
    config = METHODS[method](wbits=4, abits=4, calib_size=8, batch_size=8)
    qm = pq.quantize(model, config, calib=[calib], progress=False)
    reference = quantize_hybrid_baseline(model, calib, wbits=4, abits=4, observer=config.OBSERVER,
                                         percentile=config.clip_percentile(), calib_size=8, batch_size=8)
    with torch.no_grad():
        out = qm.model(x)
        assert torch.equal(out, reference(x))  # the CLI, the benchmark and the docs run this same model

    path = pq.save(qm, tmp_path / f"{method}.safetensors")
    assert pq.load(path).config == config
    with torch.no_grad():
        assert torch.equal(pq.load(path).model(x), out)
        packed = pq.load(path, mode="packed", cpu_dtype=torch.float32)
        agree = (packed.model(x).argmax(-1) == out.argmax(-1)).float().mean()
    assert agree >= 0.95


def test_every_vit_method_defaults_to_one_bit_width(capsys: pytest.CaptureFixture[str]) -> None:
    from polyquant.cli import main
    from polyquant.plugins.vit.methods import DEFAULT_BITS

    for name, cls in METHODS.items():
        config = cls()
        assert (config.wbits, config.abits) == DEFAULT_BITS, name
    for method in ("qhyvit", "adalog", "hybrid_minmax"):
        assert main(["quantize", f"vit/{method}", "--help"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: 4)" in out.rsplit("--wbits INT", 1)[1].split("--abits")[0]
        assert "Every vit method defaults to W4A4" in out
