"""Read and write the standard 3D Gaussian Splatting ``.ply`` (the layout of graphdeco-inria/gaussian-splatting).

    scene = read_ply("point_cloud.ply")        # GaussianScene of float32 CPU tensors
    write_ply(scene, "restored.ply")           # atomic; read_ply gives back the same bits
    ratio = ply_bytes(scene) / compressed_size  # the .ply size, computed without writing

One ``vertex`` element, one row per Gaussian, float32 properties in this order when written
(``binary_little_endian``; B = 0, 3, 8 or 15 higher SH bands per colour channel, for degree 0..3):

=============================  ======================  ==================================================
property                       scene attribute          note
=============================  ======================  ==================================================
x, y, z                        ``xyz[:, 0..2]``
nx, ny, nz                     --                       zeros when written, ignored (and optional) on read
f_dc_0..2                      ``sh_dc[:, c]``
f_rest_0..(3B-1)               ``sh_rest``              channel-major: ``f_rest_{c*B + b}`` = ``sh_rest[:, b, c]``
opacity                        ``opacity[:, 0]``        the logit, stored as is
scale_0..2                     ``scale[:, 0..2]``       the log, stored as is
rot_0..3                       ``rotation[:, 0..3]``    (w, x, y, z), not normalised
=============================  ======================  ==================================================

``read_ply`` also takes ascii and big-endian files, properties of any numeric type (converted to float32), other
properties (ignored) and other elements. Every problem with the file is a ``PlyError``: one line naming the path.
"""

from __future__ import annotations

import os
import secrets
import struct
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from polyquant.artifact import ArtifactError, check_target, open_regular

from .scene import GaussianScene, rest_bands

plyfile: Any
try:
    import plyfile
except (ImportError, OSError, RuntimeError):  # pragma: no cover - depends on the environment
    plyfile = None

__all__ = ["PlyError", "read_ply", "write_ply", "ply_bytes"]

INSTALL_HINT = "the gaussians plugin needs plyfile: pip install 'polyquant[gaussians]'"
# The properties every Gaussian needs, by scene attribute (f_rest_* come from the file's count).
_COLUMNS = {
    "xyz": ("x", "y", "z"),
    "sh_dc": ("f_dc_0", "f_dc_1", "f_dc_2"),
    "opacity": ("opacity",),
    "scale": ("scale_0", "scale_1", "scale_2"),
    "rotation": ("rot_0", "rot_1", "rot_2", "rot_3"),
}
_NORMALS = ("nx", "ny", "nz")
_REST_COUNTS = tuple(3 * rest_bands(d) for d in range(4))  # 0, 9, 24, 45
# What plyfile (and numpy under it) raises for a file it cannot parse, besides its own PlyParseError.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, EOFError, StopIteration, struct.error)


class PlyError(ValueError):
    """A ``.ply`` cannot be read or written: the one-line message names the file and the problem."""


def _plyfile() -> ModuleType:
    if plyfile is None:
        raise ImportError(INSTALL_HINT)
    return plyfile


def _property_names(sh_degree: int) -> list[str]:
    """The vertex properties ``write_ply`` writes, in order."""
    names = _table_names(3 * rest_bands(sh_degree))
    return [*names[:3], *_NORMALS, *names[3:]]


def _table_names(rest_count: int) -> list[str]:
    """The properties of the (N, P) float32 table ``read_ply`` builds, in order: the written ones less normals."""
    c = _COLUMNS
    rest = [f"f_rest_{i}" for i in range(rest_count)]
    return [*c["xyz"], *c["sh_dc"], *rest, *c["opacity"], *c["scale"], *c["rotation"]]


def _attribute_slices(rest_count: int) -> dict[str, slice]:
    """Each scene attribute's columns in that table."""
    sizes = {"xyz": 3, "sh_dc": 3, "sh_rest": rest_count, "opacity": 1, "scale": 3, "rotation": 4}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = slice(start, start + size)
        start += size
    return out


