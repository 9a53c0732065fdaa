"""Turn a calibrated fake-quant model into a real quantized artifact, and back.

``export_model(model)`` gives every frozen weight quantizer's weight as a typed entry (``polyquant.entries``: int,
float, table, vq, rotated) and keeps the float tensors that were not quantized; ``export(model)`` packs that into an
``Artifact`` whose manifest describes it (``manifest_sections``: the entries, every quantizer's spec and the core
quant layers), and ``restore(model, artifact)`` loads such an artifact into a model prepared with the same rules
(or, with ``prepare_from_specs``, into a float copy) and returns it quantized, outputs identical to the exported
model. ``polyquant.save`` / ``load`` do the same through a plugin's handler.

Keys (flat, per module ``<fqn>``):

    <fqn>.weight_*           the weight's entry (``polyquant.entries``: weight_packed / weight_scale /
                             weight_zero_point / weight_table / weight_codes / weight_codebooks / weight_shape)
    <quantizer>.scale / .zero_point       activation quantizers' frozen qparams
    float.<name>             every other parameter / buffer of the model, unchanged

Manifest (``config``): ``entries`` {fqn: entry JSON}, ``quantizers`` {name: spec JSON}, ``layers`` {fqn: layer JSON,
``polyquant.nn.layer_specs``}.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .artifact import Artifact, ArtifactError
from .entries import Entry, RotatedEntry, VQEntry, WeightEntry, entry_tensors, entry_to_dict, read_entries, read_entry
from .entries import read_weight
from .formats import FloatFormat, IntFormat, LogFormat, TableFormat
from .nn import ActQuantizer, Quantizer, QuantSpec, QuantWeightModule, RotatedLinear, VQWeightQuantizer, layer_specs
from .pack import pack_rows
from .primitives import PerChannel, PerTensor, block_size_for

__all__ = [
    "export",
    "export_model",
    "export_tensors",
    "split_export",
    "manifest_sections",
    "quantizer_specs",
    "weight_entry",
    "restore",
    "code_bits",
    "weight_entries",
    "check_finite",
]


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` when the floating-point ``tensor`` holds NaN or Inf.

    Codes cannot represent them (a NaN weight would be stored as some code and restored as a finite value), so
    every exporter calls this on the weights it quantizes and on their qparams before packing them.
    """
    if not tensor.dtype.is_floating_point:
        return
    bad = int((~torch.isfinite(tensor.detach())).sum())
    if bad:
        raise ValueError(f"{name}: {bad} of {tensor.numel()} values are NaN or Inf; cannot export non-finite "
                         "weights (check the calibration data and any training after calibrate())")


def code_bits(q: Quantizer) -> int:
    """Bits per stored code of a quantizer's format (log formats need one more for their zero)."""
    fmt = q.fmt
    if isinstance(fmt, LogFormat):
        return fmt.bits + 1
    return fmt.bits


def _has_codes(wq: Quantizer) -> bool:
    """Whether the quantizer's stored codes are known: the core rounding, or a subclass that gives its ``codes``."""
    own_rounding = type(wq).fake_quant is not Quantizer.fake_quant
    return not own_rounding or type(wq).codes is not Quantizer.codes


