"""The impl module of plugin ``ssm`` (``SPEC.impl``): Quamba W8A8 and its naive, SmoothQuant and QuaRot W8A8
baselines on ``transformers``' Mamba (one file per method's config: ``quamba.py``, ``naive.py``, ``smoothquant.py``
with its migration fold, ``quarot.py``; the shared points: ``placement.py``; the quantizable mixers: ``mixer.py``,
``mixer2.py``).

Every method is core quant layers and core activation quantizers on a ``QuantMambaMixer`` (Mamba-2:
``QuantMamba2Mixer``); the ``prepare`` hook rebuilds them on a float skeleton, so the core's default restore and
packing do the rest (``in_proj`` ->
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

from .models import (SHIPPED, MambaLM, bits_per_byte, build_model, byte_batches, encode, load_pretrained,
                     load_tokenizer, text_bytes, token_batches)
from .naive import NaiveConfig
from .placement import quantize_mixers
from .quamba import QuambaConfig
from .quarot import QuaRotConfig
from .smoothquant import SmoothQuantConfig, smooth_mixers

__all__ = ["METHODS", "build_model", "example", "add_model_args", "load_inputs", "report_quantized", "add_load_args",
           "run_load"]

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
                         (SmoothQuantConfig, "smoothquant", _quantize_smoothquant),
                         (QuaRotConfig, "quarot", _quantize)):
    register_handler(_cls, plugin=PLUGIN, method=_name, prepare=_prepare, example_input=_example_input)(_fn)

METHODS: dict[str, type[QuantConfig]] = {"quamba": QuambaConfig, "naive": NaiveConfig,
                                         "smoothquant": SmoothQuantConfig, "quarot": QuaRotConfig}


# --- the contract test's case -------------------------------------------------------------------------------------


def example(method: str) -> MethodExample:
    """The shipped byte-level Mamba, 4 calibration batches of (2, 64) stdlib bytes, one held-out batch of (2, 64)."""
    if method not in METHODS:
        raise KeyError(f"{PLUGIN} has no method {method!r}")
    model = build_model({"name": SHIPPED})
    calib = byte_batches(text_bytes("train", limit=200_000), batches=4, batch_size=2, seq_len=64, seed=1)
    inputs = byte_batches(text_bytes("test", limit=200_000), batches=1, batch_size=2, seq_len=64, seed=2)[0]
    return MethodExample(model=model, config=METHODS[method](), calib=calib, inputs=inputs)


# --- command line (polyquant quantize ssm/METHOD, polyquant load ART) -------------------------------------------

MAX_TEXT_BYTES = 256 * 2**20  # --calib-text / --eval-text files larger than this are refused


def _read_text(path: str, option: str) -> bytes:
    """The bytes of a text file the user named (a regular file, at most ``MAX_TEXT_BYTES``); ``UsageError``."""
    from polyquant.artifact import ArtifactError, open_regular

    try:
        with open_regular(path, max_bytes=MAX_TEXT_BYTES) as f:
            return f.read()
    except (ArtifactError, OSError) as e:
        raise UsageError(f"{option} {e}") from None


def _tokens(data: bytes, tokenizer: Any, model: MambaLM, option: str) -> tuple[torch.Tensor, float]:
    try:
        return encode(data, tokenizer, model.vocab_size)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _windows(ids: torch.Tensor, batches: int, seq_len: int, seed: int, option: str) -> list[torch.Tensor]:
    try:
        return token_batches(ids, batches=batches, batch_size=4, seq_len=seq_len, seed=seed)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _folder_tokenizer(folder: str | None) -> Any:
    try:
        return None if folder is None else load_tokenizer(folder)
    except ValueError as e:
        raise UsageError(f"--tokenizer: {e}") from None


def _user_model(path: str, progress: bool) -> tuple[MambaLM, dict[str, Any]]:
    try:
        return load_pretrained(path, progress=progress)
    except ValueError as e:
        raise UsageError(f"--model {e}") from None


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Model and data options of ``polyquant quantize ssm/<method>``."""
    group = parser.add_argument_group("model and data (ssm)")
    group.add_argument("--model", default="tiny",
                       help="'tiny' (the shipped byte-level Mamba) or a folder a transformers MambaForCausalLM / "
                            "Mamba2ForCausalLM was saved to with save_pretrained (default: %(default)s)")
    group.add_argument("--tokenizer", default=None, metavar="FOLDER",
                       help="a transformers tokenizer folder (default: the --model folder's, if it has one; "
                            "byte-level models need none)")
    group.add_argument("--calib-text", default=None, metavar="FILE",
                       help="a text file to calibrate on (default: the Python standard-library sources)")
    group.add_argument("--calib-batches", type=int, default=8,
                       help="calibration batches of 4 sequences (default: %(default)s)")
    group.add_argument("--seq-len", type=int, default=SEQ_LEN,
                       help="tokens per calibration / evaluation sequence (default: %(default)s)")
    group.add_argument("--eval-text", default=None, metavar="FILE",
                       help="held-out text for the bits-per-byte report (default: the held-out stdlib sources)")


