"""``polyquant demo audio``: a report section with the shipped codecs level by level, every method with sane
numbers, the ptq artifacts loaded back packed beside their fake-quant codecs, and the two labelled figures."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("torchaudio")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_section_tables_and_figures() -> None:
    from PIL import Image

    from polyquant.plugins.audio.demo import run_demo
    from polyquant.report import Section

    section = run_demo(clips=2, calib_clips=4)
    assert isinstance(section, Section) and section.domain == "audio" and section.headline and section.reduced
    codec_table, table, usage_table = section.tables

    codecs = {(r[0], int(r[1])): (float(r[2]), float(r[3])) for r in codec_table.rows}  # kbps, mel distance
    assert sorted(codecs) == [("tiny-grvq", 1), ("tiny-grvq", 2), ("tiny-rvq", 1), ("tiny-rvq", 2), ("tiny-rvq", 4)]
    assert codecs["tiny-rvq", 4][0] == 2.0 and codecs["tiny-rvq", 1][0] == 0.5 and codecs["tiny-grvq", 2][0] == 2.0
    assert codecs["tiny-rvq", 4][1] < codecs["tiny-rvq", 1][1]  # more levels, closer spectra

    col = {h: i for i, h in enumerate(table.header)}
    rows = {r[0]: r for r in table.rows}
    methods = ["rvq refit (2 kbps)", "grvq refit (2 kbps)", "fsq baseline (2 kbps)", "ptq int8 weights",
               "ptq int4 weights"]
    assert list(rows) == ["tiny-rvq float (4 levels)", *(f"tiny-rvq + {m}" for m in methods)]
    mel = {name: float(r[col["mel fake-quant"]]) for name, r in rows.items()}
    size = {name: int(r[col["artifact bytes"]].replace(",", "")) for name, r in rows.items()}
    for name, r in rows.items():
        assert 0 < mel[name] < 10 and 1.9 <= float(r[col["kbps"]]) <= 2.0, r
        assert float(r[col["ms / decode (1 s clip)"]]) > 0
    float_row = "tiny-rvq float (4 levels)"
    assert mel[float_row] == codecs["tiny-rvq", 4][1]
    for bits in (8, 4):
        r = rows[f"tiny-rvq + ptq int{bits} weights"]
        # PackedConv decodes the same codes to the same float weights: the packed codec matches fake-quant
        assert abs(float(r[col["mel packed"]]) - mel[r[0]]) < 1e-2, r
        assert abs(float(r[col["SI-SDR packed dB"]]) - float(r[col["SI-SDR fake-quant dB"]])) < 0.05, r
        assert size[r[0]] < size[float_row]
    assert size["tiny-rvq + ptq int4 weights"] < size["tiny-rvq + ptq int8 weights"]
    # weight-only int8 stays at float quality (measured within 0.1%); int4 loses (measured +4%)
    assert abs(mel["tiny-rvq + ptq int8 weights"] / mel[float_row] - 1) < 0.01
    assert mel["tiny-rvq + ptq int4 weights"] > mel["tiny-rvq + ptq int8 weights"]
    for m in methods[:3]:  # refit bottlenecks: float tables, no packed form
        assert rows[f"tiny-rvq + {m}"][col["mel packed"]] == "-"

    assert [(r[0], r[1]) for r in usage_table.rows] == [(c, str(level)) for c in ("tiny-rvq (shipped)",
                                                                                   "tiny-rvq + rvq refit")
                                                        for level in (1, 2, 3, 4)]
    for r in usage_table.rows:
        used = int(r[2].split(" of ")[0])
        assert 1 <= float(r[3]) <= used <= 2 * 50  # 2 clips of 50 frames

    spectrograms, usage = section.figures
    assert (spectrograms.title, usage.title) == ("spectrograms", "code usage")
    for figure in section.figures:
        width, height = Image.open(io.BytesIO(figure.png)).size
        assert width > 0 and height > 0
    assert spectrograms.axes == [["time (s)", "frequency (kHz)"]] * 5
    assert usage.axes == [["codebook entry (sorted by use)", "share of frames (%)"]] * 2
    text = str(section)
    assert all(t.text() in text for t in section.tables)
