"""``polyquant demo`` end to end, as ``make demo`` runs it: every installed plugin's demo at its default (reduced)
settings, the page with a section per domain, and that page opened in a real headless browser (Debian's chromium
driven by playwright, no browser download; skipped with the reason where either is missing)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from polyquant.cli import main
from polyquant.plugins import discover

DOMAINS = ("audio", "diffusion", "embeddings", "gaussians", "lidar", "ssm", "vit")


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, float]:
    folder = tmp_path_factory.mktemp("report") / "polyquant-report"
    t0 = time.perf_counter()
    code = main(["demo", "--out", str(folder), "--quiet"])
    return folder, code, time.perf_counter() - t0


def test_demo_writes_every_domain(demo_page: tuple[Path, int, float], parse_html: Any) -> None:
    from PIL import Image

    folder, code, seconds = demo_page
    available = [name for name, info in discover().items() if info.available and info.spec and info.spec.demo]
    assert set(DOMAINS) <= set(available)  # the test extra installs every plugin's requirements
    results = json.loads((folder / "results.json").read_text())
    sections = {s["domain"]: s for s in results["sections"]}
    assert code == 0, {d: s["error"] for d, s in sections.items() if s["error"]}
    assert list(sections) == available
    for domain in DOMAINS:
        s = sections[domain]
        assert s["title"] and s["headline"] and s["reduced"] and s["tables"] and s["figures"], domain
        for figure in s["figures"]:
            image = Image.open(io.BytesIO(base64.b64decode(figure["png_base64"])))
            assert image.width > 100 and image.height > 50, (domain, figure["title"])
            assert all(x and y for x, y in figure["axes"]), (domain, figure["title"])
    doc = parse_html((folder / "index.html").read_text())
    assert doc.errors == []
    assert len(doc.images) == sum(len(s["figures"]) for s in sections.values())
    assert seconds < 600  # the budget is 5 minutes on 2 cores; one worker thread here, another test beside it


def test_page_in_a_headless_browser(demo_page: tuple[Path, int, float]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt when it runs as root)")
    folder = demo_page[0]
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error"
                    else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: problems.append(f"network: {r.url}") if not r.url.startswith(
                ("file:", "data:")) else None)
            page.goto((folder / "index.html").resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth, e.naturalHeight, "
                       "e.getBoundingClientRect().width])")
            tables = page.eval_on_selector_all(
                "table", "els => els.map(e => [e.rows.length, e.getBoundingClientRect().height])")
            sections = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
            title = page.title()
        finally:
            browser.close()
    assert problems == []
    assert title == "polyquant report" and len(sections) >= len(DOMAINS)
    assert images and all(ok and w > 0 and h > 0 and shown > 0 for _, ok, w, h, shown in images), images
    assert tables and all(rows >= 2 and height > 0 for rows, height in tables), tables
