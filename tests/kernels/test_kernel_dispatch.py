"""Dispatch: POLYQUANT_KERNELS, the optional triton import, and the lazy package exports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_checks import compiled_triton_skip_reason, use_compiled_triton

import polyquant.kernels as K
from polyquant.kernels import _dispatch


def test_auto_uses_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYQUANT_KERNELS", raising=False)
    assert _dispatch.kernel_preference() == "auto"
    assert not _dispatch.use_triton(torch.zeros(2))


def test_torch_forces_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYQUANT_KERNELS", "torch")
    assert not _dispatch.use_triton(torch.zeros(2))


def test_invalid_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYQUANT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="POLYQUANT_KERNELS"):
        _dispatch.use_triton(torch.zeros(2))


def test_forced_triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYQUANT_KERNELS", "TRITON")  # case-insensitive
    if not _dispatch.HAS_TRITON:
        with pytest.raises(RuntimeError, match="cannot be imported"):
            _dispatch.use_triton(torch.zeros(2))
    elif _dispatch.interpreting():
        assert _dispatch.use_triton(torch.zeros(2), None)
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _dispatch.use_triton(torch.zeros(2))


def test_forced_triton_runs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the path forced, the public function must reach the Triton launcher."""
    if not (_dispatch.HAS_TRITON and _dispatch.interpreting()):
        pytest.skip("needs the Triton interpreter")
    from polyquant.kernels import quant

    called = []
    real = quant.quantize_triton
    monkeypatch.setattr(quant, "quantize_triton", lambda *a, **kw: called.append(1) or real(*a, **kw))
    monkeypatch.setenv("POLYQUANT_KERNELS", "triton")
    quant.quantize(torch.randn(4, 8), 0.1)
    assert called == [1]
    monkeypatch.setenv("POLYQUANT_KERNELS", "torch")
    quant.quantize(torch.randn(4, 8), 0.1)
    assert called == [1]


def test_gpu_test_setup_forces_triton(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU-marked tests get POLYQUANT_KERNELS=triton even when the environment says torch (they would compare the
    reference with itself), through an autouse fixture of tests/kernels/conftest.py."""
    assert "_gpu_tests_use_compiled_triton" in request.fixturenames
    monkeypatch.setenv("POLYQUANT_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read by interpreting() at call time; no kernel runs here
    monkeypatch.setattr(_dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as the set-up sees it
    assert compiled_triton_skip_reason() is None
    use_compiled_triton(monkeypatch)
    assert os.environ["POLYQUANT_KERNELS"] == "triton" and _dispatch.kernel_preference() == "triton"


@pytest.mark.parametrize("missing", ["interpreter", "triton", "cuda"])
def test_gpu_test_setup_skips(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    """GPU-marked tests are skipped under the Triton interpreter, without triton and without CUDA."""
    monkeypatch.setenv("POLYQUANT_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if missing == "interpreter" else "0")
    monkeypatch.setattr(_dispatch, "HAS_TRITON", missing != "triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: missing != "cuda")
    expected = {"interpreter": "TRITON_INTERPRET=1", "triton": "not installed", "cuda": "CUDA"}[missing]
    with pytest.raises(pytest.skip.Exception, match=expected):
        use_compiled_triton(monkeypatch)
    assert os.environ["POLYQUANT_KERNELS"] == "torch"


def test_lazy_exports() -> None:
    for name in K.__all__:
        assert getattr(K, name) is not None
    with pytest.raises(AttributeError):
        K.not_a_kernel  # noqa: B018
    assert "fwht" in dir(K)


def test_imports_without_triton() -> None:
    """A broken triton (ImportError here; OSError / RuntimeError are caught too) leaves the torch paths working."""
    code = textwrap.dedent(
        """
        import os, sys
        sys.modules["triton"] = None  # import triton -> ImportError
        os.environ.pop("POLYQUANT_KERNELS", None)
        import torch
        import polyquant.kernels as K
        from polyquant.kernels import _dispatch, gemm, hadamard, hamming, quant, vq
        assert not _dispatch.HAS_TRITON
        x = torch.randn(3, 16)
        assert quant.quantize(x, 0.1).dtype == torch.int8
        assert hadamard.fwht(x).shape == x.shape
        os.environ["POLYQUANT_KERNELS"] = "triton"
        try:
            quant.quantize(x, 0.1)
        except RuntimeError as err:
            assert "cannot be imported" in str(err)
        else:
            raise AssertionError("expected RuntimeError")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
