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
