"""``polyquant demo embeddings``: a report section with every format's recall on the stored codes and on the store
saved and loaded back, bytes per vector, the saved file's bytes, and the labelled recall-vs-compression figure."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMATS = ["float16", "fp8_e4m3 (vector scale)", "int8", "uint8", "int4", "pca 50% + fp8_e4m3",
           "binary, no rescoring", "binary, 4x rescoring"]


def test_demo_runs_offline() -> None:
    from PIL import Image

    from polyquant.plugins.embeddings.demo import run_demo
    from polyquant.report import Section

    n, dim = 3000, 32
    section = run_demo(n=n, dim=dim, queries=20)
    assert isinstance(section, Section) and section.domain == "embeddings" and section.headline and section.reduced
    (table,) = section.tables
    col = {h: i for i, h in enumerate(table.header)}
    rows = {r[col["format"]]: r for r in table.rows}
    assert list(rows) == ["float32 (exact)", *FORMATS]
    float_file = int(rows["float32 (exact)"][col["store file bytes"]].replace(",", ""))
    assert float_file == 4 * n * dim and rows["float32 (exact)"][col["recall@10"]] == "1.000"
    for label in FORMATS:
        row = rows[label]
        recall = float(row[col["recall@10"]])
        assert 0.0 <= recall <= 1.0
        assert row[col["recall@10 saved + loaded"]] == row[col["recall@10"]]  # the same codes, the same search
        assert n * float(row[col["bytes/vec"]]) < int(row[col["store file bytes"]].replace(",", "")) < float_file
        assert float(row[col["queries/s"]]) > 0
    assert float(rows["float16"][col["recall@10"]]) >= 0.95  # recall@10 of float16 codes
    assert float(rows["int8"][col["recall@10"]]) >= float(rows["int4"][col["recall@10"]])  # a finer grid
    # 32 sign bits + the amortised step
    assert rows["binary, 4x rescoring"][col["compression"]] == f"{4 * dim / (4 + dim * 4 / n):.1f}x"
    (figure,) = section.figures
    assert figure.title == "recall vs compression"
    width, height = Image.open(io.BytesIO(figure.png)).size
    assert width > 0 and height > 0
    assert figure.axes == [["compression vs float32 (x)", "recall@10 (fraction of the float top-10)"]]
    assert table.text() in str(section)
