"""The impl module of plugin ``audio`` (``SPEC.impl``): codec bottleneck quantizers fitted post-training (``rvq``,
``grvq``, the ``fsq`` baseline; ``rvq.py``, ``grvq.py``, ``fsq.py``) and post-training quantization of a codec's
convolutions (``ptq``; ``ptq.py``).

A codec here is a module with ``latent(wav (B, 1, T)) -> frames (B, T', D)``, ``synthesize(frames) -> wav``, a
``quantizer`` on the frames, ``sample_rate``, ``hop`` and ``dim`` (``codec.TinyCodec``, ``encodec_adapter``); its
forward is wav -> reconstruction. The bottleneck methods capture the quantizer's input frames over the calibration
audio (``polyquant.capture``) and replace the quantizer; ``ptq`` puts core quant layers on every convolution.

Artifacts: rvq / grvq / fsq hold the new bottleneck's codebooks (or projection) as float tensors with the codec's
float weights (nothing of the model is a quantized weight: ``load --mode packed`` says so); ptq holds INT8 / INT4
convolution weights as core entries (packed: ``PackedConv``, transposed ones included).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, register_handler
from polyquant.capture import capture
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig, UsageError
from polyquant.nn import calibrate, prepare
from polyquant.vq import CODEBOOK_PRESETS, GroupedResidualVQ, ResidualVQ, train_codebooks

from . import synth
from .codes import load_codes, save_codes
from .fsq import FSQConfig, ProjectedFSQ, parse_levels
from .grvq import GRVQConfig
from .metrics import mel_distance, si_sdr
from .models import SHIPPED, build_model
from .ptq import PTQConfig, ptq_rules
from .rvq import RVQConfig, stages_for
from .wavio import read_wav, write_wav

__all__ = ["METHODS", "build_model", "example", "bottleneck_for", "frame_rate", "add_model_args",
           "load_inputs", "report_quantized", "add_load_args", "run_load"]

PLUGIN = "audio"
CLIP_SECONDS = 1.0  # calibration segments


def frame_rate(codec: nn.Module) -> float:
    return codec.sample_rate / codec.hop


def bottleneck_for(config: QuantConfig, codec: nn.Module) -> nn.Module:
    """The unfitted bottleneck a config describes for this codec (what ``prepare`` rebuilds at load)."""
    fr, dim = frame_rate(codec), codec.dim
    if isinstance(config, FSQConfig):
        levels = parse_levels(config.levels)
        groups = stages_for(config.bandwidth, fr, math.prod(levels))  # FSQ groups of prod(levels) codes each
        if not 1 <= groups * len(levels) <= dim:
            raise UsageError(f"fsq at {config.bandwidth} kbps needs {groups} groups of {len(levels)} channels; the "
                             f"codec's frames have {dim} channels at {fr:g} frames/s")
        return ProjectedFSQ(dim, levels, groups)
    assert isinstance(config, RVQConfig)
    groups = config.groups if isinstance(config, GRVQConfig) else 1
    n = stages_for(config.bandwidth, fr, config.codebook_size, groups)
    if n < 1:
        per = fr * math.log2(config.codebook_size) * groups / 1000
        raise UsageError(f"bandwidth {config.bandwidth} kbps is below one stage of {config.codebook_size} codes x "
                         f"{groups} group(s) ({per:g} kbps at {fr:g} frames/s)")
    if dim % groups:
        raise UsageError(f"the codec's {dim} latent channels do not split into {groups} groups")
    common: dict[str, Any] = dict(num_quantizers=n, codebook_size=config.codebook_size, decay=config.decay,
                                  kmeans_init=config.kmeans_iters > 0, kmeans_iters=max(1, config.kmeans_iters),
                                  threshold_dead_code=config.threshold_dead_code, seed=config.seed,
                                  options=CODEBOOK_PRESETS["encodec"])
    if isinstance(config, GRVQConfig):
        return GroupedResidualVQ(dim=dim, groups=groups, **common)
    return ResidualVQ(dim=dim, **common)


def latent_frames(codec: nn.Module, calib: Calibration) -> Tensor:
    """The quantizer's input frames (N, D) over the calibration audio."""
    caps = capture(codec, ["quantizer"], calib, outputs=False, calls="first", early_stop=True)
    return caps["quantizer"].input(0).reshape(-1, codec.dim)


