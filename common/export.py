"""Turn a calibrated fake-quant model into a real quantized artifact, and back.

``export(model)`` packs every frozen weight quantizer's codes into bytes and keeps the float
tensors that were not quantized; ``restore(model, artifact)`` loads such an artifact into a model prepared with
the same rules and returns it quantized, with outputs identical to the exported model.

Keys (flat, per module ``<fqn>``):

    <fqn>.weight_packed      uint8   codes of the weight, ``bits`` per code, in ``polyquant.pack``'s row layout
                                     (one zero-padded row of bytes per output channel): the layout the GEMM
                                     kernels read, so these bytes feed ``polyquant.kernels.w4_gemm`` unchanged
    <fqn>.weight_scale       float32 per-block scales
    <fqn>.weight_zero_point  float32 per-block zero points (INT formats)
    <fqn>.weight_shape       int64   the weight's shape
    <quantizer>.scale / .zero_point       activation quantizers' frozen qparams
    float.<name>             every other parameter / buffer of the model, unchanged
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .artifact import Artifact, ArtifactError
from .formats import BinaryFormat, FloatFormat, IntFormat, LogFormat
from .nn import Quantizer, QuantWeightModule
from .pack import pack_bits, pad_rows, unpack_rows
from .primitives import block_size_for, dequantize, quantize_tensor

__all__ = ["export", "export_tensors", "quantizer_specs", "restore", "code_bits", "weight_entries", "check_finite"]


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


def _weight_codes(module: QuantWeightModule) -> tuple[Tensor, int]:
    wq = module.weight_quantizer
    assert wq is not None and wq.scale is not None
    w = module.weight.detach().float()
    bs = block_size_for(wq.spec.granularity, w.shape)
    zp = wq.zero_point if wq.fmt.supports_zero_point else None
    q = quantize_tensor(w, wq.fmt, wq.scale, zp, bs)
    fmt = wq.fmt
    if isinstance(fmt, (IntFormat, FloatFormat, BinaryFormat)):
        codes = fmt.encode(q)
    else:
        codes = fmt.encode(q).to(torch.uint8)
    bits = code_bits(wq)
    return pad_rows(codes.reshape(codes.shape[0], -1), bits), bits  # pack_bits of these rows: the row layout of pack


def export_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The artifact tensors of a calibrated model (keys in the module docstring)."""
    tensors: dict[str, Tensor] = {}
    quantized_weights: set[str] = set()
    weight_quantizers: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightModule) and module.weight_quantizer is not None:
            wq = module.weight_quantizer
            if wq.state != "quantized" or wq.scale is None:
                raise ValueError(f"{name}: weight quantizer is not frozen; run calibrate() before export")
            check_finite(f"{name}.weight", module.weight)
            check_finite(f"{name}.weight_quantizer.scale", wq.scale)
            if wq.zero_point is not None:
                check_finite(f"{name}.weight_quantizer.zero_point", wq.zero_point)
            codes, bits = _weight_codes(module)
            tensors[f"{name}.weight_packed"] = pack_bits(codes.flatten(), bits)
            tensors[f"{name}.weight_scale"] = wq.scale.float().contiguous()
            tensors[f"{name}.weight_zero_point"] = wq.zero_point.float().contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor(list(module.weight.shape), dtype=torch.int64)
            quantized_weights.add(f"{name}.weight")
            weight_quantizers.add(f"{name}.weight_quantizer")
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and name not in weight_quantizers and module.scale is not None:
            check_finite(f"{name}.scale", module.scale)
            if module.zero_point is not None:
                check_finite(f"{name}.zero_point", module.zero_point)
            tensors[f"{name}.scale"] = module.scale.float().contiguous()
            tensors[f"{name}.zero_point"] = module.zero_point.float().contiguous()
    for name, t in model.state_dict().items():
        if name in quantized_weights or name.endswith((".scale", ".zero_point")) and _is_quantizer_buffer(model, name):
            continue
        tensors[f"float.{name}"] = t.detach().contiguous()
    return tensors


def quantizer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every quantizer's spec as JSON (format, granularity, symmetric, dynamic, stored bits), by module name."""
    return {name: _spec_dict(m, code_bits(m)) for name, m in model.named_modules() if isinstance(m, Quantizer)}


def export(
    model: nn.Module,
    *,
    plugin: str | None = None,
    method: str | None = None,
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Artifact:
    """Pack a calibrated model into an ``Artifact`` (see the module docstring for the keys)."""
    return Artifact(
        tensors=export_tensors(model),
        plugin=plugin,
        method=method,
        config=dict(config or {}),
        meta={**(meta or {}), "quantizers": quantizer_specs(model)},
    )


def _is_quantizer_buffer(model: nn.Module, name: str) -> bool:
    owner = name.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), Quantizer)
    except AttributeError:
        return False


