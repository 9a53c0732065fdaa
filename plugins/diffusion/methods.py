"""The impl module of plugin ``diffusion`` (``SPEC.impl``): FP4DiT and its baselines on diffusers transformers (one
file per method family's configs: ``fp4dit.py``, ``baselines.py``; which layers of DiT / PixArt / SD3 / Flux:
``archs.py``; quantized attention products: ``attention.py``; calibration across timesteps: ``calib.py``;
pipelines: ``pipeline.py``), and on diffusers UNets CacheQuant (``cachequant.py`` on the feature cache of
``cache.py``) and ZOODiP (``zoodip.py``; text-to-image pipelines: ``textual.py``).

    import polyquant as pq
    from polyquant.plugins.diffusion.calib import timestep_batches
    from polyquant.plugins.diffusion.fp4dit import FP4DiTConfig
    from polyquant.plugins.diffusion.methods import build_model

    model = build_model({"name": "digits-dit"})                         # a DiTDenoiser: eps = model(x_t, t, labels)
    calib = timestep_batches(model, torch.arange(10).repeat(2), steps=20, scheduler="plms")
    qm = pq.quantize(model, FP4DiTConfig(abits=8, recon_iters=500), calib=calib)
    pq.save(qm, "fp4dit_w4a8.safetensors"); qm = pq.load("fp4dit_w4a8.safetensors", mode="packed")

    polyquant quantize diffusion/fp4dit --model tiny --abits 6 --recon-iters 500 --out fp4dit_w4a6.safetensors
    polyquant quantize diffusion/fp4dit --model DIR --prompts prompts.txt --out pixart_w4a8.safetensors

A user's transformer (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``,
``FluxTransformer2DModel``) is quantized bare, calibrated on the calls its pipeline makes
(``pipeline.quantize_pipeline``); the artifact records its class and config, so ``polyquant.load`` rebuilds it.

Every method is core quant layers (``QuantLinear`` with a per-group weight quantizer and a dynamic token-wise input
quantizer) plus, with ``quantize_qkv``, diffusers attention modules patched by the core's product patches
(``polyquant.surgery``, ``attention.py``): q @ k^T and attn @ v computed by ``matmul_qk`` / ``matmul_av`` product
modules whose quantizers see q, k and v token-wise (k untransposed: the core's ``QuantMatMulKT``); the softmax
output stays float. The ``prepare`` hook rebuilds both on a float skeleton, so the core's export, restore and
packing do the rest: FP4DiT's weights are the core's ``float`` entries (E2M1 / E3M0 / E1M2 codes + group scales;
the grid is the format's, the real-valued bias is the scale), which ``PackedLinear`` runs on the kernels' FP4 GEMM
on CUDA (E2M1) and by decode on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, register_handler
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig, UsageError
from polyquant.nn import QuantMatMul, QuantMatMulKT, calibrate, prepare

from .archs import (block_names, build_transformer, example_kwargs, ff1_patterns, find_transformer,
                    keep_float_patterns, transformer_config)
from .attention import register as register_attention
from .attention import supported
from .baselines import (BASELINES, AdaRoundConfig, FixedBiasConfig, Int8Config, IntMinMaxConfig, int_act_spec,
                        int_rules)
from .cachequant import CacheQuantConfig, build_cached, quantize_cachequant
from .fp4dit import FP4DiTConfig, fp_act_spec, fp_rules
from .models import SHIPPED, DiTDenoiser, build_denoiser, zero_batch
from .unet import UNET_SHIPPED, build_unet_denoiser, is_unet_config
from .zoodip import ZOODiPConfig, grow_class_embedding, train_embedding, weight_only_rules

__all__ = ["METHODS", "quantize_dit", "build_model", "example", "add_model_args", "load_inputs",
           "report_quantized", "add_load_args", "run_load"]

PLUGIN = "diffusion"

DIT_METHODS: dict[str, type[QuantConfig]] = {"fp4dit": FP4DiTConfig, **BASELINES}
METHODS: dict[str, type[QuantConfig]] = {**DIT_METHODS, "cachequant": CacheQuantConfig, "zoodip": ZOODiPConfig}


# --- placement ------------------------------------------------------------------------------------------------------


def _method(config: QuantConfig) -> str:
    return next(name for name, cls in METHODS.items() if type(config) is cls)


def _rules_and_act(config: QuantConfig, ff1: list[str]) -> tuple[list, Any]:
    if isinstance(config, (FP4DiTConfig, FixedBiasConfig)):
        return (fp_rules(config.weight_format, config.ff1_format, config.group_size, config.abits, ff1),
                fp_act_spec(config.abits))
    if isinstance(config, AdaRoundConfig):
        if config.grid == "fp":
            if not config.group_size:
                raise UsageError("diffusion/adaround: the FP grid needs a group size (absmax per group); group_size 0 "
                                 "(per channel) is for grid='int'")
            return fp_rules("e2m1", "e3m0", config.group_size, config.abits, ff1), fp_act_spec(config.abits)
        return int_rules(4, config.abits, config.group_size), int_act_spec(config.abits)
    if isinstance(config, IntMinMaxConfig):
        return int_rules(config.wbits, config.abits, config.group_size), int_act_spec(config.abits)
    if isinstance(config, Int8Config):
        return int_rules(8, 8, 0, symmetric=True), int_act_spec(8)
    raise TypeError(f"not a diffusion config: {type(config).__name__}")


def _check_groups(model: nn.Module, group_size: int | None, method: str) -> None:
    if not group_size:  # None / 0: per output channel
        return
    keep = keep_float_patterns(model)
    for name, m in model.named_modules():
        if type(m) is nn.Linear and not any(fnmatch.fnmatchcase(name, p) for p in keep):
            if m.in_features % group_size:
                raise UsageError(f"{PLUGIN}/{method}: group_size {group_size} does not divide {name}'s in_features "
                                 f"{m.in_features}; pick a divisor (e.g. {math.gcd(group_size, m.in_features)})")


def quantize_dit(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Put ``config``'s quant layers on a diffusers transformer (DiT, PixArt, SD3, Flux; or a model holding one,
    as the ``DiTDenoiser``), in place: every Linear but the float-kept ones (``archs.LAYOUTS``), and with
    ``quantize_qkv`` attention's q / k / v (``attention.py``). Unset quantizers (``calibrate`` freezes them)."""
    method = _method(config)
    try:
        keep, ff1 = keep_float_patterns(model), ff1_patterns(model)
    except ValueError as e:
        raise UsageError(f"{PLUGIN}/{method}: {e}") from None
    _check_groups(model, getattr(config, "group_size", None), method)
    rules, act = _rules_and_act(config, ff1)
    try:
        prepare(model, rules, ignore=keep, inplace=True)
    except ValueError as e:
        raise UsageError(f"{PLUGIN}/{method}: {e}") from None
    if config.quantize_qkv:  # type: ignore[attr-defined]
        from polyquant.surgery import patch_products

        classes = register_attention()
        skipped = [n for n, m in model.named_modules() if type(m) in classes and not supported(m)]
        if skipped:
            warnings.warn(f"{PLUGIN}/{method}: {len(skipped)} attention module(s) use a processor without a quantized "
                          f"path (e.g. {skipped[0]}); their q / k / v stay float", stacklevel=2)
        # matmul_qk = q @ k^T quantizes q and k (QuantMatMulKT); matmul_av = attn @ v only v (softmax stays float)
        patch_products(model, lambda site: QuantMatMulKT(a=act, b=act, name=site.name) if site.product == "matmul_qk"
                       else QuantMatMul(b=act, name=site.name), classes=classes, ignore=skipped)
    return model


