"""Fixtures for the kernel tests.

Triton-vs-reference tests run on ``kdevice``: CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported), or CUDA tensors with compiled kernels when
POLYQUANT_TRITON_NATIVE=1 on a GPU machine. ``triton_path`` forces the Triton path through the public dispatch.

Tests marked ``gpu`` check the compiled kernels on large CUDA inputs: ``_gpu_tests_use_compiled_triton`` (autouse)
forces ``POLYQUANT_KERNELS=triton`` for them, whatever the environment says, and skips them under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import use_compiled_triton

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


@pytest.fixture(autouse=True)
def _gpu_tests_use_compiled_triton(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU-marked tests run the compiled Triton kernels: skipped without them, the Triton path forced."""
    if request.node.get_closest_marker("gpu") is not None:
        use_compiled_triton(monkeypatch)
