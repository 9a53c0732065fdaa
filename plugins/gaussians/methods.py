"""The impl module of plugin ``gaussians`` (``SPEC.impl``): compression of 3D Gaussian Splatting scenes.

Methods: ``svq`` (OMG's sub-vector quantization of a plain 3DGS scene; ``svq.py``), ``vq`` (full-vector VQ with
as many codebook entries; ``vq.py``), ``uniform8`` (per-channel 8-bit; ``uniform.py``), ``omg`` (OMG's attribute
MLPs on static / view features, then SVQ; ``omg.py``).

The model is a ``GaussianModel`` (a float scene; ``forward(camera rows (B, 22)) -> images (B, 3, H, W)``); every
method returns a ``QuantizedGaussians`` with the Gaussians in the canonical order of their fp16 positions. The
calibration batches are camera rows: the views the render-loss steps train on (``svq`` / ``vq`` with
``finetune_steps``, ``omg`` with ``render_steps`` / ``post_steps``); the k-means of the attributes needs none.

The artifact is the compressed scene itself (``container.py``: LZMA-coded positions, range-coded index streams,
fp16 codebooks / MLPs), so ``polyquant quantize gaussians/svq --input scene.ply --out scene.pqs`` writes the
compressed file and ``polyquant load scene.pqs --ply out.ply`` decodes it to a standard .ply. The codes are what the
model holds (int16 / uint8), decoded at every render: ``load --mode packed`` has no weight to pack and says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, register_handler
from polyquant.artifact import Artifact, ArtifactError
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig, UsageError
from polyquant.metrics import psnr, sqnr, ssim

from .coding import canonical_order
from .container import export_streams, layout_state, restore_streams, size_report
from .fitting import View, render_views, train_views
from .model import GaussianModel, QuantizedGaussians, VQAttribute, attribute_matrix, scene_from_attributes, skeleton
from .models import SHIPPED, build_model
from .omg import OMGConfig, OMGDecoder, distill, scene_aabb
from .render import Camera, orbit_cameras, render
from .scene import GaussianScene
from .svq import SVQConfig, check_layout, fit_attribute, fit_layout, svq_layout
from .uniform import Uniform8Config, uniform_attributes
from .vq import VQConfig, vq_layout

__all__ = ["METHODS", "build_model", "example", "float_scene", "canonical_scene", "camera_rows", "orbit_views",
           "evaluate", "add_model_args", "load_inputs", "report_quantized", "add_load_args", "run_load"]

PLUGIN = "gaussians"
FP16_MAX = 65504.0


# --- shared steps ---------------------------------------------------------------------------------------------------


def float_scene(model: nn.Module) -> GaussianScene:
    """The float scene of a ``GaussianModel`` (detached), checked finite (``UsageError`` otherwise)."""
    if not isinstance(model, GaussianModel):
        raise UsageError(f"the gaussians methods quantize a GaussianModel (a 3DGS scene), got {type(model).__name__}")
    scene = model.scene().detach()
    try:
        scene.check_finite()
    except ValueError as e:
        raise UsageError(f"the scene {e}") from None
    return scene


def canonical_scene(scene: GaussianScene) -> GaussianScene:
    """The Gaussians sorted by their fp16 positions (OMG's canonical order); ``UsageError`` for positions beyond
    the fp16 range."""
    big = scene.xyz.abs() > FP16_MAX
    if bool(big.any()):
        raise UsageError(f"{int(big.any(1).sum())} Gaussian positions lie beyond the fp16 range (|x| > 65504); "
                         "rescale the scene")
    return scene.select(canonical_order(scene.xyz))


def cameras_of(calib: Calibration) -> list[Camera]:
    """The calibration batches' camera rows as cameras."""
    if not any(True for _ in calib):
        return []
    rows = calib.inputs().reshape(-1, 22).cpu()
    return [Camera.from_tensor(r) for r in rows]


def camera_rows(cameras: list[Camera]) -> Tensor:
    return torch.stack([c.to_tensor() for c in cameras])


def _views(calib: Calibration, scene: GaussianScene, what: str) -> list[View]:
    cams = cameras_of(calib)
    if not cams:
        raise UsageError(f"{what} trains against renders: give calibration cameras")
    return render_views(scene, cams)


def _finetune_codebooks(q: QuantizedGaussians, views: list[View], steps: int, lr: float, seed: int,
                        progress: bool) -> None:
    """Train the VQ codebooks against renders with the assignments frozen, then round them to fp16 again."""
    vq_attrs = {name: module for name, module in q.attributes.items() if isinstance(module, VQAttribute)}
    books = {f"{name}.{m}": vq.embed.detach().clone().requires_grad_(True)
             for name, module in vq_attrs.items() for m, vq in enumerate(module.quantizer.quantizers)}

    def scene_fn() -> GaussianScene:
        attrs = {name: module.decode() for name, module in q.attributes.items() if name not in vq_attrs}
        for name, module in vq_attrs.items():
            codes = module.codes.long()
            attrs[name] = torch.cat([books[f"{name}.{m}"][codes[:, m]] for m in range(codes.shape[1])], dim=1)
        return scene_from_attributes(q.xyz, attrs, q.sh_degree)

    train_views({k: (v, lr) for k, v in books.items()}, scene_fn, views, steps=steps, seed=seed, progress=progress,
                desc="codebook fine-tuning")
    for name, module in vq_attrs.items():
        for m, vq in enumerate(module.quantizer.quantizers):
            vq.set_codebook(books[f"{name}.{m}"].detach().half().float())


# --- handlers -------------------------------------------------------------------------------------------------------


def _result(q: QuantizedGaussians, config: QuantConfig) -> QuantizedModel:
    """The handler's result: the artifact describes the scene's layout, so it loads without the float scene."""
    return QuantizedModel(q.eval(), config, state=layout_state(q),
                          model_config={"num_gaussians": q.num_gaussians, "sh_degree": q.sh_degree})


def _vq_methods(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    assert isinstance(config, SVQConfig)
    scene = canonical_scene(float_scene(model))
    layout = (vq_layout if isinstance(config, VQConfig) else svq_layout)(config, scene.sh_degree)
    attrs = fit_layout(scene, layout, iters=config.kmeans_iters, seed=config.seed, progress=run.progress)
    q = QuantizedGaussians(scene.xyz, dict(attrs), scene.sh_degree)
    if config.finetune_steps:
        _finetune_codebooks(q, _views(calib, scene, "finetune_steps"), config.finetune_steps, config.finetune_lr,
                            config.seed, run.progress)
    return _result(q, config)


def _uniform8(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    assert isinstance(config, Uniform8Config)
    scene = canonical_scene(float_scene(model))
    names = ["scale", "rotation", "opacity", "sh_dc"] + (["sh_rest"] if scene.sh_degree else [])
    q = QuantizedGaussians(scene.xyz, dict(uniform_attributes(scene, names, config.bits)), scene.sh_degree)
    return _result(q, config)


def _omg(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    assert isinstance(config, OMGConfig)
    scene = canonical_scene(float_scene(model))
    layout = {"scale": ([1, 1, 1], [config.scale_k] * 3), "rotation": ([2, 2], [config.rotation_k] * 2),
              "appearance": ([config.appearance_slice] * (6 // config.appearance_slice),
                             [config.appearance_k] * (6 // config.appearance_slice))}
    check_layout(layout, scene.num_gaussians)
    xyz16 = scene.xyz.half().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        decoder = OMGDecoder(scene_aabb(xyz16), scene.sh_degree, config.hidden, config.frequencies)
    decoder = decoder.to(scene.xyz.device)
    appearance = torch.cat([scene.sh_dc, torch.zeros_like(scene.sh_dc)], dim=1).requires_grad_(True)
    distill(decoder, xyz16, scene, appearance, steps=config.distill_steps, lr=config.lr, feature_lr=config.feature_lr,
            progress=run.progress)
    views = _views(calib, scene, "omg's render steps") if config.render_steps or config.post_steps else []

    def scene_from(app: Tensor, scale: Tensor, rotation: Tensor) -> GaussianScene:
        return scene_from_attributes(xyz16, {"scale": scale, "rotation": rotation, **decoder(xyz16, app)},
                                     scene.sh_degree)

    if config.render_steps:
        params = {f"mlp.{k}": (p, config.lr * 0.1) for k, p in decoder.named_parameters()}
        params["appearance"] = (appearance, config.feature_lr * 0.1)
        train_views(params, lambda: scene_from(appearance, scene.scale, scene.rotation), views,
                    steps=config.render_steps, seed=config.seed, progress=run.progress, desc="OMG render steps")
    attrs: dict[str, nn.Module] = {}
    for a, (name, values) in enumerate((("scale", scene.scale), ("rotation", scene.rotation),
                                        ("appearance", appearance.detach()))):
        slices, sizes = layout[name]
        attrs[name] = fit_attribute(values, slices, sizes, iters=config.kmeans_iters, seed=config.seed + 100 * a)
    if config.post_steps:
        dec_scene = {name: module.decode() for name, module in attrs.items()}
        params = {f"mlp.{k}": (p, config.lr * 0.1) for k, p in decoder.named_parameters()}
        train_views(params, lambda: scene_from(dec_scene["appearance"], dec_scene["scale"], dec_scene["rotation"]),
                    views, steps=config.post_steps, seed=config.seed + 1, progress=run.progress,
                    desc="OMG after SVQ")
    q = QuantizedGaussians(xyz16, attrs, scene.sh_degree, decoder.round_to_half().eval())
    return _result(q, config)


def _export(qm: QuantizedModel) -> dict[str, Any]:
    assert isinstance(qm.model, QuantizedGaussians)
    return dict(export_streams(qm.model))


def _restore(model: nn.Module, config: QuantConfig, art: Artifact) -> QuantizedModel:
    state = art.config.get("state")
    state = state if isinstance(state, dict) else {}
    q = restore_streams(state, art)
    if isinstance(model, GaussianModel) and model.num_gaussians != q.num_gaussians and \
            art.config.get("model") is None:
        raise ArtifactError(f"the artifact holds {q.num_gaussians} Gaussians, the float scene given has "
                            f"{model.num_gaussians}")
    return QuantizedModel(q.eval(), config, state=dict(state))


def _nothing_to_pack(qm: QuantizedModel, art: Artifact) -> dict[str, Any]:
    return {"attributes": "the scene's attributes are held as their codes (int16 indices / uint8) and decoded by "
                          "lookup at every render; there is no weight matrix to pack"}


def _example_input(model: nn.Module, state: dict[str, Any]) -> Tensor:
    return orbit_cameras(1, size=16, seed=0)[0].to_tensor()


for _cls, _name, _fn in ((SVQConfig, "svq", _vq_methods), (VQConfig, "vq", _vq_methods),
                         (Uniform8Config, "uniform8", _uniform8), (OMGConfig, "omg", _omg)):
    register_handler(_cls, plugin=PLUGIN, method=_name, export=_export, restore=_restore,
                     packed_weights=_nothing_to_pack, example_input=_example_input)(_fn)

METHODS: dict[str, type[QuantConfig]] = {"svq": SVQConfig, "vq": VQConfig, "uniform8": Uniform8Config,
                                         "omg": OMGConfig}


# --- evaluation -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(reference: GaussianScene, decoded: GaussianScene, cameras: list[Camera]) -> dict[str, float]:
    """Mean render PSNR / SSIM (dB; images clamped to [0, 1]) of ``decoded`` against ``reference`` over the cameras.
    The two scenes may list their Gaussians in different orders."""
    ps, ss = [], []
    for cam in cameras:
        a, b = render(reference, cam).clamp(0, 1), render(decoded, cam).clamp(0, 1)
        ps.append(psnr(a, b))
        ss.append(ssim(a, b) if min(cam.width, cam.height) >= 11 else float("nan"))
    return {"psnr": sum(ps) / len(ps), "ssim": sum(ss) / len(ss)}


def attribute_sqnr(reference: GaussianScene, decoded: GaussianScene) -> dict[str, float]:
    """SQNR (dB) per attribute of two scenes in the same (canonical) order."""
    names = ["scale", "rotation", "opacity", "sh_dc"] + (["sh_rest"] if reference.sh_degree else [])
    return {n: sqnr(attribute_matrix(decoded, n), attribute_matrix(reference, n)) for n in names}


# --- the contract test's case ----------------------------------------------------------------------------------------


def example(method: str) -> MethodExample:
    """A procedural scene of 600 Gaussians at SH degree 1, codebooks of 32 entries, two 24 px camera rows as the
    calibration views and two others as inputs."""
    if method not in METHODS:
        raise KeyError(f"{PLUGIN} has no method {method!r}")
    model = build_model({"procedural": 3, "num_gaussians": 600, "sh_degree": 1})
    small = dict(scale_k=16, rotation_k=32, opacity_k=16, dc_k=32, rest_k=32, kmeans_iters=5)
    configs: dict[str, QuantConfig] = {
        "svq": SVQConfig(**small),
        "vq": VQConfig(**small),
        "uniform8": Uniform8Config(),
        "omg": OMGConfig(scale_k=16, rotation_k=32, appearance_k=32, hidden=16, frequencies=4, distill_steps=20,
                         post_steps=2, kmeans_iters=5),
    }
    calib = [camera_rows(orbit_cameras(2, size=24, seed=5))]
    inputs = camera_rows(orbit_cameras(2, size=24, seed=6))
    return MethodExample(model=model, config=configs[method], calib=calib, inputs=inputs, graph_breaks=(
        "rendering reads each camera's image size and the visible Gaussians' tile ranges back from tensors; the "
        "attribute decode before it is one graph"))


# --- command line ---------------------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Scene and view options of ``polyquant quantize gaussians/<method>``."""
    group = parser.add_argument_group("scene and views (gaussians)")
    group.add_argument("--input", default=None, metavar="PLY",
                       help="a 3DGS scene .ply (default: the shipped fitted scene, --scene)")
    group.add_argument("--scene", default="fitted-s0", choices=sorted(SHIPPED), help="shipped scene without --input")
    group.add_argument("--views", type=int, default=8,
                       help="orbit cameras for the render-loss steps and as many held-out ones for the report "
                            "(default: %(default)s)")
    group.add_argument("--size", type=int, default=64, help="their image size in px (default: %(default)s)")
    group.add_argument("--radius", type=float, default=None,
                       help="orbit radius (default: 2.2x the scene's radius around its centre)")


def orbit_views(scene: GaussianScene, count: int, size: int, radius: float | None, seed: int) -> list[Camera]:
    """``count`` seeded orbit cameras around the scene's median position (radius: 2.2x its 95th-percentile extent
    unless given), ``size`` px: the calibration and held-out views of the CLI, the demo and the tests."""
    center = scene.xyz.median(0).values
    extent = float((scene.xyz - center).norm(dim=1).quantile(0.95))
    r = radius if radius is not None else 2.2 * max(extent, 1e-3)
    return orbit_cameras(count, radius=r, size=size, target=center, seed=seed)


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The scene (--input PLY or the shipped one), calibration camera rows, held-out cameras for the report."""
    if not 1 <= args.views <= 1000:
        raise UsageError(f"--views must be in [1, 1000], got {args.views}")
    if not 16 <= args.size <= 1024:
        raise UsageError(f"--size must be in [16, 1024] px, got {args.size}")
    if args.radius is not None and not args.radius > 0:
        raise UsageError(f"--radius must be positive, got {args.radius}")
    if args.input is not None:
        from .ply import PlyError, read_ply

        try:
            scene = read_ply(args.input)
        except PlyError as e:
            raise UsageError(str(e)) from None
        model = skeleton(scene.num_gaussians, scene.sh_degree)
        model.load_state_dict(GaussianModel(scene).state_dict())
        model_config = {"num_gaussians": scene.num_gaussians, "sh_degree": scene.sh_degree}
        label = f"{args.input} ({scene.num_gaussians:,} Gaussians, SH degree {scene.sh_degree})"
    else:
        model = build_model({"name": args.scene})
        scene = model.scene().detach()
        model_config = {"name": args.scene}
        label = f"shipped scene {args.scene} ({scene.num_gaussians:,} Gaussians, SH degree {scene.sh_degree})"
    calib = [camera_rows(orbit_views(scene, args.views, args.size, args.radius, seed=1))]
    held_out = orbit_views(scene, args.views, args.size, args.radius, seed=2)
    return CliInputs(model=model, model_config=model_config, calib=calib, label=label,
                     evaluation={"scene": scene, "cameras": held_out})


def _fmt_bytes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sizes.items() if v)


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """Bits per Gaussian before / after entropy coding, stream bytes, render PSNR / SSIM over held-out views and
    per-attribute SQNR against the float scene."""
    q = qm.model
    assert isinstance(q, QuantizedGaussians)
    scene: GaussianScene = inputs.evaluation["scene"]
    n = q.num_gaussians
    streams = export_streams(q)
    idx = sum(t.numel() for k, t in streams.items() if ".codes." in k)
    total = sum(t.numel() * t.element_size() for t in streams.values())
    with torch.no_grad():
        decoded = q.scene()
    fit = evaluate(scene, decoded, inputs.evaluation["cameras"])
    from .ply import ply_bytes

    print(f"{n:,} Gaussians: index bits {q.index_bits()} / Gaussian before entropy coding, "
          f"{8 * idx / n:.1f} after; tensors {total:,} bytes ({ply_bytes(scene) / total:.1f}x smaller than the "
          f"float .ply)")
    print(f"held-out views ({len(inputs.evaluation['cameras'])}): PSNR {fit['psnr']:.2f} dB, SSIM {fit['ssim']:.4f} "
          "against the float scene")
    if qm.method != "omg":
        sq = attribute_sqnr(canonical_scene(scene), decoded)
        print("attribute SQNR (dB): " + ", ".join(f"{k} {v:.1f}" for k, v in sq.items()))


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant load`` for gaussians artifacts."""
    parser.add_argument("--ply", default=None, metavar="PLY", help="decode the scene to this standard 3DGS .ply")
    parser.add_argument("--render", default=None, metavar="PNG", help="render one orbit view of the decoded scene")
    parser.add_argument("--size", type=int, default=256, help="--render image size in px (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite existing --ply / --render files")


def _check_out(path: str, args: argparse.Namespace, inputs: list[str]) -> None:
    from polyquant.artifact import check_target

    try:
        check_target(path, force=args.force, inputs=inputs)
    except ArtifactError as e:
        raise UsageError(str(e)) from None


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: the scene's size accounting from the file; --ply: decode to a .ply; --render: a PNG."""
    q = qm.model
    assert isinstance(q, QuantizedGaussians)
    art_path = getattr(args, "artifact_path", None)
    line = f"restored gaussians/{qm.method}: {q.num_gaussians:,} Gaussians, SH degree {q.sh_degree}, index bits " \
           f"{q.index_bits()} / Gaussian"
    print(line)
    if art_path is not None:
        sizes = size_report(art_path)
        total = sum(sizes.values())
        print(f"file {total:,} bytes = {_fmt_bytes(sizes)}; {8 * sizes['indices'] / q.num_gaussians:.1f} index "
              f"bits / Gaussian after entropy coding; positions {8 * sizes['positions'] / q.num_gaussians:.1f} "
              "bits / Gaussian (fp16, lossless, non-G-PCC)")
    if qm.packing is not None and qm.packing.kept:
        print("kept as codes: " + "; ".join(f"{k}: {v}" for k, v in sorted(qm.packing.kept.items())))
    inputs = [str(art_path)] if art_path is not None else []
    for out in (args.ply, args.render):
        if out is not None:
            _check_out(out, args, inputs)
    if args.size < 16 or args.size > 2048:
        raise UsageError(f"--size must be in [16, 2048] px, got {args.size}")
    with torch.no_grad():
        scene = q.scene().to("cpu")
    if args.ply is not None:
        from .ply import write_ply

        path = write_ply(scene, args.ply)
        print(f"decoded scene -> {path} ({path.stat().st_size:,} bytes)")
    if args.render is not None:
        cam = orbit_views(scene, 1, args.size, None, seed=0)[0]
        with torch.no_grad():
            image = render(scene, cam).clamp(0, 1)
        _write_png(image, Path(args.render))
        print(f"rendered {args.size} x {args.size} view -> {args.render}")
    return 0


def _write_png(image: Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> an 8-bit PNG (matplotlib's writer: no extra dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except (ImportError, OSError, RuntimeError):
        raise UsageError("--render needs matplotlib: pip install 'polyquant[gaussians]'") from None
    plt.imsave(path, (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
