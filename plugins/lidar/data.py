"""Point clouds for calibration and evaluation: synthetic scenes by seed, or the user's own files.

A user's cloud is a ``.npy`` array (N, F) or a ``.bin`` of float32 rows (KITTI: x, y, z, intensity; nuScenes adds
a time column), in the detector's frame (x forward, metres); F is what the detector reads (4 for the shipped one). Files with another number of features, empty clouds and NaN / infinite
coordinates are refused with a one-line ``UsageError`` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from polyquant.config import UsageError

from .model import check_points
from .synthetic import Scene, SceneConfig, make_scenes
from .train import CALIB_SEEDS, TEST_SEEDS

__all__ = ["calib_scenes", "held_out_scenes", "read_cloud", "read_clouds", "MAX_CLOUD_BYTES"]

MAX_CLOUD_BYTES = 256 * 2**20  # a point-cloud file larger than this is refused
SUFFIXES = (".npy", ".bin")


def calib_scenes(n: int, seed: int = 0, config: SceneConfig | None = None) -> list[Scene]:
    """``n`` scenes of the calibration pool (``train.CALIB_SEEDS``), drawn by a seeded permutation."""
    if not 1 <= n <= len(CALIB_SEEDS):
        raise ValueError(f"the calibration pool holds {len(CALIB_SEEDS)} scenes; asked for {n}")
    order = torch.randperm(len(CALIB_SEEDS), generator=torch.Generator().manual_seed(seed))[:n]
    return make_scenes([CALIB_SEEDS[int(i)] for i in order], config)


def held_out_scenes(n: int = len(TEST_SEEDS), config: SceneConfig | None = None) -> list[Scene]:
    """The first ``n`` held-out test scenes (``train.TEST_SEEDS``)."""
    if not 1 <= n <= len(TEST_SEEDS):
        raise ValueError(f"the test set holds {len(TEST_SEEDS)} scenes; asked for {n}")
    return make_scenes(TEST_SEEDS[:n], config)


def read_cloud(path: str | Path, features: int = 4) -> Tensor:
    """One point cloud (N, ``features``) float32 from a ``.npy`` or a ``.bin`` file of float32 rows (KITTI: 4
    features, nuScenes: 5); ``UsageError`` if it is not one."""
    import numpy as np

    from polyquant.artifact import ArtifactError, open_regular

    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise UsageError(f"{p}: point clouds are .npy (N, 4) arrays or KITTI .bin files of float32 rows")
    try:
        with open_regular(str(p), max_bytes=MAX_CLOUD_BYTES) as f:
            raw = f.read()
    except (ArtifactError, OSError) as e:
        raise UsageError(f"{p}: {e}") from None
    try:
        if p.suffix == ".npy":
            import io

            array = np.load(io.BytesIO(raw), allow_pickle=False)
        else:
            if len(raw) % (4 * features):
                raise ValueError(f"a .bin cloud is rows of {features} float32 ({4 * features} bytes); {len(raw)} bytes "
                                 f"is not a multiple of {4 * features} (a cloud with another number of features?)")
            array = np.frombuffer(raw, dtype=np.float32).reshape(-1, features)
    except ValueError as e:
        raise UsageError(f"{p}: {e}") from None
    if array.dtype.kind not in "fiu":
        raise UsageError(f"{p}: not a numeric array ({array.dtype})")
    cloud = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    try:
        check_points(cloud, str(p), features)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cloud


def read_clouds(folder: str | Path, limit: int | None = None, features: int = 4) -> list[Tensor]:
    """Every ``.npy`` / ``.bin`` cloud of ``features`` columns in ``folder`` (sorted by name), at most ``limit``."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder of point clouds")
    files = sorted(f for f in root.iterdir() if f.suffix in SUFFIXES and f.is_file())
    if not files:
        raise UsageError(f"{root}: no .npy or .bin point clouds in it")
    return [read_cloud(f, features) for f in files[:limit]]
