"""Float checkpoints: round trip, and every file that is not a readable safetensors checkpoint refused with a
one-line ``ValueError`` (``FileNotFoundError`` when missing), the errors a plugin's ``--model`` turns into usage
errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from polyquant.artifact import MAX_RANK
from polyquant.checkpoint import read_checkpoint, read_checkpoint_metadata, save_checkpoint



def _raw_safetensors(path: Path, shape: list[int], nbytes: int) -> Path:
    header = {"__metadata__": {"polyquant_model": "{}"}, "w": {"dtype": "U8", "shape": shape,
                                                               "data_offsets": [0, nbytes]}}
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"\0" * nbytes)
    return path


def test_roundtrip(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "m.safetensors", {"k": "v"})
    tensors, metadata = read_checkpoint(path)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and metadata == {"k": "v"}


@pytest.mark.usefixtures("deadline")
def test_non_checkpoints_are_one_line_value_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello world")
    pickle_file = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, pickle_file)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    deep = _raw_safetensors(tmp_path / "deep.safetensors", [1] * 100_000, 1)
    cases = [(text, "not a safetensors checkpoint"), (pickle_file, "not a safetensors checkpoint"),
             (fifo, "not a regular file"), (folder, "not a regular file"), (deep, "100000 dimensions")]
    for path, match in cases:
        for read in (read_checkpoint, read_checkpoint_metadata):
            with pytest.raises(ValueError, match=match) as info:
                read(path)
            assert "\n" not in str(info.value)
    assert _raw_safetensors(tmp_path / "ok.safetensors", [1] * MAX_RANK, 1).exists()
    assert read_checkpoint(tmp_path / "ok.safetensors")[0]["w"].dim() == MAX_RANK
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "missing.safetensors")
