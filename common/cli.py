"""The ``polyquant`` command line.

    polyquant list [--json]                         installed plugins, their state and methods
    polyquant info PLUGIN                           one plugin: summary, requirements, methods, error
    polyquant demo [PLUGIN ...]                     plugin demos; the core demo when no plugin has one
    polyquant quantize PLUGIN/METHOD [ARGS ...]     handed to the plugin (add_quantize_args / run_quantize)
    polyquant load ARTIFACT [ARGS ...]              verify and summarize an artifact; handed to its plugin's run_load

Exit codes: 0 success, 1 a command failed, 2 bad arguments or an unusable plugin. Errors are one line on stderr;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .plugins import (
    API_VERSION,
    PluginInfo,
    PluginLoadError,
    check_requirements,
    discover,
    get_demo,
    get_info,
    get_method,
    load,
)

__all__ = ["main", "build_parser", "CliError"]

CORE_DEMO = "polyquant.demo:run_core_demo"


class CliError(Exception):
    """A user error: printed as one line ``<prog>: error: <message>``, exit code 2."""

    def __init__(self, message: str, prog: str = "polyquant") -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports bad arguments as a ``CliError`` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", prog=self.prog)


# --- parser --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="polyquant", description="Quantization for non-LLM models: one core, per-domain plugins.")
    parser.add_argument("--version", action="version", version=f"polyquant {__version__} (plugin API {API_VERSION})")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("list", help="list installed plugins", description="List installed plugins.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_list)

    p = commands.add_parser("info", help="show one plugin", description="Show one plugin in detail.")
    p.add_argument("plugin", help="plugin name, as shown by 'polyquant list'")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser(
        "demo",
        help="run the offline demos",
        description="Run the demos of the named plugins, or of every available plugin; "
        "the core demo when no plugin has one.",
    )
    p.add_argument("plugins", nargs="*", metavar="PLUGIN", help="plugins whose demo to run (default: all)")
    p.set_defaults(run=cmd_demo)

    p = commands.add_parser(
        "quantize",
        help="quantize with a plugin method",
        description="Quantize with METHOD of PLUGIN. The remaining arguments belong to the method: "
        "see 'polyquant quantize PLUGIN/METHOD --help'.",
        add_help=False,  # '--help' after PLUGIN/METHOD goes to the method's own parser
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help (or the method's, after PLUGIN/METHOD)")
    p.add_argument("target", nargs="?", metavar="PLUGIN/METHOD")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments of the method")
    p.set_defaults(run=cmd_quantize, parser=p)

    p = commands.add_parser(
        "load",
        help="verify and summarize an artifact",
        description="Load ARTIFACT (checksums verified, no code executed) and print its manifest; if the "
        "artifact names a plugin with a load hook, the remaining arguments go to it.",
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help (or the plugin's, after ARTIFACT)")
    p.add_argument("artifact", nargs="?", metavar="ARTIFACT", help="path to a .safetensors artifact")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments of the plugin's load hook")
    p.set_defaults(run=cmd_load, parser=p)
    return parser


# --- commands ------------------------------------------------------------------------------------------------


def _dist(info: PluginInfo) -> str:
    return f"{info.dist} {info.version}" if info.dist else "-"


def cmd_list(args: argparse.Namespace) -> int:
    plugins = discover()
    if args.json:
        print(json.dumps([_info_dict(info) for info in plugins.values()], indent=2))
        return 0
    if not plugins:
        print("no plugins installed (entry-point group 'polyquant.plugins')")
        return 0
    rows = [("name", "available", "distribution", "methods")]
    for info in plugins.values():
        methods = ", ".join(info.spec.methods) if info.spec else "-"
        rows.append((info.name, "yes" if info.available else "no", _dist(info), methods))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    unavailable = [info for info in plugins.values() if not info.available]
    if unavailable:
        print()
        for info in unavailable:
            print(f"{info.name}: {info.error}")
    return 0


def _info_dict(info: PluginInfo) -> dict[str, Any]:
    spec = info.spec
    return {
        "name": info.name,
        "available": info.available,
        "error": info.error,
        "dist": info.dist,
        "version": info.version,
        "entry_point": info.value,
        "api_version": spec.api_version if spec else None,
        "summary": spec.summary if spec else None,
        "methods": dict(spec.methods) if spec else {},
        "requires": list(spec.requires) if spec else [],
        "impl": spec.impl if spec else None,
        "demo": spec.demo if spec else None,
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = get_info(args.plugin)
    spec = info.spec
    print(f"{info.name}: {spec.summary if spec else '(spec could not be loaded)'}")
    print(f"  available:      {'yes' if info.available else 'no'}")
    if info.error:
        print(f"  error:          {info.error}")
    print(f"  distribution:   {_dist(info)}")
    print(f"  entry point:    {info.value}")
    if spec is None:
        return 0
    print(f"  api version:    {spec.api_version}")
    print(f"  implementation: {spec.impl}")
    print(f"  demo:           {spec.demo or '-'}")
    print("  requires:" + ("" if spec.requires else "       -"))
    width = max((len(r) for r in spec.requires), default=0)
    for status in check_requirements(spec.requires):
        state = "ok" if status.satisfied else "MISSING" if status.installed is None else "WRONG VERSION"
        installed = status.installed or "not installed"
        print(f"    {status.requirement.ljust(width)}  {installed}  {state}")
    print("  methods:")
    width = max(len(m) for m in spec.methods)
    for method, summary in spec.methods.items():
        print(f"    {method.ljust(width)}  {summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.plugins:
        demos = [(name, get_demo(name)) for name in args.plugins]  # explicit: unusable -> PluginLoadError
        missing = [name for name, demo in demos if demo is None]
        if missing:
            raise CliError(f"no demo in plugin(s): {', '.join(missing)}")
    else:
        demos = [(name, get_demo(name)) for name, info in discover().items() if info.available]
        demos = [(name, demo) for name, demo in demos if demo is not None]
    if not demos:
        return _run_core_demo(args)
    failed = 0
    for name, demo in demos:
        print(f"== {name} ==", flush=True)
        failed += not _run_reported(f"demo of plugin {name!r}", demo, args)
    return 1 if failed else 0


def _run_core_demo(args: argparse.Namespace) -> int:
    module_name, _, func_name = CORE_DEMO.partition(":")
    try:
        demo = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        _print_error(f"no plugin has a demo and the core demo {CORE_DEMO} cannot be loaded: {e}", args.debug)
        return 1
    print("== core ==", flush=True)
    return 0 if _run_reported("core demo", demo, args) else 1


def _run_reported(what: str, demo: Any, args: argparse.Namespace) -> bool:
    """Run one demo and print its report; a failure is reported in one line and does not stop the others."""
    try:
        report = demo()
    except Exception as e:
        _print_error(f"{what} failed: {type(e).__name__}: {e}", args.debug)
        return False
    print(report, flush=True)
    return True


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.target is None:
        if args.help:
            args.parser.print_help()
            return 0
        raise CliError("the following arguments are required: PLUGIN/METHOD (see 'polyquant quantize --help')")
    plugin, sep, method = args.target.partition("/")
    if not sep or not plugin or not method:
        raise CliError(f"expected PLUGIN/METHOD, got {args.target!r} (see 'polyquant list')")
    get_method(plugin, method)  # unusable plugin or unknown method -> PluginLoadError
    impl = load(plugin)
    if not hasattr(impl, "add_quantize_args") or not hasattr(impl, "run_quantize"):
        raise CliError(f"plugin {plugin!r} has no command-line quantize hook; use its Python API")
    parser = _Parser(prog=f"polyquant quantize {args.target}", description=_method_summary(plugin, method))
    impl.add_quantize_args(parser, method)
    rest = ["--help"] if args.help else args.rest
    return int(impl.run_quantize(method, parser.parse_args(rest)))


def _method_summary(plugin: str, method: str) -> str | None:
    spec = get_info(plugin).spec
    return spec.methods.get(method) if spec else None


def cmd_load(args: argparse.Namespace) -> int:
    if args.artifact is None:
        if args.help:
            args.parser.print_help()
            return 0
        raise CliError("the following arguments are required: ARTIFACT (see 'polyquant load --help')")
    path = Path(args.artifact)
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    try:
        from .artifact import ArtifactError
        from .artifact import load as load_artifact
    except ImportError as e:
        raise CliError(f"artifacts are not supported by this installation: {e}") from e
    try:
        artifact = load_artifact(path)
    except ArtifactError as e:
        raise CliError(str(e)) from e  # the message names the file
    plugin = getattr(artifact, "plugin", None)
    impl = load(plugin) if plugin else None  # the artifact's plugin must be usable to hand it over
    if impl is not None and hasattr(impl, "add_load_args") and hasattr(impl, "run_load"):
        parser = _Parser(prog=f"polyquant load {args.artifact}", description=f"Load hook of plugin {plugin!r}.")
        impl.add_load_args(parser)
        plugin_args = parser.parse_args(["--help"] if args.help else args.rest)
        _print_artifact(path, artifact)
        return int(impl.run_load(artifact, plugin_args))
    if args.help:
        args.parser.print_help()
        return 0
    if args.rest:
        raise CliError(f"unrecognized arguments: {' '.join(args.rest)} (the artifact's plugin takes none)")
    _print_artifact(path, artifact)
    return 0


def _print_artifact(path: Path, artifact: Any) -> None:
    tensors = getattr(artifact, "tensors", {})
    print(f"{path}: {path.stat().st_size:,} bytes, {len(tensors)} tensors (checksums verified)")
    for key in ("plugin", "method", "config"):
        print(f"  {key + ':':<8} {json.dumps(getattr(artifact, key, None), sort_keys=True)}")


# --- entry point ---------------------------------------------------------------------------------------------


def _print_error(message: str, debug: bool, prog: str = "polyquant") -> None:
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never raises, except KeyboardInterrupt)."""
    parser = build_parser()
    args: argparse.Namespace | None = None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
            return int(args.run(args))
        except SystemExit as e:  # --help / --version, or a plugin hook calling sys.exit()
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=sys.stderr)
            return 1
        except (CliError, PluginLoadError) as e:
            _print_error(str(e), bool(args and args.debug), getattr(e, "prog", "polyquant"))
            return 2
        except Exception as e:
            debug = bool(args and args.debug)
            _print_error(f"{type(e).__name__}: {e}" + ("" if debug else " (run with --debug for the traceback)"), debug)
            return 1


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"polyquant: warning: {message}", file=sys.stderr)
