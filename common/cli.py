"""The ``polyquant`` command line.

    polyquant list [--json]                         installed plugins, their state and methods
    polyquant info PLUGIN                           one plugin: summary, requirements, methods, error
    polyquant demo [PLUGIN ...]                     plugin demos; the core demo when no plugin has one
    polyquant quantize PLUGIN/METHOD [ARGS ...]     options from the method's config fields + the plugin's model
                                                    and data options (add_model_args / load_inputs), then
                                                    polyquant.quantize and polyquant.save
    polyquant load ARTIFACT [ARGS ...]              verify and summarize an artifact; its plugin rebuilds the model
                                                    and its run_load hook reports

Exit codes: 0 success, 1 a command failed, 2 bad arguments or an unusable plugin. Errors are one line on stderr;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

from . import __version__
from .config import CliOption, ConfigError, QuantConfig, cli_options
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

__all__ = ["main", "build_parser", "CliError", "add_config_options", "config_from_args"]

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


def _config_class(plugin: str, method: str) -> type[QuantConfig]:
    cls = get_method(plugin, method)  # unusable plugin or unknown method -> PluginLoadError
    if not (isinstance(cls, type) and issubclass(cls, QuantConfig)):
        raise CliError(f"{plugin}/{method} is not configured by a QuantConfig class; use the plugin's Python API")
    return cls


def _option_type(opt: CliOption) -> Callable[[str], Any]:
    """argparse type of a generated option: parses the text; range checks are the config's."""
    def parse(text: str) -> Any:
        if opt.optional and text.lower() == "none":
            return None
        if opt.kind == "choice":
            for choice in opt.choices:
                if text == str(choice):
                    return choice
            raise argparse.ArgumentTypeError(f"choose one of {', '.join(map(str, opt.choices))}, got {text!r}")
        try:
            return int(text) if opt.kind == "int" else float(text) if opt.kind == "float" else text
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if opt.kind == 'int' else 'a number'}, got "
                                             f"{text!r}") from None

    return parse


def add_config_options(parser: argparse.ArgumentParser, cls: type[QuantConfig]) -> None:
    """One option per field of ``cls`` (``--wbits``; booleans as ``--flag`` / ``--no-flag``)."""
    group = parser.add_argument_group(f"method options ({cls.__name__})")
    for opt in cli_options(cls):
        default = "none" if opt.default is None else opt.default
        help_text = f"{opt.help} (default: {default})".strip()
        if opt.kind == "bool":
            group.add_argument(*opt.flags, dest=opt.field, action=argparse.BooleanOptionalAction,
                               default=opt.default, help=help_text)
        else:
            metavar = "{" + ",".join(map(str, opt.choices)) + "}" if opt.kind == "choice" else opt.kind.upper()
            group.add_argument(*opt.flags, dest=opt.field, type=_option_type(opt), default=opt.default,
                               metavar=metavar, help=help_text)


def config_from_args(cls: type[QuantConfig], args: argparse.Namespace, prog: str) -> QuantConfig:
    """Build and validate the config from the generated options (a bad value is a one-line usage error)."""
    try:
        return cls(**{opt.field: getattr(args, opt.field) for opt in cli_options(cls)})
    except ConfigError as e:
        raise CliError(str(e), prog=prog) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.target is None:
        if args.help:
            args.parser.print_help()
            return 0
        raise CliError("the following arguments are required: PLUGIN/METHOD (see 'polyquant quantize --help')")
    plugin, sep, method = args.target.partition("/")
    if not sep or not plugin or not method:
        raise CliError(f"expected PLUGIN/METHOD, got {args.target!r} (see 'polyquant list')")
    cls = _config_class(plugin, method)
    impl = load(plugin)
    if not hasattr(impl, "add_model_args") or not hasattr(impl, "load_inputs"):
        raise CliError(f"plugin {plugin!r} has no command-line model hooks; use its Python API")
    prog = f"polyquant quantize {args.target}"
    parser = _Parser(prog=prog, description=_method_summary(plugin, method))
    impl.add_model_args(parser, method)
    add_config_options(parser, cls)
    run = parser.add_argument_group("run options (not saved)")
    run.add_argument("--out", type=Path, default=None, help="artifact path (.safetensors)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model is)")
    run.add_argument("--quiet", action="store_true", help="no progress bars (they show only in a terminal)")
    parsed = parser.parse_args(["--help"] if args.help else args.rest)
    config = config_from_args(cls, parsed, prog)

    from .api import progress_default, quantize, save

    inputs = impl.load_inputs(method, config, parsed)
    t0 = time.perf_counter()
    device = None if parsed.device is None else torch_device(parsed.device, prog)
    qm = quantize(inputs.model, config, inputs.calib, progress=progress_default() and not parsed.quiet,
                  device=device)
    if qm.model_config is None:
        qm.model_config = inputs.model_config
    seconds = time.perf_counter() - t0
    print(f"{plugin}/{method}: {inputs.label}, {seconds:.1f} s")
    if hasattr(impl, "report_quantized"):
        impl.report_quantized(qm, inputs, parsed)
    if parsed.out is None:
        return 0
    path = save(qm, parsed.out, meta={"calib_seconds": round(seconds, 3)})
    print(f"saved {path} ({path.stat().st_size:,} bytes)")
    return 0


def _method_summary(plugin: str, method: str) -> str | None:
    spec = get_info(plugin).spec
    return spec.methods.get(method) if spec else None


def torch_device(name: str, prog: str) -> torch.device:
    """``--device NAME`` as a torch device (a ``CliError`` naming the option for a bad name)."""
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise CliError(f"--device {name}: {e}", prog=prog) from None


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
        parser.add_argument("--mode", choices=("fake", "packed"), default="fake",
                            help="fake: fake-quant modules; packed: packed codes on the kernels (polyquant.packed)")
        parser.add_argument("--device", default=None, help="where the model runs (default: cpu)")
        parser.add_argument("--cpu-dtype", choices=("bf16", "fp32"), default="bf16",
                            help="compute dtype of the packed CPU int4 / int8 GEMMs: bf16 is fast, fp32 matches "
                                 "fake-quant to fp32 rounding but is slow")
        impl.add_load_args(parser)
        plugin_args = parser.parse_args(["--help"] if args.help else args.rest)
        _print_artifact(path, artifact)
        from .api import from_artifact

        try:
            device = None if plugin_args.device is None else torch_device(plugin_args.device, str(parser.prog))
            cpu_dtype = torch.bfloat16 if plugin_args.cpu_dtype == "bf16" else torch.float32
            qm = from_artifact(artifact, mode=plugin_args.mode, device=device, cpu_dtype=cpu_dtype)
        except ArtifactError as e:
            raise CliError(str(e)) from e
        if qm.packing is not None:
            from .packed import resident_bytes

            kinds = sorted(set(qm.packing.packed.values()))
            print(f"packed {len(qm.packing.packed)} layers ({', '.join(kinds)}), {len(qm.packing.kept)} kept as "
                  f"they were; model resident bytes: {resident_bytes(qm.model)}")
        return int(impl.run_load(qm, plugin_args))
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
