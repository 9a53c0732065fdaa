"""Plugin discovery: fake third-party distributions on sys.path, plus contract tests over the built-in plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from polyquant.plugins import (
    API_VERSION,
    DISABLE_ENV,
    ENTRY_POINT_GROUP,
    PluginLoadError,
    PluginSpec,
    _registry,
    check_requirements,
    clear_cache,
    discover,
    get_demo,
    get_method,
    load,
)


def spec_source(name: str, impl: str, *, api_version: int = API_VERSION, requires: tuple[str, ...] = ()) -> str:
    return textwrap.dedent(f"""
        from polyquant.plugins import PluginSpec

        SPEC = PluginSpec(
            name={name!r},
            api_version={api_version},
            summary="A fake plugin for tests.",
            methods={{"alpha": "The first method.", "beta": "The second method."}},
            requires={requires!r},
            impl={impl!r},
            demo="{impl}:demo",
        )
    """)


IMPL_SOURCE = textwrap.dedent("""
    def alpha():
        return "alpha ran"

    def beta():
        return "beta ran"

    def demo():
        return "fake demo report"

    METHODS = {"alpha": alpha, "beta": beta}
""")


class FakeDists:
    """Writes ``<dist>-1.0.dist-info/{METADATA,entry_points.txt}`` and ``pq_fake_*`` modules into a folder on sys.path."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, dist: str, plugins: dict[str, str], modules: dict[str, str]) -> None:
        """plugins: entry-point name -> "module:attr"; modules: dotted package name -> source of its __init__."""
        info = self.root / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {target}" for name, target in plugins.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in modules.items():
            assert module.startswith("pq_fake_"), "the fixture removes pq_fake_* modules afterwards"
            path = self.root.joinpath(*module.split("."))
            path.mkdir(parents=True, exist_ok=True)
            (path / "__init__.py").write_text(source)

    def add_plugin(self, dist: str, name: str, **spec_kwargs: Any) -> None:
        """A complete plugin: package ``<name>`` holds the spec, ``<name>.impl`` the methods."""
        spec = spec_source(name, f"{name}.impl", **spec_kwargs)
        self.add(dist, {name: f"{name}:SPEC"}, {name: spec, f"{name}.impl": IMPL_SOURCE})


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDists]:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    clear_cache()
    yield FakeDists(tmp_path)
    clear_cache()  # the next discover() runs after monkeypatch has taken tmp_path off sys.path
    for module in [m for m in sys.modules if m.startswith("pq_fake_")]:
        del sys.modules[module]


def test_third_party_plugin_is_discovered_and_loads(fake: FakeDists) -> None:
    fake.add_plugin("fakeplug", "pq_fake_good")
    info = discover()["pq_fake_good"]
    assert info.available and info.error is None
    assert (info.dist, info.version, info.value) == ("fakeplug", "1.0", "pq_fake_good:SPEC")
    assert isinstance(info.spec, PluginSpec) and list(info.spec.methods) == ["alpha", "beta"]
    assert "pq_fake_good.impl" not in sys.modules  # discovery does not import the methods
    module = load("pq_fake_good")
    assert module.__name__ == "pq_fake_good.impl"
    assert get_method("pq_fake_good", "beta")() == "beta ran"
    demo = get_demo("pq_fake_good")
    assert demo is not None and demo() == "fake demo report"


def test_broken_plugin_is_listed_with_its_error(fake: FakeDists) -> None:
    fake.add("brokenplug", {"pq_fake_broken": "pq_fake_broken:SPEC"},
             {"pq_fake_broken": "raise RuntimeError('boom at import')"})
    fake.add_plugin("fakeplug", "pq_fake_good")
    plugins = discover()
    broken = plugins["pq_fake_broken"]
    assert not broken.available and broken.spec is None
    assert "RuntimeError: boom at import" in broken.error
    assert plugins["pq_fake_good"].available  # others are unaffected
    with pytest.raises(PluginLoadError, match="unavailable") as excinfo:
        load("pq_fake_broken")
    assert isinstance(excinfo.value.__cause__, RuntimeError)


def test_spec_calling_sys_exit_does_not_end_discovery(fake: FakeDists) -> None:
    fake.add("exitplug", {"pq_fake_exit": "pq_fake_exit:SPEC"}, {"pq_fake_exit": "import sys\nsys.exit(3)"})
    fake.add_plugin("fakeplug", "pq_fake_good")
    plugins = discover()  # SystemExit is a BaseException: it used to end the process here
    broken = plugins["pq_fake_exit"]
    assert not broken.available and "SystemExit: 3" in broken.error
    assert plugins["pq_fake_good"].available
    with pytest.raises(PluginLoadError, match="unavailable") as excinfo:
        load("pq_fake_exit")
    assert isinstance(excinfo.value.__cause__, SystemExit)


