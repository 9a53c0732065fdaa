"""A compressed scene as artifact tensors, back, and the exact size of each component in the written file.

The artifact is polyquant's (safetensors + JSON manifest; the file may be named ``scene.pqs``); its tensors are the
coded streams, as OMG's ``comp.xz`` holds them, each a uint8 tensor of bytes:

| key | what |
|---|---|
| ``positions`` | fp16 positions in canonical order, delta + LZMA (``coding.encode_positions``; non-G-PCC) |
| ``vq.<attr>.codes.<m>`` | sub-vector m's indices, range-coded on their histogram (``coding.encode_symbols``) |
| ``vq.<attr>.codebook.<m>`` | its codebook (K_m, L_m), float16 |
| ``uniform.<attr>.codes.<c>`` | channel c's 8-bit codes, range-coded |
| ``uniform.<attr>.qparams`` | (2, D) float32: per-channel scale, zero point |
| ``mlp.<parameter>`` | OMG's MLP weights, float16; ``mlp.aabb`` (2, 3) float32 |

The method's ``state`` (JSON) records the layout: Gaussian count, SH degree, and per attribute its kind and slices /
codebook sizes (vq) or bits (uniform), and the decoder's width and frequencies (omg).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.artifact import Artifact, ArtifactError, open_regular
from polyquant.vq import ProductVQ

from .coding import decode_positions, decode_symbols, encode_positions, encode_symbols
from .model import QuantizedGaussians, UniformAttribute, VQAttribute
from .omg import OMGDecoder
from .scene import MAX_SH_DEGREE

__all__ = ["layout_state", "export_streams", "restore_streams", "size_report", "COMPONENTS"]

COMPONENTS = ("positions", "indices", "codebooks", "mlp", "qparams", "container")
MAX_GAUSSIANS = 1 << 28


def _bytes_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def layout_state(q: QuantizedGaussians) -> dict[str, Any]:
    """The JSON description of a compressed scene's layout (what ``restore_streams`` rebuilds)."""
    attrs: dict[str, Any] = {}
    for name, module in q.attributes.items():
        if isinstance(module, VQAttribute):
            attrs[name] = {"kind": "vq", "slices": list(module.quantizer.sizes),
                           "sizes": list(module.quantizer.codebook_sizes)}
        else:
            assert isinstance(module, UniformAttribute)
            attrs[name] = {"kind": "uniform", "bits": module.bits, "dim": int(module.codes.shape[1])}
    decoder = None
    if isinstance(q.decoder, OMGDecoder):
        decoder = {"hidden": q.decoder.mlp_dc[0].out_features, "frequencies": q.decoder.frequencies}
    return {"num_gaussians": q.num_gaussians, "sh_degree": q.sh_degree, "attributes": attrs, "decoder": decoder}


def export_streams(q: QuantizedGaussians) -> dict[str, Tensor]:
    """The artifact tensors of a compressed scene (see the module docstring)."""
    out = {"positions": _bytes_tensor(encode_positions(q.xyz))}
    for name, module in q.attributes.items():
        if isinstance(module, VQAttribute):
            for m, (vq, k) in enumerate(zip(module.quantizer.quantizers, module.quantizer.codebook_sizes)):
                out[f"vq.{name}.codes.{m}"] = _bytes_tensor(encode_symbols(module.codes[:, m].long(), k))
                out[f"vq.{name}.codebook.{m}"] = vq.embed.detach().half().cpu()
        else:
            assert isinstance(module, UniformAttribute)
            for c in range(module.codes.shape[1]):
                out[f"uniform.{name}.codes.{c}"] = _bytes_tensor(encode_symbols(module.codes[:, c].long(),
                                                                                1 << module.bits))
            out[f"uniform.{name}.qparams"] = torch.cat([module.scale, module.zero_point]).cpu()
    if q.decoder is not None:
        for key, p in q.decoder.named_parameters():
            out[f"mlp.{key}"] = p.detach().half().cpu()
        out["mlp.aabb"] = q.decoder.aabb.detach().float().cpu()
    return out


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ArtifactError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _int_list(value: Any, what: str, lo: int, hi: int) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > 4096:
        raise ArtifactError(f"{what} must be a non-empty list, got {value!r}")
    return [_int(v, what, lo, hi) for v in value]


