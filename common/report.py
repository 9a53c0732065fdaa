"""One page for every domain: demo and benchmark results as a single-file HTML report with embedded plots.

    section = Section("vit", "AdaLog vs min-max at W4A4 on the digits ViT", headline="adalog 96.1% vs ...")
    section.tables.append(Table("accuracy", ["method", "top-1 %"], [["float", "98.0"], ...], note="..."))
    section.figures.append(figure_png(fig, "top-1 vs bits"))   # a matplotlib figure, every panel labelled
    write_report([section, ...], "polyquant-report")           # index.html (one file) + results.json

A plugin's demo returns a ``Section``; ``polyquant demo`` writes the page of every demo it ran (a demo that fails
becomes a section holding its error) and ``polyquant report RESULTS.json...`` renders the page again from
``results.json`` files or from any benchmark JSON (its records and key / value groups as tables). The page needs
no network: images are PNG data URIs, the style sheet is inline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["REPORT_SCHEMA", "Figure", "Section", "Table", "benchmark_section", "check_report_folder", "default_meta",
           "figure_png", "pyplot", "read_sections", "render_html", "text_table", "write_report"]

REPORT_SCHEMA = 1
MAX_ROWS = 200  # rows of one table taken from a benchmark file (the rest are counted in its note)


def text_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], note: str) -> str:
    """A printable table: the title line, each column left-justified to its widest cell, columns two spaces
    apart, the header first, and a closing note line (left out when empty)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([title, *table, *([note] if note else [])])


@dataclass
class Table:
    """Cells as text, formatted by the producer (the page shows them as given; numbers are right-aligned)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def __post_init__(self) -> None:
        self.header = [str(h) for h in self.header]
        self.rows = [[str(c) for c in row] for row in self.rows]
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"table {self.title!r}: a row has {len(row)} cells for {len(self.header)} columns")

    def text(self) -> str:
        return text_table(self.title, self.header, self.rows, self.note)


@dataclass
class Figure:
    """A PNG image and what it shows. ``axes``: the x / y labels of each labelled panel (``figure_png``)."""

    title: str
    png: bytes
    caption: str = ""
    axes: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"figure {self.title!r} is not a PNG image")


@dataclass
class Section:
    """One domain's part of the page: what ran (``title``), its one-line result (``headline``), what the demo ran
    at reduced settings (``reduced``), tables, figures, notes; ``text`` for a demo that returned plain text;
    ``error`` for one that failed (the page shows it and the other sections still render)."""

    domain: str
    title: str = ""
    headline: str = ""
    reduced: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    text: str = ""
    error: str | None = None
    seconds: float | None = None

    def _header(self) -> list[str]:
        return [p for p in (self.title, self.headline and f"result: {self.headline}",
                            self.reduced and f"reduced settings: {self.reduced}") if p]

    def summary(self) -> str:
        """A few lines for the terminal: what ran, the result, what was reduced, how many tables and figures."""
        return "\n".join([*self._header(), f"{len(self.tables)} table(s), {len(self.figures)} figure(s)"])

    def __str__(self) -> str:
        """The terminal report: title, headline, every table, the figures' titles and the notes."""
        parts = self._header()
        parts += [t.text() for t in self.tables]
        parts += [f"figure: {f.title}" for f in self.figures]
        parts += self.notes
        if self.text:
            parts.append(self.text)
        if self.error:
            parts.append(f"error: {self.error}")
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "title": self.title, "headline": self.headline, "reduced": self.reduced,
                "tables": [{"title": t.title, "header": t.header, "rows": t.rows, "note": t.note}
                           for t in self.tables],
                "figures": [{"title": f.title, "caption": f.caption, "axes": f.axes,
                             "png_base64": base64.b64encode(f.png).decode("ascii")} for f in self.figures],
                "notes": self.notes, "text": self.text, "error": self.error, "seconds": self.seconds}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Section:
        """A section from ``to_json``'s dict; ``ValueError`` naming ``where`` on anything else."""
        try:
            return cls(domain=str(obj["domain"]), title=str(obj.get("title", "")),
                       headline=str(obj.get("headline", "")), reduced=str(obj.get("reduced", "")),
                       tables=[Table(str(t["title"]), list(t["header"]), [list(r) for r in t["rows"]],
                                     str(t.get("note", ""))) for t in obj.get("tables", [])],
                       figures=[Figure(str(f["title"]), base64.b64decode(f["png_base64"], validate=True),
                                       str(f.get("caption", "")), [list(a) for a in f.get("axes", [])])
                                for f in obj.get("figures", [])],
                       notes=[str(n) for n in obj.get("notes", [])], text=str(obj.get("text", "")),
                       error=None if obj.get("error") is None else str(obj["error"]),
                       seconds=None if obj.get("seconds") is None else float(obj["seconds"]))
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # binascii.Error is a ValueError
            raise ValueError(f"{where}: not a polyquant report section ({type(e).__name__}: {e})") from None


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed): what a demo draws its figures with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, title: str, caption: str = "", dpi: int = 80) -> Figure:
    """A matplotlib figure as a ``Figure`` (PNG bytes; the figure is closed). Every panel with its axes shown
    must have x and y labels (units in them, such as ``"time (s)"``); a panel with its axes hidden (an image)
    must have a title. ``ValueError`` otherwise, so an unlabelled plot cannot reach the page."""
    import matplotlib.pyplot as plt

    axes = []
    try:
        for i, ax in enumerate(fig.axes):
            if not ax.get_visible():
                continue
            if ax.axison:
                xlabel, ylabel = ax.get_xlabel().strip(), ax.get_ylabel().strip()
                if not xlabel or not ylabel:
                    raise ValueError(f"figure {title!r}: panel {i} has no {'x' if not xlabel else 'y'}-axis label")
                axes.append([xlabel, ylabel])
            elif not ax.get_title(loc="center").strip() and not ax.get_title(loc="left").strip():
                raise ValueError(f"figure {title!r}: panel {i} hides its axes and has no title")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Figure(title, buf.getvalue(), caption, axes)


