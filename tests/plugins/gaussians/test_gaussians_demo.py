"""``polyquant demo gaussians``: a report section with every method's row (sane numbers, the decoded files render
as the in-memory models), the files smaller than the float .ply, and the side-by-side renders figure."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_section_table_and_renders() -> None:
    from PIL import Image

    from polyquant.plugins.gaussians.demo import run_demo
    from polyquant.report import Section

    section = run_demo(views=1, size=24, omg_steps=10, kmeans_iters=2, shown_size=32)
    assert isinstance(section, Section) and section.domain == "gaussians"
    assert section.title and section.headline and section.reduced and section.notes
    (table,) = section.tables
    col = {h: i for i, h in enumerate(table.header)}
    rows = {r[0]: r for r in table.rows}
    methods = ["svq", "vq (equal entries)", "uniform8", "omg"]
    assert list(rows) == ["float", *methods], table.text()

    def num(name: str, column: str) -> float:
        return float(rows[name][col[column]].rstrip("x").replace(",", ""))

    float_bytes = num("float", "file bytes")
    assert {m: int(num(m, "index bits / G")) for m in methods} == {"svq": 172, "vq (equal entries)": 46,
                                                                   "uniform8": 448, "omg": 66}
    for m in methods:
        # the file holds the codes, fp16 codebooks / MLPs and fp16 positions the model renders: decoded == simulated
        assert rows[m][col["PSNR dB real"]] == rows[m][col["PSNR dB simulated"]], rows[m]
        assert 10 < num(m, "PSNR dB real") < 100 and 0 < num(m, "SSIM real") <= 1, rows[m]
        assert num(m, "file bytes") < float_bytes and num(m, "vs .ply") > 1, rows[m]
        assert 0 < num(m, "coded bits / G") <= num(m, "index bits / G") and num(m, "render ms") > 0, rows[m]
    assert num("float", "render ms") > 0
    # SVQ beats full-vector VQ with as many codebook entries (benchmarks/gaussians.md: by 6 dB vs the float scene)
    assert num("svq", "PSNR dB real") > num("vq (equal entries)", "PSNR dB real")
    assert num("omg", "file bytes") < num("svq", "file bytes") < num("uniform8", "file bytes")

    (figure,) = section.figures
    assert figure.title == "renders side by side" and figure.caption
    width, height = Image.open(io.BytesIO(figure.png)).size
    assert width > 0 and height > 0
    assert figure.axes == []  # image panels only: axes hidden, each titled (figure_png checks the titles)
    assert table.text() in str(section)
