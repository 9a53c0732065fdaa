"""Float checkpoints that plugins ship or users hand in: safetensors with string metadata, written atomically.

    save_checkpoint(model.state_dict(), "model.safetensors", {"polyquant_model": json.dumps(config)})
    tensors, metadata = read_checkpoint("model.safetensors")

Unlike artifacts (``polyquant.artifact``: quantized models, a checked manifest), a checkpoint is a plain
safetensors file any reader opens; the metadata is ``str -> str`` (callers encode JSON themselves).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

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
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors checkpoint (tensors are not read)."""
    from safetensors import safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} is not a safetensors checkpoint: {e}") from None


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors on CPU, string metadata) of a safetensors checkpoint."""
    from safetensors.torch import load_file

    metadata = read_checkpoint_metadata(path)
    tensors: dict[str, Tensor] = load_file(str(path), device="cpu")
    return tensors, metadata