def _quantize(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    iters = getattr(config, "recon_iters", 0)
    # a bare diffusers transformer (a user's) describes itself: its class and config rebuild it at load
    described = transformer_config(model) if not isinstance(model, DiTDenoiser) and _is_transformer(model) else None
    fp_model = copy.deepcopy(model) if iters else None
    quantize_dit(model, config)
    calibrate(model, calib, progress=run.progress)  # activations are dynamic: this freezes the weight quantizers
    if isinstance(config, FixedBiasConfig):
        from polyquant.nn import QuantWeightModule
        from polyquant.primitives import pow2_scale

        for m in model.modules():  # integer exponent bias: each group's range moves in powers of two
            if isinstance(m, QuantWeightModule) and m.weight_quantizer is not None:
                m.weight_quantizer.freeze(pow2_scale(m.weight_quantizer.scale))
    if iters:
        from polyquant.reconstruct import ReconstructConfig, reconstruct

        assert isinstance(config, (FP4DiTConfig, AdaRoundConfig))
        rc = ReconstructConfig("adaround", iters=iters, lr=config.recon_lr or None, batch_size=config.recon_batch,
                               scale_aware=getattr(config, "scale_aware", False), seed=config.seed)
        reconstruct(model, block_names(model), list(calib.batches), rc, fp_model=fp_model, forward_fn=calib.forward,
                    progress=run.progress)
    return QuantizedModel(model.eval(), config, model_config=described)


def _is_transformer(model: nn.Module) -> bool:
    try:
        return find_transformer(model)[1] is model
    except ValueError:
        return False


def _prepare(skeleton: nn.Module, config: QuantConfig, state: dict[str, Any]) -> nn.Module:
    return quantize_dit(skeleton, config)


def _example_input(model: nn.Module, state: dict[str, Any]) -> Any:
    if isinstance(model, DiTDenoiser):
        return zero_batch(model)
    return example_kwargs(model, batch=1)


for _name, _cls in DIT_METHODS.items():
    register_handler(_cls, plugin=PLUGIN, method=_name, prepare=_prepare, example_input=_example_input)(_quantize)


def _prepare_cachequant(skeleton: nn.Module, config: QuantConfig, state: dict[str, Any]) -> nn.Module:
    assert isinstance(config, CacheQuantConfig)
    unet = getattr(skeleton, "unet", None)
    if unet is None:
        raise UsageError(f"{PLUGIN}/cachequant restores into a UNetDenoiser, got {type(skeleton).__name__}")
    return build_cached(unet, config, state)


def _example_cachequant(model: nn.Module, state: dict[str, Any]) -> Any:
    return zero_batch(model, t=state["timesteps"][0])


@register_handler(CacheQuantConfig, plugin=PLUGIN, method="cachequant", prepare=_prepare_cachequant,
                  example_input=_example_cachequant)
def _quantize_cachequant(model: nn.Module, config: CacheQuantConfig, calib: Calibration,
                         run: RunOptions) -> QuantizedModel:
    cached, state = quantize_cachequant(model, config, list(calib.batches), calib.forward, progress=run.progress)
    return QuantizedModel(cached, config, state=state)


def _prepare_zoodip(skeleton: nn.Module, config: QuantConfig, state: dict[str, Any]) -> nn.Module:
    from polyquant.nn import prepare

    assert isinstance(config, ZOODiPConfig)
    unet = getattr(skeleton, "unet", None)
    if unet is None:
        raise UsageError(f"{PLUGIN}/zoodip restores into a UNetDenoiser, got {type(skeleton).__name__}")
    grow_class_embedding(unet, torch.zeros(1, unet.class_embedding.embedding_dim))  # the learned row, loaded next
    return prepare(skeleton, weight_only_rules(config.wbits), inplace=True)


def reference_images(batches: Any) -> Tensor:
    """The reference images of a ZOODiP calibration: image tensors (B, C, S, S) in [-1, 1] (or (C, S, S)), or
    dicts holding them as ``images``, concatenated."""
    out = []
    for b in batches:
        x = b.get("images") if isinstance(b, dict) else b
        if not isinstance(x, Tensor) or x.dim() not in (3, 4) or not x.is_floating_point():
            raise UsageError(f"{PLUGIN}/zoodip: calibration batches are reference images (B, C, S, S) in [-1, 1], got "
                             f"{type(x).__name__}{list(x.shape) if isinstance(x, Tensor) else ''}")
        out.append(x if x.dim() == 4 else x[None])
    if not out:
        raise UsageError(f"{PLUGIN}/zoodip needs at least one reference image")
    return torch.cat([x.float() for x in out])


def _example_zoodip(model: nn.Module, state: dict[str, Any]) -> Any:
    return zero_batch(model, label=state["new_class"])


@register_handler(ZOODiPConfig, plugin=PLUGIN, method="zoodip", prepare=_prepare_zoodip,
                  example_input=_example_zoodip)
def _quantize_zoodip(model: nn.Module, config: ZOODiPConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    """INT8 weight-only quantization of a UNetDenoiser, then ZOODiP learns one new class row against it; the
    artifact holds the quantized model with the grown class table (the new class: ``state["new_class"]``)."""
    from polyquant.nn import quantize_weights

    unet = getattr(model, "unet", None)
    if unet is None or not isinstance(getattr(unet, "class_embedding", None), nn.Embedding):
        raise UsageError(f"{PLUGIN}/zoodip personalizes a class-conditional diffusers UNet (a UNetDenoiser whose UNet "
                         f"has a class_embedding table); got {type(model).__name__}")
    refs = reference_images(calib.batches)
    size = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
    if tuple(refs.shape[1:]) != size:
        raise UsageError(f"{PLUGIN}/zoodip: reference images of size {list(refs.shape[1:])}, the model samples "
                         f"{list(size)}")
    quantize_weights(model, weight_only_rules(config.wbits), inplace=True)
    try:
        theta, record = train_embedding(unet, refs, config, progress=run.progress)
    except ValueError as e:
        raise UsageError(f"{PLUGIN}/zoodip: {e}") from None
    new = grow_class_embedding(unet, theta.reshape(1, -1))
    return QuantizedModel(model.eval(), config, state={"new_class": new, "references": len(refs)},
                          report={"losses": record["losses"], "forward_passes": record["forward_passes"]})


# --- models and the contract test's case ----------------------------------------------------------------------------


def build_model(model_config: dict[str, Any]) -> nn.Module:
    """The float model a model config describes (``polyquant.load`` calls this): ``{"name": "digits-dit"}`` or a
    digits-DiT architecture -> a ``DiTDenoiser``; ``{"diffusers": class name, "config": {...}}`` (a user's
    transformer, ``archs.transformer_config``) -> that diffusers transformer."""
    if isinstance(model_config, dict) and "diffusers" in model_config:
        return build_transformer(model_config)
    if is_unet_config(model_config):
        return build_unet_denoiser(model_config)
    return build_denoiser(model_config)


def example(method: str) -> MethodExample:
    """The shipped digits DiT, 4 labels sampled with 4 DDIM steps as calibration (4 batches), one batch of 4."""
    from .calib import timestep_batches

    if method not in METHODS:
        raise KeyError(f"{PLUGIN} has no method {method!r}")
    if method == "zoodip":  # the digits UNet, 4 reference images of a 3, 3 steps
        from .models import digits_images

        unet = build_model({"name": UNET_SHIPPED})
        images, labels = digits_images("train")
        refs = images[labels == 3][:4]
        inputs = timestep_batches(unet, torch.tensor([3, 5, 7, 10]), steps=4, scheduler="ddim", seed=2)[1]
        return MethodExample(model=unet, config=ZOODiPConfig(iters=3, tau=2), calib=[refs[:2], refs[2:]], inputs=inputs)
    if method == "cachequant":  # the digits UNet, one DDIM run of 4 calls (cache every 2)
        unet = build_model({"name": UNET_SHIPPED})
        calib = timestep_batches(unet, torch.arange(4), steps=4, scheduler="ddim", seed=1)
        inputs = timestep_batches(unet, torch.tensor([5, 6, 7, 8]), steps=4, scheduler="ddim", seed=2)[1]
        return MethodExample(model=unet, config=CacheQuantConfig(steps=4, interval=2), calib=calib, inputs=inputs,
                             graph_breaks="the timestep clock reads the call's timestep back to pick its "
                                          "quantization parameters, and the feature cache is Python state")
    model = build_model({"name": SHIPPED})
    calib = timestep_batches(model, torch.arange(4), steps=4, scheduler="ddim", seed=1)
    inputs = timestep_batches(model, torch.tensor([5, 6, 7, 8]), steps=2, scheduler="ddim", seed=2)[1]
    configs: dict[str, QuantConfig] = {"fp4dit": FP4DiTConfig(recon_iters=2, recon_batch=4),
                                       "adaround": AdaRoundConfig(recon_iters=2, recon_batch=4)}
    config = configs.get(method) or METHODS[method]()
    return MethodExample(model=model, config=config, calib=calib, inputs=inputs)


# --- command line (polyquant quantize diffusion/METHOD, polyquant load ART) -------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Model and calibration options of ``polyquant quantize diffusion/<method>``."""
    group = parser.add_argument_group("model and calibration (diffusion)")
    group.add_argument("--model", default="tiny",
                       help="'tiny': the shipped class-conditional digits DiT; or DIR, a diffusers folder "
                            "(save_pretrained layout, safetensors): a pipeline (model_index.json) whose transformer "
                            "is a DiT, PixArt, SD3 or Flux one, or a DiTTransformer2DModel folder (config.json) "
                            "(default: %(default)s)")
    group.add_argument("--prompts", default=None, metavar="FILE",
                       help="text-to-image pipelines: a UTF-8 file of calibration prompts, one per line")
    group.add_argument("--sampler", choices=("plms", "ddim"), default="plms",
                       help="scheduler of the calibration (and report) sampling runs of 'tiny' and of a DiT "
                            "transformer folder; a pipeline samples with its own scheduler (default: %(default)s)")
    group.add_argument("--calib-steps", type=int, default=20, help="sampling steps of calibration (default: 20)")
    group.add_argument("--calib-images", type=int, default=20,
                       help="images sampled for calibration: class labels 0, 1, 2, ... in turn, or the first "
                            "prompts (default: %(default)s)")
    group.add_argument("--calib-seed", type=int, default=0, help="noise seed of calibration (default: 0)")
    group.add_argument("--eval-images", type=int, default=20,
                       help="images sampled (float vs quantized, same noise) for the report (default: %(default)s)")
    if method == "zoodip":
        group.add_argument("--concept", type=int, default=3,
                           help="zoodip: the digit whose training images are the references (and what the report's "
                                "classifier checks the new class's samples against) (default: %(default)s)")
        group.add_argument("--refs", default=None, metavar="DIR",
                           help="zoodip: a folder of your own reference images (PNG / JPEG, turned grayscale and "
                                "resized to the model's size) instead of --concept's digits")


def _check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.calib_steps <= 1000 or not 1 <= args.calib_images <= 10_000 \
            or not 0 <= args.eval_images <= 10_000:
        raise UsageError("--calib-steps must be in [1, 1000], --calib-images in [1, 10000], --eval-images in "
                         "[0, 10000]")
    if not 0 <= args.calib_seed < 2**31:
        raise UsageError(f"--calib-seed must be in [0, 2^31), got {args.calib_seed}")


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts is None:
        raise UsageError(f"--model {args.model}: a text-to-image pipeline calibrates on prompts: pass --prompts FILE")
    try:
        with open(args.prompts, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts {args.prompts}: cannot read it ({type(e).__name__})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"--prompts {args.prompts}: no prompt in it (one per line)")
    return lines


def _sampling_run(pipe: Any, transformer: nn.Module, args: argparse.Namespace, prompts: list[str] | None,
                  images: int, seed: int) -> Callable[[], None]:
    """What samples ``images`` images: the pipeline (class labels for a DiT, else ``prompts``) or, for a bare DiT,
    ``models.sample``; chunks of 8 images with noise seeds ``seed``, ``seed + 1``, ..."""
    from .models import sample

    chunk = 8
    n_classes = int(getattr(transformer.config, "num_embeds_ada_norm", None) or 1)

    def run() -> None:
        for i, start in enumerate(range(0, images, chunk)):
            n = min(chunk, images - start)
            gen = torch.Generator().manual_seed(seed + i)
            labels = [(start + j) % n_classes for j in range(n)]
            if pipe is None:
                sample(transformer, torch.tensor(labels), steps=args.calib_steps, scheduler=args.sampler,
                       seed=seed + i)
            elif prompts is None:
                pipe(class_labels=labels, generator=gen, num_inference_steps=args.calib_steps, output_type="pt")
            else:
                pipe(prompt=[prompts[(start + j) % len(prompts)] for j in range(n)], generator=gen,
                     num_inference_steps=args.calib_steps, output_type="latent")
    return run


def _folder_inputs(args: argparse.Namespace) -> CliInputs:
    from polyquant.api import progress_default
    from polyquant.nn import Calibration

    from .calib import record_calls
    from .pipeline import calls_bytes, load_folder, transformer_forward

    try:
        pipe, transformer = load_folder(args.model)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    if pipe is None and type(transformer).__name__ != "DiTTransformer2DModel":
        raise UsageError(f"--model {args.model}: a {type(transformer).__name__} alone cannot sample (no text encoder "
                         "or scheduler): pass its pipeline folder (model_index.json)")
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
    prompts = None if type(transformer).__name__ == "DiTTransformer2DModel" else _prompts(args)  # read once
    calls = record_calls(transformer, _sampling_run(pipe, transformer, args, prompts, args.calib_images,
                                                    args.calib_seed), progress=progress_default() and not args.quiet)
    held = [] if not args.eval_images else record_calls(
        transformer, _sampling_run(pipe, transformer, args, prompts, args.eval_images, args.calib_seed + 10_000))
    n_params = sum(p.numel() for p in transformer.parameters())
    how = type(pipe).__name__ if pipe is not None else f"{args.sampler} sampling"
    label = (f"{type(transformer).__name__} from {args.model} ({n_params / 1e6:.2f} M parameters), {len(calls)} "
             f"calibration calls ({args.calib_images} images x {args.calib_steps} steps, {how}; "
             f"{calls_bytes(calls) / 2**20:.1f} MiB of inputs held)")
    return CliInputs(model=transformer, model_config=transformer_config(transformer),
                     calib=Calibration(calls, transformer_forward), label=label, evaluation={"calls": held})


def _cachequant_inputs(config: CacheQuantConfig, args: argparse.Namespace) -> CliInputs:
    """The shipped digits UNet and whole sampling runs of ``config.steps`` model calls (DDIM: that many steps;
    PLMS: one fewer), 32 images per run."""
    from polyquant.api import progress_default

    from .calib import timestep_batches

    if args.model != "tiny":
        raise UsageError(f"{PLUGIN}/cachequant --model: only 'tiny' (the shipped digits UNet) on the command line; in "
                         "Python, quantize UNetDenoiser(UNet2DModel.from_pretrained(DIR)) with calibration runs of "
                         "calib.timestep_batches")
    steps = config.steps - (1 if args.sampler == "plms" else 0)
    if steps < 1:
        raise UsageError(f"{PLUGIN}/cachequant: PLMS calls the model steps + 1 times; --steps must be >= 2")
    model = build_model({"name": UNET_SHIPPED})
    labels = torch.arange(args.calib_images) % 10
    calib = timestep_batches(model, labels, steps=steps, scheduler=args.sampler, seed=args.calib_seed,
                             batch_size=32, progress=progress_default() and not args.quiet)
    label = (f"digits UNet ({UNET_SHIPPED}), {len(calib)} calibration calls: {args.calib_images} images x "
             f"{config.steps} {args.sampler} model calls")
    return CliInputs(model=model, model_config={"name": UNET_SHIPPED}, calib=calib, label=label,
                     evaluation={"images": args.eval_images, "sampler": args.sampler})


def read_reference_images(folder: str, size: int) -> Tensor:
    """(N, 1, size, size) in [-1, 1] from the PNG / JPEG files of ``folder`` (grayscale, resized bilinearly);
    UsageError for a missing folder, no image in it, or a file PIL cannot read."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--refs {folder}: not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UsageError(f"--refs {folder}: no .png / .jpg image in it")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                g = im.convert("L").resize((size, size), Image.BILINEAR)
        except (OSError, UnidentifiedImageError):
            raise UsageError(f"--refs: cannot read {f.name} as an image") from None
        out.append(torch.from_numpy(np.asarray(g, dtype=np.float32).copy()) / 127.5 - 1.0)
    return torch.stack(out)[:, None]


def _zoodip_inputs(args: argparse.Namespace) -> CliInputs:
    """The shipped digits UNet and the reference images: the first --calib-images training digits of --concept,
    or the user's --refs folder."""
    from .models import digits_images

    if args.model != "tiny":
        raise UsageError(f"{PLUGIN}/zoodip --model: only 'tiny' (the shipped digits UNet) on the command line; in "
                         "Python, pass a UNetDenoiser of a class-conditional UNet2DModel")
    if not 0 <= args.concept <= 9:
        raise UsageError(f"--concept must be a digit 0..9, got {args.concept}")
    model = build_model({"name": UNET_SHIPPED})
    if args.refs is not None:
        refs = read_reference_images(args.refs, int(model.config.sample_size))
        what = f"{len(refs)} reference images from {args.refs}"
    else:
        images, labels = digits_images("train")
        refs = images[labels == args.concept][: args.calib_images]
        what = f"{len(refs)} training images of the digit {args.concept}"
    label = f"digits UNet ({UNET_SHIPPED}), INT8 weights, a new class learned from {what}"
    return CliInputs(model=model, model_config={"name": UNET_SHIPPED}, calib=[refs], label=label,
                     evaluation={"images": args.eval_images, "concept": None if args.refs else args.concept})


def compare_cached(float_model: nn.Module, qmodel: nn.Module, labels: Tensor, *, scheduler: str = "ddim",
                   seed: int = 1000) -> dict[str, float]:
    """A ``CachedDenoiser`` sampling ``labels`` under its cache vs its float UNet without one (same noise): sample
    PSNR (dB), class accuracy (%) of both, and the theoretical speedup (counted MACs, ``schedule_macs``)."""
    from .cachequant import cached_sample, schedule_macs
    from .models import class_accuracy, psnr, sample

    steps = qmodel.schedule.num_steps - (1 if scheduler == "plms" else 0)
    fp_img = sample(float_model.unet, labels, steps=steps, scheduler=scheduler, seed=seed)
    q_img = cached_sample(qmodel, labels, scheduler=scheduler, seed=seed)
    macs = schedule_macs(float_model, qmodel.schedule, zero_batch(qmodel, t=qmodel.clock.timesteps[0]))
    return {"psnr": psnr(fp_img, q_img), "acc_float": class_accuracy(fp_img, labels),
            "acc_quant": class_accuracy(q_img, labels), "speedup": macs["speedup"]}


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The shipped DiT (``--model tiny``) or a user's diffusers folder, and the transformer's inputs at every step
    of sampling ``--calib-images`` images."""
    from polyquant.api import progress_default

    from .calib import timestep_batches

    _check_args(args)
    if isinstance(config, CacheQuantConfig):
        return _cachequant_inputs(config, args)
    if isinstance(config, ZOODiPConfig):
        return _zoodip_inputs(args)
    if args.model != "tiny":
        return _folder_inputs(args)
    model = build_model({"name": SHIPPED})
    labels = torch.arange(args.calib_images) % 10
    calib = timestep_batches(model, labels, steps=args.calib_steps, scheduler=args.sampler, seed=args.calib_seed,
                             batch_size=32, progress=progress_default() and not args.quiet)
    label = (f"digits DiT ({SHIPPED}), {len(calib)} calibration batches: {args.calib_images} images x "
             f"{args.calib_steps} {args.sampler} steps")
    return CliInputs(model=model, model_config={"name": SHIPPED}, calib=calib, label=label,
                     evaluation={"images": args.eval_images, "sampler": args.sampler, "steps": args.calib_steps})


@torch.no_grad()
def prediction_error(float_model: nn.Module, qmodel: nn.Module, calls: list[dict[str, Any]]) -> float:
    """Mean over recorded transformer calls of ||q - f||^2 / ||f||^2: the quantized vs the float transformer's
    first output (the noise / velocity prediction) on the same inputs."""
    from .pipeline import transformer_forward

    errs = []
    for c in calls:
        f, q = transformer_forward(float_model, c).float(), transformer_forward(qmodel, c).float()
        errs.append(float((q - f).pow(2).sum() / f.pow(2).sum().clamp_min(1e-30)))
    return sum(errs) / len(errs)


def compare_samples(float_model: nn.Module, qmodel: nn.Module, labels: Tensor, *, steps: int = 20,
                    scheduler: str = "plms", seed: int = 1000) -> dict[str, float]:
    """Sample ``labels`` with both models from the same noise: mean per-step noise MSE of the quantized vs the
    float model, sample PSNR (dB) vs the float samples, and the class accuracy (%) of both models' samples."""
    from .models import class_accuracy, noise_mse, psnr, sample

    fp_img, fp_traj = sample(float_model.transformer, labels, steps=steps, scheduler=scheduler, seed=seed,
                             return_trajectory=True)
    q_img, q_traj = sample(qmodel.transformer, labels, steps=steps, scheduler=scheduler, seed=seed,
                           return_trajectory=True)
    mse = noise_mse(fp_traj, q_traj)
    return {"noise_mse": sum(mse) / len(mse), "psnr": psnr(fp_img, q_img),
            "acc_float": class_accuracy(fp_img, labels), "acc_quant": class_accuracy(q_img, labels)}


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """The shipped DiT: noise MSE, sample PSNR and class accuracy of a few samples, quantized vs float (same labels
    and noise). A user's folder: the relative prediction error on held-out calls (other noise seeds). Both: the
    process's peak resident memory."""
    from .pipeline import peak_rss_mib

    ev = inputs.evaluation
    if isinstance(qm.config, ZOODiPConfig):
        losses = qm.report["losses"]
        k = max(1, len(losses) // 10)
        print(f"ZOODiP: {qm.config.iters} steps, {qm.report['forward_passes']} forward passes, no backward; denoising "
              f"loss (mean of the first / last {k} steps) {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f}; "
              f"the new class is label {qm.state['new_class']}")
        if ev["images"]:
            from .models import classify, sample

            labels = torch.full((ev["images"],), int(qm.state["new_class"]))
            img = sample(qm.model.unet, labels, steps=20, scheduler="ddim", seed=1000)
            if ev["concept"] is not None:
                share = float((classify(img) == ev["concept"]).float().mean()) * 100
                print(f"{ev['images']} samples of the new class (DDIM-20): {share:.1f}% classified as the digit "
                      f"{ev['concept']} (chance 10%)")
    elif isinstance(qm.config, CacheQuantConfig):
        if ev["images"]:
            r = compare_cached(inputs.model, qm.model.cpu(), torch.arange(ev["images"]) % 10, scheduler=ev["sampler"])
            print(f"{ev['images']} samples ({ev['sampler']}, {qm.config.steps} calls, cache refreshed at "
                  f"{len(qm.model.schedule.refresh)} of them) vs the float model without cache: PSNR "
                  f"{r['psnr']:.2f} dB, class accuracy float {r['acc_float']:.1f}% / cachequant "
                  f"{r['acc_quant']:.1f}%; theoretical speedup {r['speedup']:.2f}x (counted conv / linear MACs)")
    elif "calls" in ev:
        if ev["calls"]:
            err = prediction_error(inputs.model, qm.model.cpu(), ev["calls"])
            print(f"{len(ev['calls'])} held-out transformer calls ({args.eval_images} images, other noise): "
                  f"relative prediction error ||q - f||^2 / ||f||^2 = {err:.3e}")
    elif ev["images"]:
        labels = torch.arange(ev["images"]) % 10
        r = compare_samples(inputs.model, qm.model.cpu(), labels, steps=ev["steps"], scheduler=ev["sampler"])
        print(f"{ev['images']} samples ({ev['sampler']}, {ev['steps']} steps) vs float: noise MSE "
              f"{r['noise_mse']:.3e}, PSNR {r['psnr']:.2f} dB, class accuracy float {r['acc_float']:.1f}% / "
              f"{qm.method} {r['acc_quant']:.1f}%")
    print(f"peak resident memory of this process: {peak_rss_mib():.0f} MiB (CPU)")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant load`` for diffusion artifacts."""
    parser.add_argument("--eval-images", type=int, default=0,
                        help="sample this many images with the rebuilt and the float model (same noise) and report "
                             "noise MSE / PSNR / class accuracy (shipped DiT only; default: none)")


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: the rebuilt model's quantized layers, and with --eval-images its samples vs float."""
    from polyquant.nn import QuantWeightModule
    from polyquant.packed import PACKED_MODULES
    from polyquant.surgery import is_product_patched

    n_q = sum(isinstance(m, (QuantWeightModule, *PACKED_MODULES)) for m in qm.model.modules())
    n_attn = sum(is_product_patched(m) for m in qm.model.modules())
    kind = "packed" if qm.packing is not None else "fake-quant"
    cachequant = isinstance(qm.config, CacheQuantConfig)
    if cachequant:
        sched = qm.model.schedule
        print(f"restored {PLUGIN}/cachequant ({kind}): {n_q} quantized convolutions / linears (per-timestep activation "
              f"ranges at {len(qm.model.clock)} timesteps), the cache refreshed at calls {list(sched.refresh)} of "
              f"{sched.num_steps}; with model.feature_cache(): sample(model.unet, ...)")
    else:
        print(f"restored {PLUGIN}/{qm.method} ({kind}): {n_q} quantized linears, {n_attn} attentions with quantized "
              "q / k / v; patch embedding, timestep / label embedders and the final layer float")
    if args.eval_images:
        if not 1 <= args.eval_images <= 10_000:
            raise UsageError(f"--eval-images must be in [1, 10000], got {args.eval_images}")
        if cachequant:
            if qm.model_config != {"name": UNET_SHIPPED}:
                raise UsageError("--eval-images: only artifacts of the shipped digits UNet can be compared with their "
                                 "float model")
            r = compare_cached(build_model({"name": UNET_SHIPPED}), qm.model.cpu(),
                               torch.arange(args.eval_images) % 10)
            print(f"{args.eval_images} samples (ddim, cached) vs float: PSNR {r['psnr']:.2f} dB, class accuracy float "
                  f"{r['acc_float']:.1f}% / cachequant {r['acc_quant']:.1f}%; theoretical speedup "
                  f"{r['speedup']:.2f}x")
            return 0
        if qm.model_config != {"name": SHIPPED}:
            raise UsageError("--eval-images: only artifacts of the shipped digits DiT can be compared with their float "
                             "model")
        labels = torch.arange(args.eval_images) % 10
        r = compare_samples(build_model({"name": SHIPPED}), qm.model.cpu(), labels)
        print(f"{args.eval_images} samples (plms, 20 steps) vs float: noise MSE {r['noise_mse']:.3e}, PSNR "
              f"{r['psnr']:.2f} dB, class accuracy float {r['acc_float']:.1f}% / {qm.method} {r['acc_quant']:.1f}%")
    return 0
