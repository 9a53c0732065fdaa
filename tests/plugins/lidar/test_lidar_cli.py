"""The lidar command line: ``polyquant quantize lidar/METHOD`` on synthetic scenes or on the user's own point-cloud
files (.npy, KITTI .bin), ``polyquant load ART --eval N``, and the one-line errors that leave files alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from polyquant.cli import main
from polyquant.plugins.lidar.synthetic import make_scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quantize_on_user_clouds_then_load_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "clouds"
    folder.mkdir()
    for i, scene in enumerate(make_scenes(range(20_000, 20_006))):
        if i % 2:
            np.save(folder / f"{i:03d}.npy", scene.points.numpy())
        else:
            scene.points.numpy().astype(np.float32).tofile(folder / f"{i:03d}.bin")
    out = tmp_path / "minmax.safetensors"
    code = main(["quantize", "lidar/minmax", "--calib-dir", str(folder), "--eval", "10", "--quiet", "--out",
                 str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "6 clouds from" in text and "held-out 10 scenes, float:" in text and "minmax:" in text
    assert main(["load", str(out), "--eval", "10"]) == 0
    text = capsys.readouterr().out
    assert "restored lidar/minmax" in text and "10 held-out scenes, minmax: mAP" in text


@pytest.mark.parametrize("array,message", [
    (np.zeros((10, 5), np.float32), "5 features"),
    (np.zeros((0, 4), np.float32), "empty"),
    (np.array([[1.0, 2.0, math.nan, 0.0]], np.float32), "NaN"),
])
def test_bad_point_clouds_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], array: np.ndarray,
                                              message: str) -> None:
    folder = tmp_path / "clouds"
    folder.mkdir()
    np.save(folder / "bad.npy", array)
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"keep me")
    code = main(["quantize", "lidar/minmax", "--calib-dir", str(folder), "--eval", "0", "--quiet", "--out", str(out),
                 "--force"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert out.read_bytes() == b"keep me"


def test_bin_files_with_another_row_width_and_unknown_models_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "clouds"
    folder.mkdir()
    np.zeros(15, np.float32).tofile(folder / "five.bin")  # 3 rows of 5 features
    assert main(["quantize", "lidar/minmax", "--calib-dir", str(folder), "--quiet", "--out",
                 str(tmp_path / "a.safetensors")]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["quantize", "lidar/lidarptq", "--model", "pointpillars.py", "--quiet", "--out",
                 str(tmp_path / "b.safetensors")]) == 2
    assert "--model pointpillars.py" in capsys.readouterr().err
