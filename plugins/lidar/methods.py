"""The impl module of plugin ``lidar`` (``SPEC.impl``): LiDAR-PTQ (``lidarptq.py``) and its baselines
(``baselines.py``: minmax, entropy, percentile, brecq, qdrop) on the shipped CenterPoint-Pillar (``model.py``),
every method on the same quantization points (``placement.py``). All are core quant layers, so the core's default
restore and packing do the rest (convs -> ``PackedConv`` on int codes; activations stay quantize-dequantize).
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
from torch import nn

from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, describe_model, register_handler
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig, UsageError
from polyquant.nn import calibrate

from .baselines import BRECQConfig, EntropyConfig, MinMaxConfig, PercentileConfig, QDropConfig
from .data import calib_scenes, read_clouds, held_out_scenes
from .lidarptq import LidarPTQConfig, quantize_lidarptq
from .model import pad_clouds, scene_batch
from .placement import (check_detector, clouds_of, detector_blocks, prepare_detector, reconstruct_blocks,
                        uniform_batches)
from .synthetic import make_scenes

__all__ = ["METHODS", "SHIPPED", "build_model", "detect", "example", "evaluate_detector", "add_model_args",
           "load_inputs", "report_quantized", "add_load_args", "run_load"]

PLUGIN = "lidar"
SHIPPED = "centerpoint-pillar"  # plugins/lidar/assets/centerpoint_pillar.safetensors


def build_model(model_config: dict[str, Any] | None = None) -> nn.Module:
    """The shipped, BatchNorm-folded CenterPoint-Pillar (``{"name": "centerpoint-pillar"}``), or an mmdet3d pillar
    detector wrapped by the adapter (``{"mmdet3d": CONFIG, "checkpoint": FILE or None}``; the optional extra)."""
    from .train import load_detector

    model_config = model_config or {"name": SHIPPED}
    if set(model_config) == {"mmdet3d", "checkpoint"}:
        from .mmdet3d_adapter import MMDet3DPillars, build_mmdet3d

        detector = build_mmdet3d(model_config["mmdet3d"], model_config["checkpoint"])
        return describe_model(MMDet3DPillars(detector), model_config)
    if model_config != {"name": SHIPPED}:
        raise ValueError(f"lidar builds {{'name': {SHIPPED!r}}} or {{'mmdet3d': CONFIG, 'checkpoint': FILE}}, got "
                         f"{model_config!r}")
    return describe_model(load_detector(), model_config)


def _is_mmdet3d(model: nn.Module) -> bool:
    from .mmdet3d_adapter import MMDet3DPillars

    return isinstance(model, MMDet3DPillars)


def _prepare(skeleton: nn.Module, config: QuantConfig, state: dict[str, Any]) -> nn.Module:
    if _is_mmdet3d(skeleton):
        from .mmdet3d_adapter import prepare_mmdet3d

        return prepare_mmdet3d(skeleton, config)  # type: ignore[arg-type]
    return prepare_detector(check_detector(skeleton), config.w_bits, config.a_bits,  # type: ignore[attr-defined]
                            float_pfn=config.float_pfn)  # type: ignore[attr-defined]


def _example_input(model: nn.Module, state: dict[str, Any]) -> torch.Tensor:
    points = torch.tensor([[[10.0, 0.0, 0.5, 0.3], [20.0, 5.0, 1.0, 0.6]]])  # (1, 2, 4): two points
    features = model.features if _is_mmdet3d(model) else 4  # type: ignore[attr-defined]
    return torch.cat([points, points.new_zeros(1, 2, max(0, features - 4))], 2)[..., :features]


def _batches(calib: Calibration, run: RunOptions, features: int = 4) -> list[dict[str, torch.Tensor]]:
    return uniform_batches(clouds_of(calib, features), 8, run.device)


def _quantize_mmdet3d(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    from .mmdet3d_adapter import quantize_mmdet3d

    batches = _batches(calib, run, model.features)  # type: ignore[attr-defined]
    return QuantizedModel(quantize_mmdet3d(model, config, batches, progress=run.progress), config)  # type: ignore[arg-type]


def _quantize_lidarptq(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    assert isinstance(config, LidarPTQConfig)
    if _is_mmdet3d(model):
        return _quantize_mmdet3d(model, config, calib, run)
    return QuantizedModel(quantize_lidarptq(model, config, calib, progress=run.progress), config)


def _quantize_observers(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    assert isinstance(config, MinMaxConfig)
    if _is_mmdet3d(model):
        return _quantize_mmdet3d(model, config, calib, run)
    observer = {EntropyConfig: "entropy", PercentileConfig: "percentile"}.get(type(config), "minmax")
    percentile = config.percentile if isinstance(config, PercentileConfig) else 99.99
    qmodel = prepare_detector(check_detector(model), config.w_bits, config.a_bits, float_pfn=config.float_pfn,
                              act_observer=observer, percentile=percentile)
    calibrate(qmodel, _batches(calib, run), progress=run.progress)
    return QuantizedModel(qmodel.eval(), config)


def _quantize_brecq(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    import copy

    from polyquant.reconstruct import ReconstructConfig

    assert isinstance(config, BRECQConfig)
    if _is_mmdet3d(model):
        return _quantize_mmdet3d(model, config, calib, run)
    fp = copy.deepcopy(check_detector(model)).eval()
    batches = _batches(calib, run)
    qmodel = prepare_detector(model, config.w_bits, config.a_bits, float_pfn=config.float_pfn, weight_observer="mse",
                              act_observer="mse")
    calibrate(qmodel, batches, progress=run.progress)
    drop = config.drop_prob if isinstance(config, QDropConfig) else 0.0
    rc = ReconstructConfig("adaround", iters=config.iters, batch_size=config.batch_size, drop_prob=drop,
                           learn_act_scale=True, seed=config.seed)
    reconstruct_blocks(qmodel, fp, batches, rc, blocks=detector_blocks(config.float_pfn), progress=run.progress)
    return QuantizedModel(qmodel.eval(), config)


METHODS: dict[str, type[QuantConfig]] = {"lidarptq": LidarPTQConfig, "minmax": MinMaxConfig,
                                         "entropy": EntropyConfig, "percentile": PercentileConfig,
                                         "brecq": BRECQConfig, "qdrop": QDropConfig}
for _name, _fn in (("lidarptq", _quantize_lidarptq), ("minmax", _quantize_observers), ("entropy", _quantize_observers),
                   ("percentile", _quantize_observers), ("brecq", _quantize_brecq), ("qdrop", _quantize_brecq)):
    register_handler(METHODS[_name], plugin=PLUGIN, method=_name, prepare=_prepare,
                     example_input=_example_input)(_fn)


# --- the contract test's case -------------------------------------------------------------------------------------

_FAST = {"lidarptq": dict(iters=3, grid=8, search_scenes=4), "brecq": dict(iters=3), "qdrop": dict(iters=3)}


def example(method: str) -> MethodExample:
    """The shipped detector, 4 calibration scenes in one batch, 2 held-out scenes (points (2, N, 4)); the
    reconstructing methods with 3 steps per block."""
    if method not in METHODS:
        raise KeyError(f"{PLUGIN} has no method {method!r}")
    calib = [scene_batch(calib_scenes(4, seed=1))]
    inputs = pad_clouds([s.points for s in make_scenes([3, 4])])[0]
    return MethodExample(model=build_model(), config=METHODS[method](**_FAST.get(method, {})), calib=calib,
                         inputs=inputs)


# --- evaluation ---------------------------------------------------------------------------------------------------


def detect(model: nn.Module, scenes: list[Any], batch_size: int = 20) -> list[Any]:
    """The model's decoded detections (``targets.Detections``) of each scene, in batches (no grad); the model may
    be float, fake-quant or packed (buffers only)."""
    from .targets import decode

    grid = check_detector(model).grid
    device = next(itertools.chain(model.parameters(), model.buffers())).device  # a packed model holds buffers only
    dets = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch_size):
            batch = {k: v.to(device) for k, v in scene_batch(scenes[i:i + batch_size]).items()}
            dets.extend(decode(model(**batch), grid))
    return dets


def evaluate_detector(model: nn.Module, scenes: list[Any], batch_size: int = 20) -> dict[str, Any]:
    """``metrics.evaluate`` of the model's decoded detections on ``scenes`` (``detect``)."""
    from .metrics import evaluate

    return evaluate(detect(model, scenes, batch_size), scenes)