def _header(num_gaussians: int, names: list[str]) -> bytes:
    """The header ``write_ply`` writes (plyfile's own, with its final newline)."""
    ply = _plyfile()
    element = ply.PlyElement("vertex", [ply.PlyProperty(n, "f4") for n in names], num_gaussians)
    return ply.PlyData([element], text=False, byte_order="<").header.encode("ascii") + b"\n"


def ply_bytes(scene: GaussianScene) -> int:
    """Size in bytes of the file ``write_ply(scene, ...)`` writes (header + 4 bytes x properties x N)."""
    names = _property_names(scene.sh_degree)
    return len(_header(scene.num_gaussians, names)) + 4 * len(names) * scene.num_gaussians


def write_ply(scene: GaussianScene, path: str | os.PathLike[str]) -> Path:
    """Write ``scene`` as a standard 3DGS ``.ply`` (float32, little-endian, zero normals); returns the path.

    Atomic: a temp file in the same folder, fsync, then ``os.replace``; on any failure the previous file at
    ``path`` is untouched and the temp file removed. Tensors of another dtype or device are converted to float32 on
    the CPU; float32 ones come back bit-exactly from ``read_ply``. Raises ``PlyError`` (naming ``path``) for a
    target that cannot be written (missing folder, a directory, ...), an empty scene, non-finite values (checked
    before anything is written) and a failed write.
    """
    ply = _plyfile()
    where = os.fsdecode(os.fspath(path))
    try:
        target = check_target(path, force=True)
    except ArtifactError as e:
        raise PlyError(str(e)) from None
    n = scene.num_gaussians
    if n == 0:
        raise PlyError(f"{where}: cannot write a scene of 0 Gaussians (read_ply refuses an empty file)")
    t = scene.map(lambda x: x.detach().to("cpu", torch.float32))
    rest = t.sh_rest.transpose(1, 2).reshape(n, -1)  # (N, 3B), channel-major: column c*B + b = sh_rest[:, b, c]
    table = torch.cat([t.xyz, t.sh_dc, rest, t.opacity, t.scale, t.rotation], dim=1).numpy()  # (N, P - 3)
    _check_finite(table, rest.shape[1], f"{where}: cannot write non-finite values (NaN or inf):")
    table = np.concatenate([table[:, :3], np.zeros((n, 3), np.float32), table[:, 3:]], axis=1).astype("<f4")
    names = _property_names(t.sh_degree)
    vertex = table.view(np.dtype([(name, "<f4") for name in names])).reshape(n)  # (N,) records, no copy
    data = ply.PlyData([ply.PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")

    tmp = target.with_name(f".{target.name[:200]}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            data.write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise PlyError(f"{where}: cannot write ({e.strerror or e})") from e
        raise
    with suppress(OSError):  # make the rename durable where the platform allows it
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def read_ply(path: str | os.PathLike[str]) -> GaussianScene:
    """Read a 3DGS ``.ply`` (binary either endianness, or ascii; SH degree 0..3) as float32 CPU tensors.

    The SH degree comes from the number of ``f_rest_*`` properties (0, 9, 24 or 45, numbered without gaps).
    Normals and any other property or element are ignored. Raises ``PlyError`` (one line naming ``path``) for a
    missing or unreadable file, a file that is not a PLY, truncated data, no ``vertex`` element, missing or list
    properties, a bad ``f_rest_*`` count, zero Gaussians and non-finite values.
    """
    ply = _plyfile()
    where = os.fsdecode(os.fspath(path))
    try:
        f = open_regular(path)
    except ArtifactError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            raise PlyError(f"{where}: file not found") from None
        raise PlyError(_one_line(str(e))) from None
    with f:
        try:
            data = ply.PlyData.read(f, mmap="c")
        except ply.PlyHeaderParseError as e:
            raise PlyError(f"{where}: not a PLY file, or its header is unreadable ({_one_line(str(e))})") from None
        except ply.PlyElementParseError as e:
            raise PlyError(f"{where}: truncated or malformed data ({_one_line(str(e))})") from None
        except MemoryError:
            raise PlyError(f"{where}: the header declares more data than fits in memory") from None
        except OSError as e:
            raise PlyError(f"{where}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise PlyError(f"{where}: not a PLY file (non-ASCII bytes in its header or ascii data)") from None
        except (ply.PlyParseError, *_PARSE_ERRORS) as e:
            raise PlyError(f"{where}: not a valid PLY file ({type(e).__name__}: {_one_line(str(e))})") from None
        table, rest_count = _vertex_table(data, ply, where)
    n = table.shape[0]
    _check_finite(table, rest_count, f"{where}: non-finite values (NaN or inf):")
    cols = {name: torch.from_numpy(table[:, s].copy()) for name, s in _attribute_slices(rest_count).items()}
    bands = rest_count // 3
    sh_rest = cols["sh_rest"].reshape(n, 3, bands).transpose(1, 2).contiguous()  # (N, B, 3)
    return GaussianScene(xyz=cols["xyz"], scale=cols["scale"], rotation=cols["rotation"], opacity=cols["opacity"],
                         sh_dc=cols["sh_dc"], sh_rest=sh_rest)


def _vertex_table(data: Any, ply: ModuleType, where: str) -> tuple[np.ndarray, int]:
    """The Gaussians' properties as an (N, P) float32 array in ``_attribute_slices`` order (no normals), and the
    number of ``f_rest_*`` properties; ``PlyError`` for what a 3DGS file must have and this one lacks."""
    elements = {e.name: e for e in data.elements}
    if "vertex" not in elements:
        found = ", ".join(elements) or "none"
        raise PlyError(f"{where}: no 'vertex' element (elements found: {found})")
    vertex = elements["vertex"]
    props = {p.name: p for p in vertex.properties}
    required = [name for names in _COLUMNS.values() for name in names]
    missing = [name for name in required if name not in props]
    if missing:
        raise PlyError(f"{where}: missing {', '.join(missing)} (a 3DGS .ply has x, y, z, f_dc_0..2, opacity, "
                       "scale_0..2, rot_0..3 and f_rest_*)")
    rest = [name for name in props if name.startswith("f_rest_") and name[7:].isdigit()]
    if len(rest) not in _REST_COUNTS:
        raise PlyError(f"{where}: {len(rest)} f_rest_* properties; SH degree 0..3 has 0, 9, 24 or 45")
    expected = [f"f_rest_{i}" for i in range(len(rest))]
    if set(rest) != set(expected):
        gaps = [name for name in expected if name not in props]
        extra = [name for name in rest if name not in expected]
        raise PlyError(f"{where}: f_rest_* properties are not numbered 0..{len(rest) - 1} without gaps (missing "
                       f"{', '.join(gaps)}; unexpected {', '.join(extra)})")
    names = _table_names(len(rest))
    lists = [name for name in names if isinstance(props[name], ply.PlyListProperty)]
    if lists:
        raise PlyError(f"{where}: {', '.join(lists)}: list properties; the Gaussian attributes must be scalars")
    if vertex.count == 0:
        raise PlyError(f"{where}: the vertex element has 0 rows (no Gaussians)")
    table = np.empty((vertex.count, len(names)), dtype=np.float32)  # (N, P)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: reported as non-finite
        for i, name in enumerate(names):
            table[:, i] = vertex.data[name]
    return table, len(rest)


def _check_finite(table: np.ndarray, rest_count: int, prefix: str) -> None:
    """``PlyError`` (``prefix`` then, per attribute, how many of the N rows hold a NaN or an infinity)."""
    bad = []
    for name, s in _attribute_slices(rest_count).items():
        rows = np.flatnonzero(~np.isfinite(table[:, s]).all(axis=1))
        if rows.size:
            bad.append(f"{name} in {rows.size} of {table.shape[0]} rows (first row {rows[0]})")
    if bad:
        raise PlyError(f"{prefix} {'; '.join(bad)}")


def _one_line(text: str) -> str:
    return " ".join(text.split())