def test_impl_or_demo_calling_sys_exit_raises_plugin_load_error(fake: FakeDists) -> None:
    fake.add("exitimpl", {"pq_fake_exitimpl": "pq_fake_exitimpl:SPEC"}, {
        "pq_fake_exitimpl": spec_source("pq_fake_exitimpl", "pq_fake_exitimpl.impl"),
        "pq_fake_exitimpl.impl": "raise SystemExit('bye')",
    })
    with pytest.raises(PluginLoadError, match="SystemExit: bye") as excinfo:
        load("pq_fake_exitimpl")
    assert isinstance(excinfo.value.__cause__, SystemExit)
    with pytest.raises(PluginLoadError, match="cannot load demo"):
        get_demo("pq_fake_exitimpl")


def test_keyboard_interrupt_in_a_spec_is_not_swallowed(fake: FakeDists) -> None:
    fake.add("ctrlc", {"pq_fake_ctrlc": "pq_fake_ctrlc:SPEC"}, {"pq_fake_ctrlc": "raise KeyboardInterrupt"})
    with pytest.raises(KeyboardInterrupt):
        discover()


def test_plugin_prints_at_import_do_not_reach_stdout(fake: FakeDists, capsys: pytest.CaptureFixture[str]) -> None:
    from polyquant.cli import main

    spec = "print('spec says hello')\n" + spec_source("pq_fake_chatty", "pq_fake_chatty.impl")
    fake.add("chatty", {"pq_fake_chatty": "pq_fake_chatty:SPEC"},
             {"pq_fake_chatty": spec, "pq_fake_chatty.impl": "print('impl says hello')\n" + IMPL_SOURCE})
    assert main(["list", "--json"]) == 0
    out, err = capsys.readouterr()
    listed = {entry["name"]: entry for entry in json.loads(out)}  # stdout is exactly the JSON document
    assert listed["pq_fake_chatty"]["available"] and "spec says hello" in err
    assert get_method("pq_fake_chatty", "alpha")() == "alpha ran"
    out, err = capsys.readouterr()
    assert out == "" and "impl says hello" in err


def test_missing_entry_point_attribute_and_wrong_object(fake: FakeDists) -> None:
    fake.add("oddplug", {"pq_fake_noattr": "pq_fake_odd:MISSING", "pq_fake_notspec": "pq_fake_odd:OTHER"},
             {"pq_fake_odd": "OTHER = {'name': 'pq_fake_notspec'}"})
    plugins = discover()
    assert "AttributeError" in plugins["pq_fake_noattr"].error
    assert "is of type dict, not PluginSpec" in plugins["pq_fake_notspec"].error


def test_entry_point_name_must_match_spec_name(fake: FakeDists) -> None:
    fake.add("renamed", {"pq_fake_alias": "pq_fake_real:SPEC"},
             {"pq_fake_real": spec_source("pq_fake_real", "pq_fake_real.impl")})
    info = discover()["pq_fake_alias"]
    assert not info.available and "called 'pq_fake_real'" in info.error


def test_missing_requirement_makes_plugin_unavailable_without_importing_impl(fake: FakeDists) -> None:
    fake.add("needsmore", {"pq_fake_needs": "pq_fake_needs:SPEC"}, {
        "pq_fake_needs": spec_source("pq_fake_needs", "pq_fake_needs.impl", requires=("definitely-not-installed-pkg>=1",)),
        "pq_fake_needs.impl": "raise AssertionError('impl must not be imported')",
    })
    info = discover()["pq_fake_needs"]
    assert not info.available and info.spec is not None
    assert info.error == "missing requirement: definitely-not-installed-pkg>=1 is not installed"
    with pytest.raises(PluginLoadError, match="definitely-not-installed-pkg"):
        load("pq_fake_needs")
    assert "pq_fake_needs.impl" not in sys.modules


def test_requirement_versions_and_markers() -> None:
    pytest_version = check_requirements(("pytest>=1",))[0].installed
    ok, too_new, other_os, absent = check_requirements(
        ("pytest>=1", "pytest>=999", "definitely-not-installed-pkg; sys_platform == 'no-such-os'", "absent-pkg-xyz"))
    assert ok.satisfied and ok.installed == pytest_version
    assert not too_new.satisfied and too_new.problem == f"pytest>=999 is required, {pytest_version} is installed"
    assert other_os.satisfied  # the marker does not apply here
    assert not absent.satisfied and absent.installed is None


