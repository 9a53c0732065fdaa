"""Lazy re-exports for packages whose names live in submodules (``polyquant.kernels``, plugin packages).

    # mypackage/__init__.py
    _EXPORTS = {"fwht": "hadamard", "vq_assign": "vq"}     # name -> submodule holding it
    __all__ = sorted(_EXPORTS)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=("hadamard", "vq"))

A name is imported from its submodule on first access and cached in the package's namespace, so importing the
package stays light (no optional dependency is imported until a name that needs it is used). ``submodules`` names
submodules reachable as attributes (``package.hadamard``) without an explicit import: the first access imports it
(the import system then sets the attribute). Without it, ``package.sub`` is an ``AttributeError`` until something
has imported ``package.sub``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package`` (its ``__name__``), re-exporting each name of
    ``exports`` from ``package.<submodule>`` and importing each of ``submodules`` as ``package.<name>`` on first
    access; unknown names raise ``AttributeError`` as a module does."""
    subs = frozenset(submodules)
    clash = subs & set(exports)
    if clash:
        raise ValueError(f"{package}: names both exported and submodules: {sorted(clash)}")

    def __getattr__(name: str) -> Any:
        if name in subs:
            return importlib.import_module(f"{package}.{name}")  # the import system sets the package attribute
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | subs)

    return __getattr__, __dir__