# ---- benchmark JSON -> tables


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 80 else text[:77] + "..."
    return "-" if value is None else str(value)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _flat(value: Any) -> bool:
    """A scalar, or a list of scalars: one cell of a key / value table."""
    return _scalar(value) or (isinstance(value, list) and all(_scalar(x) for x in value))


def _tables(value: Any, path: str, out: list[Table]) -> None:
    """Tables of a JSON value: a list of objects is one table (a row each); an object's scalar members are one
    key / value table, an object whose members are all objects of scalars one table (a row per member); the
    rest is walked."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        header = list(dict.fromkeys(k for v in value for k in v))
        rows = [[_cell(v.get(k)) for k in header] for v in value[:MAX_ROWS]]
        note = f"first {MAX_ROWS} of {len(value)} rows" if len(value) > MAX_ROWS else ""
        out.append(Table(path, header, rows, note))
        return
    if not isinstance(value, dict):
        if isinstance(value, list) and value:
            out.append(Table(path, ["value"], [[_cell(v)] for v in value[:MAX_ROWS]]))
        return
    members = [v for v in value.values() if isinstance(v, dict) and v]
    if value and len(members) == len(value) and all(all(_scalar(x) for x in v.values()) for v in members):
        header = list(dict.fromkeys(k for v in members for k in v))
        rows = [[str(name), *(_cell(v.get(k)) for k in header)] for name, v in list(value.items())[:MAX_ROWS]]
        out.append(Table(path, ["", *header], rows))
        return
    scalars = [[str(k), _cell(v)] for k, v in value.items() if _flat(v)]
    if scalars:
        out.append(Table(path, ["key", "value"], scalars))
    for key, v in value.items():
        if not _flat(v):
            _tables(v, f"{path} / {key}" if path else str(key), out)


def benchmark_section(obj: Any, name: str) -> Section:
    """A section of any benchmark JSON (``name``: its file name): its records and groups of values as tables."""
    tables: list[Table] = []
    _tables(obj, "", tables)
    for t in tables:
        t.title = t.title or "summary"
    title = str(obj.get("benchmark", name)) if isinstance(obj, dict) else name
    return Section(domain=name, title=f"benchmark results: {title}", tables=tables)


def read_sections(path: str | os.PathLike[str]) -> list[Section]:
    """The sections of one JSON file: a report's ``results.json`` as written, any other JSON as one
    ``benchmark_section``. ``ValueError`` (one line, naming the file) when it cannot be read or parsed."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {p}: {e.strerror if isinstance(e, OSError) else e}") from None
    if isinstance(obj, dict) and "polyquant_report" in obj:
        if obj["polyquant_report"] != REPORT_SCHEMA or not isinstance(obj.get("sections"), list):
            raise ValueError(f"{p}: report schema {obj['polyquant_report']!r} is not {REPORT_SCHEMA} (or no sections)")
        return [Section.from_json(s, f"{p} section {i}") for i, s in enumerate(obj["sections"])]
    return [benchmark_section(obj, p.stem)]


# ---- the page


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1100px;padding:0 1.2em 3em;
color:#1d1d1f;line-height:1.45}
h1{margin:1em 0 .2em}h2{margin:2em 0 .3em;border-bottom:2px solid #ddd;padding-bottom:.2em}
nav a{margin-right:1em}.meta{color:#666;font-size:.9em}.headline{font-weight:600}
.reduced{color:#7a5b00;font-size:.9em}.error{background:#fde8e8;border:1px solid #e0a0a0;padding:.6em;
white-space:pre-wrap;font-family:monospace}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}caption{text-align:left;font-weight:600;
padding:.3em 0}th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#555;font-size:.85em;
margin:.2em 0 1em}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#444}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""


