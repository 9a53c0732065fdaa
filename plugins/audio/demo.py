"""``polyquant demo audio``: the shipped 2 kbps codecs (EnCodec-style RVQ, HiFi-Codec-style GRVQ) level by level,
and the plugin's methods on the RVQ codec, on held-out synthetic audio: mel distance and SI-SDR of the fake-quant
codec (simulated) and of the artifact loaded back packed (real, the ptq methods), artifact bytes, the CPU time of
one decode, a spectrogram figure and the RVQ code usage per level (offline, one torch thread: about 15 s of CPU,
30 s wall on a busy 2-core machine)."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from polyquant.report import Section, Table, figure_png, pyplot

__all__ = ["run_demo", "spectrogram_figure", "code_usage_figure"]


def spectrogram_figure(rows: dict[str, Tensor], sample_rate: int = 16_000) -> object:
    """Log-magnitude spectrograms (label -> (T,) or (1, 1, T) audio), one panel per label, top to bottom, as a
    matplotlib figure."""
    plt = pyplot()

    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.1 * len(rows)), sharex=True, squeeze=False)
    for ax, (label, wav) in zip(axes[:, 0], rows.items()):
        x = wav.reshape(-1).float()
        spec = torch.stft(x, 512, 128, window=torch.hann_window(512), return_complex=True).abs()
        db = 20 * torch.log10(spec.clamp_min(1e-5))
        ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=float(db.max()),
                  extent=(0, len(x) / sample_rate, 0, sample_rate / 2000))
        ax.set_xlabel("time (s)")
        ax.set_ylabel("frequency (kHz)")
        ax.set_title(label, fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def _usage(codes: Tensor, k: int) -> tuple[Tensor, float, int]:
    """Share of frames (%) of each codebook entry, most used first, the perplexity and the entries used, for one
    level's codes (any shape)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=k).double()
    share = 100 * counts.sort(descending=True).values / counts.sum()
    p = share[share > 0] / 100
    return share, math.exp(float(-(p * p.log()).sum())), int((counts > 0).sum())


