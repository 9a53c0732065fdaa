"""Fixtures for the kernel tests.

Triton-vs-reference tests run on ``kdevice``: CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported), or CUDA tensors with compiled kernels when
POLYQUANT_TRITON_NATIVE=1 on a GPU machine. ``triton_path`` forces the Triton path through the public dispatch.
"""

from __future__ import annotations

import pytest
import torch

from polyquant.kernels._dispatch import HAS_TRITON, interpreting


@pytest.fixture
def kdevice() -> str:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if interpreting():
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    return "cuda"


@pytest.fixture
def triton_path(monkeypatch: pytest.MonkeyPatch, kdevice: str) -> str:
    """Force the Triton path of the dispatching functions; returns the device to put tensors on."""
    monkeypatch.setenv("POLYQUANT_KERNELS", "triton")
    return kdevice


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYQUANT_KERNELS", "torch")

