"""polyquant.lazy: names re-exported from submodules on first use."""

from __future__ import annotations

import sys
import types

import pytest

from polyquant.lazy import lazy_exports


def test_lazy_exports_import_on_first_use_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = types.ModuleType("fakepkg")
    sub = types.ModuleType("fakepkg.sub")
    sub.answer = 42  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fakepkg", pkg)
    monkeypatch.setitem(sys.modules, "fakepkg.sub", sub)
    getattr_, dir_ = lazy_exports("fakepkg", {"answer": "sub"})
    pkg.__getattr__ = getattr_  # type: ignore[attr-defined]
    assert "answer" in dir_() and "answer" not in vars(pkg)
    assert pkg.answer == 42  # type: ignore[attr-defined]
    assert vars(pkg)["answer"] == 42  # cached: the next access does not go through __getattr__
    with pytest.raises(AttributeError, match="module 'fakepkg' has no attribute 'missing'"):
        getattr_("missing")


def test_kernels_and_embeddings_packages_use_it() -> None:
    import polyquant.kernels as kernels
    import polyquant.plugins.embeddings as embeddings

    assert kernels.fwht.__module__ == "polyquant.kernels.hadamard"
    assert embeddings.EmbeddingStore.__module__ == "polyquant.plugins.embeddings.store"
    assert set(kernels.__all__) <= set(dir(kernels))
    with pytest.raises(AttributeError, match="module 'polyquant.kernels' has no attribute 'nope'"):
        kernels.nope  # noqa: B018
