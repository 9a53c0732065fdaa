"""The ``polyquant`` command line.

    polyquant list [--json]                         installed plugins, their state and methods
    polyquant info PLUGIN                           one plugin: summary, requirements, methods, error
    polyquant demo [PLUGIN ...] [--out DIR]         plugin demos (the core demo when no plugin has one): a summary
                                                    per plugin and the HTML report DIR/index.html (+ results.json)
    polyquant report RESULTS.json... [--out DIR]    the same page from results.json files or any benchmark JSON
    polyquant quantize PLUGIN/METHOD [ARGS ...]     options from the method's config fields + the plugin's model
                                                    and data options (add_model_args / load_inputs), then
                                                    polyquant.quantize and polyquant.save; the time of the inputs
                                                    (a model to load, texts to embed) is reported apart
    polyquant load ARTIFACT [ARGS ...]              verify and summarize an artifact; its plugin rebuilds the model
                                                    and its run_load hook reports
    polyquant search ARTIFACT [ARGS ...]            search an artifact (an embedding store) with the search hook of
                                                    the plugin its manifest names

Plugin hooks of ``search`` (optional, in the plugin's impl module or its light ``spec.cli`` module, which imports
no torch: see ``polyquant.plugins._registry``):

    add_search_args(parser: argparse.ArgumentParser) -> None     the plugin's options (queries, -k, ...)
    run_search(artifact_path: pathlib.Path, args: argparse.Namespace) -> int    loads the artifact itself (it may
                                                    memory-map it), prints the results, returns the exit code

``search`` reads only the artifact's header (``polyquant.artifact.read_manifest``) to find the plugin; a file that
is not an artifact, names no plugin, or whose plugin has no search hook is a usage error (exit 2). Torch is
imported by the commands that need it, so ``--help``, ``list``, ``info`` and the argument checks of ``search``
(with a plugin's light ``spec.cli``) start without it.

Exit codes: 0 success, 1 a command failed, 2 bad arguments or an unusable plugin, 141 standard output closed
early (``polyquant list --json | head -1``; nothing is reported, like a command ended by SIGPIPE). Errors are one
line on stderr; ``--debug`` (anywhere on the line) adds the traceback. Text that comes from files or plugins
(manifest strings, tensor names, error messages, plugin and method summaries, demo reports: their line breaks
kept) is printed with non-printable characters escaped, so an artifact or a plugin cannot send escape sequences
to the terminal. ``demo`` runs each demo isolated: one that fails, exits, or returns a report whose ``str()``
fails is reported in one line, shown with its error on the page, and the others still run (exit 1 at the end).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from . import __version__
from .config import CliOption, ConfigError, QuantConfig, UsageError, cli_options
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
    load_cli,
)

if TYPE_CHECKING:  # imported inside the commands that need it: --help, list and search's checks start without it
    import torch

    from .report import Section

__all__ = ["main", "build_parser", "CliError", "CliInputs", "add_config_options", "config_from_args", "printable",
           "set_threads"]

CORE_DEMO = "polyquant.demo:run_core_demo"


class CliError(UsageError):
    """A user error: printed as one line ``<prog>: error: <message>``, exit code 2."""

    def __init__(self, message: str, prog: str = "polyquant") -> None:
        super().__init__(message)
        self.prog = prog


@dataclass
class CliInputs:
    """What a plugin's ``load_inputs(method, config, args)`` hook gives ``polyquant quantize``.

    Args:
        model: the float model to quantize.
        model_config: its description for the plugin's ``build_model`` (None: the user's own model; then
            ``polyquant load`` needs the float model passed in Python).
        calib: the calibration batches (an iterable, or a ``polyquant.nn.Calibration`` with its ``forward_fn``).
        label: one line naming the model and data (printed with the run time).
        evaluation: anything the plugin's ``report_quantized`` hook reads (held-out data), or None.
    """

    model: Any
    model_config: dict[str, Any] | None
    calib: Any
    label: str
    evaluation: Any = None


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
    p.add_argument("--out", default="polyquant-report", metavar="DIR",
                   help="folder of the HTML report: index.html and results.json (default: polyquant-report)")
    p.add_argument("--no-report", action="store_true", help="print the demos' reports only; write no page")
    p.add_argument("--full", action="store_true", help="print every table on the terminal, not just the summary")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr: a bar per plugin in a terminal, one line per step elsewhere")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of torch (the demos use at most 2; 1 is faster on a busy machine)")
    p.set_defaults(run=cmd_demo)

    p = commands.add_parser(
        "report",
        help="render the HTML report from result files",
        description="Render the demo report page from results.json files written by 'polyquant demo' and from "
        "any benchmark JSON (its records and groups of values become tables), one section per file.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="JSON files to render, in page order")
    p.add_argument("--out", default="polyquant-report", metavar="DIR",
                   help="folder of the page: index.html and results.json (default: polyquant-report)")
    p.add_argument("--title", default="polyquant report", help="the page's title")
    p.set_defaults(run=cmd_report)

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

    p = commands.add_parser(
        "search",
        help="search an artifact with its plugin",
        description="Search ARTIFACT (e.g. an embedding store) with the search hook of the plugin its manifest "
        "names; the remaining arguments (queries, -k, ...) go to the plugin: see 'polyquant search ARTIFACT --help'.",
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help (or the plugin's, after ARTIFACT)")
    p.add_argument("artifact", nargs="?", metavar="ARTIFACT", help="path to an artifact")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments of the plugin's search hook")
    p.set_defaults(run=cmd_search, parser=p)

    p = commands.add_parser(
        "export",
        help="export an artifact's packed model to ONNX",
        description="Rebuild ARTIFACT packed on the CPU and write it as ONNX with QuantizeLinear / "
        "DequantizeLinear nodes (polyquant.onnx_export), traced on the plugin's example input.",
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="path to a .safetensors artifact")
    p.add_argument("--onnx", required=True, metavar="PATH", help="the ONNX file to write (replaced only by a "
                                                                  "complete export)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to the example's (default: "
                                                                "the first dimension of every input is free)")
    p.set_defaults(run=cmd_export)
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
        rows.append((printable(info.name), "yes" if info.available else "no", printable(_dist(info)),
                     printable(methods)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    unavailable = [info for info in plugins.values() if not info.available]
    if unavailable:
        print()
        for info in unavailable:
            print(f"{printable(info.name)}: {printable(str(info.error))}")
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
        "cli": spec.cli if spec else None,
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = get_info(args.plugin)
    spec = info.spec
    p = printable  # every string here comes from the plugin's distribution
    print(f"{p(info.name)}: {p(spec.summary) if spec else '(spec could not be loaded)'}")
    print(f"  available:      {'yes' if info.available else 'no'}")
    if info.error:
        print(f"  error:          {p(info.error)}")
    print(f"  distribution:   {p(_dist(info))}")
    print(f"  entry point:    {p(info.value)}")
    if spec is None:
        return 0
    print(f"  api version:    {spec.api_version}")
    print(f"  implementation: {p(spec.impl)}")
    print(f"  demo:           {p(spec.demo or '-')}")
    if spec.cli:
        print(f"  cli hooks:      {p(spec.cli)}")
    print("  requires:" + ("" if spec.requires else "       -"))
    width = max((len(p(r)) for r in spec.requires), default=0)
    for status in check_requirements(spec.requires):
        state = "ok" if status.satisfied else "MISSING" if status.installed is None else "WRONG VERSION"
        installed = status.installed or "not installed"
        print(f"    {p(status.requirement).ljust(width)}  {p(installed)}  {state}")
    print("  methods:")
    width = max(len(p(m)) for m in spec.methods)
    for method, summary in spec.methods.items():
        print(f"    {p(method).ljust(width)}  {p(summary)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.plugins:  # explicit: an unknown or unusable plugin, or one without a demo, is a usage error
        infos = [get_info(name) for name in args.plugins]
        for info in infos:
            if not info.available:
                raise PluginLoadError(f"plugin {info.name!r} is unavailable: {info.error}")
        missing = [info.name for info in infos if info.spec is None or info.spec.demo is None]
        if missing:
            raise CliError(f"no demo in plugin(s): {', '.join(missing)}")
        names = list(args.plugins)
    else:
        names = [name for name, info in discover().items() if info.available and info.spec and info.spec.demo]
    from .report import check_report_folder, write_report

    folder = None
    if not args.no_report:
        try:
            folder = check_report_folder(args.out)  # before any demo runs: a bad --out costs nothing
        except ValueError as e:
            raise CliError(f"--out: {e}") from None
    if args.threads is not None:
        set_threads(args.threads, "polyquant demo")
    if names:
        runs = [(name, f"demo of plugin {name!r}", partial(_plugin_demo, name)) for name in names]
    else:
        core = _core_demo(args)
        if core is None:
            return 1
        runs = [("core", "core demo", core)]
    sections = [_run_demo(name, what, demo, args) for name, what, demo in runs]
    failed = [s.domain for s in sections if s.error]
    if folder is not None:
        page = write_report(sections, folder)
        total = sum(s.seconds or 0.0 for s in sections)
        print(f"report: {printable(str(page))} ({len(sections)} sections"
              f"{', failed: ' + ', '.join(map(printable, failed)) if failed else ''}; {total:.0f} s)", flush=True)
    return 1 if failed else 0


def _plugin_demo(name: str) -> object:
    """Import and run the demo of plugin ``name`` (both inside ``_run_demo``)."""
    demo = get_demo(name)
    if demo is None:
        raise PluginLoadError(f"plugin {name!r} declares no demo")
    return demo()


def _core_demo(args: argparse.Namespace) -> Callable[[], object] | None:
    module_name, _, func_name = CORE_DEMO.partition(":")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        _print_error(f"no plugin has a demo and the core demo {CORE_DEMO} cannot be loaded: {e}", args.debug)
        return None


def _run_demo(name: str, what: str, demo: Callable[[], object], args: argparse.Namespace) -> Section:
    """Run one demo under its progress bar and print its summary (``--full``: its whole report); a failure (any
    exception, ``sys.exit`` included, but not Ctrl-C) is reported in one line, becomes a section holding the
    error, and does not stop the others. Returns the demo's ``report.Section``."""
    from .api import progress_default
    from .demo import demo_bar
    from .report import Section

    print(f"== {printable(name)} ==", flush=True)
    t0 = time.perf_counter()
    error = None
    try:
        bars = progress_default() and not args.quiet
        with demo_bar(name, bars, lines=not bars and not args.quiet):  # off a terminal: a line per demo step
            result = demo()
        # inside: a report whose str() raises or exits fails this demo only
        section = result if isinstance(result, Section) else Section(domain=name, text=str(result))
        section.domain = name
        text = str(section) if args.full or not isinstance(result, Section) else section.summary()
    except KeyboardInterrupt:
        raise
    except SystemExit as e:
        error = f"it exited (code {e.code!r}) instead of returning a report"
    except BaseException as e:  # noqa: BLE001 - a demo must not take the other demos down
        error = f"{type(e).__name__}: {_safe_str(e)}"
    seconds = time.perf_counter() - t0
    if error is not None:
        _print_error(f"{what} failed: {error}", args.debug)
        return Section(domain=name, error=error, seconds=seconds)
    section.seconds = seconds
    print("\n".join(printable(line) for line in text.split("\n")) + f"\n({seconds:.1f} s)", flush=True)
    return section