def weight_entry(name: str, module: QuantWeightModule) -> Entry | None:
    """The entry of a quant layer's frozen weight quantizer (None: the weight stays float: no quantizer, or one
    with its own rounding and no ``codes``, or a format without codes such as twin-uniform). ``ValueError`` for a
    quantizer that is not frozen or non-finite weights / qparams."""
    wq = module.weight_quantizer
    if wq is None:
        return None
    if wq.state != "quantized":
        raise ValueError(f"{name}: weight quantizer is not frozen; run calibrate() before export")
    check_finite(f"{name}.weight", module.weight)
    shape = tuple(module.weight.shape)
    inner: WeightEntry | VQEntry | None
    if isinstance(wq, VQWeightQuantizer):
        assert wq.codes_ is not None and wq.codebooks is not None
        check_finite(f"{name}.weight_quantizer.codebooks", wq.codebooks)
        inner = VQEntry(wq.codes_, wq.codebooks, shape)
    elif not _has_codes(wq) or not isinstance(wq.fmt, (IntFormat, FloatFormat, TableFormat, LogFormat)) \
            and wq.fmt.name != "binary":
        return None
    else:
        if wq.scale is None:
            raise ValueError(f"{name}: weight quantizer is not frozen; run calibrate() before export")
        check_finite(f"{name}.weight_quantizer.scale", wq.scale)
        fmt = wq.fmt if isinstance(wq.fmt, (IntFormat, FloatFormat, TableFormat)) else TableFormat.of(wq.fmt)
        zp = wq.zero_point if isinstance(fmt, IntFormat) else None
        if zp is not None:
            check_finite(f"{name}.weight_quantizer.zero_point", zp)
        codes = wq.codes(module.weight.detach())
        inner = WeightEntry(pack_rows(codes.reshape(shape[0], -1), fmt.bits), wq.scale.detach().float(),
                            None if zp is None else zp.detach().float(), shape, fmt, fmt.bits, wq.block_size(module.weight))
    if isinstance(module, RotatedLinear):
        return RotatedEntry(inner, rotation=module.rotation)
    return inner


_ENTRY_STATE = ("scale", "zero_point", "codes_", "codebooks")  # weight-quantizer buffers an entry carries


def export_model(model: nn.Module) -> dict[str, Tensor | Entry]:
    """What an artifact holds of a calibrated model: ``{fqn: Entry}`` for each quantized weight, activation
    qparams as ``<quantizer>.scale`` / ``.zero_point`` and every other state tensor as ``float.<key>``."""
    out: dict[str, Tensor | Entry] = {}
    skip: set[str] = set()
    weight_quantizers: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightModule) and module.weight_quantizer is not None:
            weight_quantizers.add(f"{name}.weight_quantizer")
            entry = weight_entry(name, module)
            if entry is not None:
                out[name] = entry
                skip |= {f"{name}.weight", *(f"{name}.weight_quantizer.{b}" for b in _ENTRY_STATE)}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and name not in weight_quantizers and module.scale is not None:
            check_finite(f"{name}.scale", module.scale)
            out[f"{name}.scale"] = module.scale.detach().float().contiguous()
            skip.add(f"{name}.scale")
            if module.zero_point is not None:
                check_finite(f"{name}.zero_point", module.zero_point)
                out[f"{name}.zero_point"] = module.zero_point.detach().float().contiguous()
                skip.add(f"{name}.zero_point")
    for key, t in model.state_dict().items():
        if key not in skip:
            out[f"float.{key}"] = t.detach().contiguous()
    return out


def split_export(exported: dict[str, Tensor | Entry]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An export's artifact tensors (entries written out) and its entries' manifest JSON."""
    tensors: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    for key, value in exported.items():
        if isinstance(value, Tensor):
            written = {key: value}
        elif isinstance(value, (WeightEntry, VQEntry, RotatedEntry)):
            written = entry_tensors(key, value)
            entries[key] = entry_to_dict(value)
        else:
            raise TypeError(f"export value {key!r} is a {type(value).__name__}, not a Tensor or a weight entry")
        if written.keys() & tensors.keys():
            raise ValueError(f"two exported values write the artifact key {sorted(written.keys() & tensors.keys())[0]}")
        tensors.update(written)
    return tensors, entries


def export_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The artifact tensors of a calibrated model (``export_model`` with its entries written out)."""
    return split_export(export_model(model))[0]


def quantizer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every quantizer's spec as JSON, by module name: ``spec`` (``QuantSpec.to_dict`` or ``VQSpec.to_dict``), the
    quantizer's class name, and for reading at a glance its format name, granularity, scheme and stored bits."""
    return {name: _spec_dict(m) for name, m in model.named_modules() if isinstance(m, Quantizer)}


def manifest_sections(model: nn.Module, entries: dict[str, Any]) -> dict[str, Any]:
    """The manifest's self-description of a quantized model: ``entries``, ``quantizers`` and ``layers``."""
    return {"entries": entries, "quantizers": quantizer_specs(model), "layers": layer_specs(model)}


def export(
    model: nn.Module,
    *,
    plugin: str | None = None,
    method: str | None = None,
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Artifact:
    """Pack a calibrated model into an ``Artifact`` (see the module docstring for the keys and manifest)."""
    tensors, entries = split_export(export_model(model))
    sections = manifest_sections(model, entries)
    return Artifact(
        tensors=tensors,
        plugin=plugin,
        method=method,
        config={**(config or {}), **sections},
        meta=dict(meta or {}),
    )


def _is_quantizer_buffer(model: nn.Module, name: str) -> bool:
    owner = name.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), Quantizer)
    except AttributeError:
        return False


