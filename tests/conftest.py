"""Test-wide set-up.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports triton.
On a machine without CUDA we always run kernels in the interpreter; set POLYQUANT_TRITON_NATIVE=1 on a GPU
machine to test the compiled kernels instead.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

if os.environ.get("POLYQUANT_TRITON_NATIVE") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on two cores: each keeps one torch thread, so they do not oversubscribe.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny ops (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    faster and stable on a shared machine (two OpenMP threads on a busy machine made such modules several times
    slower); the count is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def deadline() -> Iterator[None]:
    """Fail (rather than hang the suite) if the test blocks for more than 10 s."""
    if not hasattr(signal, "SIGALRM"):
        pytest.skip("needs SIGALRM")

    def expire(*_: object) -> None:
        raise TimeoutError("blocked for more than 10 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _StrictHTML:
    """An HTML parser that records what a page holds and every nesting error (an end tag that closes nothing
    open, an element left open at the end)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, page: str) -> None:
        from html.parser import HTMLParser

        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: dict[str, int] = {}
        self.images: list[str] = []
        self.ids: list[str] = []
        self.doctype = ""
        outer = self

        class Parser(HTMLParser):
            def handle_decl(self, decl: str) -> None:
                outer.doctype = decl

            def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
                outer.tags[tag] = outer.tags.get(tag, 0) + 1
                a = dict(attrs)
                if tag == "img":
                    outer.images.append(a.get("src") or "")
                if "id" in a:
                    outer.ids.append(a["id"] or "")
                if tag not in outer.VOID:
                    outer.stack.append(tag)

            def handle_endtag(self, tag: str) -> None:
                if not outer.stack or outer.stack[-1] != tag:
                    outer.errors.append(f"</{tag}> closes {outer.stack[-1] if outer.stack else 'nothing'}")
                else:
                    outer.stack.pop()

        p = Parser(convert_charrefs=True)
        p.feed(page)
        p.close()
        if self.stack:
            self.errors.append(f"left open: {self.stack}")


@pytest.fixture()
def parse_html() -> type[_StrictHTML]:
    """``parse_html(page)``: the page's tags, images, ids and nesting errors (``.errors``, empty when valid)."""
    return _StrictHTML
