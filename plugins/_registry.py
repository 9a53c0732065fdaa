"""Plugin discovery, validation and lazy loading.

A plugin is a package that declares an entry point in the group ``polyquant.plugins``. The entry point names a
light ``PluginSpec`` (its module imports nothing heavy); the methods themselves live in ``spec.impl``, which is
imported only when the plugin is used. Built-in plugins are declared the same way, in our own pyproject.toml:

    [project.entry-points."polyquant.plugins"]
    vit = "polyquant.plugins.vit.spec:SPEC"           # built-in
    pointcloud = "polyquant_pointcloud.spec:SPEC"     # in a third-party package's pyproject.toml: "<package>.spec:SPEC"

    # polyquant_pointcloud/spec.py (light: no torch import)
    SPEC = PluginSpec(
        name="pointcloud",                            # == the entry-point name
        api_version=2,                                # == API_VERSION
        summary="Post-training quantization of point-cloud networks.",
        methods={"minmax": "Per-channel INT8 weights, min-max activations."},
        requires=("torch>=2.4",),                     # PEP 508, checked from metadata before impl is imported
        impl="polyquant_pointcloud.methods",
        demo="polyquant_pointcloud.demo:run",
        cli=None,                                     # or a light module holding the command-line hooks
    )

The impl module contract (the method contract itself is ``polyquant.api``; docs/ARCHITECTURE.md):

    METHODS: dict[str, type[QuantConfig]]  method name -> its config class; the keys are exactly the keys of
                                 ``spec.methods``. Importing the impl module registers one handler per config class
                                 (``polyquant.api.register_handler``). Methods are resolved through this dict only
                                 (``get_method``), never by importing names read from a file.
    example(method) -> polyquant.api.MethodExample   a small offline case; the contract test runs every method

    Optional: build_model(model_config: dict) -> nn.Module   the float skeleton an artifact describes (``load``)
    Optional command-line hooks, used by ``polyquant quantize <plugin>/<method> [args...]`` (the method's own options
    are generated from its config fields):
    add_model_args(parser: argparse.ArgumentParser, method: str) -> None       model and data options
    load_inputs(method: str, config, args) -> polyquant.cli.CliInputs           model, model_config, calib, label
    report_quantized(qm, inputs: CliInputs, args) -> None                       print quality numbers

    Optional hooks used by ``polyquant load <artifact> [--mode packed] [args...]`` (which rebuilds any plugin's
    artifact without them, and then hands the model to them):
    add_load_args(parser: argparse.ArgumentParser) -> None
    run_load(qm: polyquant.api.QuantizedModel, args: argparse.Namespace) -> int

    Optional hooks used by ``polyquant search <artifact> [args...]`` (the CLI reads only the manifest to find the
    plugin; the hook loads the artifact itself, e.g. memory-mapped; both or neither):
    add_search_args(parser: argparse.ArgumentParser) -> None                   queries, -k, ... options
    run_search(artifact_path: pathlib.Path, args: argparse.Namespace) -> int   search and print; the exit code

The command-line hooks live in the impl module, or all of them in ``spec.cli``: a light module (no torch at import,
heavy imports inside the hooks) that the command line imports instead of ``impl`` (``load_cli``), so that
``polyquant search`` parses and checks its options before anything heavy is imported.

``spec.demo`` ("module:function") names a function that runs a short offline demo and returns a printable report.

Error policy: ``discover()`` never raises. A broken entry point (any exception at import, ``sys.exit`` included;
only ``KeyboardInterrupt`` goes through), a wrong object, an API-version mismatch, an unmet requirement (checked
from installed metadata, without importing it) or ``POLYQUANT_DISABLE_PLUGINS`` leaves the plugin listed with
``error`` set. Asking for an unusable plugin (``load``, ``get_method``, ``get_demo``) raises ``PluginLoadError``
chained to the cause. Plugin modules are imported with stdout sent to stderr, so what they print at import cannot
corrupt machine-readable output (``polyquant list --json``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from types import MappingProxyType, ModuleType

__all__ = [
    "API_VERSION",
    "ENTRY_POINT_GROUP",
    "DISABLE_ENV",
    "PluginSpec",
    "PluginInfo",
    "PluginLoadError",
    "RequirementStatus",
    "check_requirements",
    "discover",
    "get_info",
    "load",
    "load_cli",
    "get_method",
    "get_demo",
    "clear_cache",
]

API_VERSION = 2  # bumped when PluginSpec or the impl contract changes incompatibly (2: METHODS map to QuantConfig classes)
ENTRY_POINT_GROUP = "polyquant.plugins"
DISABLE_ENV = "POLYQUANT_DISABLE_PLUGINS"  # comma-separated plugin names, or "all" / "*"

_PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_]*")  # also a folder name and a CLI token
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # no "/" (CLI: plugin/method), no spaces
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class PluginLoadError(RuntimeError):
    """A plugin (or one of its methods) was asked for and cannot be used; chained to the cause if there is one."""


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin declares about itself; built without importing the plugin's heavy dependencies.

    Args:
        name: the entry-point name, ``[a-z][a-z0-9_]*``.
        api_version: the plugin API the plugin was written against (``polyquant.plugins.API_VERSION``).
        summary: one line.
        methods: method name -> one-line summary; exactly the keys of the impl module's ``METHODS``.
        requires: PEP 508 requirements, checked from installed metadata before ``impl`` is imported.
        impl: dotted name of the module that holds ``METHODS`` (and the optional CLI hooks).
        demo: ``"module:function"`` running a short offline demo that returns a ``polyquant.report.Section`` (or
            printable text), or None.
        cli: dotted name of a light module holding the command-line hooks (``load_cli``), or None: they are in
            ``impl``.
    """

    name: str
    api_version: int
    summary: str
    methods: Mapping[str, str]
    requires: tuple[str, ...]
    impl: str
    demo: str | None = None
    cli: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _PLUGIN_NAME.fullmatch(self.name):
            raise ValueError(f"plugin name must match [a-z][a-z0-9_]*, got {self.name!r}")
        if not isinstance(self.api_version, int) or isinstance(self.api_version, bool):
            raise TypeError(f"{self.name}: api_version must be an int, got {self.api_version!r}")
        _check_line(self.summary, f"{self.name}: summary")
        if not isinstance(self.methods, Mapping) or not self.methods:
            raise ValueError(f"{self.name}: methods must be a non-empty mapping name -> summary")
        for method, summary in self.methods.items():
            if not isinstance(method, str) or not _METHOD_NAME.fullmatch(method):
                raise ValueError(f"{self.name}: bad method name {method!r}")
            _check_line(summary, f"{self.name}: summary of method {method!r}")
        object.__setattr__(self, "methods", MappingProxyType(dict(self.methods)))  # frozen for real
        if not isinstance(self.requires, tuple):
            raise TypeError(f"{self.name}: requires must be a tuple of PEP 508 strings, got {self.requires!r}")
        from packaging.requirements import InvalidRequirement, Requirement

        for req in self.requires:
            try:
                Requirement(req)
            except (InvalidRequirement, TypeError) as e:
                raise ValueError(f"{self.name}: bad requirement {req!r}: {e}") from e
        if not isinstance(self.impl, str) or not _DOTTED.fullmatch(self.impl):
            raise ValueError(f"{self.name}: impl must be a dotted module name, got {self.impl!r}")
        if self.demo is not None:
            module, _, func = self.demo.partition(":") if isinstance(self.demo, str) else ("", "", "")
            if not (_DOTTED.fullmatch(module) and func.isidentifier()):
                raise ValueError(f"{self.name}: demo must be 'module:function', got {self.demo!r}")
        if self.cli is not None and not (isinstance(self.cli, str) and _DOTTED.fullmatch(self.cli)):
            raise ValueError(f"{self.name}: cli must be a dotted module name or None, got {self.cli!r}")


