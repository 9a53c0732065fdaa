"""polyquant.report: tables, figures, sections, the page (valid HTML, one file), results.json round trips and
benchmark JSON rendering."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest

from polyquant.report import (
    Figure,
    Section,
    Table,
    benchmark_section,
    figure_png,
    pyplot,
    read_sections,
    render_html,
    text_table,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]


def _plot(xlabel: str = "bits", ylabel: str = "accuracy (%)") -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([3, 4, 8], [10, 80, 97])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def _section() -> Section:
    return Section("vit", title="digits ViT at W4A4", headline="adalog 96% vs min-max 80%", reduced="one round",
                   tables=[Table("W4A4", ["method", "top-1 %", "bytes"], [["float", "98.0", "1,024"],
                                                                            ["adalog <x>", "96.1", "256"]], "n")],
                   figures=[figure_png(_plot(), "top-1 vs bits", "one seed")], notes=["see benchmarks/vit.md"],
                   seconds=1.5)


def test_text_table_hand_computed() -> None:
    assert text_table("t", ["a", "bb"], [["xyz", "1"]], "note") == "t\na    bb\nxyz  1\nnote"
    assert text_table("t", ["a"], [["1"]], "") == "t\na\n1"


def test_table_and_figure_are_checked() -> None:
    assert Table("t", ["a", "b"], [[1, 2.5]]).rows == [["1", "2.5"]]
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        Table("t", ["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="is not a PNG"):
        Figure("f", b"GIF89a")


def test_figure_png_needs_labelled_axes() -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    fig = figure_png(_plot(), "t")
    assert fig.axes == [["bits", "accuracy (%)"]]
    image = Image.open(io.BytesIO(fig.png))
    assert image.format == "PNG" and image.width > 50 and image.height > 50
    with pytest.raises(ValueError, match="panel 0 has no y-axis label"):
        figure_png(_plot(ylabel=""), "t")
    import matplotlib.pyplot as plt

    picture, ax = plt.subplots()
    ax.imshow([[0, 1], [1, 0]])
    ax.axis("off")
    with pytest.raises(ValueError, match="hides its axes and has no title"):
        figure_png(picture, "render")
    picture, ax = plt.subplots()
    ax.imshow([[0, 1], [1, 0]])
    ax.axis("off")
    ax.set_title("float")
    assert figure_png(picture, "render").axes == []


def test_pyplot_draws_without_a_display() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    assert pyplot() is __import__("matplotlib.pyplot").pyplot and matplotlib.get_backend().lower() == "agg"


def test_section_summary() -> None:
    s = Section("vit", title="t", headline="h", reduced="r", tables=[Table("a", ["x"], [["1"]])])
    assert s.summary() == "t\nresult: h\nreduced settings: r\n1 table(s), 0 figure(s)"
    assert str(s).startswith("t\nresult: h\nreduced settings: r\na\nx\n1")  # the same header, then the tables


def test_section_text_and_json_round_trip() -> None:
    pytest.importorskip("matplotlib")
    s = _section()
    text = str(s)
    assert text.startswith("digits ViT at W4A4\nresult: adalog 96% vs min-max 80%\nreduced settings: one round\n")
    assert "method      top-1 %  bytes\nfloat       98.0     1,024" in text and "figure: top-1 vs bits" in text
    back = Section.from_json(json.loads(json.dumps(s.to_json())), "x")
    assert back == s
    with pytest.raises(ValueError, match="^here: not a polyquant report section"):
        Section.from_json({"domain": "a", "figures": [{"title": "f", "png_base64": "!!"}]}, "here")


def test_page_is_valid_single_file_html(parse_html: Any) -> None:
    pytest.importorskip("matplotlib")
    failed = Section("audio", error="RuntimeError: no codec <script>")
    page = render_html([_section(), failed, Section("core", text="a\nb & c")], meta="here")
    doc = parse_html(page)
    assert doc.errors == [] and doc.doctype.lower() == "doctype html"
    assert doc.tags["html"] == doc.tags["head"] == doc.tags["body"] == 1 and doc.tags["section"] == 3
    assert doc.ids == ["s0-vit", "s1-audio", "s2-core"] and doc.tags["table"] == 1
    assert len(doc.images) == 1 and doc.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(doc.images[0].split(",", 1)[1]).startswith(b"\x89PNG")
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched at view time
    assert "adalog &lt;x&gt;" in page and "<script>" not in page  # every text escaped
    assert "This demo failed: RuntimeError: no codec &lt;script&gt;" in page and "failed: audio" in page
    assert '<td class="num">1,024</td>' in page and "<pre>a\nb &amp; c</pre>" in page


def test_write_report_and_read_back(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "mine.txt").write_text("kept")
    section = _section()
    page = write_report([section], tmp_path, meta="m")
    assert page == tmp_path / "index.html" and (tmp_path / "mine.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "mine.txt", "results.json"]
    assert read_sections(tmp_path / "results.json") == [section]  # the exact PNG bytes too
    again = tmp_path / "again"
    write_report(read_sections(tmp_path / "results.json"), again, meta="m")
    assert (again / "index.html").read_text() == page.read_text()  # the same page from its results.json
    with pytest.raises(ValueError, match="exists and is not a folder"):
        write_report([], tmp_path / "mine.txt")
    with pytest.raises(ValueError, match="its parent folder does not exist"):
        write_report([], tmp_path / "no" / "such")


def test_read_sections_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(ValueError, match=r"^cannot read .*bad\.json: "):
        read_sections(tmp_path / "bad.json")
    (tmp_path / "future.json").write_text(json.dumps({"polyquant_report": 99, "sections": []}))
    with pytest.raises(ValueError, match="schema 99 is not 1"):
        read_sections(tmp_path / "future.json")


def test_benchmark_json_becomes_tables() -> None:
    obj = {"benchmark": "b", "env": {"git_sha": "abc", "torch": "2.14"}, "seeds": [0, 1],
           "rows": [{"method": "x", "acc": 0.123456789}, {"method": "y", "extra": None}],
           "per_model": {"m1": {"acc": 1.0}, "m2": {"acc": 2.0}}}
    s = benchmark_section(obj, "file")
    assert s.title == "benchmark results: b"
    tables = {t.title: t for t in s.tables}
    assert tables["summary"].rows == [["benchmark", "b"], ["seeds", "[0,1]"]]
    assert tables["env"].rows == [["git_sha", "abc"], ["torch", "2.14"]]
    assert tables["rows"].header == ["method", "acc", "extra"]
    assert tables["rows"].rows == [["x", "0.123457", "-"], ["y", "-", "-"]]
    assert tables["per_model"].header == ["", "acc"] and tables["per_model"].rows == [["m1", "1"], ["m2", "2"]]


@pytest.mark.parametrize("name", ["vit.json", "deploy.json", "lidar.json", "embeddings.json", "audio.json"])
def test_shipped_benchmark_results_render(name: str, parse_html: Any) -> None:
    sections = read_sections(REPO / "benchmarks" / "results_cpu" / name)
    assert len(sections) == 1 and sections[0].tables
    assert parse_html(render_html(sections)).errors == []
