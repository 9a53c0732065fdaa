"""The core demo trains, quantizes and reports sensible numbers; the demo helpers plugins share."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from polyquant.checkpoint import read_checkpoint
from polyquant.demo import checkpoint_bytes, run_core_demo


def test_core_demo_table() -> None:
    table = run_core_demo()
    rows = {}
    for line in table.splitlines():
        m = re.match(r"(\S+)\s+(\S+)\s+([\d.]+)\s+([\d,]+)$", line)
        if m:
            rows[(m.group(1), m.group(2))] = (float(m.group(3)), int(m.group(4).replace(",", "")))
    assert len(rows) == 9
    fp_acc, fp_bytes = rows[("float32", "-")]
    assert fp_acc > 95
    assert abs(rows[("W8A8", "minmax")][0] - fp_acc) <= 1.0
    # 4-bit weights: the artifact holds packed codes, far smaller than the fp32 checkpoint.
    assert rows[("W4A8", "mse")][1] < fp_bytes / 4
    assert rows[("W4A4", "mse")][0] > 80


def test_checkpoint_bytes_is_the_saved_file(tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 32), "b": torch.zeros(32)}
    n = checkpoint_bytes(state, tmp_path, "float")
    assert n == (tmp_path / "float.safetensors").stat().st_size and n > (64 * 32 + 32) * 4
    assert torch.equal(read_checkpoint(tmp_path / "float.safetensors")[0]["w"], state["w"])
