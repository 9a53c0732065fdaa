"""The vit plugin's implementation module: methods, configs, artifacts and the command-line hooks.

    METHODS: dict[str, Callable]          name -> quantize(model, calib, config) -> nn.Module
    CONFIGS: dict[str, type]              name -> its config dataclass (qhyvit's is resolved lazily)
    quantize_vit(model, calib, method, config=None) -> nn.Module
    export_artifact(qmodel, method, config, model_config) -> polyquant.artifact.Artifact
    restore(artifact) -> nn.Module        rebuilds a working quantized model (outputs identical to the saved one)

Command line (called by ``polyquant quantize vit/<method>`` and ``polyquant load``):

    polyquant quantize vit/adalog --model digits-vit --wbits 4 --abits 4 --calib 32 --out adalog_w4a4.safetensors
    polyquant quantize vit/minmax --model deit_tiny_patch16_224 --img-size 32 --wbits 8 --abits 8 --out deit.st
    polyquant quantize vit/qhyvit --model digits-hybrid --wbits 4 --abits 4 --out qhyvit_w4a4.safetensors
    polyquant load adalog_w4a4.safetensors --eval

``--model`` is 'digits-vit' (the shipped checkpoint), 'digits-hybrid' / 'digits-hybrid-v2', a checkpoint path,
or a timm model name (random weights: ``timm.create_model(name, pretrained=False)``; calibration images are
digits resized to the model's input). Artifacts (``polyquant.artifact``): weights as packed integer codes
(``<fqn>.weight_packed`` + ``weight_scale`` / ``weight_zero_point`` / ``weight_shape``), every other tensor of the
quantized model's state (activation quantizer scales, AdaLog q, folded biases, LayerNorms) as ``float.<key>``;
the config holds the model config and the harness recipe, so ``restore`` rebuilds the model without pickle.
Q-HyViT models are core fake-quant models and use ``polyquant.export`` (same weight keys, activation qparams as
``<quantizer>.scale`` / ``.zero_point``); their config also records every quantizer's searched granularity and
scheme, which ``restore`` applies to a freshly prepared skeleton.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .adalog import AdaLogConfig, quantize_adalog
from .baselines import BASELINES, BaselineConfig

__all__ = [
    "METHODS",
    "CONFIGS",
    "quantize_vit",
    "make_config",
    "export_artifact",
    "restore",
    "add_quantize_args",
    "run_quantize",
    "add_load_args",
    "run_load",
]

PLUGIN = "vit"
ARTIFACT_KIND = "polyquant.vit.harness"  # config["kind"]: artifacts restore() can rebuild
QHYVIT_KIND = "polyquant.vit.qhyvit"


def _quantize_qhyvit(model: nn.Module, calib: Tensor, config: Any = None) -> nn.Module:
    """Q-HyViT (hybrid ViTs), implemented in ``qhyvit.py``; imported on first use."""
    from .qhyvit import quantize_qhyvit

    return quantize_qhyvit(model, calib, config)


METHODS: dict[str, Callable[..., nn.Module]] = {
    "adalog": quantize_adalog,
    "qhyvit": _quantize_qhyvit,
    **BASELINES,
}


def _qhyvit_config() -> type:
    from .qhyvit import QHyViTConfig

    return QHyViTConfig


CONFIGS: dict[str, type | Callable[[], type]] = {
    "adalog": AdaLogConfig,
    "qhyvit": _qhyvit_config,
    **{name: BaselineConfig for name in BASELINES},
}


def _config_class(method: str) -> type:
    if method not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    cls = CONFIGS[method]
    return cls if isinstance(cls, type) else cls()


def make_config(method: str, **fields: Any) -> Any:
    """The method's config dataclass built from ``fields`` (validated by its ``__post_init__``)."""
    return _config_class(method)(**fields)


