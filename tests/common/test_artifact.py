"""Artifact save/load: exact round trips, atomic writes, and rejection of every kind of damaged or foreign file."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import polyquant
from polyquant import artifact as artifact_mod
from polyquant.artifact import (
    FORMAT_NAME,
    Artifact,
    ArtifactError,
    check_target,
    load,
    open_regular,
    read_manifest,
    save,
)


def _sample() -> Artifact:
    g = torch.Generator().manual_seed(0)
    return Artifact(
        tensors={
            "0.weight_packed": torch.randint(0, 256, (12,), dtype=torch.uint8, generator=g),
            "0.weight_scale": torch.rand(4, 1, generator=g),
            "0.weight_shape": torch.tensor([4, 6]),
            "float.0.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        },
        plugin="core",
        method="rtn",
        config={"bits": 4, "group": [1, 64], "symmetric": False},
        meta={"model": "tiny", "score": 0.5},
    )


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (also for NaNs and float8), same dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _same(a: Artifact, b: Artifact) -> bool:
    return (
        list(a.tensors) == list(b.tensors)
        and all(_same_tensor(a.tensors[k], b.tensors[k]) for k in a.tensors)
        and (a.plugin, a.method, a.config, a.meta, a.format_version)
        == (b.plugin, b.method, b.config, b.meta, b.format_version)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


def test_roundtrip_many_dtypes(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(2, dtype=torch.float64),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f8e4m3": torch.randn(7).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(7).to(torch.float8_e5m2),
        "i8": torch.randint(-128, 128, (9,), dtype=torch.int8),
        "i16": torch.randint(-1000, 1000, (3,), dtype=torch.int16),
        "i32": torch.randint(-(2**31), 2**31 - 1, (4,), dtype=torch.int32),
        "i64": torch.tensor([-(2**62), 2**62, 0]),
        "u8": torch.arange(256, dtype=torch.int32).to(torch.uint8),
        "u16": torch.tensor([0, 65535], dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.int64).to(torch.uint32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "scalar_int": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(0, 5, dtype=torch.int32),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # non-contiguous input
        "param": torch.nn.Parameter(torch.ones(2)),
        "weird name/with.dots and spaces ü": torch.zeros(1),
    }
    art = Artifact(tensors=tensors, plugin=None, method=None, config={}, meta={"tuple": [1, 2]})
    path = save(art, tmp_path / "a.safetensors")
    assert path == tmp_path / "a.safetensors"
    out = load(path)
    assert list(out.tensors) == list(tensors)
    for name, t in tensors.items():
        assert _same_tensor(out.tensors[name], t.detach().contiguous()), name
    assert out.plugin is None and out.method is None and out.config == {} and out.format_version == 1
    out.tensors["f32"] += 1  # loaded tensors are ordinary writable tensors


def test_roundtrip_metadata_and_manifest(tmp_path: Path) -> None:
    art = _sample()
    path = save(art, tmp_path / "a.safetensors")
    assert _same(load(path), art)
    manifest = read_manifest(path)
    assert manifest["format"] == FORMAT_NAME and manifest["format_version"] == 1
    assert manifest["polyquant_version"] == polyquant.__version__
    assert manifest["plugin"] == "core" and manifest["method"] == "rtn"
    assert set(manifest["tensors"]) == set(art.tensors)
    assert manifest["tensors"]["0.weight_scale"]["dtype"] == "F32"
    assert manifest["tensors"]["0.weight_scale"]["shape"] == [4, 1]
    assert len(manifest["tensors"]["0.weight_scale"]["sha256"]) == 64
    # Plain safetensors underneath: any reader can open it, the manifest sits in __metadata__["polyquant"].
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["polyquant"])["format"] == FORMAT_NAME
        assert torch.equal(f.get_tensor("0.weight_scale"), art.tensors["0.weight_scale"])


def test_tuples_come_back_as_lists_and_order_is_kept(tmp_path: Path) -> None:
    art = Artifact(tensors={"b": torch.ones(1, dtype=torch.int8), "a": torch.ones(2)}, config={"shape": (1, 2)})
    out = load(save(art, tmp_path / "t.safetensors"))
    assert out.config == {"shape": [1, 2]} and list(out.tensors) == ["b", "a"]


def test_overwrite_existing(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save(_sample(), path)
    art2 = Artifact(tensors={"x": torch.zeros(3)}, method="other")
    save(art2, path)
    assert _same(load(path), art2)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_data_is_aligned(tmp_path: Path) -> None:
    art = Artifact(tensors={"u8": torch.ones(3, dtype=torch.uint8), "f64": torch.ones(2, dtype=torch.float64),
                            "f32": torch.ones(1)})
    path = save(art, tmp_path / "a.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(data[8 : 8 + n])
    for name in ("u8", "f64", "f32"):
        begin = header[name]["data_offsets"][0]
        assert begin % art.tensors[name].dtype.itemsize == 0


# ---------------------------------------------------------------------------------------------------------------------
# Save-side validation and atomicity


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"f": lambda: 1}, "function"),
        ({"t": torch.ones(1)}, "Tensor"),
        ({1: "int key"}, "non-string key"),
        ({"x": float("nan")}, "nan"),
        ({"x": [1, {"y": float("inf")}]}, r"config\['x'\]\[1\]\['y'\]"),
        ({"s": {1, 2}}, "set"),
    ],
)
def test_save_rejects_non_json(tmp_path: Path, config: dict, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        save(Artifact(tensors={}, config=config), tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_rejects_bad_tensors(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    with pytest.raises(ArtifactError, match="not a torch.Tensor"):
        save(Artifact(tensors={"a": [1, 2]}), path)  # type: ignore[dict-item]
    with pytest.raises(ArtifactError, match="unsupported dtype"):
        save(Artifact(tensors={"a": torch.ones(2, dtype=torch.complex64)}), path)
    with pytest.raises(ArtifactError, match="reserved"):
        save(Artifact(tensors={"__metadata__": torch.ones(2)}), path)
    with pytest.raises(ArtifactError, match="non-empty strings"):
        save(Artifact(tensors={"": torch.ones(2)}), path)
    with pytest.raises(ArtifactError, match="dense"):
        save(Artifact(tensors={"a": torch.ones(2).to_sparse()}), path)
    with pytest.raises(ArtifactError, match="format_version"):
        save(Artifact(tensors={}, format_version=2), path)
    with pytest.raises(ArtifactError, match="plugin must be a string"):
        save(Artifact(tensors={}, plugin=3), path)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_failure_mid_write_keeps_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"
    original = _sample()
    save(original, path)
    before = path.read_bytes()
    calls = []

    def failing_write(f, data) -> None:  # writes half of the third chunk, then the disk "fails"
        calls.append(1)
        if len(calls) == 3:
            f.write(bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")
        f.write(data)

    monkeypatch.setattr(artifact_mod, "_write_chunk", failing_write)
    with pytest.raises(OSError, match="No space left"):
        save(Artifact(tensors={"x": torch.randn(100), "y": torch.randn(50)}), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temp file left behind
    assert _same(load(path), original)


@pytest.mark.parametrize("exc", [OSError("fsync failed"), KeyboardInterrupt()])
def test_failure_before_rename_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    path = tmp_path / "a.safetensors"
    save(_sample(), path)
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise exc

    monkeypatch.setattr(artifact_mod.os, "fsync", failing_fsync)
    with pytest.raises(type(exc)):
        save(Artifact(tensors={"x": torch.randn(10)}), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src: object, dst: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(artifact_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save(_sample(), tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# Load-side rejection


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, bytes]:
    path = save(_sample(), tmp_path / "a.safetensors")
    return path, path.read_bytes()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read file"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(ArtifactError, match="is a directory, not a regular file"):
        load(tmp_path)


@pytest.mark.parametrize("keep", [0, 1, 7, 8, 9, 100, -1, -17])
def test_truncated(saved: tuple[Path, bytes], keep: int) -> None:
    path, data = saved
    _write(path, data[:keep])
    with pytest.raises(ArtifactError, match=str(path)):
        load(path)


def test_truncated_messages(saved: tuple[Path, bytes]) -> None:
    path, data = saved
    _write(path, data[:5])
    with pytest.raises(ArtifactError, match="truncated"):
        load(path)
    _write(path, data[:-1])
    with pytest.raises(ArtifactError, match="truncated"):
        load(path)
    _write(path, data + b"\0")
    with pytest.raises(ArtifactError, match="padded"):
        load(path)


def test_every_single_bit_flip_is_detected(saved: tuple[Path, bytes]) -> None:
    """One flipped bit at every byte of the file (bit index = position mod 8): always an ArtifactError."""
    path, data = saved
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << (pos % 8)
        _write(path, bytes(damaged))
        with pytest.raises(ArtifactError):
            load(path)


def test_padding_must_be_spaces(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    for i in range(8):  # find a header length that needs padding
        data = save(Artifact(tensors={"x": torch.ones(2)}, meta={"pad": "x" * i}), path).read_bytes()
        n = int.from_bytes(data[:8], "little")
        if data[8 + n - 1] == ord(" "):
            break
    damaged = bytearray(data)
    damaged[8 + n - 1] = ord("\n")  # still valid JSON, but not what save writes
    _write(path, bytes(damaged))
    with pytest.raises(ArtifactError, match="space padding"):
        load(path)


def test_read_manifest_checks_only_the_header(saved: tuple[Path, bytes]) -> None:
    path, data = saved
    damaged = bytearray(data)
    damaged[-1] ^= 1
    _write(path, bytes(damaged))
    assert read_manifest(path)["method"] == "rtn"
    damaged[20] ^= 1
    _write(path, bytes(damaged))
    with pytest.raises(ArtifactError):
        read_manifest(path)
    with pytest.raises(ArtifactError, match="cannot read"):
        read_manifest(path.with_name("missing.safetensors"))


def test_checksum_mismatch_names_the_tensor(saved: tuple[Path, bytes]) -> None:
    path, data = saved
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF  # the last data byte
    _write(path, bytes(damaged))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for tensor '.+'"):
        load(path)


def test_tensor_swapped_with_valid_header(saved: tuple[Path, bytes], tmp_path: Path) -> None:
    """A well-formed safetensors file whose values differ from the manifest's checksums."""
    path, _ = saved
    manifest = json.dumps(read_manifest(path))
    tensors = dict(_sample().tensors)
    tensors["0.weight_scale"] = tensors["0.weight_scale"] + 1
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata={"polyquant": manifest})
    with pytest.raises(ArtifactError, match=r"checksum mismatch for tensor '0.weight_scale'"):
        load(forged)
    del tensors["float.0.bias"]
    save_file(tensors, str(forged), metadata={"polyquant": manifest})
    with pytest.raises(ArtifactError, match="tensor names do not match the manifest"):
        load(forged)


