"""Float checkpoints that plugins ship or users hand in: safetensors with string metadata, written atomically.

    save_checkpoint(model.state_dict(), "model.safetensors", {"polyquant_model": json.dumps(config)})
    tensors, metadata = read_checkpoint("model.safetensors")

Unlike artifacts (``polyquant.artifact``: quantized models, a checked manifest), a checkpoint is a plain
safetensors file any reader opens; the metadata is ``str -> str`` (callers encode JSON themselves).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from torch import Tensor

from .artifact import MAX_RANK

__all__ = ["save_checkpoint", "read_checkpoint", "read_checkpoint_metadata"]


def save_checkpoint(tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (detached, contiguous, on CPU) and ``metadata`` to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(data, str(tmp), metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_file(path: Path) -> None:
    """``FileNotFoundError`` for a missing path; ``ValueError`` for one that is not a regular file (a directory,
    FIFO or device: reading it would fail, block or never end)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file, so not a safetensors checkpoint")


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors checkpoint (tensors are not read).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (one line naming the file) for anything
    that is not a readable safetensors file, or has a tensor of more than ``MAX_RANK`` dimensions.
    """
    from safetensors import safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            ranks = {name: len(f.get_slice(name).get_shape()) for name in f.keys()}  # header only, no data
    except Exception as e:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} is not a safetensors checkpoint: {e}") from None
    deep = [name for name, rank in ranks.items() if rank > MAX_RANK]
    if deep:
        raise ValueError(f"{path}: tensor {deep[0]!r} has {ranks[deep[0]]} dimensions, more than "
                         f"MAX_RANK = {MAX_RANK}")
    return metadata


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors on CPU, string metadata) of a safetensors checkpoint; errors as ``read_checkpoint_metadata``."""
    from safetensors.torch import load_file

    metadata = read_checkpoint_metadata(path)
    try:
        tensors: dict[str, Tensor] = load_file(str(path), device="cpu")
    except Exception as e:  # the file changed since its header was read, or safetensors refuses its data
        raise ValueError(f"{path} is not a safetensors checkpoint: {e}") from None
    return tensors, metadata