def quantize_vit(model: nn.Module, calib: Tensor, method: str, config: Any = None) -> nn.Module:
    """Quantize a copy of ``model`` with ``method`` (a key of ``METHODS``) on calibration images ``calib``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if config is not None and not isinstance(config, _config_class(method)):
        raise TypeError(f"method {method!r} takes a {_config_class(method).__name__}, got {type(config).__name__}")
    return METHODS[method](model, calib, config)


# --- artifacts ----------------------------------------------------------------------------------------------------


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config or {})


def _recipe_of(qmodel: nn.Module) -> Any:
    recipe = getattr(qmodel, "_polyquant_recipe", None)
    if recipe is None:
        raise ValueError("this model was not quantized by the vit harness (AdaLog or a baseline); it cannot be "
                         "exported as a vit artifact")
    return recipe


@torch.no_grad()
def export_artifact(qmodel: nn.Module, method: str, config: Any, model_config: dict[str, Any],
                    meta: dict[str, Any] | None = None) -> Any:
    """Pack a quantized model into a ``polyquant.artifact.Artifact`` (keys: module docstring).

    Models of the vit harness (AdaLog, baselines) and of Q-HyViT (``method == "qhyvit"``) are supported.
    """
    if method == "qhyvit":
        return _export_qhyvit(qmodel, config, model_config, meta)
    from polyquant.artifact import Artifact
    from polyquant.nn import QuantConv2d, QuantLinear
    from polyquant.pack import pack_bits

    from .quantizers import UniformQuantizer

    recipe = _recipe_of(qmodel)
    tensors: dict[str, Tensor] = {}
    skip: set[str] = set()
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and isinstance(m.weight_quantizer, UniformQuantizer):
            wq = m.weight_quantizer
            codes = wq.codes(m.weight)
            tensors[f"{name}.weight_packed"] = pack_bits(codes.flatten(), wq.bits)
            tensors[f"{name}.weight_scale"] = wq.scale.float().contiguous()
            tensors[f"{name}.weight_zero_point"] = wq.zero_point.float().contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor(list(m.weight.shape), dtype=torch.int64)
            skip |= {f"{name}.weight", f"{name}.weight_quantizer.scale", f"{name}.weight_quantizer.zero_point"}
    for key, t in qmodel.state_dict().items():
        if key not in skip:
            tensors[f"float.{key}"] = t.detach().contiguous().cpu()
    cfg = _config_dict(config)
    return Artifact(
        tensors=tensors,
        plugin=PLUGIN,
        method=method,
        config={"kind": ARTIFACT_KIND, "model": model_config, "recipe": recipe.to_dict(), "method_config": cfg},
        meta={"weight_bits": recipe.wbits, "act_bits": recipe.abits, **(meta or {})},
    )


@torch.no_grad()
def restore(artifact: Any) -> nn.Module:
    """Rebuild the quantized model an artifact of ``export_artifact`` describes (eval mode, quantized state)."""
    from polyquant.artifact import ArtifactError
    from polyquant.nn import QuantConv2d, QuantLinear
    from polyquant.pack import unpack_bits

    from .harness import Recipe, vit_quantizers, wrap
    from .models import model_from_config
    from .quantizers import UniformQuantizer

    cfg = artifact.config
    if artifact.plugin == PLUGIN and cfg.get("kind") == QHYVIT_KIND:
        return _restore_qhyvit(artifact)
    if artifact.plugin != PLUGIN or cfg.get("kind") != ARTIFACT_KIND:
        raise ArtifactError(f"not a vit harness artifact (plugin {artifact.plugin!r}, kind {cfg.get('kind')!r})")
    try:
        recipe = Recipe.from_dict(cfg["recipe"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"the artifact's recipe cannot be read: {e}") from None
    qmodel, _ = wrap(model_from_config(cfg["model"]), recipe)
    t = artifact.tensors
    state: dict[str, Tensor] = {k[len("float."):]: v for k, v in t.items() if k.startswith("float.")}
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and isinstance(m.weight_quantizer, UniformQuantizer):
            try:
                shape = tuple(int(v) for v in t[f"{name}.weight_shape"].tolist())
                packed, scale, zp = (t[f"{name}.weight_packed"], t[f"{name}.weight_scale"],
                                     t[f"{name}.weight_zero_point"])
            except KeyError as e:
                raise ArtifactError(f"artifact has no quantized weight for {name}: {e}") from None
            if shape != tuple(m.weight.shape):
                raise ArtifactError(f"{name}: weight shape {shape} in the artifact, {tuple(m.weight.shape)} in the model")
            numel = int(torch.tensor(shape).prod())
            codes = unpack_bits(packed, m.weight_quantizer.bits, numel).reshape(shape)
            state[f"{name}.weight"] = (codes.float() - zp) * scale  # the dequantized weight, on the grid
            state[f"{name}.weight_quantizer.scale"] = scale
            state[f"{name}.weight_quantizer.zero_point"] = zp
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"artifact does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for q in vit_quantizers(qmodel):
        q.searched = True
        q.set_state("quantized")
    qmodel._polyquant_recipe = recipe  # type: ignore[assignment]
    return qmodel.eval()


# Q-HyViT models are core fake-quant models (QuantConv2d / QuantLinear / QuantMatMul with per-operand specs), so
# they go through ``polyquant.export``; the artifact also records each quantizer's searched spec, which rebuilds
# the same skeleton: model from its config -> BatchNorms folded -> ``prepare_hybrid`` -> specs -> qparams.


def _quantizer_choice(q: Any) -> dict[str, Any]:
    from polyquant.primitives import PerChannel

    gran = q.spec.granularity
    return {"bits": q.fmt.bits, "symmetric": bool(q.spec.symmetric), "signed": bool(getattr(q.fmt, "signed", True)),
            "axis": gran.axis if isinstance(gran, PerChannel) else None, "state": q.state}


def _export_qhyvit(qmodel: nn.Module, config: Any, model_config: dict[str, Any],
                   meta: dict[str, Any] | None) -> Any:
    from polyquant.export import export
    from polyquant.nn import Quantizer

    if getattr(qmodel, "qhyvit_report", None) is None:
        raise ValueError("this model was not quantized by Q-HyViT (no qhyvit_report); it cannot be exported as "
                         "a qhyvit artifact")
    choices = {n: _quantizer_choice(q) for n, q in qmodel.named_modules() if isinstance(q, Quantizer)}
    raw = [n for n, c in choices.items() if c["state"] != "quantized"]
    if raw:
        raise ValueError(f"{len(raw)} quantizers are not frozen (units that never ran in forward?): {raw[:3]}")
    cfg = _config_dict(config)
    return export(qmodel, plugin=PLUGIN, method="qhyvit",
                  config={"kind": QHYVIT_KIND, "model": model_config, "method_config": cfg, "quantizers": choices},
                  meta={"weight_bits": cfg.get("wbits"), "act_bits": cfg.get("abits"), **(meta or {})})


def _restore_qhyvit(artifact: Any) -> nn.Module:
    from polyquant.artifact import ArtifactError
    from polyquant.export import restore as core_restore
    from polyquant.formats import IntFormat
    from polyquant.nn import Quantizer, QuantSpec
    from polyquant.primitives import PerChannel, PerTensor

    from .models import input_spec, model_from_config
    from .qhyvit import fold_batchnorm, prepare_hybrid

    from .qhyvit import QHyViTConfig

    cfg = artifact.config
    try:  # validates bits, version and every other field of the recorded config
        mc = dataclasses.asdict(QHyViTConfig(**cfg.get("method_config", {})))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"the artifact's Q-HyViT config cannot be read: {e}") from None
    model = model_from_config(cfg["model"]).eval()
    size, chans = input_spec(model)
    fold_batchnorm(model, torch.zeros(2, chans, size, size))
    prepare_hybrid(model, wbits=mc["wbits"], abits=mc["abits"], ignore=mc["ignore"],
                   quantize_matmul=mc["quantize_matmul"])
    choices: dict[str, dict[str, Any]] = cfg.get("quantizers", {})
    names = {n for n, q in model.named_modules() if isinstance(q, Quantizer)}
    if names != set(choices):
        raise ArtifactError(f"artifact does not match the model: quantizers {sorted(names ^ set(choices))[:5]} "
                            "differ")
    for name, q in model.named_modules():
        if isinstance(q, Quantizer):
            c = choices[name]
            gran = PerTensor() if c["axis"] is None else PerChannel(int(c["axis"]))
            q.spec = QuantSpec(IntFormat(int(c["bits"]), signed=bool(c["signed"])), gran,
                               symmetric=bool(c["symmetric"]))
    return core_restore(model, artifact).eval()


# --- command line -------------------------------------------------------------------------------------------------


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (a bad value is a usage error: one line, exit code 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value

    return parse


def add_quantize_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Options of ``polyquant quantize vit/<method>``."""
    parser.add_argument("--model", default="digits-hybrid" if method == "qhyvit" else "digits-vit",
                        help="'digits-vit', 'digits-hybrid', 'digits-hybrid-v2', a checkpoint path, or a timm model "
                             "name (random weights)")
    parser.add_argument("--img-size", type=_int_in(8, 4096), default=None,
                        help="input size of a timm model (e.g. 32 to stay fast)")
    parser.add_argument("--wbits", type=_int_in(2, 8), default=4, help="weight bits (2..8)")
    parser.add_argument("--abits", type=_int_in(2, 8), default=4, help="activation bits (2..8)")
    parser.add_argument("--calib", type=_int_in(1, 1 << 20), default=32, help="number of calibration images")
    parser.add_argument("--seed", type=_int_in(0, 2**31 - 1), default=0, help="seed of the calibration subset")
    parser.add_argument("--out", type=Path, default=None, help="artifact path (.safetensors)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    if method == "qhyvit":
        parser.add_argument("--grid", type=_int_in(1, 10000), default=100,
                            help="steps of the scale-multiplier grid (paper: 100)")
        parser.add_argument("--search-rounds", type=_int_in(1, 16), default=3,
                            help="alternating weight / activation search rounds (paper: 3)")
    if method == "adalog":
        parser.add_argument("--retrain", action="store_true", help="BRECQ-style block reconstruction (+retrain)")
        parser.add_argument("--retrain-iters", type=_int_in(0, 1 << 24), default=2000, help="reconstruction steps per block")
        parser.add_argument("--retrain-size", type=_int_in(1, 1 << 20), default=1024, help="images for the reconstruction")


def _calib_images(model: nn.Module, n: int, seed: int) -> Tensor:
    from .data import calib_set, load_digits_data
    from .models import input_spec

    size, chans = input_spec(model)
    data = load_digits_data(size, 1 if chans == 1 else 3)
    return calib_set(min(n, len(data.x_train)), seed, size, 1 if chans == 1 else 3)


def _digits_accuracy(model: nn.Module) -> float | None:
    from .data import evaluate, load_digits_data
    from .models import input_spec

    size, chans = input_spec(model)
    head = getattr(model, "num_classes", None)
    if head not in (None, 10) or chans not in (1, 3):
        return None
    return evaluate(model, load_digits_data(size, chans))


def run_quantize(method: str, args: argparse.Namespace) -> int:
    """``polyquant quantize vit/<method>``: quantize, save the artifact, report."""
    from polyquant.artifact import save

    from .models import DIGITS_MODELS, build_model

    from polyquant.cli import CliError

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    try:
        model, model_config = build_model(args.model, **kwargs)
    except (ValueError, FileNotFoundError) as e:  # unknown name, missing or foreign checkpoint: a usage error
        raise CliError(f"--model {args.model}: {e}", prog=f"polyquant quantize vit/{method}") from None
    fields: dict[str, Any] = {"wbits": args.wbits, "abits": args.abits, "calib_size": args.calib}
    n_images = args.calib
    if method == "adalog":
        fields.update(retrain=args.retrain, retrain_iters=args.retrain_iters, retrain_size=args.retrain_size,
                      seed=args.seed, progress=args.progress)
        if args.retrain:
            n_images = max(n_images, args.retrain_size)
    elif method in BASELINES:
        fields["progress"] = args.progress
    elif method == "qhyvit":
        fields.update(seed=args.seed, progress=args.progress, grid=args.grid, search_rounds=args.search_rounds)
    config = make_config(method, **fields)
    calib = _calib_images(model, n_images, args.seed)
    t0 = time.perf_counter()
    qmodel = quantize_vit(model, calib, method, config)
    seconds = time.perf_counter() - t0
    print(f"vit/{method}: {args.model} W{args.wbits}A{args.abits}, {args.calib} calibration images, {seconds:.1f} s")
    if args.model in DIGITS_MODELS or model_config.get("source") in ("vit", "hybrid"):
        fp_acc, q_acc = _digits_accuracy(model), _digits_accuracy(qmodel)
        if fp_acc is not None and q_acc is not None:
            print(f"digits test accuracy: float {fp_acc:.2f}%, quantized {q_acc:.2f}%")
    if args.out is None:
        return 0
    artifact = export_artifact(qmodel, method, config, model_config,
                               meta={"model": args.model, "calib_images": args.calib, "seed": args.seed,
                                     "calib_seconds": round(seconds, 3)})
    path = save(artifact, args.out)
    print(f"saved {path} ({path.stat().st_size:,} bytes)")
    return 0


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant load`` for vit artifacts."""
    parser.add_argument("--eval", action="store_true", help="rebuild the model and evaluate it on the digits task "
                                                            "(digits models only)")


def run_load(artifact: Any, args: argparse.Namespace) -> int:
    """``polyquant load``: rebuild the quantized model; report its layers (and digits accuracy with --eval)."""
    qmodel = restore(artifact)
    n_q = sum(1 for m in qmodel.modules() if hasattr(m, "weight_quantizer"))
    bits = f"W{artifact.meta.get('weight_bits')}A{artifact.meta.get('act_bits')}"
    print(f"restored {artifact.method} {bits}: {n_q} quantized Linear / Conv layers")
    if args.eval:
        acc = _digits_accuracy(qmodel)
        if acc is None:
            print("not a digits model: nothing to evaluate")
        else:
            print(f"digits test accuracy: {acc:.2f}%")
    return 0
