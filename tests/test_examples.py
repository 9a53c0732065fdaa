"""Examples are run so they cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_core_quickstart(tmp_path: Path) -> None:
    acc = _load("core_quickstart").main(["--wbits", "8", "--abits", "8", "--out", str(tmp_path / "m.safetensors")])
    assert acc > 95


def test_vit_adalog_example(tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("timm")
    out = _load("vit_adalog").main(["--wbits", "8", "--abits", "8", "--calib", "8", "--search-round", "1",
                                    "--out", str(tmp_path / "v.safetensors")])
    assert out["identical"] == 1.0
    assert out["adalog"] >= out["float"] - 1.0 and out["minmax"] >= out["float"] - 1.0  # W8A8 is near float
    assert 0 < out["artifact_bytes"] < 829_352  # below the float checkpoint
