"""``polyquant demo ssm``: a report section with every method on every model, the packed artifact's bits per byte
beside the fake-quant model's, artifacts smaller than the float checkpoint, and the labelled SQNR figure."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_section_lists_every_method_on_every_model() -> None:
    from PIL import Image

    from polyquant.plugins.ssm.demo import MODELS, run_demo
    from polyquant.plugins.ssm.methods import METHODS
    from polyquant.report import Section

    section = run_demo(calib_batches=1, eval_batches=1, seq_len=32)
    assert isinstance(section, Section) and section.domain == "ssm" and section.headline and section.reduced
    (table,) = section.tables
    col = {h: i for i, h in enumerate(table.header)}
    rows = {(r[col["model"]], r[col["method"]]): r for r in table.rows}
    assert len(rows) == len(table.rows) == len(MODELS) * (1 + len(METHODS))
    bpb: dict[tuple[str, str], float] = {}
    for model in MODELS:
        float_bytes = int(rows[model, "float"][col["artifact bytes"]].replace(",", ""))
        for method in ("float", *METHODS):
            row = rows[model, method]
            bpb[model, method] = float(row[col["bpb fake-quant"]])
            assert 1.0 < bpb[model, method] < 4.5, (model, method, row)
            assert float(row[col["ms / forward (4, 32)"]]) > 0
            if method == "float":
                continue
            packed = float(row[col["bpb packed"]])
            # the same int8 codes; the packed CPU GEMMs compute in bf16 (8-bit mantissa): measured < 0.2% apart
            assert abs(packed / bpb[model, method] - 1) < 0.01, (model, method, row)
            assert int(row[col["artifact bytes"]].replace(",", "")) < float_bytes
            assert float(row[col["quantize s (one run)"]]) >= 0
    # the outlier channels: Quamba's percentile u quantizer and Hadamard out_proj beat naive and SmoothQuant W8A8
    # (benchmarks/ssm.md: +5.6% vs +12.4% / +12.5% bpb over float; at these settings about 6% vs 13%)
    out = "Mamba-1 + outliers"
    assert bpb[out, "quamba"] < bpb[out, "naive"] and bpb[out, "quamba"] < bpb[out, "smoothquant"]
    assert bpb[out, "naive"] > bpb[out, "float"] * 1.03  # the injected outliers do hurt naive W8A8
    (figure,) = section.figures
    assert figure.title == "per-layer SQNR"
    width, height = Image.open(io.BytesIO(figure.png)).size
    assert width > 0 and height > 0
    assert figure.axes == [["mixer layer", "output SQNR (dB)"]] * len(MODELS)
    assert table.text() in str(section)
