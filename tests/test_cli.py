"""The polyquant command line, run in-process against fake plugins (entry points patched), plus the console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import polyquant
from polyquant import cli
from polyquant.cli import main
from polyquant.plugins import DISABLE_ENV, ENTRY_POINT_GROUP, _registry, clear_cache

SPECS = textwrap.dedent("""
    from polyquant.plugins import PluginSpec

    GOOD = PluginSpec(
        name="good",
        api_version=2,
        summary="A fake plugin with command-line hooks.",
        methods={"alpha": "Prints its bit width.", "crash": "Raises."},
        requires=("pytest>=1",),
        impl="pq_fake_cli_impl",
        demo="pq_fake_cli_impl:demo",
    )
    NEEDY = PluginSpec(
        name="needy",
        api_version=2,
        summary="Needs a package that is not installed.",
        methods={"alpha": "Never runs."},
        requires=("definitely-not-installed-pkg>=1",),
        impl="pq_fake_cli_never_imported",
    )
""")

IMPL = textwrap.dedent('''
    from dataclasses import dataclass

    import torch

    from polyquant.api import QuantizedModel, register_handler
    from polyquant.config import QuantConfig, bits_field


    @dataclass
    class AlphaConfig(QuantConfig):
        """Alpha.

        Args:
            bits: weight bit width.
        """

        bits: int = bits_field(8)


    @dataclass
    class CrashConfig(QuantConfig):
        bits: int = bits_field(8)


    METHODS = {"alpha": AlphaConfig, "crash": CrashConfig}


    def _alpha(model, config, calib, run):
        print(f"alpha bits={config.bits}")
        return QuantizedModel(model, config)


    def _crash(model, config, calib, run):
        raise RuntimeError("kaboom")


    def _restore(model, config, artifact):
        return QuantizedModel(model, config)


    register_handler(AlphaConfig, plugin="good", method="alpha", restore=_restore)(_alpha)
    register_handler(CrashConfig, plugin="good", method="crash")(_crash)


    class Inputs:
        def __init__(self):
            self.model = torch.nn.Identity()
            self.model_config = {"kind": "identity"}
            self.calib = [torch.zeros(1)]
            self.label = "fake"


    def build_model(model_config):
        return torch.nn.Identity()


    def add_model_args(parser, method):
        parser.add_argument("--size", type=int, default=1, help="input size")


    def load_inputs(method, config, args):
        return Inputs()


    def demo():
        return "good demo report"


    def add_load_args(parser):
        parser.add_argument("--shout", action="store_true")


    def run_load(qm, args):
        print(("LOADED " if args.shout else "loaded ") + qm.method)
        return 0


    def add_search_args(parser):
        parser.add_argument("query")
        parser.add_argument("-k", type=int, default=3)


    def run_search(artifact_path, args):
        print(f"searched {artifact_path.name} for {args.query!r}, k={args.k}")
        return 0 if args.k > 0 else 1
''')


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses and type hints look the module up while it executes
    try:
        exec(source, module.__dict__)
    finally:
        del sys.modules[name]
    return module


def _use_entry_points(monkeypatch: pytest.MonkeyPatch, targets: dict[str, str]) -> None:
    eps = [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in targets.items()]
    monkeypatch.setattr(_registry, "_entry_points", lambda: eps)


@pytest.fixture(autouse=True)
def _fresh_discovery(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    _use_entry_points(monkeypatch, {})
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pq_fake_cli_specs", _module("pq_fake_cli_specs", SPECS))
    monkeypatch.setitem(sys.modules, "pq_fake_cli_impl", _module("pq_fake_cli_impl", IMPL))
    monkeypatch.setitem(sys.modules, "pq_fake_cli_broken", _module("pq_fake_cli_broken", "SPEC = 42"))
    _use_entry_points(monkeypatch, {
        "good": "pq_fake_cli_specs:GOOD",
        "needy": "pq_fake_cli_specs:NEEDY",
        "broken": "pq_fake_cli_broken:SPEC",
    })


def _untimed(out: str) -> str:
    """``polyquant demo`` output without its per-demo time lines."""
    return re.sub(r"^\(\d+\.\d s\)\n", "", out, flags=re.M)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: polyquant") and not err
    for command in ("list", "info", "demo", "report", "quantize", "load", "search"):
        assert command in out


@pytest.mark.parametrize("command", ["list", "info", "demo", "quantize", "load", "search"])
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: polyquant {command}")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith(f"polyquant {polyquant.__version__} ")


def test_list_without_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "list") == (0, "no plugins installed (entry-point group 'polyquant.plugins')\n", "")
    assert run(capsys, "list", "--json") == (0, "[]\n", "")


def test_list_table(capsys: pytest.CaptureFixture[str], fake_plugins: None) -> None:
    code, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["name", "available", "distribution", "methods"]
    assert lines[1].split() == ["broken", "no", "-", "-"]
    assert lines[2].split() == ["good", "yes", "-", "alpha,", "crash"]
    assert lines[3].split() == ["needy", "no", "-", "alpha"]
    assert "broken: entry point 'pq_fake_cli_broken:SPEC' is of type int, not PluginSpec" in lines
    assert "needy: missing requirement: definitely-not-installed-pkg>=1 is not installed" in lines


def test_list_json(capsys: pytest.CaptureFixture[str], fake_plugins: None) -> None:
    code, out, _ = run(capsys, "list", "--json")
    plugins = {p["name"]: p for p in json.loads(out)}
    assert code == 0 and list(plugins) == ["broken", "good", "needy"]
    assert plugins["good"]["available"] and plugins["good"]["methods"] == {"alpha": "Prints its bit width.",
                                                                           "crash": "Raises."}
    assert not plugins["broken"]["available"] and "not PluginSpec" in plugins["broken"]["error"]


def test_info(capsys: pytest.CaptureFixture[str], fake_plugins: None) -> None:
    code, out, _ = run(capsys, "info", "good")
    assert code == 0 and out.startswith("good: A fake plugin with command-line hooks.\n")
    assert "available:      yes" in out and "error:" not in out
    assert any(line.split()[0] == "pytest>=1" and line.split()[-1] == "ok" for line in out.splitlines()[1:] if line)
    assert "    alpha  Prints its bit width." in out

    code, out, _ = run(capsys, "info", "needy")
    assert code == 0 and "available:      no" in out
    assert "error:          missing requirement" in out
    assert "definitely-not-installed-pkg>=1  not installed  MISSING" in out


def test_quantize_builds_the_config_and_calls_the_handler(capsys: pytest.CaptureFixture[str],
                                                          fake_plugins: None) -> None:
    code, out, err = run(capsys, "quantize", "good/alpha", "--bits", "4", "--quiet")
    assert code == 0 and not err
    assert out.startswith("alpha bits=4\ngood/alpha: fake; inputs ")
    code, out, _ = run(capsys, "quantize", "good/alpha", "--help")
    assert code == 0 and out.startswith("usage: polyquant quantize good/alpha")
    assert "--bits INT" in out and "weight bit width. (default: 8)" in out and "--size" in out


def test_threads_option_sets_torch_threads(capsys: pytest.CaptureFixture[str], fake_plugins: None) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err = run(capsys, "quantize", "good/alpha", "--bits", "4", "--quiet", "--threads", "1")
        assert code == 0 and not err and torch.get_num_threads() == 1
        code, _, err = run(capsys, "quantize", "good/alpha", "--threads", "0")
        assert code == 2 and "--threads must be in [1, 1024], got 0" in err and len(err.splitlines()) == 1
    finally:
        torch.set_num_threads(before)


def test_command_failure_is_one_line_unless_debug(capsys: pytest.CaptureFixture[str], fake_plugins: None) -> None:
    code, out, err = run(capsys, "quantize", "good/crash", "--bits", "4")
    assert code == 1 and not out
    assert err == "polyquant: error: RuntimeError: kaboom (run with --debug for the traceback)\n"
    code, _, err = run(capsys, "--debug", "quantize", "good/crash", "--bits", "4")
    assert code == 1 and "Traceback" in err and err.endswith("polyquant: error: RuntimeError: kaboom\n")


BAD_ARGS = [
    [],
    ["frobnicate"],
    ["list", "--bogus"],
    ["info"],
    ["info", "nope"],
    ["quantize"],
    ["quantize", "good"],
    ["quantize", "nope/alpha"],
    ["quantize", "good/gamma"],
    ["quantize", "good/alpha", "--bits", "12"],  # out of the config's range
    ["quantize", "good/alpha", "--bits", "four"],
    ["quantize", "good/alpha", "--nope"],
    ["quantize", "needy/alpha"],  # unavailable
    ["quantize", "broken/alpha"],
    ["demo", "nope"],
    ["demo", "needy"],
    ["load"],
    ["load", "no/such/artifact.safetensors"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=lambda a: " ".join(a) or "(nothing)")
def test_bad_arguments_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], fake_plugins: None, argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and not out
    assert err.startswith("polyquant") and ": error: " in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_plugin_names_the_known_ones(capsys: pytest.CaptureFixture[str], fake_plugins: None) -> None:
    _, _, err = run(capsys, "info", "nope")
    assert err == "polyquant: error: unknown plugin 'nope' (known plugins: broken, good, needy)\n"


def test_demo_runs_plugin_demos(capsys: pytest.CaptureFixture[str], fake_plugins: None, tmp_path: Path) -> None:
    code, out, err = run(capsys, "demo", "--no-report")
    assert (code, err) == (0, "") and re.fullmatch(r"== good ==\ngood demo report\n\(\d+\.\d s\)\n", out), out
    code, out, _ = run(capsys, "demo", "good", "--out", str(tmp_path / "page"))
    assert code == 0 and out.startswith("== good ==\ngood demo report\n")
    assert out.splitlines()[-1].startswith(f"report: {tmp_path / 'page' / 'index.html'} (1 sections; ")
    page = (tmp_path / "page" / "index.html").read_text()
    assert "<pre>good demo report</pre>" in page  # a demo that returns text is shown as text


def test_demo_section_summary_and_page(capsys: pytest.CaptureFixture[str], fake_plugins: None, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from polyquant.demo import demo_progress
    from polyquant.report import Section, Table

    def demo() -> Section:
        steps = demo_progress(total=2)
        steps.update(1, step="first")
        steps.update(1, step="second")
        return Section("ignored", title="what ran", headline="it worked <b>",
                       tables=[Table("t", ["method", "acc"], [["x", "1.0"]])])

    monkeypatch.setattr(sys.modules["pq_fake_cli_impl"], "demo", demo)
    code, out, err = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 0 and out.startswith("== good ==\nwhat ran\nresult: it worked <b>\n1 table(s), 0 figure(s)\n")
    assert "good: 1/2 first" in err and "good: 2/2 second" in err  # progress lines off a terminal
    assert run(capsys, "demo", "--out", str(tmp_path), "--quiet")[2] == ""
    code, out, _ = run(capsys, "demo", "--no-report", "--full")
    assert "method  acc\nx       1.0" in out
    page = (tmp_path / "index.html").read_text()
    assert "it worked &lt;b&gt;" in page and '<section id="s0-good">' in page


def test_demo_failure_is_isolated_on_the_page(
    capsys: pytest.CaptureFixture[str], fake_plugins: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def boom() -> str:
        raise ValueError("demo broke")

    monkeypatch.setattr(sys.modules["pq_fake_cli_impl"], "demo", boom)
    code, out, err = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 1 and out.startswith("== good ==\nreport: ") and "failed: good" in out
    assert err.startswith("polyquant: error: demo of plugin 'good' failed: ValueError: demo broke")
    assert "This demo failed: ValueError: demo broke" in (tmp_path / "index.html").read_text()


def test_demo_bad_out_folder_is_checked_first(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                              tmp_path: Path) -> None:
    (tmp_path / "file").write_text("keep")
    code, out, err = run(capsys, "demo", "--out", str(tmp_path / "file"))
    assert (code, out) == (2, "") and err == f"polyquant: error: --out: report folder {tmp_path / 'file'} exists " \
        "and is not a folder\n"
    assert (tmp_path / "file").read_text() == "keep"


def test_demo_falls_back_to_the_core_demo(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pq_fake_core_demo", _module("pq_fake_core_demo", "def run(): return 'core'"))
    monkeypatch.setattr(cli, "CORE_DEMO", "pq_fake_core_demo:run")
    code, out, _ = run(capsys, "demo", "--no-report")
    assert code == 0 and out.startswith("== core ==\ncore\n")
    monkeypatch.setattr(cli, "CORE_DEMO", "pq_fake_no_such_module:run")
    code, _, err = run(capsys, "demo", "--no-report")
    assert code == 1 and "core demo pq_fake_no_such_module:run cannot be loaded" in err


def test_report_renders_results_and_benchmark_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from polyquant.report import Section, Table, write_report

    write_report([Section("vit", tables=[Table("t", ["a"], [["1"]])])], tmp_path / "first")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmark": "mine", "rows": [{"method": "x", "acc": 0.5}]}))
    code, out, err = run(capsys, "report", str(tmp_path / "first" / "results.json"), str(bench), "--out",
                         str(tmp_path / "page"), "--title", "my runs")
    assert (code, err) == (0, "") and out == f"report: {tmp_path / 'page' / 'index.html'} (2 sections from 2 file(s))\n"
    page = (tmp_path / "page" / "index.html").read_text()
    assert "<title>my runs</title>" in page and "benchmark results: mine" in page and "rendered from" in page


def test_report_bad_input_is_one_line_and_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    code, out, err = run(capsys, "report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "page"))
    assert (code, out) == (2, "") and err.startswith(f"polyquant: error: cannot read {tmp_path / 'bad.json'}: ")
    assert err.count("\n") == 1 and not (tmp_path / "page").exists()
    code, _, err = run(capsys, "report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "page"))
    assert code == 2 and "No such file or directory" in err


def test_duplicate_plugin_warning_is_one_line(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _use_entry_points(monkeypatch, {"good": "pq_fake_cli_specs:GOOD"})
    eps = _registry._entry_points() * 2
    monkeypatch.setattr(_registry, "_entry_points", lambda: eps)
    code, _, err = run(capsys, "list")
    assert code == 0 and err.startswith("polyquant: warning: plugin 'good' is declared twice")


def _save_artifact(path: Path, plugin: str | None) -> Path:
    artifact = pytest.importorskip("polyquant.artifact")
    torch = pytest.importorskip("torch")
    tensors = {"float.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    artifact.save(artifact.Artifact(tensors=tensors, plugin=plugin, method="m1", config={"bits": 4}, meta={}), path)
    return path


def test_load_summarizes_an_artifact(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _save_artifact(tmp_path / "a.safetensors", plugin=None)
    code, out, err = run(capsys, "load", str(path))
    assert code == 0 and not err
    assert out.splitlines()[0] == f"{path}: {path.stat().st_size:,} bytes, 1 tensors (checksums verified)"
    assert '  method:  "m1"' in out and '  config:  {"bits": 4}' in out


def test_load_hands_the_rebuilt_model_to_its_plugin(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_plugins: None
) -> None:
    path = tmp_path / "a.safetensors"
    assert run(capsys, "quantize", "good/alpha", "--quiet", "--out", str(path))[0] == 0
    code, out, _ = run(capsys, "load", str(path), "--shout")
    assert code == 0 and out.endswith("LOADED alpha\n")
    code, out, err = run(capsys, "load", str(path), "--whisper")
    assert code == 2 and not out and err.count("\n") == 1 and "unrecognized arguments: --whisper" in err
    code, out, err = run(capsys, "load", str(_save_artifact(tmp_path / "b.safetensors", plugin="good")))
    assert code == 2 and err.count("\n") == 1 and "schema" in err  # not written by polyquant.save


def test_search_hands_the_arguments_to_the_plugin_hook(
    capsys: pytest.CaptureFixture[str], fake_plugins: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _alpha_artifact(tmp_path / "a.safetensors", {"kind": "identity"})
    assert run(capsys, "search", str(path), "the query", "-k", "5") == (
        0, "searched a.safetensors for 'the query', k=5\n", "")
    assert run(capsys, "search", str(path), "q", "-k", "0")[0] == 1  # the hook's exit code
    code, out, err = run(capsys, "search", str(path), "--help")
    assert code == 0 and out.startswith(f"usage: polyquant search {path}") and "query" in out
    code, out, err = run(capsys, "search", str(path), "q", "--bogus")
    assert code == 2 and not out and err.count("\n") == 1 and "unrecognized arguments: --bogus" in err
    # the header is enough: a damaged tensor does not stop the plugin (which may memory-map the file itself)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run(capsys, "search", str(path), "q")[0] == 0
    monkeypatch.delattr(sys.modules["pq_fake_cli_impl"], "run_search")
    code, _, err = run(capsys, "search", str(path), "q")
    assert code == 2 and err.count("\n") == 1 and "plugin 'good' (alpha) cannot search its artifacts" in err


def test_search_errors_are_one_line(capsys: pytest.CaptureFixture[str], fake_plugins: None, tmp_path: Path) -> None:
    code, _, err = run(capsys, "search")
    assert code == 2 and "the following arguments are required: ARTIFACT" in err
    code, _, err = run(capsys, "search", str(_save_artifact(tmp_path / "core.safetensors", plugin=None)), "q")
    assert code == 2 and err.count("\n") == 1 and "the artifact names no plugin, so nothing can search it" in err
    code, _, err = run(capsys, "search", str(_alpha_artifact(tmp_path / "n.safetensors", None, plugin="needy")))
    assert code == 2 and err.count("\n") == 1 and "plugin 'needy' is unavailable" in err
    (tmp_path / "junk.pqs").write_bytes(b"not an artifact")
    code, _, err = run(capsys, "search", str(tmp_path / "junk.pqs"), "q")
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "junk.pqs") in err and "Traceback" not in err
    code, _, err = run(capsys, "search", str(tmp_path / "missing.pqs"), "q")
    assert code == 2 and "cannot read file" in err


def test_load_rejects_a_damaged_artifact(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _save_artifact(tmp_path / "a.safetensors", plugin=None)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor bytes: the checksum no longer matches
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "load", str(path))
    assert code == 2 and not out and err.startswith(f"polyquant: error: {path}: ") and err.count("\n") == 1
    (tmp_path / "junk.safetensors").write_bytes(b"not an artifact")
    code, _, err = run(capsys, "load", str(tmp_path / "junk.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_and_module_entry() -> None:
    script = Path(sys.executable).parent / "polyquant"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: polyquant")
    done = subprocess.run([sys.executable, "-m", "polyquant", "frobnicate"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("polyquant: error: argument COMMAND: invalid choice: 'frobnicate'")
    assert done.stderr.count("\n") == 1


# --- issue 10: careless and hostile input ---------------------------------------------------------------------


def _never(*_: object) -> None:
    raise AssertionError("ran although --out is unusable")


@pytest.mark.parametrize(("out", "match"), [
    ("", "--out '': empty path"),
    ("{tmp}/sub/", "names a folder"),
    ("{tmp}", "is a directory"),
    ("{tmp}/missing/a.safetensors", "the folder .*missing does not exist"),
    ("{tmp}/fifo", "is a FIFO"),
    ("{tmp}/link.safetensors", "is a symbolic link"),
    ("{tmp}/exists.safetensors", "the file exists; pass --force to overwrite it"),
    ("{tmp}/" + "n" * 256, "longer than the 255"),
])
def test_quantize_checks_out_before_any_work(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path, out: str,
                                             match: str) -> None:
    import os

    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    (tmp_path / "link.safetensors").symlink_to("exists.safetensors")
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setattr(sys.modules["pq_fake_cli_impl"], "load_inputs", _never)
    code, out_text, err = run(capsys, "quantize", "good/alpha", "--out", out.format(tmp=tmp_path))
    assert code == 2 and not out_text and err.count("\n") == 1
    assert err.startswith("polyquant quantize good/alpha: error: --out ")
    assert re.search(match, err) and ".tmp" not in err
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep"


def test_quantize_force_and_never_the_input(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    impl = sys.modules["pq_fake_cli_impl"]
    monkeypatch.setattr(impl, "add_model_args", lambda parser, method: parser.add_argument("--model"))
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"float weights")
    for out in (ckpt, tmp_path / "." / "ckpt.safetensors"):
        for force in ((), ("--force",)):
            code, _, err = run(capsys, "quantize", "good/alpha", "--quiet", "--model", str(ckpt), "--out", str(out),
                               *force)
            assert code == 2 and f"--out {out}: is the input {ckpt}" in err
    assert ckpt.read_bytes() == b"float weights"
    out = tmp_path / ("ü" + "o" * 240 + ".safetensors")  # 254 bytes: the temp file name must still fit
    assert run(capsys, "quantize", "good/alpha", "--quiet", "--out", str(out))[0] == 0
    code, _, err = run(capsys, "quantize", "good/alpha", "--quiet", "--out", str(out))
    assert code == 2 and "pass --force" in err
    assert run(capsys, "quantize", "good/alpha", "--quiet", "--out", str(out), "--force")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name, out.name])


def _alpha_artifact(path: Path, model_config: object, plugin: str = "good") -> Path:
    from polyquant.artifact import Artifact, save

    config = {"schema": 1, "model": model_config, "method": {"version": 1, "bits": 8}, "state": {}}
    return save(Artifact(tensors={"w\x1b[2J": _torch().ones(2)}, plugin=plugin, method="alpha", config=config,
                         meta={"note": "\x9b31m"}), path)


def _torch() -> types.ModuleType:
    return pytest.importorskip("torch")


def test_messages_from_files_are_escaped(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def build_model(model_config: dict) -> object:  # a plugin echoing a manifest string in its error, as many do
        raise ValueError(f"unknown kind {model_config['kind']}")

    monkeypatch.setattr(sys.modules["pq_fake_cli_impl"], "build_model", build_model)
    path = _alpha_artifact(tmp_path / "a.safetensors", {"kind": "\x1b]0;pwned\x07\x1b[2J\u202e"})
    code, out, err = run(capsys, "load", str(path))
    assert code == 2 and err.count("\n") == 1
    assert all(c.isprintable() for c in out.replace("\n", "") + err.replace("\n", ""))
    assert "unknown kind \\x1b]0;pwned\\x07\\x1b[2J\\u202e" in err


def test_artifact_of_a_missing_or_disabled_plugin_can_be_inspected(
    capsys: pytest.CaptureFixture[str], fake_plugins: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = _alpha_artifact(tmp_path / "m.safetensors", {"kind": "identity"}, plugin="gone")
    code, out, err = run(capsys, "load", str(missing))
    assert code == 0 and '  plugin:  "gone"' in out and "  tensors:\n    w\\x1b[2J  float32[2]\n" in out
    assert '  meta:    {"note": "\\u009b31m"}' in out
    assert err == "polyquant: warning: the model is not rebuilt: unknown plugin 'gone' (known plugins: broken, " \
                  "good, needy)\n"
    code, out, err = run(capsys, "load", str(missing), "--shout")
    assert code == 2 and not out and "unrecognized arguments: --shout (its plugin cannot be loaded" in err
    disabled = _alpha_artifact(tmp_path / "d.safetensors", {"kind": "identity"})
    monkeypatch.setenv(DISABLE_ENV, "good")
    clear_cache()
    code, out, err = run(capsys, "load", str(disabled))
    assert code == 0 and "  tensors:" in out and "the model is not rebuilt: plugin 'good' is unavailable" in err


def test_load_help_and_debug_after_the_artifact(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                                tmp_path: Path) -> None:
    core = _save_artifact(tmp_path / "core.safetensors", plugin=None)
    for flag in ("--help", "-h"):
        code, out, err = run(capsys, "load", str(core), flag)
        assert code == 0 and out.startswith("usage: polyquant load") and not err
    code, out, err = run(capsys, "load", str(core), "--debug")
    assert code == 0 and out.startswith(f"{core}: ") and not err
    code, _, err = run(capsys, "quantize", "good/crash", "--bits", "4", "--debug")
    assert code == 1 and "Traceback" in err and err.endswith("polyquant: error: RuntimeError: kaboom\n")
    code, out, err = run(capsys, "list", "--debug", "--", "--debug")  # after '--' it is an argument again
    assert code == 2 and "unrecognized arguments: -- --debug" in err


class _ClosedPipe:
    """Standard output whose reader has gone away."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_exits_quietly(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = main(["list", "--json"])
    monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""