def _tensor(tensors: dict[str, Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
    t = tensors.get(key)
    if t is None:
        raise ArtifactError(f"the artifact has no tensor {key!r}")
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        raise ArtifactError(f"{key}: expected {dtype} {shape if shape is not None else ''}, got {t.dtype} "
                            f"{tuple(t.shape)}")
    return t


def _stream(tensors: dict[str, Tensor], key: str) -> bytes:
    t = _tensor(tensors, key, torch.uint8)
    if t.dim() != 1:
        raise ArtifactError(f"{key}: a byte stream is 1-d, got shape {tuple(t.shape)}")
    return t.numpy().tobytes()


def _symbols(tensors: dict[str, Tensor], key: str, n: int, k: int) -> Tensor:
    try:
        return decode_symbols(_stream(tensors, key), n, k)
    except ValueError as e:
        raise ArtifactError(f"{key}: {e}") from None


def restore_streams(state: dict[str, Any], art: Artifact) -> QuantizedGaussians:
    """Decode an artifact's streams into the compressed scene it holds (``ArtifactError`` for any inconsistency)."""
    if not isinstance(state, dict) or not isinstance(state.get("attributes"), dict):
        raise ArtifactError("the artifact's state has no attribute layout")
    n = _int(state.get("num_gaussians"), "num_gaussians", 1, MAX_GAUSSIANS)
    degree = _int(state.get("sh_degree"), "sh_degree", 0, MAX_SH_DEGREE)
    tensors = art.tensors
    try:
        xyz = decode_positions(_stream(tensors, "positions"), n).float()
    except ValueError as e:
        raise ArtifactError(f"positions: {e}") from None
    attrs: dict[str, nn.Module] = {}
    for name, spec in state["attributes"].items():
        if not isinstance(spec, dict):
            raise ArtifactError(f"attribute {name!r}: bad layout {spec!r}")
        if spec.get("kind") == "vq":
            slices = _int_list(spec.get("slices"), f"{name} slices", 1, 4096)
            sizes = _int_list(spec.get("sizes"), f"{name} codebook sizes", 1, 65536)
            if len(slices) != len(sizes):
                raise ArtifactError(f"{name}: {len(slices)} slices but {len(sizes)} codebook sizes")
            quantizer = ProductVQ(dim=sum(slices), slices=slices, codebook_size=sizes, kmeans_init=False)
            codes = []
            for m, (vq, length, k) in enumerate(zip(quantizer.quantizers, slices, sizes)):
                book = _tensor(tensors, f"vq.{name}.codebook.{m}", torch.float16, (k, length)).float()
                if not bool(torch.isfinite(book).all()):
                    raise ArtifactError(f"vq.{name}.codebook.{m} has non-finite values")
                vq.set_codebook(book)
                codes.append(_symbols(tensors, f"vq.{name}.codes.{m}", n, k))
            attrs[name] = VQAttribute(quantizer.eval(), torch.stack(codes, dim=1))
        elif spec.get("kind") == "uniform":
            bits = _int(spec.get("bits"), f"{name} bits", 2, 8)
            dim = _int(spec.get("dim"), f"{name} dim", 1, 4096)
            qp = _tensor(tensors, f"uniform.{name}.qparams", torch.float32, (2, dim))
            if not bool(torch.isfinite(qp).all()) or not bool((qp[0] > 0).all()):
                raise ArtifactError(f"uniform.{name}.qparams: scales must be positive and finite")
            codes = torch.stack([_symbols(tensors, f"uniform.{name}.codes.{c}", n, 1 << bits) for c in range(dim)],
                                dim=1)
            attrs[name] = UniformAttribute(codes, qp[:1], qp[1:], bits)
        else:
            raise ArtifactError(f"attribute {name!r}: unknown kind {spec.get('kind')!r}")
    decoder = None
    dec = state.get("decoder")
    if dec is not None:
        if not isinstance(dec, dict):
            raise ArtifactError(f"bad decoder description {dec!r}")
        aabb = _tensor(tensors, "mlp.aabb", torch.float32, (2, 3))
        decoder = OMGDecoder(aabb, degree, _int(dec.get("hidden"), "decoder hidden", 4, 1024),
                             _int(dec.get("frequencies"), "decoder frequencies", 1, 16))
        for key, p in decoder.named_parameters():
            with torch.no_grad():
                p.copy_(_tensor(tensors, f"mlp.{key}", torch.float16, tuple(p.shape)).float())
    return QuantizedGaussians(xyz, attrs, degree, decoder)


def _component(key: str) -> str:
    if key == "positions":
        return "positions"
    if ".codes." in key:
        return "indices"
    if ".codebook." in key:
        return "codebooks"
    if key.startswith("mlp."):
        return "mlp"
    return "qparams"


def size_report(path: str | Path) -> dict[str, int]:
    """Bytes of each component in the written file, from its safetensors header: positions, indices, codebooks,
    mlp, qparams, and the container (the header with the manifest); they sum to the file size."""
    with open_regular(path) as f:
        total = f.seek(0, 2)
        f.seek(0)
        head_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(head_len))
    sizes = dict.fromkeys(COMPONENTS, 0)
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        sizes[_component(key)] += end - start
    sizes["container"] = total - sum(sizes.values())
    return sizes