def test_wrong_api_version(fake: FakeDists) -> None:
    fake.add_plugin("futureplug", "pq_fake_future", api_version=API_VERSION + 1)
    info = discover()["pq_fake_future"]
    assert not info.available and f"plugin API version {API_VERSION + 1}" in info.error


@pytest.mark.parametrize("value", ["pq_fake_good", "all", "*", "other, pq_fake_good"])
def test_disable_plugins_env(fake: FakeDists, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    fake.add("disabled", {"pq_fake_good": "pq_fake_good:SPEC"},
             {"pq_fake_good": "raise AssertionError('a disabled plugin must not be imported')"})
    monkeypatch.setenv(DISABLE_ENV, value)
    info = discover(refresh=True)["pq_fake_good"]
    assert not info.available and info.error == f"disabled by {DISABLE_ENV}"
    with pytest.raises(PluginLoadError, match="disabled"):
        load("pq_fake_good")


def test_duplicate_name_warns_and_first_wins(fake: FakeDists) -> None:
    fake.add_plugin("firstplug", "pq_fake_dup")
    fake.add("secondplug", {"pq_fake_dup": "pq_fake_other:SPEC"},
             {"pq_fake_other": "raise AssertionError('the second declaration must not be loaded')"})
    with pytest.warns(UserWarning, match="declared twice"):
        info = discover(refresh=True)["pq_fake_dup"]
    assert info.dist == "firstplug" and info.available


def test_discovery_is_cached_until_refresh(fake: FakeDists, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    read = _registry._entry_points
    monkeypatch.setattr(_registry, "_entry_points", lambda: calls.append(1) or read())
    discover()
    fake.add_plugin("lateplug", "pq_fake_late")
    assert "pq_fake_late" not in discover() and len(calls) == 1
    assert "pq_fake_late" in discover(refresh=True) and len(calls) == 2


def test_unknown_plugin_and_method(fake: FakeDists) -> None:
    fake.add_plugin("fakeplug", "pq_fake_good")
    with pytest.raises(PluginLoadError, match=r"unknown plugin 'nope' \(known plugins: .*pq_fake_good"):
        load("nope")
    with pytest.raises(PluginLoadError, match=r"no method 'gamma' \(methods: alpha, beta\)"):
        get_method("pq_fake_good", "gamma")


def test_impl_import_error_is_chained(fake: FakeDists) -> None:
    fake.add("badimpl", {"pq_fake_badimpl": "pq_fake_badimpl:SPEC"}, {
        "pq_fake_badimpl": spec_source("pq_fake_badimpl", "pq_fake_badimpl.impl"),
        "pq_fake_badimpl.impl": "import definitely_not_a_module_xyz",
    })
    assert discover()["pq_fake_badimpl"].available  # only the spec is imported by discovery
    with pytest.raises(PluginLoadError, match="cannot import 'pq_fake_badimpl.impl'") as excinfo:
        load("pq_fake_badimpl")
    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "Bad-Name"}, "plugin name"),
    ({"summary": "two\nlines"}, "one non-empty line"),
    ({"methods": {}}, "non-empty mapping"),
    ({"methods": {"a/b": "slash"}}, "bad method name"),
    ({"requires": "timm"}, "tuple of PEP 508"),
    ({"requires": ("not a requirement!!",)}, "bad requirement"),
    ({"impl": "pkg:attr"}, "dotted module name"),
    ({"demo": "pkg.mod"}, "module:function"),
    ({"api_version": "1"}, "must be an int"),
])
def test_spec_validation(kwargs: dict, match: str) -> None:
    fields = dict(name="ok", api_version=1, summary="Fine.", methods={"m": "A method."}, requires=(), impl="pkg.mod")
    with pytest.raises((ValueError, TypeError), match=match):
        PluginSpec(**{**fields, **kwargs})


def test_spec_methods_are_read_only() -> None:
    methods = {"m": "A method."}
    spec = PluginSpec(name="ok", api_version=1, summary="Fine.", methods=methods, requires=(), impl="pkg.mod")
    methods["n"] = "changed afterwards"
    assert list(spec.methods) == ["m"]
    with pytest.raises(TypeError):
        spec.methods["x"] = "y"  # type: ignore[index]


