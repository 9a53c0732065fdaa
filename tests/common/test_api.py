"""polyquant.api pieces that need no plugin: the load's probe forward (``check_restored``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyquant.api import check_restored
from polyquant.artifact import ArtifactError


def test_check_restored_names_the_module_that_does_not_run() -> None:
    # Issue 21, class 1: tensors that pass their own checks but not together (a layer of another width) raised a
    # raw RuntimeError at the user's first call; the load's probe names the innermost module instead.
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(6, 2)))
    with pytest.raises(ArtifactError, match=r"does not run: 1\.1: RuntimeError: mat1 and mat2"):
        check_restored(model, torch.zeros(1, 4))
    model[1][1] = nn.Linear(8, 2)
    check_restored(model, torch.zeros(1, 4))


def test_check_restored_refuses_non_finite_outputs() -> None:
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        check_restored(model, {"input": torch.zeros(3, 4)})
