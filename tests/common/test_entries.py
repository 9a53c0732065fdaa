"""Typed weight entries (polyquant.entries): each kind's fake-quant twin against its packed module, the manifest
that describes them, and the checks on every tensor read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import polyquant as pq
from polyquant.artifact import ArtifactError
from polyquant.artifact import load as load_artifact
from polyquant.artifact import save as save_artifact
from polyquant.entries import RotatedEntry, VQEntry, WeightEntry, entry_tensors, entry_to_dict, read_entry
from polyquant.export import export, restore, weight_entries
from polyquant.formats import NF4_VALUES, LogFormat, TableFormat, format_from_dict, format_to_dict, get_format
from polyquant.nn import (
    QuantRule,
    QuantSpec,
    RotatedLinear,
    VQSpec,
    VQWeightQuantizer,
    calibrate,
    layer_specs,
    prepare,
    prepare_from_specs,
)
from polyquant.pack import pack_rows
from polyquant.packed import HadamardLinear, VQLinear, W8A8Linear, pack_model
from polyquant.primitives import PerChannel, PerGroup, PerTensor, PerToken, granularity_from_dict, granularity_to_dict


# --- table format --------------------------------------------------------------------------------------------------


def test_nf4_rounds_to_the_nearest_value_and_codes_index_the_table() -> None:
    nf4 = get_format("nf4")
    assert isinstance(nf4, TableFormat) and nf4.bits == 4 and nf4.name == "nf4" and nf4.max_value == 1.0
    x = torch.tensor([-2.0, -0.61, 0.0, 0.04, 0.041, 0.5, 0.9])
    # midpoints: (-0.6962 - 0.5251) / 2 = -0.6106 -> -0.61 goes up to -0.5251 (code 2); (0.0 + 0.0796) / 2 = 0.0398
    # -> 0.04 and 0.041 go up (code 8); (0.4407 + 0.5626) / 2 = 0.5017 -> 0.5 goes down to 0.4407 (code 12)
    want = torch.tensor([-1.0, NF4_VALUES[2], 0.0, NF4_VALUES[8], NF4_VALUES[8], NF4_VALUES[12], 1.0])
    q = nf4.round(x)
    assert torch.equal(q, want)
    assert nf4.encode(q).tolist() == [0, 2, 7, 8, 8, 12, 15]
    assert torch.equal(nf4.decode(nf4.encode(q)), q)
    with pytest.raises(ValueError, match="not in the table"):
        nf4.encode(torch.tensor([0.3]))
    with pytest.raises(ValueError, match="codes must lie"):
        TableFormat((0.0, 1.0, 2.0)).decode(torch.tensor([3]))


def test_table_of_a_log_format_holds_its_codes_values() -> None:
    log = LogFormat(3)
    table = TableFormat.of(log)
    codes = torch.arange(2 ** (log.bits + 1))
    assert table.bits == log.bits + 1
    assert torch.equal(table.decode(codes), log.decode(codes))


@pytest.mark.parametrize("name", ["int4", "uint8", "e2m1", "e4m3", "e5m2", "log2_4", "logsqrt2_3", "binary", "nf4"])
def test_formats_and_granularities_round_trip_through_json(name: str) -> None:
    fmt = get_format(name)
    assert format_from_dict(format_to_dict(fmt)) == fmt
    for gran in (PerTensor(), PerChannel(1), PerGroup(32, 0)):
        assert granularity_from_dict(granularity_to_dict(gran)) == gran
    spec = QuantSpec(fmt, PerTensor(), symmetric=True)
    assert QuantSpec.from_dict(spec.to_dict()).fmt == fmt
    with pytest.raises(ValueError):
        format_from_dict({"type": "os.system", "bits": 4})


# --- fake-quant twins against packed modules ---------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def _quantized(rules: list[QuantRule], seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    model = prepare(_mlp(seed), rules)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
    calibrate(model, [x], progress=False)
    return model.eval(), x


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vq_weight_quantizer_and_vq_linear_decode_the_same_weight(seed: int) -> None:
    spec = VQSpec(dim=4, codebook_size=16, levels=2, groups=2, seed=seed)
    model, x = _quantized([QuantRule("*", weight=spec)], seed)
    wq = model[0].weight_quantizer
    assert isinstance(wq, VQWeightQuantizer) and tuple(wq.codes_.shape) == (2, 64 * 16 // 4, 2)
    assert tuple(wq.codebooks.shape) == (2, 2, 16, 4)
    # a second level lowers the error of the first
    one = VQSpec(dim=4, codebook_size=16, levels=1, groups=2, seed=seed)
    w = model[0].weight.detach()
    single, _ = _quantized([QuantRule("*", weight=one)], seed)
    assert (model[0].quant_weight() - w).norm() < (single[0].quant_weight() - w).norm()
    ref = model(x)
    art = export(model)
    assert art.config["entries"]["0"] == {"kind": "vq", "bits": 4, "groups": 2, "levels": 2, "codebook_size": 16,
                                          "dim": 4}
    report = pack_model(model, weight_entries(model, art))
    assert set(report.packed.values()) == {"VQLinear"} and not report.kept
    assert isinstance(model[2], VQLinear)
    assert torch.equal(model(x), ref)  # the same decode (kernels.rvq_decode) and F.linear on both sides


def test_vq_decode_is_the_sum_of_the_levels_codewords() -> None:
    # one group, one row of 4 columns, d = 2: vectors (w00, w01), (w02, w03); codes [[1, 0], [0, 1]]
    books = torch.tensor([[[[0.0, 0.0], [1.0, 2.0]], [[0.5, 0.5], [-1.0, 0.0]]]])  # (G=1, R=2, C=2, d=2)
    codes = torch.tensor([[[1, 0], [0, 1]]])  # (G, M=2, R=2)
    entry = VQEntry(codes, books, (1, 4))
    assert entry.dequantize().tolist() == [[1.5, 2.5, -1.0, 0.0]]


def test_vq_codes_above_8_bits_are_packed_rows() -> None:
    """A 1024-entry codebook's codes take 10 bits in the artifact and in VQTensor (int32 before; still read)."""
    from polyquant.packed import VQTensor

    g = torch.Generator().manual_seed(0)
    books = torch.randn(1, 2, 1024, 4, generator=g)  # (G, R=2, C=1024, d)
    codes = torch.randint(0, 1024, (1, 8 * 16 // 4, 2), generator=g)  # a (8, 16) weight
    entry = VQEntry(codes, books, (8, 16))
    tensors = entry_tensors("l", entry)
    raw = tensors["l.weight_codes"]
    assert entry.bits == 10 and raw.dtype == torch.uint8 and tuple(raw.shape) == (32, 4 * 10 // 8)  # R' = 4
    back = read_entry(tensors, "l", entry_to_dict(entry))
    assert isinstance(back, VQEntry) and torch.equal(back.codes, codes)
    legacy = {**tensors, "l.weight_codes": codes.reshape(32, 2).to(torch.int32)}
    assert torch.equal(read_entry(legacy, "l", entry_to_dict(entry)).codes, codes)
    t = VQTensor.from_entry(entry)
    assert t.codes_packed.dtype == torch.uint8 and torch.equal(t.codes(), codes[0])
    assert torch.equal(t(), entry.dequantize())


@pytest.mark.parametrize("dynamic", [False, True])
def test_rotated_linear_matches_hadamard_linear(dynamic: bool) -> None:
    act = QuantSpec("int8", PerTensor()) if not dynamic else QuantSpec("int8", PerToken(), dynamic=True)
    rules = [QuantRule("2", weight=QuantSpec("int8", PerChannel(0)), input=act, rotation="hadamard"),
             QuantRule("*", weight=QuantSpec("int8", PerChannel(0)), input=act)]
    model, x = _quantized(rules)
    assert isinstance(model[2], RotatedLinear)
    ref = model(x)
    art = export(model)
    assert art.config["entries"]["2"]["kind"] == "rotated"
    report = pack_model(model, weight_entries(model, art), cpu_dtype=torch.float32)
    assert report.packed["2"] == "HadamardLinear(W8A8Linear)" and not report.kept
    assert isinstance(model[2], HadamardLinear) and isinstance(model[2].inner, W8A8Linear)
    # int8 GEMM with exact corrections vs fake-quant in fp32: equal to fp32 rounding, the same codes
    assert _relative(model(x), ref) < 1e-5


def test_rotation_without_quantizers_keeps_the_layer_output() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 5)  # 48 = 12 * 2^2: a Hadamard size that is not a power of two
    rot = RotatedLinear(lin)
    x = torch.randn(3, 48)
    assert_close(rot(x), lin(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Hadamard"):
        RotatedLinear(nn.Linear(7, 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_table_weights_pack_as_a_table_decode(seed: int) -> None:
    rules = [QuantRule("*", weight=QuantSpec("nf4", PerGroup(16)))]
    model, x = _quantized(rules, seed)
    ref = model(x)
    art = export(model)
    assert art.config["entries"]["0"]["kind"] == "table" and "0.weight_table" in art.tensors
    report = pack_model(model, weight_entries(model, art), cpu_dtype=torch.float32)
    assert set(report.packed.values()) == {"PackedLinear(decode)"}
    assert torch.equal(model(x), ref)  # the same grid values times the same scales, then F.linear


# --- self-describing artifacts ---------------------------------------------------------------------------------


def test_artifacts_rebuild_their_layers_from_the_manifest(tmp_path: Path) -> None:
    rules = [QuantRule("0", weight=VQSpec(dim=4, codebook_size=16, levels=2)),
             QuantRule("2", weight=QuantSpec("int8", PerChannel(0)), input=QuantSpec("uint8", symmetric=False),
                       rotation="hadamard"),
             QuantRule("4", weight=QuantSpec("log2_4", PerTensor()), input=QuantSpec("int8"))]
    model, x = _quantized(rules)
    ref = model(x)
    save_artifact(export(model), tmp_path / "a.safetensors")
    art = load_artifact(tmp_path / "a.safetensors")
    assert art.config["layers"] == layer_specs(model)
    skeleton = prepare_from_specs(_mlp(), art.config["layers"])  # no rules: the manifest has them
    assert torch.equal(restore(skeleton, art)(x), ref)
    with pytest.raises(ValueError, match="no layer"):
        prepare_from_specs(nn.Sequential(nn.Linear(32, 64)), art.config["layers"])


def test_restore_applies_the_recorded_quantizer_specs() -> None:
    model, x = _quantized([QuantRule("*", weight=QuantSpec("int4", PerChannel(0)), input=QuantSpec("int8"))])
    model[2].input_quantizer.spec = QuantSpec("uint8", PerTensor(), symmetric=False)  # as a search might choose
    calibrate(model, [x], progress=False)
    ref = model(x)
    skeleton = prepare(_mlp(), [QuantRule("*", weight=QuantSpec("int4", PerChannel(0)), input=QuantSpec("int8"))])
    restored = restore(skeleton, export(model))
    assert restored[2].input_quantizer.fmt.name == "uint8"
    assert torch.equal(restored(x), ref)


# --- every tensor checked before use ------------------------------------------------------------------------------


def _forged(art: pq.Artifact, key: str, value: torch.Tensor) -> pq.Artifact:
    return pq.Artifact({**art.tensors, key: value}, config=art.config)


@pytest.mark.parametrize("key,value,match", [
    ("0.weight_scale", lambda t: torch.full_like(t, float("nan")), "not finite"),
    ("0.weight_scale", lambda t: torch.zeros_like(t), "> 0"),
    ("0.weight_scale", lambda t: t.half(), "float32"),
    ("0.weight_scale", lambda t: t[:3], "float32 values"),
    ("0.weight_packed", lambda t: t[: len(t) // 2], "uint8 bytes"),
    ("0.weight_zero_point", lambda t: torch.full_like(t, float("inf")), "NaN or Inf"),
    ("0.weight_shape", lambda t: torch.tensor([64, 32, 1] + [1] * 30), "2 to 8"),
    ("2.weight_table", lambda t: torch.full_like(t, float("nan")), "NaN or Inf"),
    ("4.weight_codes", lambda t: t[:-1], "weight_codes"),
    ("4.weight_codebooks", lambda t: torch.full_like(t, float("inf")), "NaN or Inf"),
])
def test_forged_entries_are_refused_naming_the_tensor(key: str, value, match: str) -> None:
    rules = [QuantRule("0", weight=QuantSpec("uint4", PerChannel(0), symmetric=False)),
             QuantRule("2", weight=QuantSpec("nf4", PerGroup(16))),
             QuantRule("4", weight=VQSpec(dim=4, codebook_size=4))]
    model, _ = _quantized(rules)
    art = export(model)
    bad = _forged(art, key, value(art.tensors[key]))
    name = key.split(".")[0]
    with pytest.raises(ArtifactError, match=match) as info:
        read_entry(bad.tensors, name, art.config["entries"][name])
    assert key.split(".")[0] in str(info.value)
    with pytest.raises(ArtifactError):
        restore(prepare(_mlp(), rules), bad)


def test_table_codes_past_the_table_are_refused() -> None:
    fmt = TableFormat((-1.0, 0.0, 1.0))  # 3 values at 2 bits: code 3 has no value
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    entry = WeightEntry(pack_rows(codes, 2), torch.ones(1, 1), None, (1, 4), fmt, 2)
    with pytest.raises(ArtifactError, match="codes must lie"):
        read_entry(entry_tensors("l", entry), "l", entry_to_dict(entry))


def test_rotated_entries_need_a_hadamard_size() -> None:
    with pytest.raises(ValueError, match="Hadamard"):
        RotatedEntry(VQEntry(torch.zeros(1, 7, 1, dtype=torch.long), torch.zeros(1, 1, 2, 1), (1, 7)))
