"""Helpers shared by the kernel tests: the element-wise output check and the set-up of GPU-marked tests.

Imported by name (``from kernel_checks import ...``): pytest's default ``prepend`` import mode puts this folder on
``sys.path`` for its conftest and test modules.
"""

from __future__ import annotations

import pytest
import torch

from polyquant.kernels import _dispatch

# Relative tolerance of a kernel output against its reference, by output dtype: about two units in the last place
# (the kernel and the reference both accumulate in fp32 and round once, but may sum in another order, and
# half-precision inputs or scales round before the products).
RTOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, *, context: object = "") -> None:
    """Every element of ``out`` within ``rtol * (|ref| + max|ref|)`` of ``ref``, ``rtol = RTOL[out.dtype]``.

    Element-wise, so one wrong element fails (a norm-relative error over the whole tensor hides it). The
    absolute part is relative to the largest reference value: rounding errors of a sum scale with its terms, not
    with the (possibly cancelled) result.
    """
    rtol = RTOL[out.dtype]
    peak = ref.detach().abs().max().float().item() if ref.numel() else 0.0
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * peak,
                               msg=lambda m: f"{context}: {m}" if context != "" else m)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor: for a quantization error against the float result only.

    Not for a kernel against its reference: one wrong element barely moves the norm (``assert_kernel_close``).
    """
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compiled_triton_skip_reason() -> str | None:
    """Why the compiled Triton kernels cannot run here, or None when they can (triton, CUDA, no interpreter)."""
    if not _dispatch.HAS_TRITON:
        return "triton is not installed"
    if _dispatch.interpreting():
        return "TRITON_INTERPRET=1: GPU tests check the compiled kernels (set POLYQUANT_TRITON_NATIVE=1)"
    if not torch.cuda.is_available():
        return "compiled Triton kernels need a CUDA device"
    return None


def use_compiled_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set-up of a GPU-marked kernel test: skip unless compiled kernels can run, then force the Triton path.

    Forcing ``POLYQUANT_KERNELS=triton`` overrides a ``torch`` (or anything) in the environment, which would
    otherwise make the dispatching op run the reference and the test compare the reference with itself.
    """
    reason = compiled_triton_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
