"""``polyquant demo gaussians``: every method's row with sane numbers, the side-by-side render written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_table_and_renders(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from polyquant.plugins.gaussians.demo import run_demo

    table = run_demo(views=2, size=24, omg_steps=20, out_dir=str(tmp_path))
    rows = {m.group(1).strip(): [float(v.rstrip("x")) for v in m.group(2).split()]
            for m in re.finditer(r"^(svq|vq \(equal entries\)|uniform8|omg) +(.*)$", table, re.M)}
    assert set(rows) == {"svq", "vq (equal entries)", "uniform8", "omg"}, table
    bits, coded, per_gaussian, ratio, psnr, ssim, _ = zip(*rows.values())
    assert rows["svq"][0] == 172 and rows["omg"][0] == 66 and rows["uniform8"][0] == 448
    assert rows["svq"][4] > rows["vq (equal entries)"][4]  # SVQ beats full-vector VQ at equal entries
    assert all(r > 1.0 for r in ratio) and all(0 < s <= 1 for s in ssim)
    assert (tmp_path / "renders.png").stat().st_size > 10_000 and str(tmp_path / "renders.png") in table