def _spec_dict(q: Quantizer, bits: int) -> dict[str, Any]:
    s = q.spec
    return {
        "format": q.fmt.name,
        "granularity": type(s.granularity).__name__,
        "symmetric": s.symmetric,
        "dynamic": s.dynamic,
        "bits": bits,
    }


def restore(model: nn.Module, artifact: Artifact, *, specs: dict[str, dict[str, Any]] | None = None,
            strict: bool = True) -> nn.Module:
    """Load ``artifact`` into ``model`` (prepared with the same rules, not calibrated); returns it quantized.

    ``specs``: the quantizers' specs (``quantizer_specs`` of the exported model); default: the artifact's
    ``meta["quantizers"]``, where ``export`` records them.
    """
    t = artifact.tensors
    specs = artifact.meta.get("quantizers", {}) if specs is None else specs
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightModule) and module.weight_quantizer is not None:
            wq = module.weight_quantizer
            key = f"{name}.weight_quantizer"
            if key not in specs or specs[key]["format"] != wq.fmt.name:
                raise ArtifactError(f"artifact does not match the model: {key} missing or of another format")
            shape = tuple(int(v) for v in t[f"{name}.weight_shape"].tolist())
            if shape != tuple(module.weight.shape):
                raise ArtifactError(f"{name}: weight shape {shape} in the artifact, {tuple(module.weight.shape)} in the model")
            numel = 1
            for d in shape:
                numel *= d
            packed = t[f"{name}.weight_packed"].reshape(shape[0], -1)  # one row of bytes per output channel
            codes = unpack_rows(packed, specs[key]["bits"], numel // shape[0]).reshape(shape)
            q = wq.fmt.decode(codes)
            scale, zp = t[f"{name}.weight_scale"], t[f"{name}.weight_zero_point"]
            bs = block_size_for(wq.spec.granularity, shape)
            w = dequantize(q, scale, zp if wq.fmt.supports_zero_point else None, bs)
            with torch.no_grad():
                module.weight.copy_(w.to(module.weight.dtype))
            wq.scale, wq.zero_point = scale.clone(), zp.clone()
            wq.observer = None
            wq.state = "quantized"
    weight_quantizers = {id(m.weight_quantizer) for m in model.modules() if isinstance(m, QuantWeightModule)}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and id(module) not in weight_quantizers:
            if f"{name}.scale" in t:
                module.scale, module.zero_point = t[f"{name}.scale"].clone(), t[f"{name}.zero_point"].clone()
            elif not module.spec.dynamic:
                raise ArtifactError(f"artifact has no qparams for quantizer {name}")
            module.observer = None
            module.state = "quantized"
    floats = {k[len("float."):]: v for k, v in t.items() if k.startswith("float.")}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    missing = [k for k in missing if not _is_quantized_key(model, k)]
    if strict and (missing or unexpected):
        raise ArtifactError(f"artifact does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _is_quantized_key(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    try:
        m = model.get_submodule(owner)
    except AttributeError:
        return False
    if isinstance(m, Quantizer):
        return True
    return leaf == "weight" and isinstance(m, QuantWeightModule) and m.weight_quantizer is not None


def weight_entries(model: nn.Module, artifact: Artifact, *, specs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The packed-weight entries (``polyquant.packed.WeightEntry``) of a restored core fake-quant model, by module
    name, for ``polyquant.load(mode="packed")``; a layer whose weight cannot be packed maps to the reason.

    Packed modules read blocks (1, g) of the weight flattened to (N, K): per-tensor, per-channel along axis 0 and
    per-group along the last axis of a 2-d weight. Log and binary formats stay fake-quant.
    """
    from .packed import read_weight

    specs = artifact.meta.get("quantizers", {}) if specs is None else specs
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantWeightModule) or module.weight_quantizer is None:
            continue
        wq = module.weight_quantizer
        shape = tuple(module.weight.shape)
        bs = block_size_for(wq.spec.granularity, shape)
        if not isinstance(wq.fmt, (IntFormat, FloatFormat)):
            out[name] = f"{wq.fmt.name} weights have no packed module"
        elif tuple(bs) != shape and (bs[0] != 1 or (len(shape) > 2 and tuple(bs[1:]) != shape[1:])):
            out[name] = f"blocks {bs} of a {shape} weight are not rows of the flattened weight"
        else:
            bits = specs.get(f"{name}.weight_quantizer", {}).get("bits", wq.fmt.bits)
            out[name] = read_weight(artifact.tensors, name, wq.fmt, int(bits))
    return out
