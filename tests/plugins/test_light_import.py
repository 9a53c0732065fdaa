"""Light imports: a plugin's spec module, discovery and ``import polyquant`` itself import no torch (issue 20).

A plugin's entry point names a ``PluginSpec`` in a light module (``from polyquant.plugins import PluginSpec``), and
Python runs ``polyquant/__init__.py`` before ``polyquant.plugins``: so the top-level package re-exports its public
names lazily (``polyquant.lazy.lazy_exports``), and they must still resolve to the objects of their modules.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import polyquant
from polyquant.plugins import ENTRY_POINT_GROUP

HEAVY = ("torch", "triton", "numpy", "timm", "diffusers", "transformers", "sklearn", "torchaudio", "safetensors",
         "scipy")

# Every built-in plugin's entry-point module (the module discovery imports), and every plugins/*/spec.py.
_PLUGINS_DIR = Path(importlib.import_module("polyquant.plugins").__file__).parent  # type: ignore[arg-type]
_BUILTIN_EPS = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist and ep.dist.name == "polyquant"]
SPEC_MODULES = sorted(
    {ep.value.partition(":")[0] for ep in _BUILTIN_EPS}
    | {f"polyquant.plugins.{p.parent.name}.spec" for p in _PLUGINS_DIR.glob("*/spec.py")}
)


def _importtime_chains(stderr: str) -> list[str]:
    """From ``-X importtime`` output: for each heavy top-level module imported, the chain of importers above it
    (``torch <- polyquant.api <- polyquant``), with its cumulative time."""
    rows = []  # (depth, name, cumulative us), in completion order: children before their parent
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if not cumulative.strip().isdigit():
            continue  # the header line
        rows.append(((len(name) - len(name.lstrip(" ")) - 1) // 2, name.strip(), int(cumulative)))
    chains = []
    for i, (depth, name, cumulative) in enumerate(rows):
        if name not in HEAVY:
            continue
        chain, want = [name], depth
        for parent_depth, parent, _ in rows[i + 1 :]:  # the parent is the next row that is less deep
            if parent_depth < want:
                chain.append(parent)
                want = parent_depth
                if want == 0:
                    break
        chains.append(f"{' <- '.join(chain)} ({cumulative / 1e6:.2f} s cumulative)")
    return chains


def _run_light(body: str) -> dict:
    """Run ``body`` in a fresh interpreter under ``-X importtime``; it must leave a JSON-able ``result``. Returns
    {"result": ..., "heavy": [heavy top-level modules in sys.modules], "chains": [who imported them]}."""
    code = textwrap.dedent(body) + textwrap.dedent(f"""
        import json as _json, sys as _sys
        _heavy = sorted(m for m in _sys.modules if m.split(".")[0] in {HEAVY!r} and "." not in m)
        print(_json.dumps({{"result": result, "heavy": _heavy}}))
    """)
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr[-4000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    found["chains"] = _importtime_chains(out.stderr)
    return found


def test_plugin_spec_and_import_polyquant_import_no_torch() -> None:
    found = _run_light(f"""
        import sys
        from polyquant.plugins import PluginSpec, discover
        import polyquant
        for name in {SPEC_MODULES!r}:
            __import__(name)
        result = {{"torch": "torch" in sys.modules, "version": polyquant.__version__}}
    """)
    assert SPEC_MODULES, "no built-in plugin spec module found"
    assert found["result"] == {"torch": False, "version": polyquant.__version__}, found["chains"]
    assert found["heavy"] == [], f"heavy modules imported: {found['heavy']}; importers: {found['chains']}"


def test_discover_imports_no_torch() -> None:
    """discover() reads entry points, imports the spec modules and checks requirements from metadata only."""
    found = _run_light("""
        import sys
        from polyquant.plugins import discover
        plugins = discover(refresh=True)
        result = {"torch": "torch" in sys.modules, "plugins": {n: i.error for n, i in plugins.items()}}
    """)
    builtin = {m.split(".")[2] for m in SPEC_MODULES}
    assert builtin <= set(found["result"]["plugins"]), found["result"]
    # a built-in plugin may be listed with an unmet requirement (timm missing), never with a broken entry point
    for name in builtin:
        error = found["result"]["plugins"][name]
        assert error is None or error.startswith(("missing requirement", "disabled by")), (name, error)
    assert found["result"]["torch"] is False, found["chains"]
    assert found["heavy"] == [], f"heavy modules imported: {found['heavy']}; importers: {found['chains']}"


def test_every_public_name_resolves_to_its_module_object() -> None:
    exports = polyquant._EXPORTS
    assert set(polyquant.__all__) == set(exports) | {"__version__"}
    assert len(polyquant.__all__) == len(set(polyquant.__all__))
    for name in polyquant.__all__:
        value = getattr(polyquant, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        module = importlib.import_module(f"polyquant.{exports[name]}")
        assert value is getattr(module, name), name
    assert set(polyquant.__all__) <= set(dir(polyquant))
    namespace: dict = {}
    exec("from polyquant import *", namespace)  # noqa: S102
    assert set(namespace) - {"__builtins__"} == set(polyquant.__all__)
    assert polyquant.quantize is importlib.import_module("polyquant.api").quantize
    with pytest.raises(AttributeError, match="module 'polyquant' has no attribute 'nope'"):
        polyquant.nope  # noqa: B018
    assert not hasattr(polyquant, "nope")


def test_submodules_are_attributes_in_a_fresh_process() -> None:
    """``import polyquant as pq; pq.api.MethodExample`` works without importing ``polyquant.api`` first, for every
    submodule of the package (polyquant/__init__.py lists its folder, subpackages too, plus the kernels and
    plugins subpackages)."""
    folder = Path(polyquant.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "__main__"}
    modules |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}  # subpackages: integrations
    assert set(polyquant._SUBMODULES) == modules | {"kernels", "plugins"}
    assert set(polyquant._SUBMODULES) <= set(dir(polyquant))
    found = _run_light(f"""
        import sys
        import polyquant as pq
        lazy = "torch" not in sys.modules and "polyquant.api" not in sys.modules
        example = pq.api.MethodExample.__module__
        same = all(getattr(pq, n) is sys.modules["polyquant." + n] for n in {sorted(polyquant._SUBMODULES)!r})
        result = {{"lazy": lazy, "example": example, "same": same}}
    """)
    assert found["result"] == {"lazy": True, "example": "polyquant.api", "same": True}


def test_lazy_exports_submodules() -> None:
    from polyquant.lazy import lazy_exports

    getattr_, dir_ = lazy_exports("polyquant", {}, submodules=("pack",))
    assert getattr_("pack") is importlib.import_module("polyquant.pack") and "pack" in dir_()
    with pytest.raises(ValueError, match="both exported and submodules"):
        lazy_exports("polyquant", {"pack": "pack"}, submodules=("pack",))
