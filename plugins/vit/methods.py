"""The vit plugin's implementation module: its methods' handlers, artifacts and command-line hooks.

    METHODS: dict[str, type[QuantConfig]]     method name -> config class (its handler is registered below)

Python (the core contract, ``polyquant.api``):

    import polyquant as pq
    from polyquant.plugins.vit.adalog import AdaLogConfig
    from polyquant.plugins.vit.models import build_model

    model, _ = build_model("digits-vit")                       # or any timm ViT / DeiT / Swin / hybrid
    qm = pq.quantize(model, AdaLogConfig(wbits=4, abits=4), calib=[images])
    pq.save(qm, "adalog_w4a4.safetensors"); qm = pq.load("adalog_w4a4.safetensors")

Command line (``polyquant quantize vit/<method>``: options generated from the config's fields, plus the model and
data options of ``add_model_args``):

    polyquant quantize vit/adalog --model digits-vit --wbits 4 --abits 4 --calib 32 --out adalog_w4a4.safetensors
    polyquant quantize vit/minmax --model deit_tiny_patch16_224 --img-size 32 --wbits 8 --abits 8 --out deit.st
    polyquant quantize vit/qhyvit --model digits-hybrid --wbits 4 --abits 4 --out qhyvit_w4a4.safetensors
    polyquant load adalog_w4a4.safetensors --eval                   # digits: the shipped models only
    polyquant quantize vit/adalog --model my_vit --calib-data train/ --eval-data val/ --out mine.safetensors
    polyquant load mine.safetensors --eval-data val/ --mode packed  # my_vit: written by timm's save_for_hf

Every method defaults to W4A4 (``DEFAULT_BITS``). ``hybrid_minmax`` / ``hybrid_percentile`` are Q-HyViT's
placement calibrated by a plain observer (``qhyvit.quantize_hybrid_baseline``, the benchmark's hybrid baselines).

Artifacts are the core's (``polyquant.export``): weights as int entries (the harness's unsigned codes with
per-channel zero points; Q-HyViT's searched formats), activation qparams, every other state tensor (AdaLog q,
folded biases, LayerNorms) as ``float.<key>``, and a manifest recording each quantizer's spec. The plugin writes
only the ``prepare`` hooks that rebuild its quant layers on a float skeleton (the recipe's, or Q-HyViT's
``prepare_hybrid`` after BatchNorm folding); ``polyquant.load(path, mode="packed")`` packs the entries.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, register_handler
from polyquant.artifact import ArtifactError
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig

from .adalog import AdaLogConfig
from .baselines import BASELINES
from .qhyvit import HYBRID_BASELINES, HybridBaselineConfig, QHyViTConfig
from .recipe import HarnessConfig

__all__ = [
    "METHODS",
    "build_model",
    "example",
    "add_model_args",
    "load_inputs",
    "report_quantized",
    "add_load_args",
    "run_load",
]

PLUGIN = "vit"

METHODS: dict[str, type[QuantConfig]] = {
    "adalog": AdaLogConfig,
    "qhyvit": QHyViTConfig,
    **BASELINES,
    **HYBRID_BASELINES,
}
DEFAULT_BITS = (4, 4)  # (wbits, abits) of every vit method's config (a test checks them)


# --- harness methods: AdaLog and the baselines ---------------------------------------------------------------------


def _quantize_harness(model: nn.Module, config: HarnessConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    from .harness import quantize_with_recipe

    images = calib.inputs(config.images_needed())
    retrain = isinstance(config, AdaLogConfig) and config.retrain
    # With "+retrain" the post-GELU shifts are folded into fc2's bias only after AdaRound has set fc2's weights
    # (the fold uses the quantized weights), as the reference folds after reconstruction.
    qmodel = quantize_with_recipe(model, images, config.recipe(), fold=not retrain, progress=run.progress)
    if retrain:
        from .retrain import retrain as run_retrain

        assert isinstance(config, AdaLogConfig)
        run_retrain(qmodel, model, images, iters=config.retrain_iters, size=config.retrain_size, seed=config.seed,
                    progress=run.progress, lut=config.lut)
    return QuantizedModel(qmodel, config, state={"input_size": list(images.shape[1:])})


MAX_INPUT_ELEMENTS = 3 * 1024 * 1024  # C * H * W of a recorded input size (12 MB of float32 per image)


def _example_input(model: nn.Module, state: dict[str, Any], batch: int = 2) -> Tensor:
    """Zeros of the input size the artifact's model was calibrated at (recorded in its state; older artifacts:
    the model's own input size), for the BatchNorm folding of a rebuilt skeleton and the load's probe forward.
    The size is bounded (``MAX_INPUT_ELEMENTS``) before anything is allocated."""
    from .models import input_spec

    size = state.get("input_size")
    if size is None:
        side, chans = input_spec(model)
        size = [chans, side, side]
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and 1 <= v <= 8192 for v in size)):
        raise ArtifactError(f"the artifact's input_size must be [C, H, W] with sides in 1..8192, got {size!r:.80}")
    if size[0] * size[1] * size[2] > MAX_INPUT_ELEMENTS:
        raise ArtifactError(f"the artifact's input_size {size} has more than MAX_INPUT_ELEMENTS = "
                            f"{MAX_INPUT_ELEMENTS:,} values")
    return torch.zeros(batch, *size)


def _probe_input(model: nn.Module, state: dict[str, Any]) -> Tensor:
    """One zero image for the load's probe forward (``polyquant.api.check_restored``)."""
    return _example_input(model, state, batch=1)


