"""The command line starts without torch where it does not need it: ``polyquant --help``, ``list`` and ``search``
up to the point where a store must be loaded (argument checks, a missing file) import no torch (2.7 s warm)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polyquant.cli import main
from polyquant.plugins.embeddings.data import example_vectors

SCRIPT = """
import json, sys

from polyquant.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    results.append([code, "torch" in sys.modules])
print(json.dumps(results))
"""


def test_help_list_and_search_checks_import_no_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "q.npy", example_vectors(2, 32).numpy())
    store = str(tmp_path / "s.pqs")
    assert main(["quantize", "embeddings/int8", "--quiet", "--out", store]) == 0  # 512 example vectors of 32 dims
    capsys.readouterr()
    cases = [  # (argv, exit code, whether torch is imported by then); one process, so torch stays once imported
        (["--help"], 0, False),
        (["list"], 0, False),
        (["list", "--json"], 0, False),
        (["info", "embeddings"], 0, False),
        (["search", "--help"], 0, False),
        (["search", str(tmp_path / "missing.pqs"), "a query"], 2, False),
        (["search", store, "--help"], 0, False),
        (["search", store, "-k", "0"], 2, False),
        (["search", store, "a query", "-k", "-1"], 2, False),
        (["search", store, "a query", "--rescore", "0"], 2, False),
        (["search", store], 2, False),  # neither a query nor --queries
        (["search", store, "--queries", str(tmp_path / "q.npy"), "-k", "1"], 0, True),  # the search itself needs it
    ]
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([argv for argv, _, _ in cases])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results == [[code, torch] for _, code, torch in cases], done.stderr
    assert "argument -k: expected a positive integer, got '0'" in done.stderr
    assert "missing.pqs: cannot read file" in done.stderr
