"""``data``: ``.npy`` vectors and text files are opened as artifacts are (regular files, a size bound), and every
.npy layout numpy writes still loads, memory-mapped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from polyquant.plugins.embeddings.data import load_vectors, read_texts


def test_npy_layouts_load_memory_mapped(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    cases = {
        "c": x,
        "fortran": np.asfortranarray(x),
        "f64": x.astype(np.float64),
        "f16": x.astype(np.float16),
        "big_endian": x.astype(">f4"),
        "empty": np.empty((0, 3), dtype=np.float32),
    }
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        loaded = load_vectors(tmp_path / f"{name}.npy")
        assert loaded.shape == array.shape and np.array_equal(loaded.numpy(), array.astype(loaded.numpy().dtype))
    assert load_vectors(tmp_path / "c.npy").dtype == torch.float32
    assert load_vectors(tmp_path / "f64.npy").dtype == torch.float64


def test_npy_files_that_are_not_vectors(tmp_path: Path) -> None:
    np.save(tmp_path / "ints.npy", np.zeros((2, 3), dtype=np.int32))
    np.save(tmp_path / "objects.npy", np.array([[None]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "one.npy", np.zeros(3, dtype=np.float32))
    np.save(tmp_path / "good.npy", np.ones((4, 3), dtype=np.float32))
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:-5])
    (tmp_path / "text.npy").write_text("not numpy")
    cases = [("ints", "expected float vectors \\(N, D\\), got int32 \\(2, 3\\)"),
             ("objects", "expected float vectors"), ("one", "expected float vectors"),
             ("truncated", "cannot read a .npy array"), ("text", "cannot read a .npy array")]
    for name, message in cases:
        with pytest.raises(ValueError, match=f"{name}.npy: .*{message}"):
            load_vectors(tmp_path / f"{name}.npy")


@pytest.mark.usefixtures("deadline")
def test_only_regular_files_within_the_size_bound(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.ones((4, 3), dtype=np.float32))
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    size = (tmp_path / "v.npy").stat().st_size
    assert load_vectors(tmp_path / "v.npy", max_bytes=size).shape == (4, 3)
    with pytest.raises(ValueError, match=f"v.npy: the file is {size:,} bytes, more than the {size - 1:,} allowed"):
        load_vectors(tmp_path / "v.npy", max_bytes=size - 1)
    texts, ids = read_texts(tmp_path / "t.txt", max_bytes=9)
    assert texts == ["one", "two"] and ids.tolist() == [0, 2]
    with pytest.raises(ValueError, match="t.txt: the file is 9 bytes, more than the 8 allowed"):
        read_texts(tmp_path / "t.txt", max_bytes=8)
    os.mkfifo(tmp_path / "fifo.npy")
    for read in (load_vectors, read_texts):
        with pytest.raises(ValueError, match="fifo.npy: is a FIFO, not a regular file"):
            read(tmp_path / "fifo.npy")
        with pytest.raises(ValueError, match="is a directory, not a regular file"):
            read(tmp_path)
