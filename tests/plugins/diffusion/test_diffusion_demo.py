"""``polyquant demo diffusion`` at reduced settings: one Section with the DiT, CacheQuant and ZOODiP tables (every
row present, sane numbers, packed close to fake-quant, artifacts smaller than float) and three labelled figures."""

from __future__ import annotations

import io

import pytest

from polyquant.report import Table

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _col(table: Table, name: str) -> int:
    return table.header.index(name)


def test_demo_section_tables_and_figures() -> None:
    from PIL import Image

    from polyquant.plugins.diffusion.demo import BACKPROP, PLAIN_ZO, ZOODIP, run_demo
    from polyquant.report import Section

    section = run_demo(calib_images=2, recon_iters=2, steps=8, cache_steps=8, interval=2, zo_iters=5)
    assert isinstance(section, Section) and section.domain == "diffusion"
    assert section.title and section.headline and section.reduced and section.notes
    dit, unet, zo = section.tables
    text = str(section)
    assert all(t.text() in text for t in section.tables)

    # the DiT: float + 6 methods; 8-bit weights are far closer to float than any 4-bit method
    rows = {r[0]: r for r in dit.rows}
    assert list(rows) == ["float (fp32)", "fp4dit RTN", "fp4dit + scale-aware AdaRound (2 it)", "fp_fixed_bias",
                          "int_minmax", "adaround INT4 (2 it)", "int8 (W8A8)"]
    fake, packed = _col(dit, "PSNR fake-quant (dB)"), _col(dit, "PSNR packed (dB)")
    nbytes, ms = _col(dit, "artifact bytes"), _col(dit, "ms / call (float or packed)")
    float_bytes = int(rows["float (fp32)"][nbytes].replace(",", ""))
    psnr = {k: float(r[fake]) for k, r in rows.items() if k != "float (fp32)"}
    assert all(15 < v < 60 for v in psnr.values()), dit.text()
    assert psnr["int8 (W8A8)"] > max(v for k, v in psnr.items() if k != "int8 (W8A8)"), dit.text()
    for k, r in rows.items():
        assert float(r[ms]) > 0
        acc = _col(dit, "class acc. fake-quant %")
        assert 0 <= float(r[acc]) <= 100
        if k != "float (fp32)":
            # bf16 packed compute vs fp32 fake-quant: a few rounding flips over 8 sampling steps, not a new model
            assert abs(float(r[packed]) - float(r[fake])) < 3, dit.text()
            assert 0 < int(r[nbytes].replace(",", "")) < float_bytes / 1.8  # 4-bit: ~2.4x; int8: ~1.9x

    # the UNet: float, cache only and the three CacheQuant ablations; caching every 2nd step saves MACs
    rows = {r[0]: r for r in unet.rows}
    assert list(rows) == ["float (fp32, no cache)", "cache only (float, uniform)", "quant only (W8A8, no cache)",
                          "naive quant + cache (uniform)", "CacheQuant (DPS + DEC)"]
    fake, packed = _col(unet, "PSNR fake-quant (dB)"), _col(unet, "PSNR packed (dB)")
    nbytes, speed = _col(unet, "artifact bytes"), _col(unet, "speedup (counted MACs)")
    float_bytes = int(rows["float (fp32, no cache)"][nbytes].replace(",", ""))
    assert rows["cache only (float, uniform)"][nbytes] == "-" and rows["cache only (float, uniform)"][packed] == "-"
    for k in ("quant only (W8A8, no cache)", "naive quant + cache (uniform)", "CacheQuant (DPS + DEC)"):
        r = rows[k]
        assert 20 < float(r[fake]) < 80 and abs(float(r[packed]) - float(r[fake])) < 3, unet.text()
        assert 0 < int(r[nbytes].replace(",", "")) < float_bytes / 2.5  # 8-bit weights: ~3.1x
    assert rows["quant only (W8A8, no cache)"][speed] == "1.00x"
    assert all(1.2 < float(rows[k][speed].rstrip("x")) < 2 for k in ("cache only (float, uniform)",
                                                                   "naive quant + cache (uniform)",
                                                                   "CacheQuant (DPS + DEC)"))

    # ZOODiP: three variants from the same start; only backprop does backward passes; ZO: 3 forward passes / step
    rows = {r[0]: r for r in zo.rows}
    assert list(rows) == [ZOODIP, PLAIN_ZO, BACKPROP]
    start, end = _col(zo, "held loss, t 0..999: start"), _col(zo, "held loss, t 0..999: end")
    assert len({r[start] for r in rows.values()}) == 1  # theta starts at the null class's row for all
    assert all(0 < float(r[end]) < 1 for r in rows.values())
    fwd, bwd = _col(zo, "forward passes"), _col(zo, "backward passes")
    assert rows[ZOODIP][fwd] == rows[PLAIN_ZO][fwd] == str(5 * 3 * 4) and rows[ZOODIP][bwd] == "0"
    assert rows[BACKPROP][fwd] == rows[BACKPROP][bwd] == str(5 * 4)

    assert [f.title for f in section.figures] == ["samples, float vs quantized", "cache schedule",
                                                  "ZO personalization loss"]
    for f in section.figures:
        image = Image.open(io.BytesIO(f.png))
        assert image.width > 0 and image.height > 0
        assert f.axes and all(x.strip() and y.strip() for x, y in f.axes)
        assert f"figure: {f.title}" in text
    assert section.figures[0].axes[0] == ["class label", "model"]
    assert section.figures[1].axes[0] == ["denoising step", "schedule"]
    assert section.figures[2].axes[0] == ["step", "denoising loss (MSE)"]