def test_discovery_imports_nothing_heavy() -> None:
    """Importing polyquant.plugins and discovering every plugin must not import torch & co beyond ``polyquant``."""
    code = textwrap.dedent("""
        import json, sys
        import polyquant
        before = set(sys.modules)
        from polyquant.plugins import discover
        discover()
        heavy = {"torch", "triton", "numpy", "timm", "diffusers", "transformers", "sklearn", "torchaudio",
                 "safetensors", "scipy"}
        print(json.dumps(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == []


# --- contract tests over every built-in plugin (timm style) ---------------------------------------------------

BUILTIN = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist and ep.dist.name == "polyquant")


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_plugin_contract(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    info = discover(refresh=True)[name]
    assert info.error is None, info.error
    spec = info.spec
    assert spec is not None and spec.name == name and spec.api_version == API_VERSION
    assert info.value.startswith(f"polyquant.plugins.{name}"), "built-in specs live in their plugin folder"
    assert spec.impl.startswith(f"polyquant.plugins.{name}.")
    module = load(name)
    assert set(module.METHODS) == set(spec.methods), "METHODS and spec.methods must list the same methods"
    for method in spec.methods:
        assert get_method(name, method) is module.METHODS[method]
    has_hooks = hasattr(module, "add_quantize_args"), hasattr(module, "run_quantize")
    assert has_hooks[0] == has_hooks[1], "define both add_quantize_args and run_quantize, or neither"
    if spec.demo is not None:
        assert callable(get_demo(name))


QUANT_IMPL = textwrap.dedent("""
    from dataclasses import dataclass

    import torch
    from polyquant.api import QuantizedModel, register_handler
    from polyquant.cli import CliInputs
    from polyquant.config import QuantConfig, UsageError
    from polyquant.nn import QuantRule, QuantSpec, calibrate, prepare

    from pq_fake_qc.configs import GammaConfig

    @register_handler(GammaConfig, plugin="pq_fake_qc", method="gamma")
    def _quantize(model, config, calib, run):
        if config.refuse:
            raise UsageError("pq_fake_qc/gamma: the model has no widgets")
        qmodel = prepare(model, [QuantRule("*", weight=QuantSpec("int8"))], inplace=True)
        calibrate(qmodel, calib, progress=False)
        return QuantizedModel(qmodel, config)

    METHODS = {"gamma": GammaConfig}

    def add_model_args(parser, method):
        pass

    def load_inputs(method, config, args):
        return CliInputs(torch.nn.Sequential(torch.nn.Linear(4, 4)), None, [torch.randn(2, 4)], "a linear layer")
""")

CONFIGS_SOURCE = textwrap.dedent("""
    from dataclasses import dataclass

    from polyquant.config import QuantConfig

    @dataclass
    class GammaConfig(QuantConfig):
        \"\"\"A fake method.

        Args:
            refuse: raise a usage error.
        \"\"\"

        refuse: bool = False
""")


def _add_quant_plugin(fake: FakeDists) -> None:
    """A top-level entry point ``pq_fake_qc:SPEC`` (the package itself holds the spec) with a real handler."""
    spec = spec_source("pq_fake_qc", "pq_fake_qc.impl").replace('{"alpha": "The first method.", "beta": "The second '
                                                                 'method."}', '{"gamma": "A fake method."}')
    spec = spec.replace('demo="pq_fake_qc.impl:demo",', "")
    fake.add("fakeqc", {"pq_fake_qc": "pq_fake_qc:SPEC"},
             {"pq_fake_qc": spec, "pq_fake_qc.impl": QUANT_IMPL, "pq_fake_qc.configs": CONFIGS_SOURCE})


def test_quantize_finds_the_handler_of_a_top_level_entry_point(fake: FakeDists) -> None:
    # "pkg:SPEC": the spec's module is the package itself; quantize must still load the plugin defining the config
    import torch

    import polyquant as pq

    _add_quant_plugin(fake)
    from pq_fake_qc.configs import GammaConfig  # type: ignore[import-not-found]

    assert "pq_fake_qc.impl" not in sys.modules
    qm = pq.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), GammaConfig(), calib=[torch.randn(2, 4)],
                     progress=False)
    assert (qm.plugin, qm.method) == ("pq_fake_qc", "gamma")


def test_a_usage_error_in_a_handler_exits_2_with_one_line(fake: FakeDists, capsys: pytest.CaptureFixture[str]) -> None:
    from polyquant.cli import main

    _add_quant_plugin(fake)
    assert main(["quantize", "pq_fake_qc/gamma", "--refuse", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["polyquant: error: pq_fake_qc/gamma: the model has no widgets"]
    assert main(["quantize", "pq_fake_qc/gamma", "--quiet"]) == 0
