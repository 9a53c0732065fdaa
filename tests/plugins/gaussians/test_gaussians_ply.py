"""The 3DGS ``.ply`` reader and writer: bit-exact round trips, graphdeco's layout, other encodings, and a one-line
``PlyError`` naming the path for every bad file (with no damage to an existing file on a failed write)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import plyfile
import pytest
import torch

from polyquant.plugins.gaussians import ply as ply_module
from polyquant.plugins.gaussians.ply import PlyError, ply_bytes, read_ply, write_ply
from polyquant.plugins.gaussians.scene import GaussianScene, rest_bands

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1",
        "rot_2", "rot_3"]


def random_scene(n: int, degree: int, seed: int) -> GaussianScene:
    g = torch.Generator().manual_seed(seed)
    b = rest_bands(degree)
    scene = GaussianScene(xyz=torch.randn(n, 3, generator=g) * 100, scale=torch.randn(n, 3, generator=g) - 4,
                          rotation=torch.randn(n, 4, generator=g), opacity=torch.randn(n, 1, generator=g) * 5,
                          sh_dc=torch.randn(n, 3, generator=g), sh_rest=torch.randn(n, b, 3, generator=g) * 0.1)
    scene.xyz[0] = torch.tensor([-0.0, 1e-42, 3.4e38])  # signed zero, a subnormal, near float32's maximum
    return scene


def graphdeco_columns(scene: GaussianScene) -> dict[str, np.ndarray]:
    """Each property's values as graphdeco's ``save_ply`` lays them out, built name by name (not by reshape)."""
    cols: dict[str, np.ndarray] = {}
    for name, t in (("x", scene.xyz[:, 0]), ("y", scene.xyz[:, 1]), ("z", scene.xyz[:, 2])):
        cols[name] = t.numpy()
    for c in range(3):
        cols[f"f_dc_{c}"] = scene.sh_dc[:, c].numpy()
    b_count = scene.sh_rest.shape[1]
    for c in range(3):
        for b in range(b_count):
            cols[f"f_rest_{c * b_count + b}"] = scene.sh_rest[:, b, c].numpy()
    cols["opacity"] = scene.opacity[:, 0].numpy()
    for i in range(3):
        cols[f"scale_{i}"] = scene.scale[:, i].numpy()
    for i in range(4):
        cols[f"rot_{i}"] = scene.rotation[:, i].numpy()
    return cols


def records(cols: dict[str, np.ndarray], types: dict[str, str] | None = None) -> np.ndarray:
    """A structured vertex array of ``cols`` (float32 unless ``types`` names another type)."""
    types = types or {}
    n = len(next(iter(cols.values())))
    out = np.empty(n, dtype=[(name, types.get(name, "f4")) for name in cols])
    for name, values in cols.items():
        out[name] = values
    return out


def save_with_plyfile(path: Path, vertex: np.ndarray | None, *, text: bool = False, byte_order: str = "<",
                      extra: list[plyfile.PlyElement] | None = None) -> Path:
    elements = [] if vertex is None else [plyfile.PlyElement.describe(vertex, "vertex")]
    plyfile.PlyData(elements + (extra or []), text=text, byte_order=byte_order).write(str(path))
    return path


def assert_same_bits(a: GaussianScene, b: GaussianScene) -> None:
    for (name, x), y in zip(a.tensors().items(), b.tensors().values()):
        assert x.dtype == y.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous(), name
        assert x.shape == y.shape, name
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), name


def expect_ply_error(path: Path, *words: str) -> str:
    with pytest.raises(PlyError) as info:
        read_ply(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------
# round trips and layout


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_is_bit_exact(tmp_path: Path, degree: int, seed: int) -> None:
    scene = random_scene(7 + seed, degree, seed)
    path = write_ply(scene, tmp_path / "scene.ply")
    assert path == tmp_path / "scene.ply"
    back = read_ply(path)
    assert back.sh_degree == degree and back.num_gaussians == scene.num_gaussians
    assert_same_bits(back, scene)
    assert sorted(os.listdir(tmp_path)) == ["scene.ply"]  # no temp file left


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_bytes_is_the_written_size(tmp_path: Path, degree: int) -> None:
    for n in (1, 123):
        scene = random_scene(n, degree, n)
        path = write_ply(scene, tmp_path / f"{n}.ply")
        assert ply_bytes(scene) == path.stat().st_size
    assert ply_bytes(scene) > scene.float_bytes()  # header and normals on top of the attributes


@pytest.mark.parametrize("degree", [1, 3])
def test_written_layout_is_graphdeco(tmp_path: Path, degree: int) -> None:
    scene = random_scene(5, degree, 3)
    raw = plyfile.PlyData.read(str(write_ply(scene, tmp_path / "s.ply")))
    assert raw.byte_order == "<" and not raw.text and [e.name for e in raw.elements] == ["vertex"]
    vertex = raw["vertex"]
    b = rest_bands(degree)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *[f"f_rest_{i}" for i in range(3 * b)],
             "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert [p.name for p in vertex.properties] == names
    assert all(p.val_dtype in ("f4", "float32", "float") for p in vertex.properties)
    for name, values in graphdeco_columns(scene).items():
        assert np.array_equal(vertex[name], values), name
    for name in ("nx", "ny", "nz"):
        assert not vertex[name].any()


def test_f_rest_is_channel_major(tmp_path: Path) -> None:
    # f_rest_{c*B + b} holds band b of channel c: encode (c, b) in the value and read it back
    b_count = 8
    n = 2
    cols = {name: np.full(n, i, np.float32) for i, name in enumerate(BASE)}
    for c in range(3):
        for b in range(b_count):
            cols[f"f_rest_{c * b_count + b}"] = np.array([100 * c + b, -(100 * c + b)], np.float32)
    scene = read_ply(save_with_plyfile(tmp_path / "hand.ply", records(cols)))
    assert scene.sh_degree == 2
    expected = torch.tensor([[100.0 * c + b for c in range(3)] for b in range(b_count)])  # (B, 3)
    assert torch.equal(scene.sh_rest[0], expected) and torch.equal(scene.sh_rest[1], -expected)
    assert torch.equal(scene.rotation[0], torch.tensor([10.0, 11.0, 12.0, 13.0]))  # rot_0 (w) first
    assert torch.equal(scene.opacity[:, 0], torch.full((n,), 6.0))
    assert torch.equal(scene.scale[1], torch.tensor([7.0, 8.0, 9.0]))


@pytest.mark.parametrize("text, byte_order", [(True, "<"), (False, ">"), (True, ">")], ids=["ascii", "big", "ascii2"])
def test_ascii_and_big_endian_input(tmp_path: Path, text: bool, byte_order: str) -> None:
    scene = random_scene(6, 3, 4)
    cols = graphdeco_columns(scene)
    path = save_with_plyfile(tmp_path / "in.ply", records(cols, {n: ">f4" for n in cols}), text=text,
                             byte_order=byte_order)
    assert (b"format ascii" if text else b"format binary_big_endian") in path.read_bytes()[:60]
    assert_same_bits(read_ply(path), scene)


def test_extra_properties_elements_and_numeric_types(tmp_path: Path) -> None:
    scene = random_scene(4, 1, 5)
    cols = {"red": np.array([1, 2, 3, 250]), "weird": np.arange(4.0), **graphdeco_columns(scene),
            "f_rest_note": np.ones(4), "nx": np.ones(4)}
    cols["opacity"] = np.array([-3, 0, 2, 7])  # integer properties are converted
    cols["scale_0"] = scene.scale[:, 0].numpy().astype(np.float64)
    types = {"red": "u1", "weird": "f8", "opacity": "i2", "scale_0": "f8", "f_rest_note": "i4", "nx": "f8"}
    faces = np.array([([0, 1, 2],), ([1, 2, 3],)], dtype=[("vertex_indices", "i4", (3,))])
    face = plyfile.PlyElement.describe(faces, "face")
    path = save_with_plyfile(tmp_path / "x.ply", records(cols, types), extra=[face])
    back = read_ply(path)
    assert back.sh_degree == 1
    assert torch.equal(back.opacity[:, 0], torch.tensor([-3.0, 0.0, 2.0, 7.0]))
    assert torch.equal(back.scale, scene.scale) and torch.equal(back.sh_rest, scene.sh_rest)


def test_write_converts_dtype_and_gradients(tmp_path: Path) -> None:
    scene = random_scene(3, 0, 6)
    doubled = scene.map(lambda t: t.double().requires_grad_())
    assert_same_bits(read_ply(write_ply(doubled, tmp_path / "d.ply")), scene)


# ----------------------------------------------------------------------------------------------------------------
# bad files


def test_missing_file_and_folder(tmp_path: Path) -> None:
    expect_ply_error(tmp_path / "nope.ply", "not found")
    expect_ply_error(tmp_path, "directory")


@pytest.mark.parametrize("content, words", [
    (b"", ("not a PLY",)),
    (b"hello world\n", ("not a PLY",)),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n", ("header",)),  # no end_header
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty strange x\nend_header\n", ("PLY",)),
    (b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nend_header\n1\nfoo\n", ("malformed",)),
    (b"ply\nformat ascii 1.0\nelement vertex -2\nproperty float x\nend_header\n", ("PLY",)),
    (bytes(range(256)), ("PLY",)),
], ids=["empty", "text", "no-end-header", "bad-type", "ascii-garbage", "negative-count", "binary-junk"])
def test_not_a_ply(tmp_path: Path, content: bytes, words: tuple[str, ...]) -> None:
    path = tmp_path / "bad.ply"
    path.write_bytes(content)
    expect_ply_error(path, *words)


@pytest.mark.parametrize("text, byte_order", [(False, "<"), (False, ">"), (True, "<")])
def test_truncated_data(tmp_path: Path, text: bool, byte_order: str) -> None:
    path = save_with_plyfile(tmp_path / "t.ply", records(graphdeco_columns(random_scene(5, 2, 7))), text=text,
                             byte_order=byte_order)
    data = path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1 if text else len(data) - 9  # ascii: drop the last row
    path.write_bytes(data[:cut])
    expect_ply_error(path, "truncated")


def test_header_declares_far_more_rows_than_the_file_has(tmp_path: Path) -> None:
    path = write_ply(random_scene(2, 0, 8), tmp_path / "h.ply")
    data = path.read_bytes().replace(b"element vertex 2\n", b"element vertex 999999999999\n")
    path.write_bytes(data)
    expect_ply_error(path, "truncated")
    path.write_bytes(data.replace(b"binary_little_endian", b"ascii"))
    with pytest.raises(PlyError, match=str(path)):
        read_ply(path)


def test_no_vertex_element(tmp_path: Path) -> None:
    cols = graphdeco_columns(random_scene(2, 0, 9))
    other = plyfile.PlyElement.describe(records(cols), "gaussian")
    message = expect_ply_error(save_with_plyfile(tmp_path / "v.ply", None, extra=[other]), "no 'vertex' element")
    assert "gaussian" in message


def test_missing_properties_are_listed(tmp_path: Path) -> None:
    cols = graphdeco_columns(random_scene(2, 1, 10))
    del cols["scale_1"], cols["rot_3"]
    expect_ply_error(save_with_plyfile(tmp_path / "m.ply", records(cols)), "missing scale_1, rot_3")


def test_list_property_for_an_attribute(tmp_path: Path) -> None:
    cols = graphdeco_columns(random_scene(2, 0, 10))
    del cols["opacity"]
    vertex = records(cols)
    dtype = vertex.dtype.descr + [("opacity", "O")]
    with_list = np.empty(2, dtype=dtype)
    for name in cols:
        with_list[name] = vertex[name]
    with_list["opacity"] = [np.array([1.0], np.float32), np.array([2.0], np.float32)]
    element = plyfile.PlyElement.describe(with_list, "vertex", val_types={"opacity": "f4"})
    path = save_with_plyfile(tmp_path / "l.ply", None, extra=[element])
    expect_ply_error(path, "opacity", "list")


@pytest.mark.parametrize("drop, add, words", [
    (["f_rest_8"], [], ("8 f_rest_*", "0, 9, 24 or 45")),
    ([], ["f_rest_9"], ("10 f_rest_*",)),
    (["f_rest_4"], ["f_rest_9"], ("missing f_rest_4", "unexpected f_rest_9")),
], ids=["too-few", "too-many", "gap"])
def test_bad_f_rest_count(tmp_path: Path, drop: list[str], add: list[str], words: tuple[str, ...]) -> None:
    cols = graphdeco_columns(random_scene(2, 1, 11))
    for name in drop:
        del cols[name]
    for name in add:
        cols[name] = np.zeros(2, np.float32)
    expect_ply_error(save_with_plyfile(tmp_path / "r.ply", records(cols)), *words)


def test_zero_gaussians(tmp_path: Path) -> None:
    cols = {name: np.zeros(0, np.float32) for name in BASE}
    expect_ply_error(save_with_plyfile(tmp_path / "z.ply", records(cols)), "0 rows", "no Gaussians")


def test_non_finite_values_name_attribute_and_rows(tmp_path: Path) -> None:
    cols = graphdeco_columns(random_scene(6, 1, 12))
    cols["scale_1"] = cols["scale_1"].copy()
    cols["scale_1"][[2, 4]] = np.nan
    cols["f_rest_5"] = cols["f_rest_5"].copy()
    cols["f_rest_5"][3] = -np.inf
    message = expect_ply_error(save_with_plyfile(tmp_path / "n.ply", records(cols)), "non-finite",
                               "scale in 2 of 6 rows (first row 2)", "sh_rest in 1 of 6 rows (first row 3)")
    assert "opacity" not in message
    cols = graphdeco_columns(random_scene(6, 1, 12))
    cols["x"] = np.full(6, 1e300)  # finite as float64, infinite as float32
    expect_ply_error(save_with_plyfile(tmp_path / "o.ply", records(cols, {"x": "f8"})), "xyz in 6 of 6 rows")


# ----------------------------------------------------------------------------------------------------------------
# bad writes leave existing files intact


def write_error(scene: GaussianScene, path: Path, *words: str) -> None:
    with pytest.raises(PlyError) as info:
        write_ply(scene, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


def test_write_into_missing_folder(tmp_path: Path) -> None:
    write_error(random_scene(2, 0, 13), tmp_path / "absent" / "s.ply", "does not exist")
    assert os.listdir(tmp_path) == []


def test_write_errors_keep_the_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene = random_scene(4, 2, 14)
    path = write_ply(scene, tmp_path / "keep.ply")
    before = path.read_bytes()

    bad = scene.detach()
    bad.rotation[1, 2] = float("nan")
    write_error(bad, path, "non-finite", "rotation in 1 of 4 rows")
    write_error(GaussianScene.empty(0, 1), path, "0 Gaussians")

    def disk_full(self: plyfile.PlyData, stream: object) -> None:
        stream.write(b"ply\npartial")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(plyfile.PlyData, "write", disk_full)
    write_error(scene, path, "cannot write", os.strerror(errno.ENOSPC))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.ply"]  # no temp file left
    (tmp_path / "folder.ply").mkdir()
    write_error(scene, tmp_path / "folder.ply", "directory")


def test_without_plyfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ply_module, "plyfile", None)
    scene = random_scene(2, 0, 15)
    for call in (lambda: read_ply(tmp_path / "a.ply"), lambda: write_ply(scene, tmp_path / "a.ply"),
                 lambda: ply_bytes(scene)):
        with pytest.raises(ImportError, match=r"pip install 'polyquant\[gaussians\]'"):
            call()
    assert os.listdir(tmp_path) == []
