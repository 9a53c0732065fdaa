"""Lazy re-exports for packages whose names live in submodules (``polyquant.kernels``, plugin packages).

    # mypackage/__init__.py
    _EXPORTS = {"fwht": "hadamard", "vq_assign": "vq"}     # name -> submodule holding it
    __all__ = sorted(_EXPORTS)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

A name is imported from its submodule on first access and cached in the package's namespace, so importing the
package stays light (no optional dependency is imported until a name that needs it is used).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package`` (its ``__name__``), re-exporting each name of
    ``exports`` from ``package.<submodule>``; unknown names raise ``AttributeError`` as a module does."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
