"""Acceptance test of the plugin contract: the third-party example plugin ``examples/third_party_plugin``.

The plugin is registered for this test module only, without a network and without installing it: its folder goes
on ``sys.path`` and a minimal ``polyquant_mamba_demo-0.1.dist-info`` (METADATA + entry_points.txt, generated from
the example's own pyproject.toml) is written to a temporary folder that also goes on ``sys.path``, where
``importlib.metadata`` finds it. Then every method runs through the core contract test's functions
(``tests/test_contract.py``), and the packed modules and the hook-free ``polyquant load`` are checked.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import polyquant as pq
from polyquant.cli import main
from polyquant.nn import RotatedLinear
from polyquant.packed import HadamardLinear, VQLinear, W8A8Linear
from polyquant.plugins import clear_cache, discover, load

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "third_party_plugin"
CONTRACT = ROOT / "tests" / "test_contract.py"
PACKAGE = "polyquant_mamba_demo"
PLUGIN = "mamba_demo"
METHODS = ("w8a8", "rvq")
ENTRY_POINT = {PLUGIN: f"{PACKAGE}.spec:SPEC"}  # what the test registers; the pyproject must declare the same


def _pyproject() -> dict[str, Any]:
    with open(EXAMPLE / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _contract() -> ModuleType:
    """tests/test_contract.py as a module (the one pytest imported, if it did; else loaded from its file)."""
    mod = sys.modules.get("test_contract")
    if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == CONTRACT:
        return mod
    spec = importlib.util.spec_from_file_location("_polyquant_contract_for_mamba_demo", CONTRACT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Register the example plugin (sys.path + a generated dist-info), and undo it afterwards."""
    project = _pyproject()["project"]
    site = tmp_path_factory.mktemp("site")
    info = site / f"{PACKAGE}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    group = project["entry-points"]["polyquant.plugins"]
    (info / "entry_points.txt").write_text("[polyquant.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in group.items()))
    added = [str(EXAMPLE), str(site)]
    sys.path[:0] = added
    importlib.invalidate_caches()
    clear_cache()
    try:
        yield PLUGIN
    finally:
        for path in added:
            sys.path.remove(path)
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        clear_cache()


# --- packaging --------------------------------------------------------------------------------------------------


def test_pyproject_declares_the_entry_point() -> None:
    data = _pyproject()
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    project = data["project"]
    assert project["name"] == "polyquant-mamba-demo"
    assert "polyquant" in project["dependencies"]
    assert project["entry-points"]["polyquant.plugins"] == ENTRY_POINT
    assert data["tool"]["setuptools"]["packages"] == [PACKAGE]
    assert (EXAMPLE / PACKAGE / "__init__.py").is_file() and (EXAMPLE / "README.md").is_file()


def test_spec_module_is_light() -> None:
    code = (f"import sys; sys.path.insert(0, {str(EXAMPLE)!r})\n"
            f"from {PACKAGE}.spec import SPEC\n"
            "heavy = sorted(m for m in ('torch', 'numpy', f'{SPEC.impl}') if m in sys.modules)\n"
            "print(SPEC.name, heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{PLUGIN} []"


def test_discovered(plugin: str) -> None:
    info = discover()[plugin]
    assert info.available, info.error
    assert (info.dist, info.version, info.value) == ("polyquant-mamba-demo", "0.1", ENTRY_POINT[PLUGIN])
    impl = load(plugin)
    assert info.spec is not None and tuple(info.spec.methods) == tuple(impl.METHODS) == METHODS
    assert not hasattr(impl, "run_load") and not hasattr(impl, "add_load_args")  # polyquant load needs no hook


# --- the core contract, method by method -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trips(plugin: str, method: str) -> None:
    _contract().test_config_round_trips(plugin, method)


@pytest.mark.parametrize("method", METHODS)
def test_quantize_save_load_same_outputs(plugin: str, method: str, tmp_path: Path) -> None:
    _contract().test_quantize_save_load_same_outputs(plugin, method, tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_command_line_round_trip(plugin: str, method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _contract().test_command_line_round_trip(plugin, method, tmp_path, capsys)


# --- packed modules and the hook-free load ------------------------------------------------------------------------


def _linears(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", METHODS)
def test_packed_modules(plugin: str, method: str, tmp_path: Path) -> None:
    ex = load(plugin).example(method)
    linears = _linears(ex.model)
    assert linears == {f"blocks.{i}.{p}" for i in range(2) for p in ("in_proj", "x_proj", "out_proj")}
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False)
    for i in range(2):  # the depthwise conv and the scan stay float
        assert type(qm.model.get_submodule(f"blocks.{i}.conv")) is nn.Conv1d
    if method == "w8a8":
        assert {n for n, m in qm.model.named_modules() if isinstance(m, RotatedLinear)} == \
            {n for n in linears if n.endswith("out_proj")}
    with torch.no_grad():
        fake = qm.model(ex.inputs)
    path = pq.save(qm, tmp_path / f"{method}.safetensors")

    packed = pq.load(path, mode="packed", cpu_dtype=torch.float32)
    assert packed.packing is not None and packed.packing.kept == {}
    assert set(packed.packing.packed) == linears
    for name in linears:
        m = packed.model.get_submodule(name)
        if method == "w8a8" and name.endswith("out_proj"):
            assert isinstance(m, HadamardLinear) and isinstance(m.inner, W8A8Linear), name
            assert packed.packing.packed[name] == "HadamardLinear(W8A8Linear)"
        elif method == "w8a8":
            assert type(m) is W8A8Linear and packed.packing.packed[name] == "W8A8Linear", name
        else:
            assert type(m) is VQLinear and packed.packing.packed[name] == "VQLinear", name
        if isinstance(m, (W8A8Linear, HadamardLinear)):
            act = m.inner.act if isinstance(m, HadamardLinear) else m.act
            assert not act.dynamic  # static per-tensor int8, as calibrated
    with torch.no_grad():
        got = packed.model(ex.inputs)
    err = float((got.float() - fake.float()).norm() / fake.float().norm().clamp_min(1e-12))
    assert err <= _contract().PACKED_RTOL, f"packed vs fake-quant relative error {err:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_cli_quantize_and_load_without_hooks(plugin: str, method: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.safetensors"
    assert main(["quantize", f"{plugin}/{method}", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert "output relative L2 error vs float" in capsys.readouterr().out  # report_quantized
    assert main(["load", str(out)]) == 0, capsys.readouterr().err
    assert f"restored {plugin}/{method}: 6 quantized layers (fake-quant)" in capsys.readouterr().out
    assert main(["load", str(out), "--mode", "packed"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "packed 6 layers" in text and "0 kept as they were" in text and f"restored {plugin}/{method}: " in text


def test_cli_packed_summary_counts_each_layer_once(plugin: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.safetensors"
    assert main(["quantize", f"{plugin}/w8a8", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["load", str(out), "--mode", "packed"]) == 0, capsys.readouterr().err
    assert f"restored {plugin}/w8a8: 6 quantized layers (packed)" in capsys.readouterr().out


def test_cli_usage_error_is_one_line(plugin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad.safetensors"
    assert main(["quantize", f"{plugin}/rvq", "--dim", "3", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dim 3 does not divide" in err and "Traceback" not in err
    assert not out.exists()