def test_manifest_edit_is_detected(saved: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = saved
    manifest = read_manifest(path)
    manifest["method"] = "something-else"
    forged = tmp_path / "forged.safetensors"
    save_file(dict(_sample().tensors), str(forged), metadata={"polyquant": json.dumps(manifest)})
    with pytest.raises(ArtifactError, match="manifest checksum mismatch"):
        load(forged)


def test_newer_format_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifact_mod, "FORMAT_VERSION", 2)
    path = save(Artifact(tensors={"x": torch.ones(2)}, format_version=2), tmp_path / "v2.safetensors")
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="unsupported format_version 2"):
        load(path)
    with pytest.raises(ArtifactError, match="unsupported format_version 2"):
        read_manifest(path)


def test_foreign_safetensors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(plain))
    with pytest.raises(ArtifactError, match="not a polyquant artifact"):
        load(plain)
    save_file({"w": torch.ones(3)}, str(plain), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="not a polyquant artifact"):
        load(plain)
    save_file({"w": torch.ones(3)}, str(plain), metadata={"polyquant": json.dumps({"format": "other"})})
    with pytest.raises(ArtifactError, match="not a polyquant artifact"):
        load(plain)


def test_text_and_empty_files(tmp_path: Path) -> None:
    for content in [b"", b"hello world, this is not an artifact\n" * 3, b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00{}"]:
        path = _write(tmp_path / "x.safetensors", content)
        with pytest.raises(ArtifactError, match=str(path)):
            load(path)


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader executed code from the file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


def test_pickle_is_never_executed(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe)))).close()  # the payload is live ...
    assert probe.exists()

    marker = tmp_path / "marker"
    payload = pickle.dumps({"weight": _Payload(str(marker))})
    for name, data in [("p.safetensors", payload), ("p.pkl", payload)]:
        path = _write(tmp_path / name, data)
        with pytest.raises(ArtifactError):
            load(path)
    torch_file = tmp_path / "t.pt"
    torch.save({"weight": _Payload(str(marker))}, torch_file)  # zip + pickle, as torch.save writes it
    with pytest.raises(ArtifactError):
        load(torch_file)
    assert not marker.exists()  # ... but load never ran it


