"""Forged artifacts: files whose checksums are all valid (as anyone can recompute them) but whose header asks for
something hostile: huge ranks and shapes, element counts that do not match the bytes, escape sequences in strings,
model kwargs with huge values. ``load`` must refuse each quickly with ``ArtifactError`` (never crash, hang or
allocate without bound); strings are data, escaped when the command line prints them."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyquant
from polyquant.artifact import FORMAT_NAME, MAX_EMPTY_EXTENT, MAX_RANK, ArtifactError, load, read_manifest

_ITEMSIZE = {"F32": 4, "F16": 2, "U8": 1, "I64": 8, "BOOL": 1}


def _digest(manifest: dict[str, Any]) -> str:
    """The manifest checksum exactly as the format defines it (canonical JSON of every other field)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def forge(
    path: Path,
    tensors: dict[str, tuple[str, Any, bytes]],
    *,
    plugin: str | None = None,
    method: str | None = None,
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a file with every checksum valid: ``tensors`` maps name -> (dtype, shape as written, raw bytes)."""
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": 1,
        "polyquant_version": "0.0",
        "plugin": plugin,
        "method": method,
        "config": config or {},
        "meta": meta or {},
        "tensors": {name: {"dtype": d, "shape": s, "sha256": hashlib.sha256(b).hexdigest()}
                    for name, (d, s, b) in tensors.items()},
    }
    manifest["manifest_sha256"] = _digest(manifest)
    header: dict[str, Any] = {"__metadata__": {"polyquant": json.dumps(manifest)}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(d for _, _, d in tensors.values()))
    return path


def rewrite_header(path: Path, old: bytes, new: bytes) -> Path:
    """Replace ``old`` by ``new`` in the header of a forged file (the length prefix follows; data unchanged)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = data[8 : 8 + n].rstrip(b" ").replace(old, new)
    head += b" " * (-(8 + len(head)) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n :])
    return path


def test_forge_writes_loadable_artifacts(tmp_path: Path) -> None:
    """The forger itself is right: a well-formed forged file loads."""
    path = forge(tmp_path / "ok.safetensors", {"w": ("F32", [2, 1], b"\0" * 8), "e": ("U8", [0, 7], b"")},
                 method="m", config={"a": [1]})
    art = load(path)
    assert art.tensors["w"].shape == (2, 1) and art.tensors["e"].shape == (0, 7) and art.config == {"a": [1]}
    assert read_manifest(path)["method"] == "m"


HOSTILE_SHAPES = [
    ("rank 100,000", "F32", [1] * 100_000, 4, "MAX_RANK"),
    ("rank MAX_RANK + 1", "F32", [1] * (MAX_RANK + 1), 4, "MAX_RANK"),
    ("rank 100,000, empty", "F32", [1] * 99_999 + [0], 0, "MAX_RANK"),
    ("empty, 2**40 rows", "F32", [2**40, 0], 0, "MAX_EMPTY_EXTENT"),
    ("empty, dims past int64", "U8", [0, 2**64, 2**64], 0, "MAX_EMPTY_EXTENT"),
    ("empty, just past the bound", "U8", [MAX_EMPTY_EXTENT + 1, 0], 0, "MAX_EMPTY_EXTENT"),
    ("huge dims, 4 bytes", "F32", [2**63, 2**63], 4, "needs"),
    ("dims past int64, 1 byte", "U8", [2**64 + 1], 1, "needs"),
    ("more elements than bytes", "F32", [3], 8, "needs 12"),
    ("fewer elements than bytes", "I64", [1], 16, "needs 8"),
    ("negative dim", "F32", [-1, -4], 16, "bad shape"),
    ("float dim", "F32", [2.0], 8, "bad shape"),
    ("bool dim", "F32", [True], 4, "bad shape"),
    ("string dim", "F32", ["2"], 8, "bad shape"),
    ("shape not a list", "F32", 2, 8, "bad shape"),
    ("shape of 10**5000 digits", "F32", "BIGINT", 4, "not valid JSON"),
]


@pytest.mark.parametrize(("dtype", "shape", "nbytes", "match"), [c[1:] for c in HOSTILE_SHAPES],
                         ids=[c[0] for c in HOSTILE_SHAPES])
def test_hostile_shapes_are_refused(tmp_path: Path, dtype: str, shape: Any, nbytes: int, match: str) -> None:
    path = tmp_path / "x.safetensors"
    if shape == "BIGINT":  # JSON allows any integer; Python refuses to parse one this long
        rewrite_header(forge(path, {"x": (dtype, [12345], b"\0" * nbytes)}), b"12345", b"9" * 5000)
    else:
        forge(path, {"x": (dtype, shape, b"\0" * nbytes)})
    with pytest.raises(ArtifactError, match=match):
        load(path)
    with pytest.raises(ArtifactError):
        polyquant.load(path)
    with pytest.raises(ArtifactError):
        read_manifest(path)


def test_bounds_are_inclusive(tmp_path: Path) -> None:
    """What the bounds allow loads (and is then safe to walk)."""
    path = forge(tmp_path / "x.safetensors", {"deep": ("F32", [1] * MAX_RANK, b"\0" * 4),
                                               "wide": ("U8", [MAX_EMPTY_EXTENT, 0], b"")})
    art = load(path)
    assert art.tensors["deep"].dim() == MAX_RANK and art.tensors["deep"].tolist() is not None
    assert art.tensors["wide"].shape == (MAX_EMPTY_EXTENT, 0)


