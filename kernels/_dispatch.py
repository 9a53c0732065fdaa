"""Kernel dispatch: Triton on CUDA tensors, the pure-torch reference elsewhere.

``POLYQUANT_KERNELS`` forces a path:

| value            | path                                                                              |
|------------------|-----------------------------------------------------------------------------------|
| unset / ``auto`` | Triton when triton imports and every tensor argument is on CUDA, else the reference |
| ``torch``        | always the reference                                                              |
| ``triton``       | always Triton; an error if triton is missing, or if tensors are not on CUDA and the |
|                  | interpreter (``TRITON_INTERPRET=1``, read when triton is imported) is off           |

Triton is an optional dependency: importing this module never fails. The import guard also catches ``OSError``
and ``RuntimeError``, which a triton built against another driver or torch raises at import time.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

ENV_VAR = "POLYQUANT_KERNELS"
_CHOICES = ("auto", "torch", "triton")

triton: Any
tl: Any
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: BaseException | None = None
except (ImportError, OSError, RuntimeError) as _err:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = _err


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_preference() -> str:
    """The path asked for by ``POLYQUANT_KERNELS``: ``auto``, ``torch`` or ``triton``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_CHOICES)}")
    return value


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op should run its Triton kernel on these tensors (``None`` entries are ignored).

    Raises:
        RuntimeError: ``POLYQUANT_KERNELS=triton`` but triton cannot be imported, or the tensors are not on
            CUDA and the Triton interpreter is off.
    """
    pref = kernel_preference()
    if pref == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if pref == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError(
            f"{ENV_VAR}=triton but triton cannot be imported ({TRITON_IMPORT_ERROR!r}); "
            "install polyquant[kernels] or unset the variable"
        )
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or move the tensors to CUDA"
        )
    return True


def require_triton() -> None:
    """Raise a clear error when a Triton launcher is called without triton."""
    if not HAS_TRITON:
        raise RuntimeError(f"this kernel needs triton, which cannot be imported ({TRITON_IMPORT_ERROR!r})")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View (..., K) as (M, K), M = prod(...) (also when K = 0)."""
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension (..., K)")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel should do its tile arithmetic in for inputs of ``dtype``.

    bf16 arithmetic is wrong in the Triton interpreter, so there bf16 tiles are widened to fp32 after loading.
    """
    if dtype == torch.bfloat16 and interpreting():
        return torch.float32
    return dtype


def tl_dtype(dtype: torch.dtype) -> Any:
    """The ``triton.language`` dtype for a torch dtype."""
    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.int8: tl.int8,
        torch.uint8: tl.uint8,
        torch.int32: tl.int32,
    }[dtype]