def test_bad_headers(tmp_path: Path) -> None:
    def craft(header: dict | str, data: bytes = b"") -> Path:
        raw = (header if isinstance(header, str) else json.dumps(header)).encode()
        return _write(tmp_path / "h.safetensors", len(raw).to_bytes(8, "little") + raw + data)

    meta = {"__metadata__": {"polyquant": "{}"}}
    cases = [
        ('{"a": 1, "a": 2}', "duplicate key"),
        ("[1, 2]", "does not start with"),
        ('{"x": NaN}', "not valid JSON"),
        ({**meta, "w": {"dtype": "F32", "shape": [2]}}, "bad header entry"),
        ({**meta, "w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
        ({**meta, "w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "bad shape"),
        ({**meta, "w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "bad shape"),
        ({**meta, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, "outside"),
        ({**meta, "w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12"),
        ({**meta, "w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "outside"),
        ({**meta, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "overlaps"),
        ({**meta, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "gap"),
        ({"__metadata__": {"polyquant": 5}}, "strings to strings"),
        ({"__metadata__": {"polyquant": "{"}}, "bad manifest"),
        ({"__metadata__": {"polyquant": "[]"}}, "expected a JSON object"),
        ({"__metadata__": {"polyquant": json.dumps({"format": FORMAT_NAME, "format_version": 1})}}, "bad manifest"),
        ({"__metadata__": {"polyquant": json.dumps({"format": FORMAT_NAME, "format_version": 0})}}, "format_version 0"),
        ({"__metadata__": {"polyquant": json.dumps({"format": FORMAT_NAME, "format_version": True})}}, "format_version"),
        ({"__metadata__": {"polyquant": "{}", "other": "x"}}, "unexpected metadata keys"),
        ("{" + "[" * 100000 + "]" * 100000 + "}", "not valid JSON"),
    ]
    for header, match in cases:
        has_tensors = isinstance(header, dict) and len(header) > 1
        path = craft(header, b"\0" * 8 if has_tensors else b"")
        with pytest.raises(ArtifactError, match=match):
            load(path)
    _write(tmp_path / "h.safetensors", (10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ArtifactError, match="bad header length"):
        load(tmp_path / "h.safetensors")
    _write(tmp_path / "h.safetensors", (2**64 - 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(ArtifactError, match="bad header length"):
        load(tmp_path / "h.safetensors")
    _write(tmp_path / "h.safetensors", (3).to_bytes(8, "little") + b"{\xff}")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(tmp_path / "h.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Fuzzing


@pytest.fixture(scope="module")
def fuzz_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, Artifact]:
    folder = tmp_path_factory.mktemp("fuzz")
    art = _sample()
    data = save(art, folder / "orig.safetensors").read_bytes()
    return folder / "fuzzed.safetensors", data, art


_corruption = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30), st.binary(max_size=0)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
)


def _corrupt(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, at, blob in ops:
        pos = at % (len(out) + 1)
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip":
            for i, b in enumerate(blob):  # flip bit (b % 8) of a byte near pos
                if out:
                    out[(pos + i * 7) % len(out)] ^= 1 << (b % 8)
        elif kind == "overwrite":
            out[pos : pos + len(blob)] = blob
        elif kind == "insert":
            out[pos:pos] = blob
        else:
            del out[pos : pos + len(blob)]
    return bytes(out)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_corruption, min_size=1, max_size=3))
def test_fuzz_corruptions(fuzz_case: tuple[Path, bytes, Artifact], ops: list[tuple[str, int, bytes]]) -> None:
    path, data, original = fuzz_case
    damaged = _corrupt(data, ops)
    path.write_bytes(damaged)
    try:
        out = load(path)
    except ArtifactError:
        return
    # A corruption may only go unnoticed if it changed nothing that matters: the result must be identical.
    assert _same(out, original)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=10,
        ),
        max_size=5,
    )
)
def test_config_roundtrip_property(tmp_path: Path, config: dict) -> None:
    art = Artifact(tensors={"x": torch.arange(3)}, config=config, meta={"copy": config})
    out = load(save(art, tmp_path / "c.safetensors"))
    assert out.config == config and out.meta == {"copy": config}


# ---------------------------------------------------------------------------------------------------------------------
# Targets that are not regular files, careless output paths, hostile inputs (issue 10)



def _fake_mode(monkeypatch: pytest.MonkeyPatch, path: Path, mode: int) -> None:
    """Make ``os.stat`` / ``os.lstat`` / ``os.fstat`` report ``path`` (a regular file in tmp_path) as ``mode``,
    to stand for a device without touching one."""
    real_stat, real_lstat, real_fstat = os.stat, os.lstat, os.fstat
    ino = real_stat(path).st_ino

    def fake(result: os.stat_result) -> os.stat_result:
        if result.st_ino != ino:
            return result
        return os.stat_result((mode | 0o666, *tuple(result)[1:]))

    monkeypatch.setattr(os, "stat", lambda p, *a, **k: fake(real_stat(p, *a, **k)))
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: fake(real_lstat(p, *a, **k)))
    monkeypatch.setattr(os, "fstat", lambda fd: fake(real_fstat(fd)))


def test_save_refuses_targets_that_are_not_regular_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    original = save(_sample(), tmp_path / "real.safetensors").read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to("real.safetensors")
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    for target, kind in ((fifo, "FIFO"), (link, "symbolic link"), (folder, "directory")):
        with pytest.raises(ArtifactError, match=f"{target}: is a {kind}"):
            save(Artifact(tensors={"x": torch.ones(2)}), target)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and folder.is_dir()
    assert (tmp_path / "real.safetensors").read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == sorted(["fifo.safetensors", "real.safetensors", "link.safetensors",
                                                   "dir.safetensors"])  # no temp file either
    device = tmp_path / "null"  # a regular file that stat reports as a character device, like /dev/null
    device.write_bytes(b"")
    _fake_mode(monkeypatch, device, stat.S_IFCHR)
    with pytest.raises(ArtifactError, match="is a character device"):
        save(Artifact(tensors={"x": torch.ones(2)}), device)


def test_save_refuses_a_target_that_turns_special_while_writing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"

    def write_then_swap(f: Any, data: Any) -> None:
        f.write(data)
        if not path.exists():
            os.mkfifo(path)

    monkeypatch.setattr(artifact_mod, "_write_chunk", write_then_swap)
    with pytest.raises(ArtifactError, match="is a FIFO"):
        save(_sample(), path)
    assert stat.S_ISFIFO(os.lstat(path).st_mode) and os.listdir(tmp_path) == ["a.safetensors"]


def test_check_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = save(_sample(), tmp_path / "a.safetensors")
    hardlink = tmp_path / "b.safetensors"
    os.link(existing, hardlink)
    new = tmp_path / "new.safetensors"
    assert check_target(new, force=False) == new and check_target(existing, force=True) == existing
    cases = [
        ("", False, (), "'': empty path"),
        (f"{tmp_path}/", False, (), "names a folder"),
        (tmp_path / "..", False, (), "names a folder"),
        (f"{tmp_path}/new/.", False, (), "names a folder"),
        (tmp_path / "missing" / "a.safetensors", False, (), "the folder .*missing does not exist"),
        (existing / "x.safetensors", False, (), "is not a folder"),
        (tmp_path / ("n" * 256), False, (), "256 bytes, longer than the 255"),
        (existing, False, (), "the file exists; pass --force"),
        (existing, True, ["digits-vit", tmp_path / "nope", existing], "is the input"),
        (existing, True, [str(hardlink)], "is the input"),  # same inode through another name
    ]
    for path, force, inputs, match in cases:
        with pytest.raises(ArtifactError, match=match):
            check_target(path, force=force, inputs=inputs)
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)  # as root everything is writable: pretend
    with pytest.raises(ArtifactError, match=f"{tmp_path}/new.safetensors: cannot write in the folder"):
        check_target(new, force=False)


def test_api_save_checks_the_target_first(tmp_path: Path) -> None:
    qm = polyquant.QuantizedModel(torch.nn.Identity(), config=None)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="is a directory"):
        polyquant.save(qm, tmp_path)  # refused before the (here impossible) export


@pytest.mark.parametrize("length", [234, 240, 250, 255])
def test_long_names_save(tmp_path: Path, length: int) -> None:
    path = tmp_path / ("ü" + "n" * (length - 2 - len(".safetensors")) + ".safetensors")
    assert len(os.fsencode(path.name)) == length
    art = _sample()
    assert _same(load(save(art, path)), art)
    save(art, path)  # and overwrite
    assert os.listdir(tmp_path) == [path.name]


def test_write_errors_name_the_target_not_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"
    real_open = os.open

    def refusing_open(name: Any, flags: int, *args: Any) -> int:
        if str(name).endswith(".tmp") and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(PermissionError) as info:
        save(_sample(), path)
    assert info.value.filename == str(path) and ".tmp" not in str(info.value)


def _killed_save(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that dies mid-write without running any clean-up (as under SIGKILL)."""
    with monkeypatch.context() as m:
        def die(f: Any, data: Any) -> None:
            raise SystemExit("killed")

        m.setattr(artifact_mod, "_write_chunk", die)
        m.setattr(os, "unlink", lambda *_a, **_k: None)  # the except clause never gets to run
        with pytest.raises(SystemExit):
            save(_sample(), path)


def test_next_save_removes_temps_of_killed_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fcntl = pytest.importorskip("fcntl")  # without advisory locks (Windows) stale temp files are left alone
    path = tmp_path / ("k" * 240 + ".safetensors")
    other = tmp_path / "other.safetensors"
    for _ in range(2):
        _killed_save(path, monkeypatch)
    _killed_save(other, monkeypatch)
    temps = sorted(set(os.listdir(tmp_path)))
    assert len(temps) == 3 and all(name.endswith(".tmp") for name in temps)
    live = [tmp_path / n for n in temps if not n.startswith(".other")][0]  # pretend a live save still writes it
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        save(_sample(), path)
        left = sorted(os.listdir(tmp_path))
    assert left == sorted([path.name, live.name, *[n for n in temps if n.startswith(".other")]])
    save(_sample(), path)  # the lock is gone: now it is stale too
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, *[n for n in temps if n.startswith(".other")]])


@pytest.mark.usefixtures("deadline")
def test_load_refuses_fifos_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for read in (load, read_manifest, polyquant.load):
        with pytest.raises(ArtifactError, match="is a FIFO, not a regular file"):
            read(fifo)


def test_load_refuses_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = save(_sample(), tmp_path / "zero")  # readable, but stat reports a character device (like /dev/zero)
    _fake_mode(monkeypatch, device, stat.S_IFCHR)
    for read in (load, read_manifest, polyquant.load):
        with pytest.raises(ArtifactError, match="is a character device, not a regular file"):
            read(device)


# ---------------------------------------------------------------------------------------------------------------------
# Memory-mapped load


def test_mmap_roundtrip_many_dtypes(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f8e4m3": torch.randn(7).to(torch.float8_e4m3fn),
        "i64": torch.tensor([-(2**62), 2**62, 0]),
        "u8": torch.arange(256, dtype=torch.int32).to(torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty_2d": torch.empty(0, 5, dtype=torch.int32),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }
    art = Artifact(tensors=tensors, plugin="core", method="rtn", config={"a": [1]}, meta={"b": 2})
    path = save(art, tmp_path / "a.safetensors")
    for verify in (False, True):
        out = load(path, mmap=True, verify=verify)
        assert _same(out, art)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the file is mapped, not read into memory
        assert str(path.resolve()) in maps.read_text()


def test_mmap_is_copy_on_write(tmp_path: Path) -> None:
    path = save(_sample(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    out = load(path, mmap=True)
    out.tensors["0.weight_scale"] += 1  # changes memory only
    out.tensors["0.weight_packed"][:] = 0
    assert path.read_bytes() == data
    assert _same(load(path), _sample())


def test_mmap_checks_the_header_and_optionally_the_checksums(saved: tuple[Path, bytes]) -> None:
    path, data = saved
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF  # the last data byte: only the checksums can tell
    _write(path, bytes(damaged))
    assert load(path, mmap=True).plugin == "core"  # documented: mmap skips the per-tensor sha256 by default
    with pytest.raises(ArtifactError, match=r"checksum mismatch for tensor '.+'"):
        load(path, mmap=True, verify=True)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load(path)
    for bad in (data[:-1], data[:20], data + b"\0", b""):
        _write(path, bad)
        with pytest.raises(ArtifactError, match=str(path)):
            load(path, mmap=True)
    damaged = bytearray(data)
    damaged[20] ^= 1  # inside the JSON header
    _write(path, bytes(damaged))
    with pytest.raises(ArtifactError):
        load(path, mmap=True)
    with pytest.raises(ArtifactError, match="verify=False needs mmap=True"):
        load(path, verify=False)


def test_mmap_rejects_bool_tensors_that_are_not_0_or_1(tmp_path: Path) -> None:
    path = save(Artifact(tensors={"live": torch.tensor([True, False])}), tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] = 2  # the second bool (its checksum is not verified: mmap without verify)
    _write(path, bytes(data))
    with pytest.raises(ArtifactError, match="bool tensor 'live' holds bytes other than 0 and 1"):
        load(path, mmap=True)


@pytest.mark.usefixtures("deadline")
def test_mmap_refuses_fifos_and_folders(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ArtifactError, match="FIFO, not a regular file"):
        load(fifo, mmap=True)
    with pytest.raises(ArtifactError, match="is a directory"):
        load(tmp_path, mmap=True)


def _forge_with_valid_checksums(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A safetensors file holding ``tensors`` as they are, with a manifest whose checksums match them (the digest
    recomputed as the module docstring describes): only the value checks can refuse it."""
    import hashlib

    manifest = {"format": FORMAT_NAME, "format_version": 1, "polyquant_version": "0", "plugin": None,
                "method": None, "config": {}, "meta": {},
                "tensors": {name: {"dtype": {torch.bool: "BOOL", torch.float32: "F32"}[t.dtype], "shape": list(t.shape),
                                   "sha256": hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()}
                            for name, t in tensors.items()}}
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    manifest["manifest_sha256"] = hashlib.sha256(canonical.encode("ascii")).hexdigest()
    save_file(tensors, str(path), metadata={"polyquant": json.dumps(manifest)})
    return path


def test_bool_tensors_holding_other_bytes_are_refused_on_every_path(tmp_path: Path) -> None:
    """Byte 2 in a bool tensor is undefined in torch (``~t`` gives 253, ``t.sum()`` counts it as 2): refused when
    read, mapped (verified or not) and saved, naming the tensor."""
    two = torch.tensor([1, 2, 0], dtype=torch.uint8).view(torch.bool)
    path = _forge_with_valid_checksums(tmp_path / "a.safetensors", {"live": two, "w": torch.ones(2)})
    for read in (lambda: load(path), lambda: load(path, mmap=True), lambda: load(path, mmap=True, verify=True),
                 lambda: polyquant.load(path)):
        with pytest.raises(ArtifactError, match=f"{path}: bool tensor 'live' holds bytes other than 0 and 1"):
            read()
    with pytest.raises(ArtifactError, match="bool tensor 'live' holds bytes other than 0 and 1"):
        save(Artifact(tensors={"live": two}), tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    good = _forge_with_valid_checksums(tmp_path / "c.safetensors", {"live": torch.tensor([True, False])})
    assert load(good).tensors["live"].tolist() == [True, False]  # the forging helper itself writes valid files


@pytest.mark.usefixtures("deadline")
def test_open_regular_checks_kind_and_size_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "x.npy"
    os.mkfifo(fifo)
    with pytest.raises(ArtifactError, match=f"^{fifo}: is a FIFO, not a regular file$"):
        open_regular(fifo)
    with pytest.raises(ArtifactError, match="is a directory, not a regular file"):
        open_regular(tmp_path)
    with pytest.raises(ArtifactError, match="No such file or directory"):
        open_regular(tmp_path / "missing.txt")
    small = tmp_path / "small.txt"
    small.write_bytes(b"12345")
    with open_regular(small, max_bytes=5) as f:
        assert f.read() == b"12345"
    with pytest.raises(ArtifactError, match=f"^{small}: the file is 5 bytes, more than the 4 allowed here$"):
        open_regular(small, max_bytes=4)