def test_closed_stdout_console_script() -> None:
    """'polyquant list --json | head -1': no message, no 'Exception ignored' at exit, the SIGPIPE status."""
    import os

    read_end, write_end = os.pipe()
    script = Path(sys.executable).parent / "polyquant"
    proc = subprocess.Popen([str(script), "list", "--json"], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    os.close(read_end)  # before the command writes anything
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (141, b"")


DEMOS = textwrap.dedent("""
    import sys

    from polyquant.plugins import PluginSpec

    def _spec(name, demo):
        return PluginSpec(name=name, api_version=2, summary=name, methods={"alpha": "a"}, requires=(),
                          impl="pq_fake_cli_impl", demo=demo)

    A_IMPORT_EXITS = _spec("a_import_exits", "pq_fake_cli_demo_exits:demo")
    B_IMPORT_FAILS = _spec("b_import_fails", "pq_fake_cli_demo_missing:demo")
    C_DEMO_EXITS = _spec("c_demo_exits", "pq_fake_cli_demos:exits")
    D_DEMO_RAISES = _spec("d_demo_raises", "pq_fake_cli_demos:raises")

    def exits():
        sys.exit(3)

    def raises():
        raise KeyError("lost")
""")


def test_each_demo_runs_isolated(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pq_fake_cli_demos", _module("pq_fake_cli_demos", DEMOS))
    (tmp_path / "pq_fake_cli_demo_exits.py").write_text("raise SystemExit(5)\n")  # exits while imported
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("A_IMPORT_EXITS", "B_IMPORT_FAILS", "C_DEMO_EXITS", "D_DEMO_RAISES")
    _use_entry_points(monkeypatch, {"good": "pq_fake_cli_specs:GOOD",
                                    **{name.lower(): f"pq_fake_cli_demos:{name}" for name in names}})
    clear_cache()
    code, out, err = run(capsys, "demo", "--no-report")
    assert code == 1
    assert _untimed(out).splitlines() == ["== a_import_exits ==", "== b_import_fails ==", "== c_demo_exits ==",
                                "== d_demo_raises ==", "== good ==", "good demo report"]
    errors = err.splitlines()
    assert len(errors) == 4 and all(line.startswith("polyquant: error: demo of plugin '") for line in errors)
    assert re.search(r"SystemExit: 5|exited \(code 5\)", errors[0]) and "pq_fake_cli_demo_missing" in errors[1]
    assert "exited (code 3)" in errors[2] and "KeyError: 'lost'" in errors[3]
    code, out, _ = run(capsys, "demo", "c_demo_exits", "good", "--no-report")  # named ones too
    assert code == 1 and _untimed(out).endswith("== good ==\ngood demo report\n")


def _vit_available() -> bool:
    try:
        import polyquant.plugins.vit.spec  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _vit_available(), reason="needs the vit plugin")
def test_vit_model_that_is_not_a_checkpoint_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    import os

    from polyquant.plugins.vit.models import DIGITS_VIT_PATH

    _use_entry_points(monkeypatch, {"vit": "polyquant.plugins.vit.spec:SPEC"})
    clear_cache()
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    data = DIGITS_VIT_PATH.read_bytes()  # the shipped checkpoint's metadata, over a 100,000-dimension tensor
    n = int.from_bytes(data[:8], "little")
    header = {"__metadata__": json.loads(data[8 : 8 + n])["__metadata__"],
              "w": {"dtype": "U8", "shape": [1] * 100_000, "data_offsets": [0, 1]}}
    head = json.dumps(header).encode()
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(len(head).to_bytes(8, "little") + head + b"\0")
    for model in (text, fifo, deep):
        code, out, err = run(capsys, "quantize", "vit/minmax", "--quiet", "--model", str(model))
        assert code == 2 and not out and err.count("\n") == 1
        assert err.startswith(f"polyquant quantize vit/minmax: error: --model {model}: ")



def test_info_escapes_what_the_plugin_says(capsys: pytest.CaptureFixture[str], fake_plugins: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin's summary, method summaries and requirement strings reach the terminal escaped, as in ``list``."""
    from polyquant.plugins import PluginSpec

    specs = sys.modules["pq_fake_cli_specs"]
    monkeypatch.setattr(specs, "GOOD", PluginSpec(
        name="good", api_version=2, summary="Clears the screen\x1b[2J\x1b]0;pwned\x07 and flips\u202e text.",
        methods={"alpha": "Line one\rline two\x9b31m"}, requires=(), impl="pq_fake_cli_impl"))
    clear_cache()
    code, out, _ = run(capsys, "info", "good")
    assert code == 0 and all(line.isprintable() for line in out.split("\n"))
    assert out.startswith("good: Clears the screen\\x1b[2J\\x1b]0;pwned\\x07 and flips\\u202e text.\n")
    assert "    alpha  Line one\\rline two\\x9b31m\n" in out


REPORTS = textwrap.dedent("""
    from polyquant.plugins import PluginSpec

    def _spec(name, demo):
        return PluginSpec(name=name, api_version=2, summary=name, methods={"alpha": "a"}, requires=(),
                          impl="pq_fake_cli_impl", demo=demo)

    A_UNPRINTABLE = _spec("a_unprintable", "pq_fake_cli_reports:unprintable")
    B_ESCAPES = _spec("b_escapes", "pq_fake_cli_reports:escapes")

    class Report:
        def __str__(self):
            raise RuntimeError("no text")

    def unprintable():
        return Report()

    def escapes():
        return "table\\x1b[2J\\nrow\\ttwo\\r\\u202e"
""")


def test_demo_reports_are_escaped_and_one_that_cannot_print_stops_no_other(
    capsys: pytest.CaptureFixture[str], fake_plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pq_fake_cli_reports", _module("pq_fake_cli_reports", REPORTS))
    _use_entry_points(monkeypatch, {"a_unprintable": "pq_fake_cli_reports:A_UNPRINTABLE",
                                    "b_escapes": "pq_fake_cli_reports:B_ESCAPES", "good": "pq_fake_cli_specs:GOOD"})
    clear_cache()
    code, out, err = run(capsys, "demo", "--no-report")
    assert code == 1
    assert _untimed(out).split("\n") == ["== a_unprintable ==", "== b_escapes ==", "table\\x1b[2J", "row\\ttwo\\r\\u202e",
                               "== good ==", "good demo report", ""]
    assert err == "polyquant: error: demo of plugin 'a_unprintable' failed: RuntimeError: no text\n"