def _is_number(text: str) -> bool:
    t = text.strip().rstrip("%x").replace(",", "")
    try:
        float(t)
    except ValueError:
        return False
    return bool(t)


def _anchor(i: int, domain: str) -> str:
    return f"s{i}-" + "".join(c if c.isalnum() else "-" for c in domain)[:40]


def _table_html(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th scope=\"col\">{e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{e(c)}</td>" if _is_number(c) else f"<td>{e(c)}</td>"
                                    for c in row) + "</tr>\n" for row in t.rows)
    note = f"<p class=\"note\">{e(t.note)}</p>\n" if t.note else ""
    return (f"<table>\n<caption>{e(t.title)}</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n"
            f"</table>\n{note}")


def _section_html(i: int, s: Section) -> str:
    e = html.escape
    out = [f"<section id=\"{_anchor(i, s.domain)}\">\n<h2>{e(s.domain)}</h2>\n"]
    if s.title:
        out.append(f"<p>{e(s.title)}</p>\n")
    if s.headline:
        out.append(f"<p class=\"headline\">{e(s.headline)}</p>\n")
    if s.reduced:
        out.append(f"<p class=\"reduced\">Reduced settings: {e(s.reduced)}</p>\n")
    if s.error:
        out.append(f"<div class=\"error\" role=\"alert\">This demo failed: {e(s.error)}</div>\n")
    out += [_table_html(t) for t in s.tables]
    for f in s.figures:
        data = base64.b64encode(f.png).decode("ascii")
        caption = e(f.title) + (f" &mdash; {e(f.caption)}" if f.caption else "")
        out.append(f"<figure>\n<img src=\"data:image/png;base64,{data}\" alt=\"{e(f.title)}\">\n"
                   f"<figcaption>{caption}</figcaption>\n</figure>\n")
    out += [f"<p class=\"note\">{e(n)}</p>\n" for n in s.notes]
    if s.text:
        out.append(f"<pre>{e(s.text)}</pre>\n")
    if s.seconds is not None:
        out.append(f"<p class=\"meta\">{s.seconds:.1f} s</p>\n")
    out.append("</section>\n")
    return "".join(out)


def render_html(sections: Sequence[Section], title: str = "polyquant report", meta: str = "") -> str:
    """The page: a title, a line of ``meta`` (where and when it ran), links to the sections, then each section
    (a failed one shows its error). One self-contained HTML5 document."""
    e = html.escape
    nav = " ".join(f"<a href=\"#{_anchor(i, s.domain)}\">{e(s.domain)}</a>" for i, s in enumerate(sections))
    failed = [s.domain for s in sections if s.error]
    status = f"{len(sections)} sections" + (f", failed: {', '.join(failed)}" if failed else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<header>\n<h1>{e(title)}</h1>\n"
            f"<p class=\"meta\">{e(meta)}{' &middot; ' if meta else ''}{e(status)}</p>\n<nav>{nav}</nav>\n"
            "</header>\n<main>\n" + "".join(_section_html(i, s) for i, s in enumerate(sections)) +
            "</main>\n</body>\n</html>\n")


def default_meta() -> str:
    """Where and when: the polyquant version, Python, torch, the platform and the time (UTC)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pq = version("polyquant")
    except PackageNotFoundError:
        pq = "unknown"
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return (f"polyquant {pq}, Python {platform.python_version()}, torch {torch_version}, {platform.platform()}, "
            f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` (mode 0666 less the umask), then replace ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_report_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, checked before any work: it is a folder or can be one (its parent exists);
    ``ValueError`` otherwise."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise ValueError(f"report folder {p} exists and is not a folder")
    if not p.exists() and not p.parent.resolve().is_dir():
        raise ValueError(f"report folder {p}: its parent folder does not exist")
    return p


def write_report(sections: Sequence[Section], folder: str | os.PathLike[str], title: str = "polyquant report",
                 meta: str | None = None) -> Path:
    """Write ``index.html`` and ``results.json`` (``polyquant report`` renders it again) into ``folder``
    (created; other files there are left alone; each file replaced whole). Returns the page's path."""
    p = check_report_folder(folder)
    p.mkdir(exist_ok=True)
    meta = default_meta() if meta is None else meta
    results = {"polyquant_report": REPORT_SCHEMA, "title": title, "meta": meta,
               "sections": [s.to_json() for s in sections]}
    _write_atomic(p / "results.json", json.dumps(results, indent=1) + "\n")
    _write_atomic(p / "index.html", render_html(sections, title, meta))
    return p / "index.html"
