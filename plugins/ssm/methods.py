"""The impl module of plugin ``ssm`` (``SPEC.impl``): Quamba W8A8 and its naive and SmoothQuant W8A8 baselines on
``transformers``' Mamba-1 (``quamba.py`` holds the configs and the placement; ``smoothquant.py`` the migration fold;
``mixer.py`` the quantizable mixer).

Every method is core quant layers and core activation quantizers on a ``QuantMambaMixer``; the ``prepare`` hook
rebuilds them on a float skeleton, so the core's default restore and packing do the rest (``in_proj`` ->
``W8A8Linear``, ``out_proj`` -> ``HadamardLinear(W8A8Linear)`` for quamba, ``conv1d`` -> ``PackedConv``, ``x_proj``
/ ``dt_proj`` -> ``PackedLinear`` on int8 codes: their inputs are already int8 values of the preceding quantizer).
smoothquant folds its migration into float weights before quantizing: the norms' weights travel as float tensors,
in_proj's smoothed weight as its int8 entry.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, register_handler
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig, UsageError
from polyquant.nn import calibrate

from .models import SHIPPED, bits_per_byte, build_model, byte_batches, text_bytes
from .quamba import NaiveConfig, QuambaConfig, quantize_mixers
from .smoothquant import SmoothQuantConfig, smooth_mixers

__all__ = ["METHODS", "build_model", "example", "add_model_args", "load_inputs", "report_quantized"]

PLUGIN = "ssm"
SEQ_LEN = 128  # calibration / evaluation sequence length (bytes)


def _prepare(skeleton: nn.Module, config: QuantConfig, state: dict[str, Any]) -> nn.Module:
    return quantize_mixers(skeleton, config)


def _example_input(model: nn.Module, state: dict[str, Any]) -> torch.Tensor:
    return torch.zeros(1, 8, dtype=torch.long)


def _quantize(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    qmodel = quantize_mixers(model, config)
    calibrate(qmodel, calib, progress=run.progress)
    return QuantizedModel(qmodel.eval(), config)


def _quantize_smoothquant(model: nn.Module, config: QuantConfig, calib: Calibration,
                          run: RunOptions) -> QuantizedModel:
    assert isinstance(config, SmoothQuantConfig)
    smooth_mixers(model, calib, config.alpha)  # float-exact fold into the norms and in_proj (the artifact's weights)
    return _quantize(model, config, calib, run)


for _cls, _name, _fn in ((QuambaConfig, "quamba", _quantize), (NaiveConfig, "naive", _quantize),
                         (SmoothQuantConfig, "smoothquant", _quantize_smoothquant)):
    register_handler(_cls, plugin=PLUGIN, method=_name, prepare=_prepare, example_input=_example_input)(_fn)

METHODS: dict[str, type[QuantConfig]] = {"quamba": QuambaConfig, "naive": NaiveConfig,
                                         "smoothquant": SmoothQuantConfig}


# --- the contract test's case -------------------------------------------------------------------------------------


def example(method: str) -> MethodExample:
    """The shipped byte-level Mamba, 4 calibration batches of (2, 64) stdlib bytes, one held-out batch of (2, 64)."""
    if method not in METHODS:
        raise KeyError(f"{PLUGIN} has no method {method!r}")
    model = build_model({"name": SHIPPED})
    calib = byte_batches(text_bytes("train", limit=200_000), batches=4, batch_size=2, seq_len=64, seed=1)
    inputs = byte_batches(text_bytes("test", limit=200_000), batches=1, batch_size=2, seq_len=64, seed=2)[0]
    return MethodExample(model=model, config=METHODS[method](), calib=calib, inputs=inputs)


# --- command line (polyquant quantize ssm/METHOD) -----------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Model and data options of ``polyquant quantize ssm/<method>``."""
    group = parser.add_argument_group("model and data (ssm)")
    group.add_argument("--model", default="tiny", help="'tiny' (the shipped byte-level Mamba) (default: %(default)s)")
    group.add_argument("--calib-text", default=None,
                       help="a text file to calibrate on (default: the Python standard-library sources)")
    group.add_argument("--calib-batches", type=int, default=8,
                       help=f"calibration batches of (4, {SEQ_LEN}) bytes (default: %(default)s)")


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The shipped model and byte windows of the calibration text."""
    if args.model != "tiny":
        raise UsageError(f"--model {args.model!r}: only 'tiny' (the shipped byte-level Mamba) is supported yet")
    if args.calib_batches < 1:
        raise UsageError(f"--calib-batches must be at least 1, got {args.calib_batches}")
    if args.calib_text is None:
        data, source = text_bytes("train"), "stdlib sources"
    else:
        path = Path(args.calib_text)
        if not path.is_file():
            raise UsageError(f"--calib-text {path}: no such file")
        data, source = path.read_bytes(), str(path)
    try:
        calib = byte_batches(data, batches=args.calib_batches, batch_size=4, seq_len=SEQ_LEN, seed=1)
    except ValueError as e:
        raise UsageError(f"--calib-text: {e}") from None
    held_out = byte_batches(text_bytes("test"), batches=4, batch_size=4, seq_len=SEQ_LEN, seed=2)
    model_config = {"name": SHIPPED}
    return CliInputs(model=build_model(model_config), model_config=model_config, calib=calib,
                     label=f"byte-level Mamba ({SHIPPED}), {args.calib_batches} x (4, {SEQ_LEN}) bytes of {source}",
                     evaluation=held_out)


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """Held-out bits per byte of the float and the quantized model."""
    held_out = inputs.evaluation
    print(f"held-out bits per byte: float {bits_per_byte(inputs.model, held_out):.4f}, "
          f"{qm.method} {bits_per_byte(qm.model, held_out):.4f}")