def _summary(result: dict[str, Any]) -> str:
    r = result["range"]
    return (f"mAP {result['mAP']:.3f} (near {r['near']['mAP']:.3f}, mid {r['mid']['mAP']:.3f}, far "
            f"{r['far']['mAP']:.3f}), mAPH {result['mAPH']:.3f}")


# --- command line (polyquant quantize lidar/METHOD, polyquant load ART) -------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Model and data options of ``polyquant quantize lidar/<method>``."""
    group = parser.add_argument_group("model and data (lidar)")
    group.add_argument("--model", default="tiny",
                       help="'tiny' (the shipped CenterPoint-Pillar trained on synthetic scenes) or an mmdet3d config "
                            "file of a pillar detector (PointPillars, CenterPoint-Pillar; needs "
                            "scripts/install-lidar-extra.sh) (default: %(default)s)")
    group.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="the mmdet3d model's weights (default: mmdet3d's initialisation)")
    group.add_argument("--calib", type=int, default=32, metavar="N",
                       help="calibration scenes from the synthetic calibration pool (default: %(default)s)")
    group.add_argument("--calib-seed", type=int, default=0, help="which pool scenes (default: %(default)s)")
    group.add_argument("--calib-dir", default=None, metavar="FOLDER",
                       help="calibrate on your own point clouds instead: .npy (N, 4) or KITTI .bin files of x, y, z, "
                            "intensity in the detector's frame (at most --calib of them)")
    group.add_argument("--eval", type=int, default=40, metavar="N",
                       help="held-out synthetic scenes for the float vs quantized AP report; 0 skips it "
                            "(default: %(default)s)")