def cmd_report(args: argparse.Namespace) -> int:
    from .report import check_report_folder, default_meta, read_sections, write_report

    try:
        folder = check_report_folder(args.out)
        sections = [s for path in args.results for s in read_sections(path)]
    except ValueError as e:
        raise CliError(str(e)) from None
    meta = f"rendered from {', '.join(Path(p).name for p in args.results)}; {default_meta()}"
    page = write_report(sections, folder, title=args.title, meta=meta)
    print(f"report: {printable(str(page))} ({len(sections)} sections from {len(args.results)} file(s))")
    return 0


def _safe_str(e: BaseException) -> str:
    """``str(e)``, or a note when that raises too (an exception type from a plugin can do anything)."""
    try:
        return str(e)
    except Exception:  # noqa: BLE001
        return "(its message cannot be printed)"


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
    impl = load_cli(plugin)  # the module holding the command-line hooks
    if not hasattr(impl, "add_model_args") or not hasattr(impl, "load_inputs"):
        raise CliError(f"plugin {plugin!r} has no command-line model hooks; use its Python API")
    prog = f"polyquant quantize {args.target}"
    parser = _Parser(prog=prog, description=_method_summary(plugin, method))
    impl.add_model_args(parser, method)
    add_config_options(parser, cls)
    run = parser.add_argument_group("run options (not saved)")
    run.add_argument("--out", default=None, metavar="PATH",
                     help="artifact path (a safetensors file: .safetensors, or the plugin's suffix such as .pqs); "
                          "checked before calibration starts")
    run.add_argument("--force", action="store_true", help="overwrite an existing --out file (never an input file)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress on stderr: bars in a terminal, one line per layer or phase elsewhere")
    run.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    parsed = parser.parse_args(["--help"] if args.help else args.rest)
    config = config_from_args(cls, parsed, prog)
    if parsed.out is not None:
        _check_out(parsed, prog)

    from .api import progress_default, quantize, save
    from .progress import line_progress

    set_threads(parsed.threads, prog)
    device = default_device() if parsed.device is None else torch_device(parsed.device, prog)
    t0 = time.perf_counter()
    inputs = impl.load_inputs(method, config, parsed)  # may be the slow part: a model to load, texts to embed
    input_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with line_progress(not parsed.quiet):  # off a terminal: one line per step of the methods that report them
        qm = quantize(inputs.model, config, inputs.calib, progress=progress_default() and not parsed.quiet,
                      device=device)
    if qm.model_config is None:
        qm.model_config = inputs.model_config
    seconds = time.perf_counter() - t0
    print(f"{plugin}/{method}: {inputs.label}; inputs {input_seconds:.1f} s, quantized in {seconds:.1f} s")
    if hasattr(impl, "report_quantized"):
        impl.report_quantized(qm, inputs, parsed)
    if parsed.out is None:
        return 0
    path = save(qm, parsed.out, meta={"calib_seconds": round(seconds, 3)})
    print(f"saved {path} ({path.stat().st_size:,} bytes)")
    return 0