def _spec_dict(q: Quantizer) -> dict[str, Any]:
    s = q.spec
    return {
        "class": type(q).__name__,
        "spec": q.vq.to_dict() if isinstance(q, VQWeightQuantizer) else s.to_dict(),
        "format": q.fmt.name,
        "granularity": type(s.granularity).__name__,
        "symmetric": s.symmetric,
        "dynamic": s.dynamic,
        "bits": code_bits(q),
    }


def _artifact_specs(artifact: Artifact, specs: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The quantizer specs a restore reads: given, else the manifest's (``config``), else an older artifact's
    ``meta["quantizers"]``."""
    if specs is not None:
        return specs
    found = artifact.config.get("quantizers", artifact.meta.get("quantizers", {}))
    if not isinstance(found, dict):
        raise ArtifactError("the manifest's quantizers must be a JSON object")
    return found


def _legacy_entry(artifact: Artifact, name: str, wq: Quantizer, specs: dict[str, Any]) -> WeightEntry:
    """The int / float entry of an artifact whose manifest records no entries (written before they existed)."""
    key = f"{name}.weight_quantizer"
    if key not in specs or not isinstance(specs[key], dict) or specs[key].get("format") != wq.fmt.name:
        raise ArtifactError(f"artifact does not match the model: {key} missing or of another format")
    entry = read_weight(artifact.tensors, name, wq.fmt, specs[key].get("bits", wq.fmt.bits))
    shape = tuple(int(v) for v in entry.shape)
    block = wq.spec and block_size_for(wq.spec.granularity, shape)
    if tuple(block) != tuple(entry.block or ()):
        raise ArtifactError(f"{name}: blocks {tuple(block)} of a {shape} weight are not rows of the flattened weight")
    return entry


def _load_entry(name: str, module: QuantWeightModule, entry: Entry) -> None:
    """Set a quant layer's weight and weight quantizer from its entry (the fake-quant twin of the entry)."""
    wq = module.weight_quantizer
    assert wq is not None
    if isinstance(entry, RotatedEntry) != isinstance(module, RotatedLinear):
        raise ArtifactError(f"{name}: a {entry.kind} entry for a {type(module).__name__}")
    if isinstance(entry, RotatedEntry):
        entry = entry.inner
    if tuple(entry.shape) != tuple(module.weight.shape):
        raise ArtifactError(f"{name}: weight shape {entry.shape} in the artifact, {tuple(module.weight.shape)} in the model")
    if isinstance(entry, VQEntry):
        if not isinstance(wq, VQWeightQuantizer):
            raise ArtifactError(f"{name}: a vq entry for a {wq.fmt.name} weight quantizer")
        wq.set_codes(entry.codes, entry.codebooks)
    else:
        fmt = wq.fmt if isinstance(wq.fmt, (IntFormat, FloatFormat, TableFormat)) else TableFormat.of(wq.fmt)
        same = fmt.values == entry.fmt.values if isinstance(fmt, TableFormat) and isinstance(entry.fmt, TableFormat) \
            else fmt == entry.fmt
        if isinstance(wq, VQWeightQuantizer) or not same:
            raise ArtifactError(f"{name}: weights of format {entry.fmt.name} in the artifact, {wq.fmt.name} in the model")
        want = tuple(wq.block_size(module.weight))
        if tuple(entry.block or ()) != want:
            raise ArtifactError(f"{name}: blocks {entry.block} in the artifact, {want} in the model")
        scale = entry.scale.reshape(wq.scale.shape) if wq.scale is not None and wq.scale.numel() == entry.scale.numel() \
            else entry.scale
        zp = None if entry.zero_point is None else entry.zero_point.reshape(scale.shape)
        wq.freeze(scale, zp)
    with torch.no_grad():
        module.weight.copy_(entry.dequantize().to(module.weight.dtype))
    wq.set_state("quantized")


def restore(model: nn.Module, artifact: Artifact, *, specs: dict[str, dict[str, Any]] | None = None,
            strict: bool = True) -> nn.Module:
    """Load ``artifact`` into ``model`` (prepared with the same rules, not calibrated); returns it quantized.

    Weights come from the manifest's ``entries`` (each tensor checked by ``polyquant.entries.read_entry``);
    artifacts written before entries existed are read as int / float entries with the quantizer specs (``specs``,
    default: the manifest's, where ``export`` and ``polyquant.save`` record them).
    """
    t = artifact.tensors
    entries = artifact.config.get("entries")
    legacy = entries is None
    if not legacy and not isinstance(entries, dict):
        raise ArtifactError("the manifest's entries must be a JSON object")
    spec_map = _artifact_specs(artifact, specs) if legacy else {}
    if not legacy:
        _apply_recorded_specs(model, artifact.config.get("quantizers"))
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightModule) and module.weight_quantizer is not None:
            wq = module.weight_quantizer
            if legacy:
                entry: Entry = _legacy_entry(artifact, name, wq, spec_map)
            elif name in entries:
                entry = read_entry(t, name, entries[name])
            elif _has_codes(wq):
                raise ArtifactError(f"artifact does not match the model: no weight entry for {name}")
            else:
                continue  # the weight and the quantizer's state are float.* tensors
            _load_entry(name, module, entry)
    if not legacy and set(entries) - {n for n, m in model.named_modules() if isinstance(m, QuantWeightModule)}:
        extra = sorted(set(entries) - {n for n, m in model.named_modules() if isinstance(m, QuantWeightModule)})
        raise ArtifactError(f"artifact does not match the model: entries for {extra[:5]}, which are not quant layers")
    weight_quantizers = {id(m.weight_quantizer) for m in model.modules() if isinstance(m, QuantWeightModule)}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and id(module) not in weight_quantizers:
            if f"{name}.scale" in t:
                scale = _qparam(t, f"{name}.scale", positive=True)
                zp = _qparam(t, f"{name}.zero_point") if f"{name}.zero_point" in t else None
                _check_qparam_shapes(name, module, scale, zp)
                module.freeze(scale, zp)
            elif not module.spec.dynamic:
                raise ArtifactError(f"artifact has no qparams for quantizer {name}")
            module.observer = None
    floats = {k[len("float."):]: v for k, v in t.items() if k.startswith("float.")}
    _check_floats(model, floats)
    missing, unexpected = model.load_state_dict(floats, strict=False)
    missing = [k for k in missing if not _is_quantized_key(model, k)]
    if strict and (missing or unexpected):
        raise ArtifactError(f"artifact does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and id(module) not in weight_quantizers:
            module.set_state("quantized")
    return model


def _apply_recorded_specs(model: nn.Module, recorded: Any) -> None:
    """Give each core ``Quantizer`` / ``ActQuantizer`` of ``model`` the spec the manifest records for it: a method
    that searched a quantizer's format, granularity or scheme needs no state of its own to restore it."""
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise ArtifactError("the manifest's quantizers must be a JSON object")
    for name, q in model.named_modules():
        if type(q) in (Quantizer, ActQuantizer) and isinstance(recorded.get(name), dict) and "spec" in recorded[name]:
            try:
                q.spec = QuantSpec.from_dict(recorded[name]["spec"])
            except ValueError as e:
                raise ArtifactError(f"{name}: the manifest's quantizer spec is invalid: {e}") from None


def _qparam(tensors: dict[str, Tensor], key: str, *, positive: bool = False) -> Tensor:
    t = tensors[key]
    if t.dtype != torch.float32 or t.numel() == 0:
        raise ArtifactError(f"{key} must be float32 values, got {t.dtype} {list(t.shape)}")
    bad = ~torch.isfinite(t) if not positive else ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        raise ArtifactError(f"{key}: {int(bad.sum())} values are {'not finite and > 0' if positive else 'NaN or Inf'}")
    return t


def _check_qparam_shapes(name: str, q: Quantizer, scale: Tensor, zero_point: Tensor | None) -> None:
    """An activation quantizer's restored scale / zero point fit it: the shape of the parameters a quantizer
    subclass registers at construction, else (the core quantizers) its granularity's: one value per tensor, or one
    axis of values per channel (the channel count itself is checked by the load's probe forward)."""
    g = q.spec.granularity
    if q.scale is not None and tuple(q.scale.shape) != tuple(scale.shape):
        raise ArtifactError(f"{name}.scale: shape {list(scale.shape)} in the artifact, the model's quantizer has "
                            f"{list(q.scale.shape)}")
    if q.scale is None and type(q) in (Quantizer, ActQuantizer):
        if isinstance(g, PerTensor) and scale.numel() != 1:
            raise ArtifactError(f"{name}.scale: a per-tensor quantizer has one scale, got shape {list(scale.shape)}")
        if isinstance(g, PerChannel) and sum(s != 1 for s in scale.shape) > 1:
            raise ArtifactError(f"{name}.scale: a per-channel quantizer's scales lie along one axis, got shape "
                                f"{list(scale.shape)}")
    if zero_point is not None and tuple(zero_point.shape) != tuple(scale.shape):
        raise ArtifactError(f"{name}.zero_point: shape {list(zero_point.shape)}, its scale has {list(scale.shape)}")


def _check_floats(model: nn.Module, floats: dict[str, Tensor]) -> None:
    """Each ``float.*`` tensor against the skeleton's own: same shape, a dtype it can take (the same, or another
    of float32 / float16 / bfloat16 for a floating-point tensor: cast to the skeleton's), finite values where the
    skeleton's are (a mask buffer of -inf stays allowed). ``ArtifactError`` naming the tensor otherwise."""
    expected = model.state_dict()
    for key, got in floats.items():
        want = expected.get(key)
        if want is None:
            continue  # not in the model: reported with the missing / unexpected keys
        same_kind = got.dtype == want.dtype or {got.dtype, want.dtype} <= _CASTABLE
        if not same_kind or tuple(got.shape) != tuple(want.shape):
            raise ArtifactError(f"float.{key}: {str(got.dtype).removeprefix('torch.')} {list(got.shape)} in the "
                                f"artifact, the model has {str(want.dtype).removeprefix('torch.')} {list(want.shape)}")
        if got.is_floating_point() and got.numel() and not bool(torch.isfinite(got).all()) \
                and bool(torch.isfinite(want).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ArtifactError(f"float.{key}: {bad} of {got.numel()} values are NaN or Inf")


_CASTABLE = {torch.float32, torch.float16, torch.bfloat16}


def _is_quantized_key(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    try:
        m = model.get_submodule(owner)
    except AttributeError:
        return False
    if isinstance(m, Quantizer):
        return True
    return leaf == "weight" and isinstance(m, QuantWeightModule) and m.weight_quantizer is not None


def weight_entries(model: nn.Module, artifact: Artifact, *, specs: dict[str, dict[str, Any]] | None = None
                   ) -> dict[str, Entry | str]:
    """The weight entries of a restored model, by module name, for ``polyquant.load(mode="packed")``: the
    manifest's ``entries`` (any plugin's; each tensor checked), or for an older artifact the int / float entries
    of its core quant layers. A quant layer whose weight has no entry maps to the reason it stays fake-quant."""
    entries = artifact.config.get("entries")
    out: dict[str, Entry | str] = {}
    if entries is not None:
        out.update(read_entries(artifact.tensors, entries))
        for name, module in model.named_modules():
            if isinstance(module, QuantWeightModule) and module.weight_quantizer is not None and name not in out:
                out[name] = f"{type(module.weight_quantizer).__name__} weights are not stored as codes"
        return out
    spec_map = _artifact_specs(artifact, specs)
    for name, module in model.named_modules():
        if not isinstance(module, QuantWeightModule) or module.weight_quantizer is None:
            continue
        wq = module.weight_quantizer
        if not isinstance(wq.fmt, (IntFormat, FloatFormat)):
            out[name] = f"{wq.fmt.name} weights have no packed module"
            continue
        try:
            out[name] = _legacy_entry(artifact, name, wq, spec_map)
        except ArtifactError as e:
            out[name] = str(e)
    return out