def _check_counts(args: argparse.Namespace) -> None:
    if args.calib_batches < 1:
        raise UsageError(f"--calib-batches must be at least 1, got {args.calib_batches}")
    if not 2 <= args.seq_len <= 65536:
        raise UsageError(f"--seq-len must be in [2, 65536], got {args.seq_len}")


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The float model (shipped or the user's folder) and windows of the calibration text."""
    _check_counts(args)
    if args.model == "tiny":
        model, model_config, name = build_model({"name": SHIPPED}), {"name": SHIPPED}, f"byte-level Mamba ({SHIPPED})"
        tokenizer = _folder_tokenizer(args.tokenizer)
    else:
        from polyquant.api import progress_default

        model, model_config = _user_model(args.model, progress_default() and not args.quiet)
        name = f"{type(model.lm).__name__} from {args.model}"
        tokenizer = _folder_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
    calib_data, source = ((text_bytes("train"), "stdlib sources") if args.calib_text is None
                          else (_read_text(args.calib_text, "--calib-text"), str(args.calib_text)))
    ids, _ = _tokens(calib_data, tokenizer, model, "--calib-text")
    calib = _windows(ids, args.calib_batches, args.seq_len, 1, "--calib-text")
    eval_data = text_bytes("test") if args.eval_text is None else _read_text(args.eval_text, "--eval-text")
    eval_ids, bytes_per_token = _tokens(eval_data, tokenizer, model, "--eval-text")
    held_out = _windows(eval_ids, 4, args.seq_len, 2, "--eval-text")
    return CliInputs(model=model, model_config=model_config, calib=calib,
                     label=f"{name}, {args.calib_batches} x (4, {args.seq_len}) tokens of {source}",
                     evaluation=(held_out, bytes_per_token))


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """Held-out bits per byte of the float and the quantized model."""
    held_out, bytes_per_token = inputs.evaluation
    fp = bits_per_byte(inputs.model, held_out, bytes_per_token)
    q = bits_per_byte(qm.model, held_out, bytes_per_token)
    print(f"held-out bits per byte: float {fp:.4f}, {qm.method} {q:.4f} ({100 * (q / fp - 1):+.2f}%)")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant load`` for ssm artifacts."""
    parser.add_argument("--eval-text", default=None, metavar="FILE",
                        help="print the bits per byte of the rebuilt model on this text, beside the float model's")
    parser.add_argument("--model", default=None, metavar="FOLDER",
                        help="the float model's save_pretrained folder (the float reference and its tokenizer) for "
                             "an artifact of a user's model; the shipped model needs none")
    parser.add_argument("--tokenizer", default=None, metavar="FOLDER",
                        help="a transformers tokenizer folder (default: --model's, if any; byte-level models need "
                             "none)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="evaluation batches of 4 sequences (default: %(default)s)")


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: the rebuilt model's quantized layers, and with --eval-text its bits per byte beside the
    float model's (the shipped model is rebuilt from the package; a user's model from --model FOLDER)."""
    from polyquant.nn import QuantWeightModule

    if qm.packing is not None:
        kinds = sorted(set(qm.packing.packed.values()))
        print(f"restored ssm/{qm.method}: {len(qm.packing.packed)} packed layers ({', '.join(kinds)}); the SSM's "
              "activation points (u, dt, B / C) and its A_log / D / dt_bias stay quantize-dequantize (the scan runs "
              "in float); embedding, norms and lm_head float")
    else:
        n_q = sum(isinstance(m, QuantWeightModule) for m in qm.model.modules())
        print(f"restored ssm/{qm.method}: {n_q} quantized layers (fake-quant); embedding, norms and lm_head float")
    if args.eval_text is None:
        return 0
    if args.eval_batches < 1 or not 2 <= args.seq_len <= 65536:
        raise UsageError("--eval-batches must be at least 1 and --seq-len in [2, 65536]")
    if not qm.model_config:
        raise UsageError("the artifact does not describe its model: no float reference can be built")
    float_model: MambaLM | None = None
    if args.model is not None:
        float_model, user_config = _user_model(args.model, False)
        if user_config != qm.model_config:
            raise UsageError(f"--model {args.model}: not the model this artifact was quantized from (its "
                             "transformers config differs)")
    elif "hf_config" not in qm.model_config:
        float_model = build_model(qm.model_config)  # the shipped checkpoint or a seeded architecture
    tokenizer = _folder_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
    lm = qm.model
    ids, bytes_per_token = _tokens(_read_text(args.eval_text, "--eval-text"), tokenizer, lm, "--eval-text")
    batches = _windows(ids, args.eval_batches, args.seq_len, 2, "--eval-text")
    device = next(lm.parameters()).device
    q = bits_per_byte(lm, [b.to(device) for b in batches], bytes_per_token)
    line = f"bits per byte on {args.eval_text} ({args.eval_batches} x (4, {args.seq_len}) tokens): {qm.method} {q:.4f}"
    if float_model is None:
        print(f"{line}; float: pass --model FOLDER (the float model) for the reference")
    else:
        fp = bits_per_byte(float_model, batches, bytes_per_token)
        print(f"{line}, float {fp:.4f} ({100 * (q / fp - 1):+.2f}%)")
    return 0