MAX_THREADS = 1024  # --threads of quantize and load
THREADS_HELP = "CPU threads of torch (default: torch's own, one per core; fewer helps on a busy machine)"


def set_threads(threads: int | None, prog: str) -> None:
    """Apply ``--threads`` (None: leave torch's default); a ``CliError`` outside 1..``MAX_THREADS``."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise CliError(f"--threads must be in [1, {MAX_THREADS}], got {threads}", prog=prog)
    import torch

    torch.set_num_threads(threads)


def _check_out(parsed: argparse.Namespace, prog: str) -> None:
    """Refuse an unusable ``--out`` before the model is loaded and calibrated. The value of every other option
    that names an existing file (``--model ckpt.safetensors``) is an input that the output must not overwrite."""
    from .artifact import ArtifactError, check_target

    inputs = [value for key, value in vars(parsed).items() if key != "out" and isinstance(value, str) and value]
    try:
        check_target(parsed.out, force=parsed.force, inputs=inputs)
    except ArtifactError as e:
        raise CliError(f"--out {e}", prog=prog) from None


def _method_summary(plugin: str, method: str) -> str | None:
    spec = get_info(plugin).spec
    return spec.methods.get(method) if spec else None


def default_device() -> torch.device:
    """The command line's default device: CUDA when available, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_device(name: str, prog: str) -> torch.device:
    """``--device NAME`` as a torch device (a ``CliError`` naming the option for a bad name)."""
    import torch

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
    try:
        from .artifact import ArtifactError
        from .artifact import load as load_artifact
    except ImportError as e:
        raise CliError(f"artifacts are not supported by this installation: {e}") from e
    try:
        artifact = load_artifact(path)  # a missing file, a FIFO or a device is refused here, without blocking
    except ArtifactError as e:
        raise CliError(str(e)) from e  # the message names the file
    plugin = artifact.plugin
    impl, unavailable = None, None
    if plugin:
        try:
            load(plugin)  # the impl module, which the rebuild needs
            impl = load_cli(plugin)  # the module holding the command-line hooks (often the same)
        except PluginLoadError as e:  # the artifact can still be inspected; only the rebuild needs the plugin
            unavailable = str(e)
    if impl is not None:
        parser = _Parser(prog=f"polyquant load {args.artifact}", description=f"Rebuild the artifact with plugin "
                                                                                f"{plugin!r} (and its load hook).")
        parser.add_argument("--mode", choices=("fake", "packed"), default="fake",
                            help="fake: fake-quant modules; packed: packed codes on the kernels (polyquant.packed)")
        parser.add_argument("--device", default=None, help="where the model runs (default: cuda when available, "
                                                           "else cpu)")
        parser.add_argument("--cpu-dtype", choices=("bf16", "fp32"), default="bf16",
                            help="compute dtype of the packed CPU int4 / int8 GEMMs: bf16 is fast, fp32 matches "
                                 "fake-quant to fp32 rounding")
        parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
        hooks = hasattr(impl, "add_load_args") and hasattr(impl, "run_load")
        if hooks:
            impl.add_load_args(parser)
        plugin_args = parser.parse_args(["--help"] if args.help else args.rest)
        set_threads(plugin_args.threads, str(parser.prog))
        plugin_args.artifact_path = path  # for a run_load hook that reads the file itself (sizes)
        _print_artifact(path, artifact)
        import torch

        from .api import from_artifact

        try:
            device = (default_device() if plugin_args.device is None
                      else torch_device(plugin_args.device, str(parser.prog)))
            cpu_dtype = torch.bfloat16 if plugin_args.cpu_dtype == "bf16" else torch.float32
            qm = from_artifact(artifact, mode=plugin_args.mode, device=device, cpu_dtype=cpu_dtype)
        except ArtifactError as e:  # a restore names the tensor; the line names the file too
            message = str(e)
            raise CliError(message if message.startswith(str(path)) else f"{path}: {message}") from e
        if qm.packing is not None:
            from .packed import resident_bytes

            kinds = sorted(set(qm.packing.packed.values()))
            print(f"packed {len(qm.packing.packed)} layers ({', '.join(kinds)}), {len(qm.packing.kept)} kept as "
                  f"they were; model resident bytes: {resident_bytes(qm.model)}")
        if hooks:
            return int(impl.run_load(qm, plugin_args))
        print(f"restored {printable(f'{qm.plugin}/{qm.method}')}: {_quant_layers(qm.model)} quantized layers "
              f"({'packed' if qm.packing is not None else 'fake-quant'})")
        return 0
    if args.help or any(arg in ("-h", "--help") for arg in args.rest):
        args.parser.print_help()
        return 0
    if args.rest:
        why = f"its plugin cannot be loaded: {unavailable}" if unavailable else "the artifact's plugin takes none"
        raise CliError(f"unrecognized arguments: {' '.join(args.rest)} ({why})")
    _print_artifact(path, artifact, tensors=True)
    if unavailable:
        print(f"polyquant: warning: the model is not rebuilt: {printable(unavailable)}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .artifact import ArtifactError

    path, out = Path(args.artifact), Path(args.onnx)
    if out.resolve() == path.resolve():
        raise CliError(f"--onnx {out} is the artifact itself")
    try:
        from .onnx_export import export_onnx
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise CliError(f"ONNX export needs onnx and onnxscript (pip install 'polyquant[onnx]'): {e}") from e
    from .api import get_handler, load as load_artifact

    try:
        qm = load_artifact(path, mode="packed", device="cpu")
    except ArtifactError as e:
        message = str(e)
        raise CliError(message if message.startswith(str(path)) else f"{path}: {message}") from e
    make_input = get_handler(type(qm.config)).example_input
    if make_input is None:
        raise CliError(f"{qm.plugin}/{qm.method} gives no example input to trace: call "
                       "polyquant.onnx_export.export_onnx(model, args, path) in Python")
    batch = make_input(qm.model, qm.state)
    inputs, kwargs = ((), batch) if isinstance(batch, dict) else (tuple(batch) if isinstance(batch, (tuple, list))
                                                                   else (batch,), None)
    report = export_onnx(qm.model, inputs, out, kwargs=kwargs, dynamic_batch=not args.static_batch)
    as_int = sum(1 for how in report.weights.values() if " DQ" in how)
    as_qdq = sum(1 for how in report.activations.values() if how.endswith("QDQ"))
    print(f"wrote {out}: {report.bytes} bytes; {as_int} of {len(report.weights)} packed weights as integer "
          f"DequantizeLinear, {as_qdq} of {len(report.activations)} activation quantizers as Q / DQ, the rest "
          f"float operations")
    if not args.static_batch and not report.dynamic_batch:
        print("note: the model's code fixes the batch size, so the file takes batches of the example's size only")
    return 0


def _quant_layers(model: Any) -> int:
    """Layers of ``model`` that hold a quantized weight (fake-quant or packed)."""
    from .nn import QuantWeightModule
    from .packed import PACKED_MODULES, HadamardLinear

    if not hasattr(model, "modules"):
        return 0
    inner = {id(m.inner) for m in model.modules() if isinstance(m, HadamardLinear)}  # one layer, not two
    return sum(1 for m in model.modules() if id(m) not in inner and (isinstance(m, PACKED_MODULES)
               or isinstance(m, QuantWeightModule) and m.weight_quantizer is not None))


def cmd_search(args: argparse.Namespace) -> int:
    if args.artifact is None:
        if args.help:
            args.parser.print_help()
            return 0
        raise CliError("the following arguments are required: ARTIFACT (see 'polyquant search --help')")
    path = Path(args.artifact)
    from .artifact import ArtifactError, read_manifest

    try:
        manifest = read_manifest(path)  # the header only: the plugin may memory-map the rest
    except ArtifactError as e:
        raise CliError(str(e)) from e
    plugin = manifest["plugin"]
    if not plugin:
        raise CliError(f"{path}: the artifact names no plugin, so nothing can search it")
    impl = load_cli(plugin)  # an unusable plugin: PluginLoadError, exit 2; a light hooks module imports no torch
    if not hasattr(impl, "add_search_args") or not hasattr(impl, "run_search"):
        raise CliError(f"{path}: plugin {plugin!r} ({manifest['method']}) cannot search its artifacts (no "
                       "add_search_args / run_search hooks)")
    parser = _Parser(prog=f"polyquant search {args.artifact}", description=f"Search hook of plugin {plugin!r}.")
    impl.add_search_args(parser)
    plugin_args = parser.parse_args(["--help"] if args.help else args.rest)
    return int(impl.run_search(path, plugin_args))


def _print_artifact(path: Path, artifact: Any, *, tensors: bool = False) -> None:
    """The artifact's manifest (and with ``tensors``, one line per tensor); file text is escaped."""
    print(f"{printable(str(path))}: {path.stat().st_size:,} bytes, {len(artifact.tensors)} tensors "
          "(checksums verified)")
    for key in ("plugin", "method", "config", "meta"):
        text = json.dumps(getattr(artifact, key), sort_keys=True)
        print(f"  {key + ':':<8} {printable(text)}")
    if tensors:
        print("  tensors:")
        for name, t in artifact.tensors.items():
            print(f"    {printable(name)}  {str(t.dtype).removeprefix('torch.')}{list(t.shape)}")


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls, escape sequences, bidirectional overrides, line
    breaks) written as its Python escape (``\\x1b``, ``\\u202e``, ``\\n``): safe to print to a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# --- entry point ---------------------------------------------------------------------------------------------


