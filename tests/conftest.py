"""Test-wide set-up.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports triton.
On a machine without CUDA we always run kernels in the interpreter; set POLYQUANT_TRITON_NATIVE=1 on a GPU
machine to test the compiled kernels instead.
"""

from __future__ import annotations

import os

if os.environ.get("POLYQUANT_TRITON_NATIVE") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
