"""The mmdet3d adapter on small PointPillars (anchor head) and CenterPoint-Pillar (CenterHead) models built from
mmdet3d's own configs, shrunk for the CPU (0.64-0.8 m pillars, 16-64 channels, random weights): every method runs
through it, TGPL only with a CenterHead, artifacts round-trip. Skipped unless the optional extra is installed
(``scripts/install-lidar-extra.sh``: mmcv's compiled ops, mmengine, mmdet, mmdet3d)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from polyquant.plugins.lidar.mmdet3d_adapter import available

REASON = available()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.usefixtures("one_torch_thread")]

import polyquant as pq  # noqa: E402
from polyquant.plugins.lidar.baselines import BRECQConfig, EntropyConfig, MinMaxConfig  # noqa: E402
from polyquant.plugins.lidar.data import calib_scenes  # noqa: E402
from polyquant.plugins.lidar.lidarptq import LidarPTQConfig  # noqa: E402
from polyquant.plugins.lidar.placement import uniform_batches  # noqa: E402


def _config_dir() -> Path:
    import mmdet3d

    return Path(mmdet3d.__file__).parent / ".mim" / "configs"


def _small_pointpillars() -> dict[str, Any]:
    from mmengine.config import Config

    cfg = Config.fromfile(str(_config_dir() / "_base_" / "models" / "pointpillars_hv_secfpn_kitti.py"))
    m = cfg.model
    voxel = [0.32, 0.32, 4]
    m.data_preprocessor.voxel_layer.voxel_size = voxel
    m.voxel_encoder.voxel_size = voxel
    m.voxel_encoder.feat_channels = [16]
    m.middle_encoder.in_channels = 16
    m.middle_encoder.output_shape = [248, 216]
    m.backbone.update(in_channels=16, layer_nums=[1, 1, 1], out_channels=[16, 32, 64])
    m.neck.update(in_channels=[16, 32, 64], out_channels=[16, 16, 16])
    m.bbox_head.update(in_channels=48, feat_channels=48)
    return cfg.to_dict()


def _small_centerpoint() -> dict[str, Any]:
    from mmengine.config import Config

    cfg = Config.fromfile(str(_config_dir() / "centerpoint" /
                              "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py"))
    m = cfg.model
    voxel = [0.8, 0.8, 8]
    m.data_preprocessor.voxel_layer.voxel_size = voxel
    m.pts_voxel_encoder.update(voxel_size=voxel, feat_channels=[16])
    m.pts_middle_encoder.update(in_channels=16, output_shape=(128, 128))
    m.pts_backbone.update(in_channels=16, layer_nums=[1, 1, 1], out_channels=[16, 32, 64])
    m.pts_neck.update(in_channels=[16, 32, 64], out_channels=[16, 16, 16])
    m.pts_bbox_head.update(in_channels=48, share_conv_channel=16)
    m.pts_bbox_head.bbox_coder.voxel_size = voxel[:2]
    m.train_cfg.pts.update(grid_size=[128, 128, 1], voxel_size=voxel)
    m.test_cfg.pts.voxel_size = voxel[:2]
    return {"model": cfg.to_dict()["model"]}


def _wrapped(cfg: dict[str, Any]) -> Any:
    from polyquant.plugins.lidar.mmdet3d_adapter import MMDet3DPillars, build_mmdet3d

    torch.manual_seed(0)
    return MMDet3DPillars(build_mmdet3d(cfg))


def _calib(model: Any, n: int = 4) -> list[dict[str, torch.Tensor]]:
    from polyquant.plugins.lidar.mmdet3d_adapter import scene_clouds

    return uniform_batches(scene_clouds(calib_scenes(n, 0), model.features), 2)


def test_pointpillars_methods_and_tgpl_needs_a_center_head(tmp_path: Path) -> None:
    from polyquant.config import UsageError

    model = _wrapped(_small_pointpillars())
    calib = _calib(model)
    with torch.no_grad():
        ref = model(**calib[0])
    assert ref.dim() == 4 and model.features == 4 and not model.center_head
    for config in (MinMaxConfig(), EntropyConfig(w_bits=4), LidarPTQConfig(tgpl=False, iters=2, grid=8),
                   BRECQConfig(iters=2)):
        qm = pq.quantize(model, config, calib=calib, progress=False)
        with torch.no_grad():
            out = qm.model(**calib[0])
        err = float((out - ref).norm() / ref.norm())
        assert 0 < err < 0.5, (type(config).__name__, err)
    path = pq.save(qm, tmp_path / "pp.safetensors")
    with torch.no_grad():
        assert torch.equal(pq.load(path, model=_wrapped(_small_pointpillars())).model(**calib[0]), out)
    with pytest.raises(UsageError, match="CenterHead"):
        pq.quantize(model, LidarPTQConfig(iters=2), calib=calib, progress=False)


def test_centerpoint_lidarptq_with_tgpl_on_mmdet3d_losses() -> None:
    model = _wrapped(_small_centerpoint())
    assert model.center_head and model.features == 5
    calib = _calib(model)
    with torch.no_grad():
        ref = model(**calib[0])
    blocks = model.blocks()
    assert any(b.endswith("shared_conv") for b in blocks) and any(".heatmap" in b for b in blocks)
    qm = pq.quantize(model, LidarPTQConfig(iters=2, grid=8, score_threshold=0.05), calib=calib, progress=False)
    with torch.no_grad():
        out = qm.model(**calib[0])
    assert torch.isfinite(out).all() and 0 < float((out - ref).norm() / ref.norm()) < 0.5


def test_command_line_on_an_mmdet3d_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from polyquant.cli import main

    config = tmp_path / "small_pointpillars.py"
    config.write_text(f"model = {_small_pointpillars()['model']!r}\n")
    out = tmp_path / "a.safetensors"
    assert main(["quantize", "lidar/minmax", "--model", str(config), "--calib", "4", "--quiet", "--out",
                 str(out)]) == 0, capsys.readouterr().err
    assert "relative error" in capsys.readouterr().out
    assert main(["load", str(out)]) == 0
    assert main(["load", str(out), "--mode", "packed", "--device", "cpu"]) == 0
