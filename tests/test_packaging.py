"""pyproject.toml against the source tree: packages, plugin entry points and package data; then a real wheel.

setuptools does not discover packages under a custom package-dir, so the package list is explicit; these tests
keep it, the plugin entry points and the package data in step with the folders.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

from polyquant.plugins import ENTRY_POINT_GROUP, PluginSpec

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]  # import name -> folder, e.g. "polyquant.plugins" -> "plugins"
PACKAGES: list[str] = SETUPTOOLS["packages"]
PLUGIN_ENTRY_POINTS: dict[str, str] = PYPROJECT["project"]["entry-points"].get(ENTRY_POINT_GROUP, {})
NOT_DATA = {".py", ".pyc", ".md"}  # files that are not package data: code, bytecode, notes for developers


def _folder(package: str) -> Path:
    """The source folder of a package under the package-dir mapping (the longest mapped prefix wins)."""
    for prefix in sorted(PACKAGE_DIR, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / PACKAGE_DIR[prefix] / Path(*package[len(prefix):].split(".")[1:])
    raise AssertionError(f"{package} is not under any package-dir root")


def _package(folder: Path) -> str:
    """The import name of a source folder (inverse of ``_folder``)."""
    rel = folder.relative_to(ROOT)
    for name, root in PACKAGE_DIR.items():
        if rel.parts[: len(Path(root).parts)] == Path(root).parts:
            return ".".join([name, *rel.parts[len(Path(root).parts):]])
    raise AssertionError(f"{folder} is not under any package-dir root")


def _source_packages() -> set[str]:
    inits = [init for top in PACKAGE_DIR.values() for init in (ROOT / top).rglob("__init__.py")]
    return {_package(init.parent) for init in inits if "__pycache__" not in init.parts}


def _data_files(package: str, folder: Path) -> set[Path]:
    """Files under ``folder`` that setuptools ships as package data of ``package`` (the same glob as setuptools)."""
    package_data = SETUPTOOLS.get("package-data", {})
    patterns = [*package_data.get("*", []), *package_data.get(package, [])]
    return {Path(f) for p in patterns for f in glob.glob(str(folder / p), recursive=True) if Path(f).is_file()}


def _expected_wheel_files(root: Path = ROOT) -> set[str]:
    """Paths inside the wheel (``polyquant/...``) that the source tree at ``root`` should produce."""
    files = set()
    for package in PACKAGES:
        folder = root / _folder(package).relative_to(ROOT)
        prefix = Path(*package.split("."))
        files |= {str(prefix / f.name) for f in folder.glob("*.py")}
        files |= {str(prefix / f.relative_to(folder)) for f in _data_files(package, folder)}
    return files


def test_package_list_matches_folders() -> None:
    listed, found = set(PACKAGES), _source_packages()
    assert not found - listed, f"folders with __init__.py missing from [tool.setuptools] packages: {found - listed}"
    assert not listed - found, f"packages listed in pyproject.toml without a folder: {listed - found}"
    assert len(PACKAGES) == len(listed), "a package is listed twice"


def test_every_plugin_folder_has_an_entry_point_and_vice_versa() -> None:
    folders = {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}
    declared = set(PLUGIN_ENTRY_POINTS)
    assert not folders - declared, f"plugin folders without an entry point in pyproject.toml: {folders - declared}"
    assert not declared - folders, f"entry points without a plugin folder: {declared - folders}"


@pytest.mark.parametrize("name", sorted(PLUGIN_ENTRY_POINTS))
def test_plugin_entry_point_targets_its_spec(name: str) -> None:
    target = PLUGIN_ENTRY_POINTS[name]
    module, _, attr = target.partition(":")
    assert module == f"polyquant.plugins.{name}" or module.startswith(f"polyquant.plugins.{name}.")
    spec = getattr(importlib.import_module(module), attr)
    assert isinstance(spec, PluginSpec) and spec.name == name


def test_package_data_is_included() -> None:
    packages = {_folder(p): p for p in PACKAGES}
    missing = []
    for top in PACKAGE_DIR.values():
        for f in (ROOT / top).rglob("*"):
            if not f.is_file() or f.suffix in NOT_DATA or "__pycache__" in f.parts or f.name.startswith("."):
                continue
            owner = next(folder for folder in f.parents if folder in packages)  # the nearest listed package
            if f not in _data_files(packages[owner], owner):
                missing.append(str(f.relative_to(ROOT)))
    assert not missing, f"files not shipped (extend [tool.setuptools.package-data] or move them): {missing}"


def test_installed_metadata_matches_pyproject() -> None:
    """The entry points of the installed (editable) polyquant are pyproject's; if not, run `make venv`."""
    installed = {(ep.group, ep.name, ep.value) for ep in distribution("polyquant").entry_points}
    assert installed == _pyproject_entry_points(), "stale install: pyproject.toml changed, run `make venv`"


def _pyproject_entry_points() -> set[tuple[str, str, str]]:
    groups = {"console_scripts": PYPROJECT["project"].get("scripts", {}), **PYPROJECT["project"]["entry-points"]}
    return {(group, name, value) for group, eps in groups.items() for name, value in eps.items()}


INSPECT_INSTALLED = textwrap.dedent("""
    import json
    from importlib.metadata import distribution
    from importlib.util import find_spec

    dist = distribution("polyquant")
    print(json.dumps({
        "files": sorted(str(f) for f in dist.files if str(f).startswith("polyquant/")),
        "entry_points": sorted([ep.group, ep.name, ep.value] for ep in dist.entry_points),
        "location": find_spec("polyquant").origin,
    }))
""")


@pytest.mark.slow
def test_wheel_installs_the_source_layout(tmp_path: Path) -> None:
    """Build a wheel from a copy of the tree, install it alone in a clean venv, compare files and entry points."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for top in PACKAGE_DIR.values():
        shutil.copytree(ROOT / top, src / top, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}  # nothing else installed
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, cwd=tmp_path, env=env, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("polyquant-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if n.startswith(("tests/", "common/", "kernels/", "plugins/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, cwd=tmp_path, env=env, timeout=120)
    out = subprocess.run([str(python), "-I", "-c", INSPECT_INSTALLED], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=60).stdout
    installed = json.loads(out)

    assert Path(installed["location"]).is_relative_to(venv), "the clean venv must import the wheel, not the tree"
    files = {f for f in installed["files"] if "__pycache__" not in f}
    expected = _expected_wheel_files(src)
    assert files == expected, f"only in the wheel: {files - expected}; only in the tree: {expected - files}"
    modules = {f.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for f in files if f.endswith(".py")}
    assert set(PACKAGES) <= modules
    assert {tuple(ep) for ep in installed["entry_points"]} == _pyproject_entry_points()


def test_test_file_names_are_unique() -> None:
    # tests/ folders have no __init__.py: pytest imports test files by basename, so two files with the same name in
    # different folders stop the whole collection ("import file mismatch") when the suite runs together.
    from collections import Counter

    names = Counter(p.name for p in (Path(__file__).resolve().parent).rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