def code_usage_figure(codes: dict[str, Tensor], k: int) -> object:
    """One panel per codec: the share of frames of each used codebook entry, sorted by use (log-log), one line per
    RVQ level (codes (B, T', levels)); the legend has each level's perplexity and entries used."""
    plt = pyplot()
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(codes), figsize=(5 * len(codes), 3.6), squeeze=False, sharey=True)
    for ax, (label, c) in zip(axes[0], codes.items()):
        for level in range(c.shape[-1]):
            share, perplexity, used = _usage(c[..., level], k)
            ax.step(range(1, used + 1), share[:used].numpy(), where="mid",
                    label=f"level {level + 1}: perplexity {perplexity:.0f}, {used} of {k} used")
        ax.set_xscale("log")  # rank vs share on log-log axes: the head and the long tail both readable
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("codebook entry (sorted by use)")
        ax.set_ylabel("share of frames (%)")
        ax.set_title(f"{label}, {math.prod(c.shape[:-1])} held-out frames", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def run_demo(clips: int = 16, calib_clips: int = 64) -> Section:
    """Held-out reconstruction of the shipped codecs and of each method on ``clips`` synthetic 1 s clips (methods
    calibrated on ``calib_clips`` other clips): kbps, mel distance and SI-SDR fake-quant and packed, artifact bytes,
    ms per decode of one clip, quantize seconds; the spectrogram and code-usage figures; as a report section."""
    import polyquant as pq
    from polyquant.demo import checkpoint_bytes, demo_progress, demo_threads, median_seconds, packed_copy

    from .fsq import FSQConfig
    from .grvq import GRVQConfig
    from .methods import build_model, synthetic_batches
    from .metrics import mel_distance, si_sdr
    from .ptq import PTQConfig
    from .rvq import RVQConfig

    methods = {"rvq refit (2 kbps)": RVQConfig(), "grvq refit (2 kbps)": GRVQConfig(),
               "fsq baseline (2 kbps)": FSQConfig(), "ptq int8 weights": PTQConfig(),
               "ptq int4 weights": PTQConfig(weight_bits=4)}
    steps = demo_progress(total=2 + len(methods) + 1)
    codec_rows: list[list[str]] = []
    rows: list[list[str]] = []
    mel: dict[str, tuple[float, float | None]] = {}  # method -> (fake-quant, packed)
    # one torch thread: this codec's small convolutions and k-means++'s 1024 small steps per level ran 5-10x slower
    # on two threads of a busy 2-core machine (OpenMP waits), and one thread keeps the ms comparable
    with demo_threads(1), torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x = torch.cat(synthetic_batches(clips, seed=2024, seconds=1.0, batch_size=clips))  # (clips, 1, T)
        calib = synthetic_batches(calib_clips, seed=1, seconds=1.0, batch_size=8)
        one = x[:1]  # (1, 1, T): the clip every decode is timed on
        rvq, grvq = build_model({"name": "tiny-rvq"}), build_model({"name": "tiny-grvq"})
        shown = {"input": x[0]}
        usage: dict[str, Tensor] = {}
        for name, codec in (("tiny-rvq", rvq), ("tiny-grvq", grvq)):
            # RVQ codes are greedy, stage by stage: the first n levels of the full codes are the n-level encoding
            full = codec.encode(x)  # (B, T', levels) RVQ, (B, T', groups, levels) GRVQ
            for levels in ((1, 2, 4) if name == "tiny-rvq" else (1, 2)):
                codes = full[..., :levels]
                y = codec.decode(codes)[..., : x.shape[-1]]
                mel_y, sdr_y = mel_distance(y, x), si_sdr(y, x)
                codec_rows.append([name, str(levels), f"{codec.code_bitrate(codes) / 1000:.2f}", f"{mel_y:.3f}",
                                   f"{sdr_y:.2f}"])
            shown[f"{name} ({codec.code_bitrate(full) / 1000:.0f} kbps)"] = y[0]
            if name == "tiny-rvq":
                usage["tiny-rvq (shipped)"], fp_mel, fp_sdr = full, mel_y, sdr_y
            steps.update(1, step=name)
        float_bytes = checkpoint_bytes(rvq.state_dict(), folder, "float")  # EMA buffers included
        rvq_codes = rvq.encode(one)
        fp_ms = 1000 * median_seconds(lambda: rvq.decode(rvq_codes))
        rows.append(["tiny-rvq float (4 levels)", "2.00", f"{fp_mel:.3f}", "-", f"{fp_sdr:.2f}", "-",
                     f"{float_bytes:,}", f"{fp_ms:.0f}", "-"])
        bytes_of: dict[str, int] = {}
        for label, config in methods.items():
            t0 = time.perf_counter()
            qm = pq.quantize(rvq, config, calib=calib, progress=False)
            seconds = time.perf_counter() - t0
            q = qm.model
            codes = q.encode(x)
            y = q.decode(codes)[..., : x.shape[-1]]
            fake = (mel_distance(y, x), si_sdr(y, x))
            if isinstance(config, PTQConfig):  # int codes of the convolutions: the packed model decodes
                real, nbytes = packed_copy(qm, folder, label.replace(" ", "-"))
                y_real = real.decode(real.encode(x))[..., : x.shape[-1]]
                packed_cells = [f"{mel_distance(y_real, x):.3f}", f"{si_sdr(y_real, x):.2f}"]
                mel[label] = (fake[0], float(packed_cells[0]))
                if config.weight_bits == 4:
                    shown[f"tiny-rvq + {label}, packed"] = y_real[0]
            else:  # a refit bottleneck: float codebooks, float convolutions; the saved file is the artifact
                real, nbytes = q, pq.save(qm, folder / f"{label.split()[0]}.safetensors").stat().st_size
                packed_cells = ["-", "-"]
                mel[label] = (fake[0], None)
                if label.startswith("rvq"):
                    usage["tiny-rvq + rvq refit"] = codes
                if label.startswith("fsq"):
                    shown[f"tiny-rvq + {label}"] = y[0]
            one_codes = real.encode(one)
            ms = 1000 * median_seconds(lambda: real.decode(one_codes))
            bytes_of[label] = nbytes
            rows.append([f"tiny-rvq + {label}", f"{q.code_bitrate(codes) / 1000:.2f}", f"{fake[0]:.3f}",
                         packed_cells[0], f"{fake[1]:.2f}", packed_cells[1], f"{nbytes:,}", f"{ms:.0f}",
                         f"{seconds:.1f}"])
            steps.update(1, step=label)
        k = rvq.codebook_size
        usage_rows = []
        for label, c in usage.items():
            for level in range(c.shape[-1]):
                _, perplexity, used = _usage(c[..., level], k)
                usage_rows.append([label, str(level + 1), f"{used} of {k}", f"{perplexity:.0f}"])
        figures = [
            figure_png(spectrogram_figure(shown, rvq.sample_rate), "spectrograms",
                       f"one held-out clip, top to bottom: {', '.join(shown)}"),
            figure_png(code_usage_figure(usage, k), "code usage",
                       f"codebook entries of each RVQ level on the {clips} held-out clips, sorted by use; a level "
                       "that spreads its frames over more entries (higher perplexity) carries more bits"),
        ]
        steps.update(1, step="figures")
        threads = torch.get_num_threads()
    n_conv = sum(p.numel() for n, p in rvq.named_parameters() if not n.startswith("quantizer"))

    codec_table = Table(
        "the shipped codecs, level by level", ["codec", "levels", "kbps", "mel distance", "SI-SDR dB"], codec_rows,
        "tiny-rvq: RVQ 4 x 1024 (EnCodec-style); tiny-grvq: GRVQ 2 groups x 2 levels x 1024 (HiFi-Codec-style); "
        "decoding the first levels only. Lower mel distance and higher SI-SDR are better.")
    header = ["method", "kbps", "mel fake-quant", "mel packed", "SI-SDR fake-quant dB", "SI-SDR packed dB",
              "artifact bytes", "ms / decode (1 s clip)", "quantize s (one run)"]
    note = ("Simulated: the quantized codec as polyquant.quantize returns it (ptq: fake-quant convolutions, float "
            "weights on the int grid). Real (ptq): the artifact saved, then loaded back packed (PackedConv: int8 / "
            "int4 codes decoded to float at each call, then the float convolution), encoding and decoding the same "
            "clips. Refit rows (rvq / grvq / fsq): '-' for packed: their artifact is a new float bottleneck "
            "(codebooks or projection) beside the float convolutions, so no weight is quantized and a packed load "
            "is the same float model; their bytes are the saved .safetensors file and their ms the model itself. "
            "Float row: the shipped tiny-rvq at 4 levels, its bytes the float32 safetensors state dict "
            f"({n_conv / 1000:.0f} k convolution parameters plus the 4 x 1024 x 64 codebook and its EMA sums, 2 MB, "
            "which the rvq refit and ptq artifacts keep in float32 too). ms: decode of one 1 s clip's codes "
            f"(codebook lookup + decoder), median of 5 after a warm-up on {threads} torch thread(s), CPU.")
    table = Table(f"methods on tiny-rvq: simulated vs real ({clips} held-out clips, calibrated on {calib_clips})",
                  header, rows, note)
    usage_table = Table("code usage on the held-out clips", ["codec", "RVQ level", "entries used", "perplexity"],
                        usage_rows, f"{math.prod(usage['tiny-rvq (shipped)'].shape[:-1])} held-out frames per "
                        "level; perplexity exp(H) of the entries' shares (at most the number of frames).")
    int4 = mel["ptq int4 weights"]
    headline = (f"mel distance (lower is better) at 2 kbps: float tiny-rvq {fp_mel:.3f}; ptq int8 "
                f"{mel['ptq int8 weights'][0]:.3f} (packed {mel['ptq int8 weights'][1]:.3f}), int4 {int4[0]:.3f} "
                f"(packed {int4[1]:.3f}, {float_bytes / bytes_of['ptq int4 weights']:.1f}x smaller file); rvq refit "
                f"{mel['rvq refit (2 kbps)'][0]:.3f}, fsq baseline {mel['fsq baseline (2 kbps)'][0]:.3f}")
    return Section(
        domain="audio",
        title=(f"tiny 16 kHz codecs (hop 320, 50 frames/s, 2 kbps), {clips} held-out synthetic 1 s clips; the "
               f"methods on tiny-rvq calibrated on {calib_clips} other clips"),
        headline=headline,
        reduced=(f"{clips} held-out clips and {calib_clips} calibration clips, one seed, no PESQ / STOI "
                 "(benchmarks/audio.py: 16 mixed and 16 speech-like held-out clips, 64 calibration clips, 3 seeds, "
                 "PESQ-WB / STOI and the quantizer-only comparison)"),
        tables=[codec_table, table, usage_table], figures=figures,
        notes=["benchmarks/audio.md has 3 seeds, PESQ-WB / STOI and the quantizer-only comparison with "
               "vector-quantize-pytorch."])


if __name__ == "__main__":
    print(run_demo())