def _model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], str]:
    if args.model == "tiny":
        if args.checkpoint is not None:
            raise UsageError("--checkpoint goes with an mmdet3d config in --model; 'tiny' ships its weights")
        return build_model(), {"name": SHIPPED}, f"CenterPoint-Pillar ({SHIPPED})"
    from pathlib import Path

    if not Path(args.model).is_file():
        raise UsageError(f"--model {args.model}: 'tiny' or an mmdet3d config file; no such file")
    config = {"mmdet3d": str(Path(args.model).resolve()),
              "checkpoint": None if args.checkpoint is None else str(Path(args.checkpoint).resolve())}
    try:
        model = build_model(config)
    except UsageError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    return model, config, f"mmdet3d {type(model.detector).__name__} from {args.model}"  # type: ignore[attr-defined]


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The detector (shipped, or an mmdet3d config) and its calibration scenes (or the user's clouds)."""
    if not 1 <= args.calib <= 4096:
        raise UsageError(f"--calib must be in [1, 4096], got {args.calib}")
    if not 0 <= args.eval <= 200:
        raise UsageError(f"--eval must be in [0, 200], got {args.eval}")
    model, model_config, name = _model(args)
    features = model.features if _is_mmdet3d(model) else 4  # type: ignore[attr-defined]
    if args.calib_dir is not None:
        clouds = read_clouds(args.calib_dir, args.calib, features)
        source = f"{len(clouds)} clouds from {args.calib_dir}"
    else:
        if args.calib > 512:
            raise UsageError("--calib: the synthetic calibration pool holds 512 scenes")
        scenes = calib_scenes(args.calib, args.calib_seed)
        if _is_mmdet3d(model):
            from .mmdet3d_adapter import scene_clouds

            clouds = scene_clouds(scenes, features)
        else:
            clouds = [s.points for s in scenes]
        source = f"{args.calib} synthetic scenes"
    evaluation = held_out_scenes(args.eval) if args.eval and not _is_mmdet3d(model) else None
    return CliInputs(model=model, model_config=model_config, calib=uniform_batches(clouds, 8),
                     label=f"{name}, {source}", evaluation=evaluation)


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """BEV AP of the float and the quantized detector on the held-out scenes (the shipped detector); for an
    mmdet3d model, the relative error of its head outputs against the float model's on one calibration batch."""
    if _is_mmdet3d(qm.model):
        batch = next(iter(inputs.calib))
        with torch.no_grad():
            ref, got = inputs.model(**batch), qm.model(**batch)
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        print(f"head outputs vs float on {batch['points'].shape[0]} calibration scenes: relative error {err:.4f}")
        return
    if inputs.evaluation is None:
        return
    scenes = inputs.evaluation
    print(f"held-out {len(scenes)} scenes, float:     {_summary(evaluate_detector(inputs.model, scenes))}")
    print(f"held-out {len(scenes)} scenes, {qm.method + ':':10s} {_summary(evaluate_detector(qm.model, scenes))}")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant load`` for lidar artifacts."""
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="evaluate the rebuilt detector on N held-out synthetic scenes beside the float one")


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: the rebuilt detector's quantized layers, and with --eval N its AP beside the float's."""
    from polyquant.nn import QuantWeightModule

    if qm.packing is not None:
        kinds = sorted(set(qm.packing.packed.values()))
        print(f"restored lidar/{qm.method}: {len(qm.packing.packed)} packed layers ({', '.join(kinds)}); the "
              "activations stay quantize-dequantize (int8 inputs are simulated; the scatter runs in float)")
    else:
        n_q = sum(isinstance(m, QuantWeightModule) for m in qm.model.modules())
        print(f"restored lidar/{qm.method}: {n_q} quantized layers (fake-quant)")
    if not args.eval:
        return 0
    if qm.model_config != {"name": SHIPPED}:
        raise UsageError("--eval scores the shipped detector on the synthetic scenes; this artifact holds another "
                         "model")
    if not 1 <= args.eval <= 200:
        raise UsageError(f"--eval must be in [0, 200], got {args.eval}")
    scenes = held_out_scenes(args.eval)
    print(f"{args.eval} held-out scenes, float:  {_summary(evaluate_detector(build_model(), scenes))}")
    print(f"{args.eval} held-out scenes, {qm.method}: {_summary(evaluate_detector(qm.model, scenes))}")
    return 0
