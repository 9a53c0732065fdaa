"""``polyquant demo diffusion``: the table lists float and every method with sane numbers, and the grid image has
one row of 10 samples per model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_demo_table_and_grid_image(tmp_path: Path) -> None:
    from PIL import Image

    from polyquant.plugins.diffusion.demo import run_demo

    table = run_demo(calib_images=2, recon_iters=2, out_dir=str(tmp_path))
    psnr = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(\S.*?) {2,}(\d+\.\d+) ", table, re.M)}
    assert set(psnr) == {"fp4dit RTN", "fp4dit + scale-aware AdaRound (2 it)", "fp_fixed_bias", "int_minmax",
                         "adaround INT4 (2 it)", "int8 (W8A8)"}, table
    assert all(15 < v < 60 for v in psnr.values()) and psnr["int8 (W8A8)"] > max(
        v for k, v in psnr.items() if k != "int8 (W8A8)")  # 8-bit weights are far closer to float than 4-bit
    image = Image.open(tmp_path / "samples.png")
    assert image.size == (10 * (8 * 4 + 2), 7 * (8 * 4 + 2))  # 10 samples x 7 rows (float + 6 methods), 4x, 1 px frame
    assert str(tmp_path / "samples.png") in table
