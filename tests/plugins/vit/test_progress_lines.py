"""Issue 29: off a terminal, ``polyquant quantize vit/...`` prints one progress line per layer or phase on stderr
(``polyquant.progress``), and nothing with ``--quiet``."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")
pytest.importorskip("sklearn")

from polyquant.cli import main  # noqa: E402

ARGS = ["--wbits", "8", "--abits", "8", "--calib", "8", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads() -> object:
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method, desc", [("minmax", "calibrating (minmax): "), ("qhyvit", "Q-HyViT W8A8: ")])
def test_one_line_per_layer_off_a_terminal(method: str, desc: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--grid", "2", "--search-rounds", "1"] if method == "qhyvit" else []
    assert main(["quantize", f"vit/{method}", *ARGS, *extra]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(desc)]
    assert len(lines) >= 10 and "\r" not in err  # plain lines, one per calibrated layer / unit
    assert lines[-1].split(": ")[1].startswith("100%" if method == "minmax" else f"{len(lines)}/{len(lines)}")

    assert main(["quantize", f"vit/{method}", *ARGS, *extra, "--quiet"]) == 0
    assert desc not in capsys.readouterr().err
