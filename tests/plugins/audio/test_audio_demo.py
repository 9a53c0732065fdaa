"""``polyquant demo audio``: every row with sane numbers and the spectrogram plot written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_table_and_spectrograms(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from polyquant.plugins.audio.demo import run_demo

    table = run_demo(clips=2, calib_clips=4, out_dir=str(tmp_path))
    rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(\S.*?) {2,}(\d+\.\d+) +(\d+\.\d+) ", table, re.M)}
    assert len(rows) == 10, table  # 3 + 2 level rows of the shipped codecs, 5 methods
    assert rows["tiny-rvq, first 4 level(s)"][0] == 2.0 and rows["tiny-rvq, first 1 level(s)"][0] == 0.5
    assert rows["tiny-grvq, first 2 level(s)"][0] == 2.0
    # more levels, closer spectra: 2 kbps beats 0.5 kbps on the mel distance
    assert rows["tiny-rvq, first 4 level(s)"][1] < rows["tiny-rvq, first 1 level(s)"][1]
    assert all(0 < mel < 10 for _, mel in rows.values())
    assert (tmp_path / "spectrograms.png").stat().st_size > 10_000 and str(tmp_path / "spectrograms.png") in table
