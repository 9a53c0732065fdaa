"""The core demo trains, quantizes and reports sensible numbers."""

from __future__ import annotations

import re

from polyquant.demo import run_core_demo


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
