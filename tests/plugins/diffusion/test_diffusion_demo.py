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

    table = run_demo(calib_images=2, recon_iters=2, out_dir=str(tmp_path), cachequant=False)
    psnr = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(\S.*?) {2,}(\d+\.\d+) ", table, re.M)}
    assert set(psnr) == {"fp4dit RTN", "fp4dit + scale-aware AdaRound (2 it)", "fp_fixed_bias", "int_minmax",
                         "adaround INT4 (2 it)", "int8 (W8A8)"}, table
    assert all(15 < v < 60 for v in psnr.values()) and psnr["int8 (W8A8)"] > max(
        v for k, v in psnr.items() if k != "int8 (W8A8)")  # 8-bit weights are far closer to float than 4-bit
    image = Image.open(tmp_path / "samples.png")
    assert image.size == (10 * (8 * 4 + 2), 7 * (8 * 4 + 2))  # 10 samples x 7 rows (float + 6 methods), 4x, 1 px frame
    assert str(tmp_path / "samples.png") in table


def test_cachequant_demo_table_and_grid_image(tmp_path: Path) -> None:
    from PIL import Image

    from polyquant.plugins.diffusion.demo import run_cachequant_demo

    table = run_cachequant_demo(calib_images=4, steps=8, interval=2, out_dir=str(tmp_path))
    rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(\S.*?) {2,}(\d+\.\d+) +\d+ +(\d+\.\d+)x", table, re.M)}
    assert set(rows) == {"cache only (float, uniform)", "quant only (W8A8, no cache)", "naive quant + cache",
                         "CacheQuant (DPS + DEC)"}, table
    assert all(20 < p < 80 for p, _ in rows.values())
    assert rows["quant only (W8A8, no cache)"][1] == 1.0 and all(  # every step refreshes: no saving
        1.2 < s < 2 for k, (_, s) in rows.items() if k != "quant only (W8A8, no cache)")  # half the steps cached
    image = Image.open(tmp_path / "samples_unet.png")
    assert image.size == (10 * (8 * 4 + 2), 5 * (8 * 4 + 2))  # float, cache only and 3 quantized rows