def test_save_refuses_what_load_would(tmp_path: Path) -> None:
    """Save and load share the bounds: nothing is written that could not be read back."""
    from polyquant.artifact import Artifact, save

    for t in (torch.zeros([1] * (MAX_RANK + 1)), torch.zeros(MAX_EMPTY_EXTENT + 1, 0)):
        with pytest.raises(ArtifactError, match="cannot be saved"):
            save(Artifact(tensors={"t": t}), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_hostile_offsets_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    for new in (b"[0, 1180591620717411303424]", b"[8, 16]", b"[-8, 8]"):
        rewrite_header(forge(path, {"x": ("F32", [2], b"\0" * 8)}), b"[0, 8]", new)
        with pytest.raises(ArtifactError, match="outside"):
            load(path)
    data = forge(path, {"x": ("F32", [2], b"\0" * 8)}).read_bytes()
    # The header says 8 data bytes, the file has 256 MiB more (sparse): refused from its size, the data unread.
    path.write_bytes(data)
    with path.open("r+b") as f:
        f.truncate(len(data) + 2**28)
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="data section has"):
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24


ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202e\r\n\0"


def test_strings_with_escapes_are_data(tmp_path: Path) -> None:
    """Control characters in names and strings load unchanged (they are the file's data) ..."""
    path = forge(tmp_path / "x.safetensors", {ESCAPES: ("U8", [1], b"\1")}, plugin=None, method=ESCAPES,
                 config={ESCAPES: ESCAPES}, meta={"m": [ESCAPES]})
    art = load(path)
    assert list(art.tensors) == [ESCAPES] and art.method == ESCAPES and art.config == {ESCAPES: ESCAPES}


def test_cli_prints_forged_strings_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """... and ``polyquant load`` prints them escaped: no control character reaches the terminal."""
    from polyquant.cli import main

    path = forge(tmp_path / "x.safetensors", {ESCAPES: ("U8", [1], b"\1")}, plugin=None, method=ESCAPES,
                 config={ESCAPES: ESCAPES}, meta={"m": [ESCAPES]})
    assert main(["load", str(path)]) == 0
    out, err = capsys.readouterr()
    assert all(c.isprintable() for line in out.splitlines() for c in line), out
    assert "\\x1b[2J" in out and "\\u202e" in out  # the tensor name, escaped
    forge(path, {"x": ("F32", [1] * 100_000, b"\0" * 4)}, plugin=ESCAPES)
    assert main(["load", str(path)]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and "MAX_RANK" in err


def _vit_artifact(path: Path, model: Any) -> Path:
    """A forged vit artifact whose method config is valid and whose model config is ``model``."""
    from polyquant.plugins import get_method

    method = get_method("vit", "minmax")().to_dict()
    return forge(path, {}, plugin="vit", method="minmax",
                 config={"schema": 1, "model": model, "method": method, "state": {}})


HOSTILE_MODELS = {
    "huge embed_dim": {"source": "vit", "kwargs": {"embed_dim": 2**40, "num_heads": 1}},
    "huge depth": {"source": "vit", "kwargs": {"depth": 10**9}},
    "huge img_size": {"source": "vit", "kwargs": {"img_size": 10**6, "patch_size": 1}},
    "huge num_classes": {"source": "vit", "kwargs": {"num_classes": 10**12}},
    "huge mlp_ratio": {"source": "vit", "kwargs": {"mlp_ratio": 1e30}},
    "negative depth": {"source": "vit", "kwargs": {"depth": -3}},
    "unknown kwarg": {"source": "vit", "kwargs": {"act_layer": "os.system"}},
    "kwargs not a dict": {"source": "vit", "kwargs": [1, 2]},
    "unknown source": {"source": "\x1b[2Jpickle"},
    "timm, huge embed_dim": {"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"embed_dim": 2**40}},
    "timm, unknown name": {"source": "timm", "name": "../../etc/passwd", "kwargs": {}},
    "hybrid, huge widths": {"source": "hybrid", "kwargs": {"widths": [2**40, 2**40, 2**40]}},
    "model config not a dict": [1, 2, 3],
}


@pytest.mark.parametrize("model", list(HOSTILE_MODELS.values()), ids=list(HOSTILE_MODELS))
def test_hostile_model_kwargs_are_refused(tmp_path: Path, model: Any) -> None:
    """Through ``polyquant.load``: the plugin's ``build_model`` refuses them before building anything."""
    pytest.importorskip("timm")
    with pytest.raises(ArtifactError):
        polyquant.load(_vit_artifact(tmp_path / "x.safetensors", model))


_dims = st.one_of(st.integers(0, 4), st.integers(0, 2**70), st.sampled_from([2**31, 2**32, 2**63, 2**64]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(sorted(_ITEMSIZE)),
    shape=st.lists(_dims, max_size=6) | st.lists(st.integers(0, 2), min_size=MAX_RANK - 2, max_size=MAX_RANK + 8),
    extra=st.sampled_from([0, 0, 1, -1, 7]),
)
def test_fuzz_forged_shapes(tmp_path: Path, dtype: str, shape: list[int], extra: int) -> None:
    """Any forged shape either loads as exactly what the header says (and can be walked) or is refused."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * _ITEMSIZE[dtype] + extra
    if not 0 <= nbytes <= 4096:  # the file must hold the bytes: the header then claims more than it has
        nbytes = 8
    path = forge(tmp_path / "f.safetensors", {"t": (dtype, shape, b"\1" * nbytes)})
    try:
        t = load(path).tensors["t"]
    except ArtifactError:
        return
    assert list(t.shape) == shape and t.numel() * t.element_size() == nbytes and t.dim() <= MAX_RANK
    extent = 1
    for d in shape:
        extent *= max(d, 1)
    assert extent <= max(t.numel(), MAX_EMPTY_EXTENT)
    if extent <= 10_000:
        t.tolist()
