"""Safe save / load of quantized artifacts: one .safetensors file with a JSON manifest, checked end to end.

File layout (plain safetensors, readable by any safetensors reader):

    8 bytes       little-endian u64 N, the header length
    N bytes       JSON header: {"__metadata__": {"polyquant": "<manifest JSON>"},
                                "<name>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
                  padded with spaces to a multiple of 8
    data          the raw little-endian tensor bytes, back to back (offsets are relative to the data start)

The manifest (a JSON object stored as a string under ``__metadata__["polyquant"]``):

    format            "polyquant-artifact"
    format_version    1
    polyquant_version the writer's ``polyquant.__version__``
    plugin, method    str or null
    config, meta      JSON objects
    tensors           {name: {"dtype": "F32", "shape": [...], "sha256": "<hex of the raw bytes>"}}
    manifest_sha256   sha256 of the canonical JSON (sorted keys, no spaces) of all the fields above

``load`` never unpickles and never runs code from the file: it checks the header itself (length, JSON, dtypes,
shapes, offsets contiguous and in range), the manifest (format, version, its own checksum, tensor names, dtypes,
shapes) and every tensor's sha256 before safetensors reads the bytes. Any problem raises ``ArtifactError``.

``load(path, mmap=True)`` maps the file instead of reading it, for artifacts larger than RAM (embedding stores):
the same header and manifest checks run, then every tensor is a view of the mapping at its offset, read on first
touch. The mapping is copy-on-write: writing to a tensor changes memory, never the file. The tensors' sha256 are
not verified by default (that would read the whole file); ``verify=True`` hashes them through the mapping. Every
load (read or mapped, verified or not) checks that bool tensors hold only 0 and 1 bytes. Saves replace files by
rename, so a mapped artifact stays valid while the path is saved again; a file truncated in place under a live
mapping is not supported.
The checksums detect corruption, not deliberate tampering (anyone can recompute them); they are not a signature.
The header alone bounds what a file may ask for: at most ``MAX_RANK`` dimensions per tensor, element counts that
match the bytes, and no empty tensor spanning more than ``MAX_EMPTY_EXTENT`` positions (a zero-size tensor of shape
``(2**40, 0)`` has no bytes but a 2**40-entry ``.tolist()``). ``load`` and ``read_manifest`` read regular files
only (never block on a FIFO, never read a device without end) and compare the file size with the header before
reading any tensor data; ``open_regular`` is that check, public for every other file the command line reads.

``save`` refuses (``check_target``) a target that is not a regular file (directory, FIFO, device, socket, symbolic
link: the rename would replace it, as root even ``/dev/null``), a missing or unwritable folder, an empty name and
a name longer than the file system allows. Its temp file, ``.<name>.<digest>.<random>.tmp`` beside the target
(the name shortened so that names up to the 255-byte limit still save), holds an advisory lock while it is
written; the next save of the same target removes temp files that no live save holds (left by a killed one).

Tensor keys are flat strings, by convention ``<fqn>.weight_packed``, ``<fqn>.weight_scale``,
``<fqn>.weight_zero_point``, ``<fqn>.weight_shape``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
import sys
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # torch is imported where tensors are made or read: ``read_manifest`` needs none
    import torch
    from torch import Tensor

try:  # advisory locks on temp files (POSIX); without them stale temp files are left alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Artifact",
    "ArtifactError",
    "save",
    "load",
    "read_manifest",
    "check_target",
    "open_regular",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_RANK",
    "MAX_EMPTY_EXTENT",
]

FORMAT_NAME = "polyquant-artifact"
FORMAT_VERSION = 1
MANIFEST_KEY = "polyquant"
MAX_RANK = 32  # dimensions per tensor; deeper shapes crash torch's recursive helpers (.tolist() at 100,000)
MAX_EMPTY_EXTENT = 2**24  # product of the non-zero dims of a tensor with no elements
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_NAME_MAX = 255  # bytes in a file name, where the file system does not say (os.pathconf)
_TEMP_SUFFIX_BYTES = 16 + len(".tmp")  # the random hex part and the suffix of a temp file name

# safetensors dtype name -> bytes per element (the dtypes we write and accept; ``_torch_dtypes`` has their torch dtype)
_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype (imports torch on first use)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": torch.uint64,
        "U32": torch.uint32,
        "U16": torch.uint16,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


@cache
def _dtype_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name."""
    return {v: k for k, v in _torch_dtypes().items()}

