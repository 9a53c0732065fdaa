"""``polyquant demo lidar``: a report section with the float, max-min, entropy and LiDAR-PTQ rows (sane numbers,
the packed models matching fake-quant, the artifacts smaller than the float model) and the labelled BEV figure."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_section_table_and_bev_figure() -> None:
    from PIL import Image

    from polyquant.plugins.lidar.demo import run_demo
    from polyquant.report import Section

    section = run_demo(calib_scenes=8, eval_scenes=10, packed_scenes=4, iters=2, grid=4, search_scenes=2)
    assert isinstance(section, Section) and section.domain == "lidar"
    assert section.title and section.headline and section.reduced and section.notes
    (table,) = section.tables
    col = {h: i for i, h in enumerate(table.header)}
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == ["float", "minmax", "entropy", "lidarptq"], table.text()

    def num(name: str, column: str) -> float:
        return float(rows[name][col[column]].replace(",", ""))

    for name in rows:
        for column in ("mAP", "near", "mid", "far", "mAPH", "mAP fake-quant (4 scenes)", "mAP packed (4 scenes)"):
            assert 0 <= num(name, column) <= 1, rows[name]
        assert num(name, "ms / batch of 8 scenes") > 0
    assert num("float", "mAP") > 0.8
    float_bytes = num("float", "artifact bytes")
    for m in ("minmax", "entropy", "lidarptq"):
        # PackedConv decodes the same int8 codes to the same fp32 weights as fake-quant: equal up to fp32 rounding
        assert abs(num(m, "mAP packed (4 scenes)") - num(m, "mAP fake-quant (4 scenes)")) <= 0.01, rows[m]
        assert num(m, "artifact bytes") < float_bytes / 3, rows[m]  # int8 codes of fp32 weights, plus qparams
        assert float(rows[m][col["quantize s (one run)"]]) >= 0
    # entropy's KL ranges clip the sparse BEV activations (benchmarks/lidar.md: -0.17 mAP); the others stay close
    assert num("entropy", "mAP") < num("minmax", "mAP") - 0.1
    assert num("lidarptq", "mAP") > num("float", "mAP") - 0.05  # 2 reconstruction steps: no claim over max-min

    (figure,) = section.figures
    assert figure.title == "BEV detections" and figure.caption
    width, height = Image.open(io.BytesIO(figure.png)).size
    assert width > 0 and height > 0
    assert figure.axes == [["y, lateral (m)", "x, forward (m)"]] * 4
    assert table.text() in str(section)


def test_demo_refuses_more_packed_scenes_than_evaluated() -> None:
    from polyquant.plugins.lidar.demo import run_demo

    with pytest.raises(ValueError, match="packed_scenes"):
        run_demo(eval_scenes=4, packed_scenes=8)
