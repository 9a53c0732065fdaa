"""``polyquant.progress``: bars in a terminal, one line per step inside ``line_progress()``, silence otherwise."""

from __future__ import annotations

import pytest

from polyquant.progress import line_progress, lines_enabled, progress_bar, progress_iter


def test_silent_outside_line_progress(capsys: pytest.CaptureFixture[str]) -> None:
    assert not lines_enabled()
    assert list(progress_iter([1, 2, 3], desc="steps", bars=False)) == [1, 2, 3]
    bar = progress_bar(total=4, desc="work", bars=False)
    bar.update(2, step="a")
    bar.close()
    assert capsys.readouterr().err == ""


def test_one_line_per_step_inside_line_progress(capsys: pytest.CaptureFixture[str]) -> None:
    with line_progress():
        assert lines_enabled()
        assert list(progress_iter(["x", "y"], desc="units", bars=False, step=str.upper)) == ["x", "y"]
        bar = progress_bar(total=8, desc="calibrating", bars=False, percent=True)
        bar.update(2, step="blocks.0")
        bar.update(6, step="blocks.1")
    assert not lines_enabled()
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["units: 1/2 X", "units: 2/2 Y", "calibrating: 25% blocks.0",
                                                  "calibrating: 100% blocks.1"]
    assert all(ln.endswith(" s)") for ln in lines)


def test_line_progress_can_be_off(capsys: pytest.CaptureFixture[str]) -> None:
    with line_progress(False):
        list(progress_iter([1], desc="steps", bars=False))
    assert capsys.readouterr().err == ""
