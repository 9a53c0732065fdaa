"""The method contract, for every method of every discovered plugin (as timm's test_models does for models).

Each plugin's impl module gives a small offline case per method (``example(method) -> polyquant.api.MethodExample``).
Every method must: configure itself with a ``QuantConfig`` whose dict and command-line round trips are exact,
quantize through ``polyquant.quantize`` into a ``QuantizedModel`` that names its plugin and method, save, and load
back (the plugin rebuilds the model from the artifact alone) with bit-identical outputs, also from the command
line (``polyquant quantize PLUGIN/METHOD ... --out`` then ``polyquant load``, in both modes), and load packed
(``mode="packed"``, ``cpu_dtype=torch.float32``) with outputs within ``PACKED_RTOL`` of the fake-quant ones, and
compiled (``torch.compile(packed, fullgraph=True)``, or with the graph breaks the example explains in
``graph_breaks``) with outputs within ``COMPILED_RTOL`` of the eager packed ones. The compile test uses the
``aot_eager`` backend (Dynamo's capture and AOT autograd's functional graph, no code generation: the C++ compiler
of inductor is left to ``tests/common/test_compile.py`` and ``benchmarks/deploy.py``).

``PACKED_RTOL``: packed layers compute the fake-quant layer's values in another order (integer GEMMs with exact
corrections, decoded weights), so they agree to float32 rounding per layer; a rounding difference can move an
activation across a quantization step in a later layer, so the bound is on the whole output's relative L2 error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import polyquant as pq
from polyquant.cli import add_config_options, config_from_args, main
from polyquant.config import QuantConfig, cli_options
from polyquant.plugins import discover, load


PACKED_RTOL = 1e-3  # ||packed - fake|| / ||fake|| over the example's outputs (see the module docstring)
COMPILED_RTOL = 1e-5  # ||compiled - eager|| / ||eager||: the same operations, fused or reordered by the backend


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name, info in discover().items():
        if info.available and info.spec is not None:
            cases += [(name, method) for method in info.spec.methods]
    return cases


CASES = _cases()
IDS = [f"{p}/{m}" for p, m in CASES]


def _example(plugin: str, method: str) -> pq.api.MethodExample:
    impl = load(plugin)
    if not hasattr(impl, "example"):
        pytest.fail(f"plugin {plugin!r} gives no example(method) for the contract test")
    return impl.example(method)


def _argv(config: QuantConfig) -> list[str]:
    """Command-line options that rebuild ``config`` (every field, defaults included)."""
    argv: list[str] = []
    for opt in cli_options(type(config)):
        value = getattr(config, opt.field)
        flag = opt.flags[0]
        if opt.kind == "bool":
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, "none" if value is None else str(value)]
    return argv


def test_every_plugin_has_methods() -> None:
    assert CASES, "no plugin with methods was discovered"


@pytest.mark.parametrize("plugin,method", CASES, ids=IDS)
def test_config_round_trips(plugin: str, method: str) -> None:
    cls = load(plugin).METHODS[method]
    assert isinstance(cls, type) and issubclass(cls, QuantConfig)
    config = _example(plugin, method).config
    assert type(config) is cls
    data = json.loads(json.dumps(config.to_dict()))  # JSON-ready
    assert data["version"] == cls.VERSION
    assert cls.from_dict(data) == config
    with pytest.raises(ValueError):
        cls.from_dict({**data, "no_such_field": 1})
    parser = argparse.ArgumentParser()
    add_config_options(parser, cls)
    assert config_from_args(cls, parser.parse_args([]), "test") == cls()  # CLI defaults = dataclass defaults
    assert config_from_args(cls, parser.parse_args(_argv(config)), "test") == config


@pytest.mark.parametrize("plugin,method", CASES, ids=IDS)
def test_quantize_save_load_same_outputs(plugin: str, method: str, tmp_path: Path) -> None:
    ex = _example(plugin, method)
    with torch.no_grad():
        before = ex.model(ex.inputs)
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False)
    assert isinstance(qm, pq.QuantizedModel) and (qm.plugin, qm.method) == (plugin, method)
    assert qm.config == ex.config
    with torch.no_grad():
        assert torch.equal(ex.model(ex.inputs), before)  # the input model is not modified
        out = qm.model(ex.inputs)
    assert not torch.equal(out, before)  # something was quantized
    path = pq.save(qm, tmp_path / "a.safetensors")
    restored = pq.load(path)
    assert (restored.plugin, restored.method, restored.config) == (plugin, method, ex.config)
    with torch.no_grad():
        assert torch.equal(restored.model(ex.inputs), out)
    # with the float model given instead of the recorded description
    with torch.no_grad():
        assert torch.equal(pq.load(path, model=ex.model).model(ex.inputs), out)
    # packed: the weights as codes on the packed modules, within PACKED_RTOL of fake-quant
    packed = pq.load(path, mode="packed", cpu_dtype=torch.float32)
    assert packed.packing is not None and not (set(packed.packing.packed) & set(packed.packing.kept))
    with torch.no_grad():
        got = packed.model(ex.inputs)
    err = float((got.float() - out.float()).norm() / out.float().norm().clamp_min(1e-12))
    assert err <= PACKED_RTOL, f"packed vs fake-quant relative error {err:.2e}; packing {packed.packing}"
    _check_compiled(packed.model, ex)


def _check_compiled(model: torch.nn.Module, ex: pq.api.MethodExample) -> None:
    """The packed model compiled as one graph (or with the example's explained breaks) gives its eager outputs."""
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ex.inputs)
        compiled = torch.compile(model, fullgraph=ex.graph_breaks is None, backend="aot_eager")
        got = compiled(ex.inputs)
    err = float((got.float() - eager.float()).norm() / eager.float().norm().clamp_min(1e-12))
    assert err <= COMPILED_RTOL, f"compiled vs eager relative error {err:.2e}"
    torch._dynamo.reset()


@pytest.mark.parametrize("plugin,method", CASES, ids=IDS)
def test_command_line_round_trip(plugin: str, method: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = _example(plugin, method).config
    out = tmp_path / "cli.safetensors"
    code = main(["quantize", f"{plugin}/{method}", *_argv(config), "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert pq.load(out).config == config
    assert main(["load", str(out)]) == 0, capsys.readouterr().err
    assert main(["load", str(out), "--mode", "packed", "--device", "cpu"]) == 0, capsys.readouterr().err


def test_quantize_after_importing_only_the_config_module() -> None:
    # The handler lives in the plugin's impl module; quantize loads the plugin that defines the config class.
    import subprocess
    import sys

    code = ("import torch, polyquant as pq\n"
            "from polyquant.plugins.vit.baselines import MinMaxConfig\n"
            "from polyquant.plugins.vit.models import build_model\n"
            "m, _ = build_model('digits-vit')\n"
            "qm = pq.quantize(m, MinMaxConfig(wbits=8, abits=8, calib_size=4), calib=[torch.randn(4, 1, 32, 32)],"
            " progress=False)\n"
            "print(qm.plugin, qm.method)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["vit", "minmax"]
