"""Every vit method's artifact loads as packed modules (``polyquant.load(path, mode="packed")``) and matches the
fake-quant load: each packed layer within the kernels' tolerance on the same input (element-wise), the whole model
within the rounding flips such float differences cause in later activation quantizers, in fewer bytes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import polyquant as pq
from polyquant.capture import capture
from polyquant.packed import PACKED_MODULES, resident_bytes
from polyquant.plugins import load as load_plugin

IMPL = load_plugin("vit")
CASES = [(m, b) for m in IMPL.METHODS for b in (4, 8)]


def _layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named layer's input in one forward of ``x`` (its first call)."""
    with torch.no_grad():
        got = capture(model, names, [x], outputs=False, calls="first")
    return {name: c.input() for name, c in got.items()}


@pytest.mark.parametrize("method,bits", CASES, ids=[f"{m}-w{b}a{b}" for m, b in CASES])
def test_packed_load_matches_fake_quant(method: str, bits: int, tmp_path: Path) -> None:
    ex = IMPL.example(method)
    config = dataclasses.replace(ex.config, wbits=bits, abits=bits)
    qm = pq.quantize(ex.model, config, calib=ex.calib, progress=False)
    path = pq.save(qm, tmp_path / "a.safetensors")
    fake = pq.load(path)
    packed = pq.load(path, mode="packed", cpu_dtype=torch.float32)  # exact CPU GEMMs
    report = packed.packing
    assert report is not None and report.packed and not report.kept, report
    fast = pq.load(path, mode="packed")  # the default: bf16 CPU GEMMs (fp32 decodes: torch's fp32 ones are slower)
    assert fast.packing is not None
    kinds = fast.packing.packed.values()
    if bits == 4:  # 4-bit linears run torch's int4 GEMM (every digits model has 16-multiple widths)
        assert any(kind == "PackedLinear(cpu_int4)" for kind in kinds), fast.packing.packed
    else:
        assert any(kind in ("PackedLinear(w8)", "W8A8Linear") for kind in kinds), fast.packing.packed
    n_quantized = sum(1 for m in fake.model.modules() if isinstance(getattr(m, "weight_quantizer", None), nn.Module))
    assert len(report.packed) == n_quantized
    assert sum(isinstance(m, PACKED_MODULES) for m in packed.model.modules()) == n_quantized

    # each packed layer against its fake-quant layer on the same input, element-wise
    names = list(report.packed)
    inputs = _layer_inputs(packed.model, names, ex.inputs)
    assert set(inputs) == set(names)
    with torch.no_grad():
        for name in names:
            want = fake.model.get_submodule(name)(inputs[name])
            got = packed.model.get_submodule(name)(inputs[name])
            assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=name)
            got = fast.model.get_submodule(name)(inputs[name])
            assert_close(got, want, rtol=2e-2, atol=1e-2 * float(want.abs().max()), msg=f"{name} (bf16)")

    # the whole model: float differences of the GEMMs may flip a few later activation roundings
    with torch.no_grad():
        want, got, got_fast = fake.model(ex.inputs), packed.model(ex.inputs), fast.model(ex.inputs)
    assert (got - want).abs().mean() < 0.01 * want.abs().mean()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 7 / 8
    assert (got_fast.argmax(-1) == want.argmax(-1)).float().mean() >= 7 / 8
    assert resident_bytes(packed.model) < resident_bytes(fake.model) * (0.25 if bits == 4 else 0.4)
    assert resident_bytes(fast.model) < resident_bytes(fake.model) * (0.25 if bits == 4 else 0.4)


def test_load_mode_is_checked(tmp_path: Path) -> None:
    ex = IMPL.example("minmax")
    path = pq.save(pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="mode"):
        pq.load(path, mode="int4")


def test_cli_load_packed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from polyquant.cli import main

    ex = IMPL.example("minmax")
    config = dataclasses.replace(ex.config, wbits=4, abits=4)
    path = pq.save(pq.quantize(ex.model, config, calib=ex.calib, progress=False), tmp_path / "m.safetensors")
    assert main(["load", str(path), "--mode", "packed"]) == 0
    out = capsys.readouterr().out
    assert "PackedLinear(cpu_int4)" in out and "(packed)" in out
    assert main(["load", str(path), "--mode", "packed", "--device", "nonsense"]) == 2
    assert "--device nonsense" in capsys.readouterr().err