def _prepare_harness(model: nn.Module, config: HarnessConfig, state: dict[str, Any]) -> nn.Module:
    """The harness's quant layers on a float skeleton (the recipe's quantizers, unset); the core restore loads the
    artifact's weight entries, qparams and float tensors into it."""
    from .harness import wrap

    return wrap(model, config.recipe(), _example_input(model, state))[0]


# The harness's weight quantizers give their codes (UniformQuantizer.codes: unsigned codes with per-channel zero
# points), so the core export writes them as int entries and the core restore and packed load read them back.
for _name, _cls in {"adalog": AdaLogConfig, **BASELINES}.items():
    register_handler(_cls, plugin=PLUGIN, method=_name, prepare=_prepare_harness,
                     example_input=_probe_input)(_quantize_harness)


# --- Q-HyViT ----------------------------------------------------------------------------------------------------
# Q-HyViT models are core fake-quant models (QuantConv2d / QuantLinear / QuantMatMul with per-operand specs): the
# core export writes them, and its manifest records each quantizer's searched spec (format, granularity, scheme),
# which the core restore applies to the skeleton this prepare hook rebuilds: BatchNorms folded -> prepare_hybrid.


def _quantize_qhyvit(model: nn.Module, config: QHyViTConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    from polyquant.nn import Quantizer

    from .qhyvit import run_qhyvit

    images = calib.inputs(config.calib_size)
    qmodel, report = run_qhyvit(model, images, config, progress=run.progress)
    quantizers = {n: q for n, q in qmodel.named_modules() if isinstance(q, Quantizer)}
    raw = [n for n, q in quantizers.items() if q.state != "quantized"]
    if raw:
        raise ValueError(f"{len(raw)} quantizers are not frozen (units that never ran in forward?): {raw[:3]}")
    return QuantizedModel(qmodel, config, state={"input_size": list(images.shape[1:])}, report=report)


def _prepare_qhyvit(model: nn.Module, config: QHyViTConfig, state: dict[str, Any]) -> nn.Module:
    from polyquant.surgery import fold_batchnorm

    from .qhyvit import prepare_hybrid

    model = model.eval()
    fold_batchnorm(model, _example_input(model, state))
    prepare_hybrid(model, wbits=config.wbits, abits=config.abits, ignore=config.ignore,
                   quantize_matmul=config.quantize_matmul)
    return model


register_handler(QHyViTConfig, plugin=PLUGIN, method="qhyvit", prepare=_prepare_qhyvit,
                 example_input=_probe_input)(_quantize_qhyvit)


# --- hybrid baselines: Q-HyViT's placement, a plain observer -------------------------------------------------------


def _quantize_hybrid_baseline(model: nn.Module, config: HybridBaselineConfig, calib: Calibration, run: RunOptions
                              ) -> QuantizedModel:
    from .qhyvit import quantize_hybrid_baseline

    images = calib.inputs(config.calib_size)
    qmodel = quantize_hybrid_baseline(model, images, wbits=config.wbits, abits=config.abits,
                                      observer=config.OBSERVER, percentile=config.clip_percentile(),
                                      calib_size=config.calib_size, batch_size=config.batch_size)
    return QuantizedModel(qmodel, config, state={"input_size": list(images.shape[1:])})


def _prepare_hybrid_baseline(model: nn.Module, config: HybridBaselineConfig, state: dict[str, Any]) -> nn.Module:
    """BatchNorms folded, then Q-HyViT's placement; the core restore applies the manifest's quantizer specs."""
    from polyquant.surgery import fold_batchnorm

    from .qhyvit import prepare_hybrid

    model = model.eval()
    fold_batchnorm(model, _example_input(model, state))
    return prepare_hybrid(model, wbits=config.wbits, abits=config.abits)


for _name, _hybrid_cls in HYBRID_BASELINES.items():
    register_handler(_hybrid_cls, plugin=PLUGIN, method=_name, prepare=_prepare_hybrid_baseline,
                     example_input=_probe_input)(_quantize_hybrid_baseline)


# --- models ------------------------------------------------------------------------------------------------------


def build_model(model_config: dict[str, Any]) -> nn.Module:
    """The float skeleton an artifact's model config describes (``polyquant.load`` calls this)."""
    from .models import model_from_config

    return model_from_config(model_config).eval()


def example(method: str) -> MethodExample:
    """A fast case of ``method`` on a shipped digits model (the core's contract test runs it)."""
    from .data import calib_set, load_digits_data
    from .models import build_model as resolve_model
    from .models import input_spec

    cls = METHODS[method]
    if cls is QHyViTConfig:
        model, _ = resolve_model("digits-hybrid")
        config: QuantConfig = QHyViTConfig(wbits=6, abits=6, calib_size=4, batch_size=4, grid=4, search_rounds=1)
    elif issubclass(cls, HybridBaselineConfig):
        model, _ = resolve_model("digits-hybrid")
        config = cls(wbits=6, abits=6, calib_size=4, batch_size=4)
    else:
        model, _ = resolve_model("digits-vit")
        searched = method not in ("minmax", "percentile")
        config = cls(wbits=6, abits=6, calib_size=4, calib_batch_size=4,
                     **({"eq_n": 64, "steps": 1, "search_round": 1} if searched else {}))
    size, chans = input_spec(model)
    return MethodExample(model, config, [calib_set(4, 0, size, chans)], load_digits_data(size, chans).x_test[:8])


# --- command line -------------------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Model and data options of ``polyquant quantize vit/<method>`` (the method's own come from its config)."""
    parser.epilog = (f"Every vit method defaults to W{DEFAULT_BITS[0]}A{DEFAULT_BITS[1]} (--wbits {DEFAULT_BITS[0]} "
                     f"--abits {DEFAULT_BITS[1]}).")
    hybrid = method == "qhyvit" or method in HYBRID_BASELINES
    parser.add_argument("--model", default="digits-hybrid" if hybrid else "digits-vit",
                        help="'digits-vit', 'digits-hybrid', 'digits-hybrid-v2', a timm model folder (written by "
                             "timm.models.save_for_hf(model, DIR, safe_serialization=True)), a polyquant checkpoint, "
                             "or a timm architecture name (random weights)")
    parser.add_argument("--model-args", type=_json_object, default=None, metavar="JSON",
                        help="keyword arguments of a timm architecture name, e.g. '{\"embed_dims\": [48, 96, 224, "
                             "448], \"num_classes\": 10}' (checked against the architecture's signature)")
    parser.add_argument("--img-size", type=int, default=None, help="input size of a timm model (e.g. 32 to stay fast)")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration subset")
    parser.add_argument("--calib-data", default=None, metavar="DIR",
                        help="calibrate on the images in DIR (an ImageFolder or a flat folder); default: the digits "
                             "set (right only for the shipped digits models)")
    parser.add_argument("--eval-data", default=None, metavar="DIR",
                        help="report float and quantized top-1 on the labelled ImageFolder DIR")
    _add_preprocess_args(parser)


def _add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    """How --calib-data / --eval-data images are preprocessed (quantize and load)."""
    parser.add_argument("--mean", type=_floats, default=None,
                        help="input normalization mean, e.g. 0.485,0.456,0.406 (default: the model's timm data "
                             "config or its folder's config.json; required for a model that records none)")
    parser.add_argument("--std", type=_floats, default=None, help="input normalization std (default: the model's)")
    parser.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), default=None,
                        help="resize interpolation of --calib-data / --eval-data images (default: the model's)")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="center-crop fraction of --calib-data / --eval-data images (default: the model's)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