def _check_line(text: object, what: str) -> None:
    if not isinstance(text, str) or not text.strip() or "\n" in text:
        raise ValueError(f"{what} must be one non-empty line, got {text!r}")


@dataclass(frozen=True)
class PluginInfo:
    """What discovery found under one entry-point name."""

    name: str  # entry-point name (== spec.name for a valid plugin)
    value: str  # entry-point target, "module:attr"
    dist: str | None  # distribution declaring the entry point ("polyquant" for built-ins)
    version: str | None  # that distribution's version
    spec: PluginSpec | None = None  # None when the entry point could not be loaded
    error: str | None = None  # why the plugin cannot be used; None when it can
    cause: BaseException | None = field(default=None, repr=False, compare=False)  # original exception

    @property
    def available(self) -> bool:
        return self.spec is not None and self.error is None


@dataclass(frozen=True)
class RequirementStatus:
    requirement: str  # as declared, PEP 508
    installed: str | None  # installed version, None when not installed
    satisfied: bool

    @property
    def problem(self) -> str | None:
        if self.satisfied:
            return None
        if self.installed is None:
            return f"{self.requirement} is not installed"
        return f"{self.requirement} is required, {self.installed} is installed"


def check_requirements(requires: tuple[str, ...]) -> list[RequirementStatus]:
    """Check PEP 508 requirements against installed distribution metadata; imports none of them.

    Requirements whose environment marker does not apply here are reported as satisfied.
    """
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion

    statuses = []
    for text in requires:
        req = Requirement(text)
        try:
            installed: str | None = version(req.name)
        except PackageNotFoundError:
            installed = None
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            statuses.append(RequirementStatus(text, installed, True))
            continue
        try:
            ok = installed is not None and req.specifier.contains(installed, prereleases=True)
        except InvalidVersion:
            ok = False
        statuses.append(RequirementStatus(text, installed, ok))
    return statuses


# --- discovery ---------------------------------------------------------------------------------------------

_cache: dict[str, PluginInfo] | None = None  # filled once per process; entry_points() does not cache


def _entry_points() -> list[EntryPoint]:
    """The single place that reads entry points (tests patch it)."""
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _disabled() -> set[str]:
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",")}
    return {n for n in names if n}