def _fit_bottleneck(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    frames = latent_frames(model, calib)
    if not bool(torch.isfinite(frames).all()):
        raise UsageError("the codec's latent frames of the calibration audio are not finite")
    q = bottleneck_for(config, model).to(frames.device)
    if isinstance(q, ProjectedFSQ):
        q.fit(frames)
    else:
        assert isinstance(config, RVQConfig)
        if config.kmeans_iters:
            q.fit(frames, iters=config.kmeans_iters)
        g = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(len(frames), generator=g).to(frames.device)
        train_codebooks(q, list(frames[order].split(config.batch_frames)), epochs=config.epochs,
                        progress=run.progress, desc=f"{type(config).__name__} EMA")
    model.quantizer = q.eval()
    return QuantizedModel(model.eval(), config)


def _ptq(model: nn.Module, config: QuantConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    assert isinstance(config, PTQConfig)
    qmodel = prepare(model, ptq_rules(config), inplace=True)
    calibrate(qmodel, calib, progress=run.progress)
    return QuantizedModel(qmodel.eval(), config)


def _prepare_bottleneck(skeleton: nn.Module, config: QuantConfig, state: dict[str, Any]) -> nn.Module:
    skeleton.quantizer = bottleneck_for(config, skeleton)
    return skeleton


def _prepare_ptq(skeleton: nn.Module, config: QuantConfig, state: dict[str, Any]) -> nn.Module:
    assert isinstance(config, PTQConfig)
    return prepare(skeleton, ptq_rules(config), inplace=True)


def _float_bottleneck(qm: QuantizedModel, artifact: Any) -> dict[str, Any]:
    return {"quantizer": "the bottleneck's codebooks are the method's float tables (codes of audio, not of weights; "
                         "encode / decode run on polyquant.kernels rvq_assign / rvq_decode); the convolutions stay "
                         "float (method ptq quantizes them)"}


def _example_input(model: nn.Module, state: dict[str, Any]) -> Tensor:
    return torch.zeros(1, 1, 2 * int(model.hop))


for _cls, _name in ((RVQConfig, "rvq"), (GRVQConfig, "grvq"), (FSQConfig, "fsq")):
    register_handler(_cls, plugin=PLUGIN, method=_name, prepare=_prepare_bottleneck, packed_weights=_float_bottleneck,
                     example_input=_example_input)(_fit_bottleneck)
register_handler(PTQConfig, plugin=PLUGIN, method="ptq", prepare=_prepare_ptq, example_input=_example_input)(_ptq)

METHODS: dict[str, type[QuantConfig]] = {"rvq": RVQConfig, "grvq": GRVQConfig, "fsq": FSQConfig, "ptq": PTQConfig}
DEFAULT_MODEL = {"rvq": "tiny-rvq", "grvq": "tiny-grvq", "fsq": "tiny-rvq", "ptq": "tiny-rvq"}


# --- the contract test's case -------------------------------------------------------------------------------------


def synthetic_batches(count: int, *, seed: int, seconds: float = 0.5, batch_size: int = 2) -> list[Tensor]:
    """``count`` seeded synthetic clips as (batch_size, 1, T) batches."""
    clips = torch.from_numpy(synth.dataset(count, seed=seed, seconds=seconds))[:, None]
    return list(clips.split(batch_size))


def example(method: str) -> MethodExample:
    """The shipped codec of the method, 4 synthetic calibration clips of 0.5 s, a held-out batch of 2 clips; the
    VQ methods with K = 64 (fast k-means)."""
    if method not in METHODS:
        raise KeyError(f"{PLUGIN} has no method {method!r}")
    model = build_model({"name": DEFAULT_MODEL[method]})
    configs: dict[str, QuantConfig] = {
        "rvq": RVQConfig(bandwidth=1.2, codebook_size=64, kmeans_iters=5, epochs=1),  # 4 stages of 6 bits
        "grvq": GRVQConfig(bandwidth=1.2, codebook_size=64, kmeans_iters=5, epochs=1, groups=2),  # 2 x 2
        "fsq": FSQConfig(),
        "ptq": PTQConfig(weight_bits=8, activations=True),
    }
    calib = synthetic_batches(4, seed=11)
    inputs = synthetic_batches(2, seed=12)[0]
    return MethodExample(model=model, config=configs[method], calib=calib, inputs=inputs)


# --- command line (polyquant quantize audio/METHOD, polyquant load ART) ------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Model and data options of ``polyquant quantize audio/<method>``."""
    group = parser.add_argument_group("model and data (audio)")
    group.add_argument("--model", default=DEFAULT_MODEL[method], choices=sorted(SHIPPED),
                       help="the shipped 16 kHz codec (default: %(default)s)")
    group.add_argument("--input", default=None, metavar="WAV",
                       help="a WAV file: calibrated on (with the synthetic clips), then encoded and decoded by the "
                            "quantized codec: codes (packed) and the decoded audio are written beside --out")
    group.add_argument("--calib-clips", type=int, default=64,
                       help="seeded synthetic 1 s clips added to the calibration audio (default: %(default)s)")
    group.add_argument("--downmix", action="store_true", help="average a multi-channel --input to mono")


def _segments(wav: Tensor, seconds: float, sample_rate: int) -> list[Tensor]:
    """(1, T) -> batches (b, 1, n) of n = seconds * rate samples (the tail zero-padded)."""
    n = int(seconds * sample_rate)
    x = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % n)).view(-1, 1, n)
    return list(x.split(8))


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The shipped codec, calibration batches of 1 s (the --input file's segments and synthetic clips)."""
    if not 0 <= args.calib_clips <= 100_000:
        raise UsageError(f"--calib-clips must be in [0, 100000], got {args.calib_clips}")
    model = build_model({"name": args.model})
    wav = None if args.input is None else read_wav(args.input, model.sample_rate, downmix=args.downmix)
    calib: list[Tensor] = [] if wav is None else _segments(wav, CLIP_SECONDS, model.sample_rate)
    if args.calib_clips:
        calib += synthetic_batches(args.calib_clips, seed=1, seconds=CLIP_SECONDS, batch_size=8)
    if not calib:
        raise UsageError("no calibration audio: give --input WAV or --calib-clips > 0")
    parts = ([f"{args.input} ({wav.shape[-1] / model.sample_rate:.1f} s)"] if wav is not None else []) + (
        [f"{args.calib_clips} synthetic 1 s clips"] if args.calib_clips else [])
    return CliInputs(model=model, model_config={"name": args.model}, calib=calib,
                     label=f"codec {args.model}, calibrated on {' + '.join(parts)}", evaluation=wav)


def _side_paths(out: str | None, input_path: str) -> tuple[Path, Path]:
    base = Path(out) if out is not None else Path(input_path)
    stem = base.name[: -len(".safetensors")] if base.name.endswith(".safetensors") else base.stem
    return base.with_name(f"{stem}.codes.safetensors"), base.with_name(f"{stem}.decoded.wav")


def _check_side(path: Path, args: argparse.Namespace, inputs: list[str]) -> None:
    from polyquant.artifact import ArtifactError, check_target

    try:
        check_target(path, force=getattr(args, "force", False), inputs=inputs)
    except ArtifactError as e:
        raise UsageError(str(e)) from None


def _encode_decode(codec: nn.Module, wav: Tensor, num_quantizers: int | None = None) -> tuple[Tensor, Tensor]:
    """codes (1, T', ...) of the first ``num_quantizers`` stages (default all) and the decoded (1, 1, T) of a (1, T)
    wav."""
    device = next(codec.parameters()).device
    x = wav[None].to(device)
    with torch.no_grad():
        codes = codec.encode(x, num_quantizers)
        y = codec.decode(codes)[..., : x.shape[-1]]
    return codes.cpu(), y.cpu()


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """With --input: encode and decode it, write the packed codes and the decoded wav beside --out, print the bitrate
    and the reconstruction's mel distance / SI-SDR beside the float codec's."""
    wav = inputs.evaluation
    codec = qm.model
    if wav is None:
        print(f"bottleneck: {type(codec.quantizer).__name__}; pass --input WAV to encode a file")
        return
    codes_path, wav_path = _side_paths(args.out, args.input)
    for p in (codes_path, wav_path):
        _check_side(p, args, [args.input])
    codes, y = _encode_decode(codec, wav)
    _, y_float = _encode_decode(inputs.model, wav)
    x = wav[None]
    meta = {"sample_rate": codec.sample_rate, "hop": codec.hop, "num_samples": int(wav.shape[-1]),
            "model": qm.model_config, "method": qm.method}
    save_codes(codes_path, codes, codec.codebook_size, meta)
    write_wav(wav_path, y[0], codec.sample_rate)
    print(f"{args.input}: {codec.code_bitrate(codes) / 1000:.2f} kbps, codes {tuple(codes.shape)} -> {codes_path} "
          f"({codes_path.stat().st_size:,} bytes), decoded -> {wav_path}")
    print(f"mel distance {mel_distance(y, x):.3f} (shipped codec {mel_distance(y_float, x):.3f}), "
          f"SI-SDR {si_sdr(y, x):.2f} dB (shipped codec {si_sdr(y_float, x):.2f} dB)")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant load`` for audio artifacts."""
    parser.add_argument("--codes", default=None, metavar="FILE", help="decode this code file (written by quantize)")
    parser.add_argument("--input", default=None, metavar="WAV", help="encode and decode this WAV file")
    parser.add_argument("--levels", type=int, default=None,
                        help="decode from the first N residual levels only (bitrate scalability; rvq / grvq)")
    parser.add_argument("--wav-out", default=None, metavar="WAV", help="where the decoded audio goes "
                        "(default: beside the file: CODES.wav for --codes, INPUT.decoded.wav for --input)")
    parser.add_argument("--downmix", action="store_true", help="average a multi-channel --input to mono")


def _stages(quantizer: nn.Module) -> int:
    """Residual levels of an RVQ bottleneck (per group of a GRVQ); 0 for any other."""
    rvq = quantizer.quantizers[0] if isinstance(quantizer, GroupedResidualVQ) else quantizer
    return rvq.num_quantizers if isinstance(rvq, ResidualVQ) else 0


def _check_levels(levels: int | None, quantizer: nn.Module, available: int) -> None:
    """``UsageError`` unless --levels is absent or names 1..available residual levels of an RVQ / GRVQ."""
    if levels is None:
        return
    if isinstance(quantizer, ProjectedFSQ):
        raise UsageError("--levels: an FSQ bottleneck has no residual levels")
    if not 1 <= levels <= available:
        raise UsageError(f"--levels must be in [1, {available}], got {levels}")


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: what was restored (bitrate, resident bytes, packing); --codes / --input: decode to a wav."""
    from polyquant.packed import resident_bytes

    codec = qm.model
    kind = type(codec.quantizer).__name__
    line = f"restored audio/{qm.method}: bottleneck {kind}, resident {resident_bytes(codec) / 2**20:.2f} MiB"
    if qm.packing is not None:
        line += f"; packed {sorted(set(qm.packing.packed.values())) or 'nothing'}"
        if qm.packing.kept:
            line += f"; kept float: {'; '.join(f'{k}: {v}' for k, v in sorted(qm.packing.kept.items()))}"
    print(line)
    if args.codes is None and args.input is None:
        return 0
    if args.codes is not None and args.input is not None:
        raise UsageError("give --codes or --input, not both")
    if args.codes is not None:
        try:
            codes, header = load_codes(args.codes)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--codes {e}") from None
        if header.get("sample_rate") != codec.sample_rate or header.get("hop") != codec.hop:
            raise UsageError(f"--codes {args.codes}: codes of a {header.get('sample_rate')} Hz / hop "
                             f"{header.get('hop')} codec; this one runs at {codec.sample_rate} Hz / hop {codec.hop}")
        _check_levels(args.levels, codec.quantizer, codes.shape[-1])
        codes = codes if args.levels is None else codes[..., : args.levels]
        out = Path(args.wav_out) if args.wav_out else Path(args.codes).with_suffix(".wav")
        _check_side(out, args, [args.codes])
        device = next(codec.parameters()).device
        try:
            with torch.no_grad():
                y = codec.decode(codes.to(device))[..., : int(header.get("num_samples", 1 << 62))].cpu()
        except ValueError as e:
            raise UsageError(f"--codes {args.codes}: {e}") from None
        write_wav(out, y[0], codec.sample_rate)
        print(f"decoded {tuple(codes.shape)} codes ({codec.code_bitrate(codes) / 1000:.2f} kbps) -> {out}")
        return 0
    wav = read_wav(args.input, codec.sample_rate, downmix=args.downmix)
    out = Path(args.wav_out) if args.wav_out else _side_paths(None, args.input)[1]
    _check_side(out, args, [args.input])
    _check_levels(args.levels, codec.quantizer, _stages(codec.quantizer))
    codes, y = _encode_decode(codec, wav, args.levels)  # the first levels' codes are a prefix of all the codes
    write_wav(out, y[0], codec.sample_rate)
    x = wav[None]
    print(f"{args.input}: {codec.code_bitrate(codes) / 1000:.2f} kbps, mel distance {mel_distance(y, x):.3f}, "
          f"SI-SDR {si_sdr(y, x):.2f} dB -> {out}")
    return 0