_MANIFEST_FIELDS = {
    "format",
    "format_version",
    "polyquant_version",
    "plugin",
    "method",
    "config",
    "meta",
    "tensors",
    "manifest_sha256",
}
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
_MANIFEST_TENSOR_FIELDS = {"dtype", "shape", "sha256"}


class ArtifactError(ValueError):
    """An artifact cannot be saved or loaded: the message names the file and the problem."""


@dataclass
class Artifact:
    """Tensors plus the JSON description of how they were produced.

    Args:
        tensors: flat name -> tensor (any device; saved from CPU, loaded on CPU).
        plugin: name of the plugin that produced it, or None for the core.
        method: name of the method, or None.
        config: the method's configuration, JSON-serializable (tuples come back as lists).
        meta: anything else JSON-serializable (e.g. quantizer specs, model name).
        format_version: file format version; ``load`` fills in the file's.
    """

    tensors: dict[str, Tensor]
    plugin: str | None = None
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


# ---------------------------------------------------------------------------------------------------------------------
# Save


def save(artifact: Artifact, path: str | os.PathLike[str]) -> Path:
    """Write ``artifact`` to ``path`` atomically (temp file in the same folder, fsync, rename); returns the path.

    An existing regular file at ``path`` is replaced; any other target is refused first (see ``check_target``).
    Raises ``ArtifactError`` for an artifact that cannot be represented (non-JSON config or meta, bad names,
    unsupported dtypes, shapes beyond ``MAX_RANK`` / ``MAX_EMPTY_EXTENT``) or a target that cannot be written,
    and ``OSError`` (naming ``path``) when writing fails; the previous file at ``path``, if any, is untouched on
    any failure.
    """
    path = check_target(path, force=True)
    where = str(path)
    if artifact.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{where}: can only write format_version {FORMAT_VERSION}, got {artifact.format_version}")
    for name, value in (("plugin", artifact.plugin), ("method", artifact.method)):
        if value is not None and not isinstance(value, str):
            raise ArtifactError(f"{where}: {name} must be a string or None, got {type(value).__name__}")
    for name, value in (("config", artifact.config), ("meta", artifact.meta)):
        if not isinstance(value, dict):
            raise ArtifactError(f"{where}: {name} must be a dict, got {type(value).__name__}")
        _check_json(value, name, where)
    if not isinstance(artifact.tensors, dict):
        kind = type(artifact.tensors).__name__
        raise ArtifactError(f"{where}: tensors must be a dict of name -> Tensor, got {kind}")

    tensors: dict[str, Tensor] = {}
    for name, t in artifact.tensors.items():
        tensors[name] = _prepare_tensor(name, t, where)
        _check_bool(name, tensors[name], where)
    raw = {name: _raw_bytes(t) for name, t in tensors.items()}

    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "polyquant_version": _polyquant_version(),
        "plugin": artifact.plugin,
        "method": artifact.method,
        "config": artifact.config,
        "meta": artifact.meta,
        "tensors": {
            name: {
                "dtype": _dtype_names()[t.dtype],
                "shape": list(t.shape),
                "sha256": hashlib.sha256(raw[name]).hexdigest(),
            }
            for name, t in tensors.items()
        },
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)

    # Data order: widest dtypes first, so every tensor is aligned to its item size (the data start is 8-aligned).
    order = sorted(tensors, key=lambda n: -tensors[n].dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": {MANIFEST_KEY: json.dumps(manifest, allow_nan=False)}}
    offset = 0
    for name in order:
        end = offset + len(raw[name])
        t = tensors[name]
        header[name] = {"dtype": _dtype_names()[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    head = json.dumps(header, separators=(",", ":")).encode("ascii")
    head += b" " * (-(8 + len(head)) % 8)

    prefix = _temp_prefix(path)
    _remove_stale_temps(path.parent, prefix)
    tmp = path.with_name(f"{prefix}{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            _lock(f.fileno())  # held until closed: a live save's temp file is never taken for a stale one
            _write_chunk(f, len(head).to_bytes(8, "little"))
            _write_chunk(f, head)
            for name in order:
                _write_chunk(f, raw[name])
            f.flush()
            os.fsync(f.fileno())
        _check_replaceable(path, where)  # again: the target may have changed while we wrote
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, os.fspath(tmp)):
            raise OSError(e.errno, e.strerror, where) from e  # name the user's path, not the hidden temp file
        raise
    _fsync_dir(path.parent)
    return path


def check_target(
    path: str | os.PathLike[str], *, force: bool, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Check, before any work starts, that an artifact can be saved at ``path``; returns it as a ``Path``.

    Raises ``ArtifactError`` (one line naming ``path``) for: an empty path or one naming a folder; a missing
    folder, or one that is not a folder or not writable; a name longer than the file system allows; an existing
    target that is not a regular file (a directory, FIFO, device, socket or symbolic link: ``save`` renames a new
    file over the target, which would replace it; give the real path of a link instead); an existing file unless
    ``force``; and, even with ``force``, a target that is the same file as one of ``inputs`` (paths that do not
    exist are skipped).
    """
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not raw:
        raise ArtifactError("'': empty path; give a file name")
    target = Path(raw)
    if os.path.basename(raw) in ("", ".", ".."):  # 'out/', 'out/.': pathlib would drop the final part
        raise ArtifactError(f"{raw}: names a folder; give a file name such as {raw.rstrip('/' + os.sep) or '.'}"
                            "/model.safetensors")
    folder = target.parent
    try:
        folder_mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise ArtifactError(f"{raw}: the folder {folder} does not exist") from None
    except OSError as e:
        raise ArtifactError(f"{raw}: cannot use the folder {folder} ({e.strerror or e})") from None
    if not stat.S_ISDIR(folder_mode):
        raise ArtifactError(f"{raw}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(f"{raw}: cannot write in the folder {folder} (permission denied or read-only)")
    limit = _name_max(folder)
    if len(os.fsencode(target.name)) > limit:
        raise ArtifactError(f"{raw}: the file name is {len(os.fsencode(target.name))} bytes, longer than the "
                            f"{limit} the file system allows")
    exists = _check_replaceable(target, raw)
    if exists:
        same = _same_file_as(target, inputs)
        if same is not None:
            raise ArtifactError(f"{raw}: is the input {same}; saving would overwrite it (choose another path)")
        if not force:
            raise ArtifactError(f"{raw}: the file exists; pass --force to overwrite it")
    return target


def _check_replaceable(path: Path, where: str) -> bool:
    """Whether ``path`` exists; ``ArtifactError`` if it is something a rename must not replace."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ArtifactError(f"{where}: cannot check the target ({e.strerror or e})") from None
    if stat.S_ISLNK(mode):
        raise ArtifactError(f"{where}: is a symbolic link (to {os.readlink(path)}); artifacts are only written to "
                            "regular files, give the real path")
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{where}: is a {_file_kind(mode)}; artifacts are only written to regular files")
    return True


def _same_file_as(path: Path, inputs: Iterable[str | os.PathLike[str]]) -> str | None:
    """The first of ``inputs`` that is the same file as ``path`` (same device and inode), or None."""
    try:
        target = os.stat(path)
    except OSError:
        return None
    for item in inputs:
        with suppress(OSError, ValueError):  # inputs that do not exist or cannot be named are not the target
            found = os.stat(item)
            if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                return os.fsdecode(os.fspath(item))
    return None


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")]
    return next((name for test, name in kinds if test(mode)), "special file")


def _name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of ``folder`` allows."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # not POSIX, or the file system does not say
        return _NAME_MAX


def _temp_prefix(path: Path) -> str:
    """``.<name>.<digest>.``: what every temp file of ``path`` starts with. The name is shortened so that the
    whole temp name fits in the file system's limit; the digest of the full name keeps shortened names apart."""
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]
    budget = _name_max(path.parent) - len(f"..{digest}.") - _TEMP_SUFFIX_BYTES
    name = path.name
    while len(os.fsencode(name)) > budget:
        name = name[:-1]
    return f".{name}.{digest}."


def _lock(fd: int) -> None:
    """Lock a new temp file for the duration of the save (where the file system has no locks: not locked)."""
    if fcntl is not None:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_stale_temps(folder: Path, prefix: str) -> None:
    """Remove the temp files of one target that no live save holds locked (left behind by a killed save)."""
    if fcntl is None:
        return
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(".tmp")
                     and len(e.name) == len(prefix) + _TEMP_SUFFIX_BYTES]
    except OSError:
        return
    for name in names:
        stale = folder / name
        with suppress(OSError):
            fd = os.open(stale, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a save in progress
                os.unlink(stale)
            finally:
                os.close(fd)


def _write_chunk(f: BinaryIO, data: bytes | memoryview) -> None:
    f.write(data)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prepare_tensor(name: object, t: object, where: str) -> Tensor:
    import torch

    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{where}: tensor names must be non-empty strings, got {name!r}")
    if name == "__metadata__":
        raise ArtifactError(f"{where}: '__metadata__' is reserved and cannot name a tensor")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ArtifactError(f"{where}: tensor name {name!r} is not valid unicode") from e
    if not isinstance(t, torch.Tensor):
        raise ArtifactError(f"{where}: tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise ArtifactError(f"{where}: tensor {name!r} must be a dense tensor with data ({t.layout}, {t.device})")
    if t.dtype not in _dtype_names():
        supported = ", ".join(str(d).removeprefix("torch.") for d in _dtype_names())
        raise ArtifactError(f"{where}: tensor {name!r} has unsupported dtype {t.dtype} (supported: {supported})")
    problem = _shape_problem(list(t.shape))
    if problem:
        raise ArtifactError(f"{where}: tensor {name!r} cannot be saved: {problem}")
    return t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()


def _shape_problem(shape: list[int]) -> str | None:
    """Why a shape of non-negative ints is refused (see ``MAX_RANK``, ``MAX_EMPTY_EXTENT``), or None."""
    if len(shape) > MAX_RANK:
        return f"{len(shape)} dimensions, more than MAX_RANK = {MAX_RANK}"
    if 0 in shape:
        extent = math.prod(d for d in shape if d)
        if extent > MAX_EMPTY_EXTENT:
            return f"an empty tensor spanning {extent} positions, more than MAX_EMPTY_EXTENT = {MAX_EMPTY_EXTENT}"
    return None


def _raw_bytes(t: Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian), without a copy."""
    if sys.byteorder != "little":
        raise ArtifactError("saving artifacts on a big-endian machine is not supported")
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _check_json(value: Any, at: str, where: str) -> None:
    """Raise ArtifactError unless ``value`` is plain JSON: dict (str keys), list/tuple, str, int, finite float,
    bool, None."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArtifactError(f"{where}: {at} is {value}, which JSON cannot represent")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{at}[{i}]", where)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ArtifactError(f"{where}: {at} has a non-string key {key!r}; JSON keys must be strings")
            _check_json(item, f"{at}[{key!r}]", where)
        return
    raise ArtifactError(f"{where}: {at} is a {type(value).__name__}, which is not JSON-serializable")


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _polyquant_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------------------
# Load


def load(path: str | os.PathLike[str], *, mmap: bool = False, verify: bool | None = None) -> Artifact:
    """Read and verify an artifact written by ``save``; tensors come back on CPU, in the order they were saved.

    Args:
        path: a regular file.
        mmap: map the file instead of reading it: tensors are copy-on-write views of the mapping (module
            docstring), read from disk when touched.
        verify: check every tensor's sha256; default True when reading, False with ``mmap`` (hashing reads the
            whole file). Reading without ``mmap`` always verifies.

    Raises ``ArtifactError`` (and nothing else) for a missing, unreadable, truncated, corrupted or foreign file.
    """
    where = str(path)
    try:
        if mmap:
            return _load_mmap(Path(path), where, verify=bool(verify))
        if verify is False:
            raise ArtifactError(f"{where}: verify=False needs mmap=True (a read load always verifies checksums)")
        return _load(Path(path), where)
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupted file must never surface as another error type
        raise ArtifactError(f"{where}: cannot load artifact ({type(e).__name__}: {e})") from e


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified manifest of an artifact, reading only its header (tensor checksums are not verified)."""
    where = str(path)
    try:
        with open_regular(path) as f:
            return _read_header(f, where)[3]
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{where}: cannot read artifact header ({type(e).__name__}: {e})") from e


def _read_header(f: BinaryIO, where: str) -> tuple[int, bytes, dict[str, dict[str, Any]], dict[str, Any]]:
    """(file size, the header bytes with their 8-byte length prefix, header entries, manifest) of an open file.
    Every tensor's dtype, shape and span is checked against the file size before any data is read."""
    size = os.fstat(f.fileno()).st_size
    prefix = _read_exact(f, 8, where)
    n = _header_length(prefix, size, where)
    head = _read_exact(f, n, where)
    entries, metadata = _parse_header(head, size - 8 - n, where)
    return size, prefix + head, entries, _parse_manifest(metadata, entries, where)


def _load(path: Path, where: str) -> Artifact:
    with open_regular(path) as f:
        size, head, entries, manifest = _read_header(f, where)
        start = len(head)
        f.seek(0)
        data = _read_exact(f, size, where)
    if data[:start] != head:
        raise ArtifactError(f"{where}: the file changed while it was read")

    with memoryview(data) as view:
        for name, spec in manifest["tensors"].items():
            begin, end = entries[name]["data_offsets"]
            if hashlib.sha256(view[start + begin : start + end]).hexdigest() != spec["sha256"]:
                raise ArtifactError(f"{where}: checksum mismatch for tensor {_short(name)} (the file is corrupted)")

    from safetensors.torch import load as safetensors_load

    try:
        loaded = safetensors_load(data)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{where}: safetensors rejected the file ({e})") from e
    for name, t in loaded.items():
        _check_bool(name, t, where)
    return Artifact(
        tensors={name: loaded[name] for name in manifest["tensors"]},
        plugin=manifest["plugin"],
        method=manifest["method"],
        config=manifest["config"],
        meta=manifest["meta"],
        format_version=manifest["format_version"],
    )


def _load_mmap(path: Path, where: str, *, verify: bool) -> Artifact:
    import numpy as np
    import torch

    if sys.byteorder != "little":
        raise ArtifactError(f"{where}: memory-mapped loading needs a little-endian machine")
    with open_regular(path) as f:
        size, head, entries, manifest = _read_header(f, where)
        start = len(head)
        try:
            mapped = np.memmap(f, dtype=np.uint8, mode="c", shape=(size,))  # copy-on-write: the file stays as is
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{where}: cannot map the file ({e})") from e
    if bytes(mapped[:start]) != head:
        raise ArtifactError(f"{where}: the file changed while it was read")

    tensors: dict[str, Tensor] = {}
    for name, spec in manifest["tensors"].items():
        begin, end = entries[name]["data_offsets"]
        dtype = _torch_dtypes()[spec["dtype"]]
        raw = mapped[start + begin : start + end]
        if verify and hashlib.sha256(memoryview(raw)).hexdigest() != spec["sha256"]:
            raise ArtifactError(f"{where}: checksum mismatch for tensor {_short(name)} (the file is corrupted)")
        if (start + begin) % dtype.itemsize:
            raw = np.array(raw)  # a misaligned tensor (not written by ``save``): copied to aligned memory
        t = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(dtype).reshape(spec["shape"])
        _check_bool(name, tensors[name], where)
    return Artifact(
        tensors=tensors,
        plugin=manifest["plugin"],
        method=manifest["method"],
        config=manifest["config"],
        meta=manifest["meta"],
        format_version=manifest["format_version"],
    )


def _check_bool(name: str, t: Tensor, where: str) -> None:
    """A bool tensor must hold only the bytes 0 and 1 (any other byte is undefined behaviour in torch)."""
    import torch

    if t.dtype == torch.bool and t.numel() and int(t.reshape(-1).view(torch.uint8).max()) > 1:
        raise ArtifactError(f"{where}: bool tensor {_short(name)} holds bytes other than 0 and 1")


def open_regular(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> BinaryIO:
    """Open ``path`` for reading in binary mode, only if it is a regular file of at most ``max_bytes`` bytes.

    The check every file the command line reads goes through (artifacts, ``--input``, ``--queries``): a FIFO,
    device, socket or directory is refused without blocking on it or reading it (a FIFO would wait for a writer
    forever, ``/dev/zero`` never ends), and so is a file larger than ``max_bytes`` (None: no bound). The file is
    opened non-blocking and checked again through its descriptor, so a path swapped for a FIFO after the first
    check does not block either. Raises ``ArtifactError`` (a ``ValueError``; one line starting with the path).
    """
    where = os.fsdecode(os.fspath(path))
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            f = os.fdopen(fd, "rb")
            found = os.fstat(fd)
            mode = found.st_mode
            if stat.S_ISREG(mode):
                if max_bytes is not None and found.st_size > max_bytes:
                    f.close()
                    raise ArtifactError(f"{where}: the file is {found.st_size:,} bytes, more than the {max_bytes:,} "
                                        "allowed here")
                return f
            f.close()
    except OSError as e:
        raise ArtifactError(f"{where}: cannot read file ({e.strerror or e})") from e
    raise ArtifactError(f"{where}: is a {_file_kind(mode)}, not a regular file")


def _read_exact(f: BinaryIO, n: int, where: str) -> bytes:
    try:
        data = f.read(n)
    except OSError as e:
        raise ArtifactError(f"{where}: cannot read file ({e.strerror or e})") from e
    if len(data) != n:
        raise ArtifactError(f"{where}: the file ended after {len(data)} of {n} bytes (truncated while it was read)")
    return data


def _header_length(prefix: bytes, file_size: int, where: str) -> int:
    if file_size < 8 or len(prefix) < 8:
        raise ArtifactError(f"{where}: truncated or not an artifact: {file_size} bytes, less than the 8-byte prefix")
    n = int.from_bytes(prefix[:8], "little")
    if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > file_size:
        raise ArtifactError(
            f"{where}: bad header length {n} for a file of {file_size} bytes "
            "(truncated, corrupted or not a safetensors file)"
        )
    return n


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(text: bytes | str, what: str, where: str) -> dict[str, Any]:
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_strict_object, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{where}: bad {what}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ArtifactError(f"{where}: bad {what}: expected a JSON object, got {type(value).__name__}")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(head: bytes, data_len: int, where: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Validate the safetensors JSON header against the data size; returns (tensor entries, __metadata__)."""
    if not head.startswith(b"{"):
        raise ArtifactError(f"{where}: bad header: does not start with '{{' (not a safetensors file)")
    if not head.rstrip(b" ").endswith(b"}"):
        raise ArtifactError(f"{where}: bad header: the JSON object must be followed by nothing but space padding")
    header = _parse_json(head, "header", where)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise ArtifactError(f"{where}: not a polyquant artifact: safetensors file without metadata")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactError(f"{where}: bad header: __metadata__ must map strings to strings")

    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            raise ArtifactError(
                f"{where}: bad header entry for tensor {_short(name)}: expected {sorted(_ENTRY_FIELDS)}"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise ArtifactError(f"{where}: tensor {_short(name)} has unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ArtifactError(f"{where}: tensor {_short(name)} has a bad shape {_short(shape)}")
        problem = _shape_problem(shape)
        if problem:
            raise ArtifactError(f"{where}: tensor {_short(name)} has {problem}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ArtifactError(f"{where}: tensor {_short(name)} has bad data_offsets {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise ArtifactError(
                f"{where}: tensor {_short(name)} data_offsets {_short(offsets)} outside the {data_len} data bytes"
            )
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != nbytes:
            raise ArtifactError(
                f"{where}: tensor {_short(name)} spans {end - begin} bytes, {dtype}{_short(shape)} needs {nbytes}"
            )
        spans.append((begin, end, name))

    expected = 0
    for begin, end, name in sorted(spans):
        if begin != expected:
            problem = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
            raise ArtifactError(f"{where}: bad header: tensor {_short(name)} at offset {begin} {problem}")
        expected = end
    if expected != data_len:
        raise ArtifactError(
            f"{where}: tensors cover {expected} bytes but the data section has {data_len} (truncated or padded file)"
        )
    return header, metadata


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (header values can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_manifest(metadata: dict[str, str], entries: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    """Validate the manifest and check it against the header entries; returns the manifest."""
    if MANIFEST_KEY not in metadata:
        raise ArtifactError(f"{where}: not a polyquant artifact: no '{MANIFEST_KEY}' manifest in the metadata")
    extra = set(metadata) - {MANIFEST_KEY}
    if extra:
        raise ArtifactError(f"{where}: unexpected metadata keys {_short(sorted(extra))} next to the manifest")
    manifest = _parse_json(metadata[MANIFEST_KEY], "manifest", where)
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{where}: not a polyquant artifact: manifest format is {_short(manifest.get('format'))}")
    version = manifest.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: unsupported format_version {_short(version)} (this polyquant reads 1..{FORMAT_VERSION}; "
            "a newer file needs a newer polyquant)"
        )
    if set(manifest) != _MANIFEST_FIELDS:
        fields = _short(sorted(manifest))
        raise ArtifactError(f"{where}: bad manifest: fields {fields}, expected {sorted(_MANIFEST_FIELDS)}")
    if manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise ArtifactError(f"{where}: manifest checksum mismatch (the header is corrupted)")
    for key in ("plugin", "method"):
        if manifest[key] is not None and not isinstance(manifest[key], str):
            raise ArtifactError(f"{where}: bad manifest: {key} must be a string or null")
    if not isinstance(manifest["config"], dict) or not isinstance(manifest["meta"], dict):
        raise ArtifactError(f"{where}: bad manifest: config and meta must be objects")
    if not isinstance(manifest["polyquant_version"], str):
        raise ArtifactError(f"{where}: bad manifest: polyquant_version must be a string")

    tensors = manifest["tensors"]
    if not isinstance(tensors, dict):
        raise ArtifactError(f"{where}: bad manifest: tensors must be an object")
    missing, unexpected = set(tensors) - set(entries), set(entries) - set(tensors)
    if missing or unexpected:
        raise ArtifactError(
            f"{where}: tensor names do not match the manifest: missing {_short(sorted(missing)[:5])}, "
            f"unexpected {_short(sorted(unexpected)[:5])}"
        )
    for name, spec in tensors.items():
        if not isinstance(spec, dict) or set(spec) != _MANIFEST_TENSOR_FIELDS:
            raise ArtifactError(f"{where}: bad manifest entry for tensor {_short(name)}")
        entry = entries[name]
        if spec["dtype"] != entry["dtype"] or spec["shape"] != entry["shape"]:
            raise ArtifactError(
                f"{where}: tensor {_short(name)} is {entry['dtype']}{_short(entry['shape'])} in the file but "
                f"{_short(spec['dtype'])}{_short(spec['shape'])} in the manifest"
            )
        if not isinstance(spec["sha256"], str):
            raise ArtifactError(f"{where}: bad manifest: sha256 of tensor {_short(name)} must be a string")
    return manifest