def _inspect(ep: EntryPoint, disabled: set[str]) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    base = PluginInfo(
        name=ep.name,
        value=ep.value,
        dist=dist.name if dist is not None else None,
        version=dist.version if dist is not None else None,
    )

    def fail(error: str, spec: PluginSpec | None = None, cause: BaseException | None = None) -> PluginInfo:
        return replace(base, spec=spec, error=error, cause=cause)

    if disabled & {ep.name, "all", "*"}:
        return fail(f"disabled by {DISABLE_ENV}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # prints at import must not corrupt `list --json`
            spec = ep.load()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a broken plugin (sys.exit included) must not break discovery
        return fail(f"cannot load entry point {ep.value!r}: {type(e).__name__}: {e}", cause=e)
    if not isinstance(spec, PluginSpec):
        return fail(f"entry point {ep.value!r} is of type {type(spec).__name__}, not PluginSpec")
    if spec.name != ep.name:
        return fail(f"entry point {ep.name!r} names a PluginSpec called {spec.name!r}", spec)
    if spec.api_version != API_VERSION:
        return fail(f"written for plugin API version {spec.api_version}, this polyquant has {API_VERSION}", spec)
    unmet = [s for s in check_requirements(spec.requires) if not s.satisfied]
    if unmet:
        return fail("missing requirement: " + "; ".join(str(s.problem) for s in unmet), spec)
    return replace(base, spec=spec)


def discover(refresh: bool = False) -> dict[str, PluginInfo]:
    """Every plugin declared in the ``polyquant.plugins`` entry-point group, sorted by name; never raises.

    Entry points are read once per process; ``refresh=True`` reads them (and ``POLYQUANT_DISABLE_PLUGINS``)
    again. When two distributions declare the same name, the first one found on ``sys.path`` wins, with a warning.
    """
    global _cache
    if _cache is None or refresh:
        disabled = _disabled()
        found: dict[str, PluginInfo] = {}
        for ep in _entry_points():
            if ep.name in found:
                first = found[ep.name]
                dist = ep.dist.name if getattr(ep, "dist", None) is not None else "?"
                warnings.warn(
                    f"plugin {ep.name!r} is declared twice: {ep.value!r} from {dist} ignored, "
                    f"{first.value!r} from {first.dist} kept",
                    stacklevel=2,
                )
                continue
            found[ep.name] = _inspect(ep, disabled)
        _cache = dict(sorted(found.items()))
    return dict(_cache)


def clear_cache() -> None:
    """Forget what ``discover()`` found; the next call reads the entry points again."""
    global _cache
    _cache = None


# --- loading -----------------------------------------------------------------------------------------------


def get_info(name: str) -> PluginInfo:
    """What discovery found for plugin ``name`` (usable or not); ``PluginLoadError`` if no plugin has that name."""
    plugins = discover()
    if name not in plugins:
        known = ", ".join(plugins) or "none installed"
        raise PluginLoadError(f"unknown plugin {name!r} (known plugins: {known})")
    return plugins[name]


def _usable(name: str) -> PluginSpec:
    info = get_info(name)
    if not info.available:
        raise PluginLoadError(f"plugin {name!r} is unavailable: {info.error}") from info.cause
    assert info.spec is not None
    return info.spec


def _import(name: str, module_name: str) -> ModuleType:
    """Import a module of plugin ``name`` (its prints go to stderr); any failure is a ``PluginLoadError``."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise PluginLoadError(f"plugin {name!r}: cannot import {module_name!r}: {type(e).__name__}: {e}") from e


def load(name: str) -> ModuleType:
    """Import and return the impl module of plugin ``name``; raises ``PluginLoadError`` if it cannot be used."""
    spec = _usable(name)
    module = _import(name, spec.impl)
    if not isinstance(getattr(module, "METHODS", None), Mapping):
        raise PluginLoadError(f"plugin {name!r}: {spec.impl} defines no METHODS dict")
    return module


def load_cli(name: str) -> ModuleType:
    """The module holding the command-line hooks of plugin ``name``: ``spec.cli``, imported without the impl
    module, or the impl module itself (``load``) when the plugin names none. Raises ``PluginLoadError`` if the
    plugin cannot be used."""
    spec = _usable(name)
    return load(name) if spec.cli is None else _import(name, spec.cli)


def get_method(plugin: str, method: str) -> object:
    """The object registered as ``method`` in the ``METHODS`` dict of plugin ``plugin``'s impl module."""
    methods: Mapping[str, object] = load(plugin).METHODS
    if method not in methods:
        known = ", ".join(methods) or "none"
        raise PluginLoadError(f"plugin {plugin!r} has no method {method!r} (methods: {known})")
    return methods[method]


def get_demo(name: str) -> Callable[[], object] | None:
    """The demo function of plugin ``name`` (returns a printable report), or None if it declares none."""
    spec = _usable(name)
    if spec.demo is None:
        return None
    module_name, _, func_name = spec.demo.partition(":")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            func = getattr(importlib.import_module(module_name), func_name)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise PluginLoadError(f"plugin {name!r}: cannot load demo {spec.demo!r}: {type(e).__name__}: {e}") from e
    if not callable(func):
        raise PluginLoadError(f"plugin {name!r}: demo {spec.demo!r} is not callable")
    return func