def _print_error(message: str, debug: bool, prog: str = "polyquant") -> None:
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {printable(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never raises, except KeyboardInterrupt)."""
    parser = build_parser()
    args: argparse.Namespace | None = None
    argv, debug = _take_debug(sys.argv[1:] if argv is None else list(argv))
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args = parser.parse_args(argv)
            args.debug = args.debug or debug
            code = int(args.run(args))
            sys.stdout.flush()  # here, not at exit: a closed pipe is then reported as one
            return code
        except BrokenPipeError:  # the reader went away ('| head -1'): stop quietly, like a command ended by SIGPIPE
            _discard_stdout()
            return 141
        except SystemExit as e:  # --help / --version, or a plugin hook calling sys.exit()
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(printable(str(e.code)), file=sys.stderr)
            return 1
        except (CliError, PluginLoadError, UsageError) as e:
            _print_error(str(e), debug or bool(args and args.debug), getattr(e, "prog", "polyquant"))
            return 2
        except Exception as e:
            debug = debug or bool(args and args.debug)
            _print_error(f"{type(e).__name__}: {e}" + ("" if debug else " (run with --debug for the traceback)"), debug)
            return 1


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` is accepted anywhere before a ``--``, also among a method's or a load hook's arguments:
    (the arguments without it, whether it was given)."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [arg for arg in argv[:end] if arg != "--debug"]
    return kept + argv[end:], len(kept) < end


def _discard_stdout() -> None:
    """Point standard output at the null device, so that flushing it at exit does not fail on the closed pipe."""
    with suppress(OSError, ValueError, AttributeError):  # not a real file (tests capture it): nothing to do
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"polyquant: warning: {printable(str(message))}", file=sys.stderr)