MAX_MODEL_ARGS_CHARS = 8192  # --model-args JSON


def _json_object(text: str) -> dict[str, Any]:
    if len(text) > MAX_MODEL_ARGS_CHARS:
        raise argparse.ArgumentTypeError(f"more than {MAX_MODEL_ARGS_CHARS} characters")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, got {text!r:.60}")
    return value


def _preprocess(model: nn.Module, args: argparse.Namespace, prog: str) -> Any:
    from polyquant.cli import CliError

    from .data import preprocess_for

    try:
        return preprocess_for(model, mean=args.mean, std=args.std, interpolation=args.interpolation,
                              crop_pct=args.crop_pct)
    except ValueError as e:
        raise CliError(str(e), prog=prog) from None


def _folder(path: str, prep: Any, option: str, prog: str, *, limit: int | None = None, seed: int = 0) -> Any:
    from polyquant.cli import CliError

    from .data import load_image_folder

    try:
        return load_image_folder(path, prep, limit=limit, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"{option} {path}: {e}", prog=prog) from None


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The model named by ``--model`` and its calibration images (digits resized to the model's input)."""
    from polyquant.cli import CliError

    from .data import calib_set, load_digits_data
    from .models import input_spec, is_shipped
    from .models import build_model as resolve_model

    prog = f"polyquant quantize vit/{method}"
    if args.img_size is not None and not 8 <= args.img_size <= 4096:
        raise CliError(f"--img-size must be in [8, 4096], got {args.img_size}", prog=prog)
    if not 0 <= args.calib_seed < 2**31:
        raise CliError(f"--calib-seed must be in [0, 2^31), got {args.calib_seed}", prog=prog)
    try:
        model, model_config = resolve_model(args.model, img_size=args.img_size, model_args=args.model_args)
    except (ValueError, FileNotFoundError) as e:  # unknown name, missing or foreign checkpoint: a usage error
        raise CliError(f"--model {args.model}: {e}", prog=prog) from None
    n = config.images_needed() if isinstance(config, HarnessConfig) else getattr(config, "calib_size", 32)
    if method in ("minmax", "percentile") and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        print(f"note: vit/{method} quantizes with the ViT harness's placement; Q-HyViT's placement on a hybrid "
              f"(the benchmark's baseline) is vit/hybrid_{method}", file=sys.stderr)
    evaluation = None
    if args.calib_data is not None or args.eval_data is not None:
        prep = _preprocess(model, args, prog)
    if args.eval_data is not None:  # checked before any calibration work
        evaluation = _folder(args.eval_data, prep, "--eval-data", prog)
        if evaluation.labels is None:
            raise CliError(f"--eval-data {args.eval_data}: needs class folders (an ImageFolder) for labels",
                           prog=prog)
    if args.calib_data is not None:
        folder = _folder(args.calib_data, prep, "--calib-data", prog, limit=n, seed=args.calib_seed)
        if folder.short:
            print(f"--calib-data {args.calib_data}: found {folder.found} images, {n} requested; calibrating on "
                  f"{len(folder)}", file=sys.stderr)
        label = f"{args.model}, {len(folder)} calibration images from {args.calib_data}"
        return CliInputs(model, model_config, [folder.images], label, evaluation)
    size, chans = input_spec(model)
    channels = 1 if chans == 1 else 3
    data = load_digits_data(size, channels)
    images = calib_set(min(n, len(data.x_train)), args.calib_seed, size, channels)
    label = f"{args.model}, {len(images)} calibration images"
    if not is_shipped(model_config):
        print(f"note: no --calib-data: calibrating {args.model} on digits images resized to {size}x{size}; pass "
              "--calib-data DIR for the model's own data", file=sys.stderr)
        label += " (digits)"
    return CliInputs(model, model_config, [images], label, evaluation)


def _digits_accuracy(model: nn.Module) -> float | None:
    from .data import evaluate, load_digits_data
    from .models import input_spec

    size, chans = input_spec(model)
    head = getattr(model, "num_classes", None)
    if head not in (None, 10) or chans not in (1, 3):
        return None
    return evaluate(model, load_digits_data(size, chans))


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """Top-1 of the float and quantized models: on ``--eval-data``, else on the digits test set for the shipped
    digits models only (a user's checkpoint is not evaluated on digits: its accuracy there means nothing)."""
    from .data import evaluate_folder
    from .models import is_shipped

    folder = inputs.evaluation
    if folder is not None:
        fp_acc, q_acc = evaluate_folder(inputs.model, folder), evaluate_folder(qm.model, folder)
        print(f"{args.eval_data} top-1 ({len(folder)} images): float {fp_acc:.2f}%, quantized {q_acc:.2f}%")
    elif is_shipped(inputs.model_config):
        fp_acc, q_acc = _digits_accuracy(inputs.model), _digits_accuracy(qm.model)
        if fp_acc is not None and q_acc is not None:
            print(f"digits test accuracy: float {fp_acc:.2f}%, quantized {q_acc:.2f}%")
    else:
        print(f"accuracy not evaluated: {args.model} is not a shipped digits model; pass --eval-data DIR")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant load`` for vit artifacts."""
    parser.add_argument("--eval", action="store_true",
                        help="evaluate on the digits test set (the shipped digits models only; a usage error for "
                             "any other model: pass --eval-data)")
    parser.add_argument("--eval-data", default=None, metavar="DIR",
                        help="report top-1 on the labelled ImageFolder DIR (read as 'polyquant quantize' reads it)")
    _add_preprocess_args(parser)


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: report the rebuilt model's layers, and its top-1 on ``--eval-data`` (or, with
    ``--eval``, on the digits test set: shipped digits models only, else a usage error)."""
    from polyquant.cli import CliError
    from polyquant.packed import PACKED_MODULES

    from .data import evaluate_folder
    from .models import is_shipped

    prog = f"polyquant load {args.artifact_path}"
    if args.eval and args.eval_data is not None:
        raise CliError("--eval and --eval-data exclude each other", prog=prog)
    if args.eval and not is_shipped(qm.model_config):
        raise CliError("--eval evaluates the shipped digits models on digits only, and this artifact holds another "
                       "model: pass --eval-data DIR (a labelled ImageFolder)", prog=prog)
    folder = None
    if args.eval_data is not None:  # read before the report, so a bad folder is one error line
        folder = _folder(args.eval_data, _preprocess(qm.model, args, prog), "--eval-data", prog)
        if folder.labels is None:
            raise CliError(f"--eval-data {args.eval_data}: needs class folders (an ImageFolder) for labels",
                           prog=prog)
    n_q = sum(1 for m in qm.model.modules() if hasattr(m, "weight_quantizer") or isinstance(m, PACKED_MODULES))
    bits = f"W{getattr(qm.config, 'wbits', '?')}A{getattr(qm.config, 'abits', '?')}"
    kind = "packed" if qm.packing is not None else "fake-quant"
    print(f"restored {qm.method} {bits}: {n_q} quantized Linear / Conv layers ({kind})")
    if folder is not None:
        print(f"{args.eval_data} top-1 ({len(folder)} images): {evaluate_folder(qm.model, folder):.2f}%")
    elif args.eval:
        acc = _digits_accuracy(qm.model)
        print("not a digits model: nothing to evaluate" if acc is None else f"digits test accuracy: {acc:.2f}%")
    return 0
