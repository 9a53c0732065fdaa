"""The impl module of plugin ``mamba_demo`` (``SPEC.impl``): two methods built from core pieces only.

    w8a8  static W8A8: int8 per-channel weights, static per-tensor int8 activations (min-max calibration) on every
          Linear; ``out_proj`` gets an online Hadamard rotation first (``QuantRule(..., rotation="hadamard")``, a
          ``polyquant.nn.RotatedLinear``). The depthwise conv and the scan stay float.
    rvq   residual-VQ weights on every Linear (``polyquant.nn.VQSpec``: 2 levels x 16 codes by default), float
          activations.

Neither method writes export, restore or packing code: the core records the quant layers in the artifact, rebuilds
them on ``build_model``'s skeleton, and ``polyquant.load(path, mode="packed")`` turns them into
``HadamardLinear(W8A8Linear)`` / ``W8A8Linear`` / ``VQLinear``. The command line needs ``add_model_args`` and
``load_inputs``; ``polyquant load`` needs no hook.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, register_handler
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig, UsageError, int_field
from polyquant.nn import QuantRule, QuantSpec, VQSpec, calibrate, prepare
from polyquant.primitives import PerChannel
from torch import nn

from .model import DEFAULT_CONFIG, build_model, make_inputs

__all__ = ["W8A8Config", "RVQConfig", "METHODS", "build_model", "example", "add_model_args", "load_inputs",
           "report_quantized"]

PLUGIN = "mamba_demo"


# --- w8a8 -------------------------------------------------------------------------------------------------------


@dataclass
class W8A8Config(QuantConfig):
    """Static W8A8 of every Linear, with an online Hadamard rotation before each block's out_proj.

    Args:
        hadamard: rotate the input of out_proj (and its weight) by a Hadamard matrix before quantizing.
        symmetric: symmetric int8 activations (zero point 0); else asymmetric, with a zero point.
    """

    hadamard: bool = True
    symmetric: bool = True


def w8a8_rules(config: W8A8Config) -> list[QuantRule]:
    """int8 per-channel weights and static per-tensor int8 inputs on every ``nn.Linear`` (matched by type, so the
    depthwise Conv1d stays float); out_proj first, rotated when ``config.hadamard``."""
    w = QuantSpec("int8", PerChannel(0))
    a = QuantSpec("int8", symmetric=config.symmetric, observer="minmax")
    return [QuantRule("*.out_proj", weight=w, input=a, rotation="hadamard" if config.hadamard else None),
            QuantRule(nn.Linear, weight=w, input=a)]


@register_handler(W8A8Config, plugin=PLUGIN, method="w8a8")
def _quantize_w8a8(model: nn.Module, config: W8A8Config, calib: Calibration, run: RunOptions) -> QuantizedModel:
    try:
        qmodel = prepare(model, w8a8_rules(config), inplace=True)
    except ValueError as e:  # no Linear, or an out_proj whose in_features has no Hadamard matrix
        raise UsageError(f"{PLUGIN}/w8a8: {e}") from None
    calibrate(qmodel, calib, progress=run.progress)
    return QuantizedModel(qmodel.eval(), config)


# --- rvq --------------------------------------------------------------------------------------------------------


@dataclass
class RVQConfig(QuantConfig):
    """Residual vector quantization of every Linear weight; activations stay float.

    Args:
        dim: sub-vector length (divides every Linear's in_features).
        codebook_size: codewords per residual level.
        levels: residual levels.
        iters: k-means iterations per level.
        seed: k-means seed.
    """

    dim: int = int_field(4, 1, 64)
    codebook_size: int = int_field(16, 2, 256)
    levels: int = int_field(2, 1, 8)
    iters: int = int_field(10, 0, 200)
    seed: int = int_field(0, 0, 2**31 - 1)

    def spec(self) -> VQSpec:
        return VQSpec(dim=self.dim, codebook_size=self.codebook_size, levels=self.levels, iters=self.iters,
                      seed=self.seed)


@register_handler(RVQConfig, plugin=PLUGIN, method="rvq")
def _quantize_rvq(model: nn.Module, config: RVQConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    bad = [f"{name} ({m.in_features})" for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and m.in_features % config.dim]
    if bad:
        raise UsageError(f"{PLUGIN}/rvq: --dim {config.dim} does not divide the in_features of {', '.join(bad)}")
    try:
        qmodel = prepare(model, [QuantRule(nn.Linear, weight=config.spec())], inplace=True)
    except ValueError as e:
        raise UsageError(f"{PLUGIN}/rvq: {e}") from None
    calibrate(qmodel, calib, progress=run.progress)  # fits the codebooks; there is no activation quantizer
    return QuantizedModel(qmodel.eval(), config)


METHODS: dict[str, type[QuantConfig]] = {"w8a8": W8A8Config, "rvq": RVQConfig}


# --- the contract test's case -------------------------------------------------------------------------------------


def example(method: str) -> MethodExample:
    """A small offline case: the default model (2 blocks, d_model 32, d_inner 64), 4 calibration batches of
    (4, 16, 32), and one held-out batch to compare outputs on."""
    if method not in METHODS:
        raise KeyError(f"{PLUGIN} has no method {method!r}")
    model = build_model(DEFAULT_CONFIG)
    calib = make_inputs(DEFAULT_CONFIG["d_model"], batches=4, seed=1)
    inputs = make_inputs(DEFAULT_CONFIG["d_model"], batches=1, seed=2)[0]
    return MethodExample(model=model, config=METHODS[method](), calib=calib, inputs=inputs)


# --- command line (polyquant quantize mamba_demo/METHOD) ------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Model and data options of ``polyquant quantize mamba_demo/<method>`` (the method's come from its config)."""
    group = parser.add_argument_group("model and data (mamba_demo)")
    group.add_argument("--model-seed", type=int, default=DEFAULT_CONFIG["seed"],
                       help="seed of the model's weights (default: %(default)s)")
    group.add_argument("--n-layers", type=int, default=DEFAULT_CONFIG["n_layers"],
                       help="number of blocks (default: %(default)s)")
    group.add_argument("--calib-batches", type=int, default=4,
                       help="random calibration batches of (4, 16, d_model) (default: %(default)s)")


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The seeded model and random calibration batches the options describe."""
    if args.calib_batches < 1:
        raise UsageError(f"--calib-batches must be at least 1, got {args.calib_batches}")
    model_config = {**DEFAULT_CONFIG, "seed": args.model_seed, "n_layers": args.n_layers}
    try:
        model = build_model(model_config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    d_model = DEFAULT_CONFIG["d_model"]
    calib = make_inputs(d_model, batches=args.calib_batches, seed=1)
    held_out = make_inputs(d_model, batches=1, seed=2)[0]
    label = f"MambaDemo ({args.n_layers} blocks, seed {args.model_seed}), {args.calib_batches} random batches"
    return CliInputs(model=model, model_config=model_config, calib=calib, label=label, evaluation=held_out)


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """Print the relative L2 error of the quantized model's outputs against the float model's, on held-out data."""
    x: Any = inputs.evaluation
    device = next(qm.model.parameters()).device
    with torch.no_grad():
        ref = inputs.model(x).float()
        out = qm.model(x.to(device)).float().cpu()
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    print(f"output relative L2 error vs float: {err:.4f}")
