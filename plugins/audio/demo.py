"""``polyquant demo audio``: the shipped 2 kbps codecs (EnCodec-style RVQ, HiFi-Codec-style GRVQ) and the plugin's
methods on held-out synthetic audio (offline, ~20 s), with a spectrogram plot of one clip (input and decodes)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["run_demo", "save_spectrograms"]


def save_spectrograms(rows: dict[str, Tensor], path: str | Path, sample_rate: int = 16_000) -> Path:
    """A PNG of log-magnitude spectrograms (label -> (T,) or (1, 1, T) audio), one panel per label, top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.8 * len(rows)), sharex=True, squeeze=False)
    for ax, (label, wav) in zip(axes[:, 0], rows.items()):
        x = wav.reshape(-1).float()
        spec = torch.stft(x, 512, 128, window=torch.hann_window(512), return_complex=True).abs()
        db = 20 * torch.log10(spec.clamp_min(1e-5))
        ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=float(db.max()),
                  extent=(0, len(x) / sample_rate, 0, sample_rate / 2000))
        ax.set_ylabel("kHz")
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_demo(clips: int = 8, calib_clips: int = 32, out_dir: str | None = None) -> str:
    """Held-out reconstruction of the shipped codecs and of each method on ``clips`` synthetic 1 s clips: kbps, mel
    distance, SI-SDR, calibration seconds; the spectrogram plot goes to ``out_dir`` (default: a new temporary
    folder), its path in the report."""
    import polyquant as pq
    from polyquant.demo import demo_threads, text_table

    from .fsq import FSQConfig
    from .grvq import GRVQConfig
    from .methods import build_model, synthetic_batches
    from .metrics import mel_distance, si_sdr
    from .ptq import PTQConfig
    from .rvq import RVQConfig

    rows = []
    with demo_threads(), torch.no_grad():
        x = torch.cat(synthetic_batches(clips, seed=2024, seconds=1.0, batch_size=clips))
        calib = synthetic_batches(calib_clips, seed=1, seconds=1.0, batch_size=8)
        rvq, grvq = build_model({"name": "tiny-rvq"}), build_model({"name": "tiny-grvq"})
        shown = {"input": x[0]}
        for name, codec in (("tiny-rvq", rvq), ("tiny-grvq", grvq)):
            for levels in ((1, 2, 4) if name == "tiny-rvq" else (1, 2)):
                codes = codec.encode(x, levels)
                y = codec.decode(codes)[..., : x.shape[-1]]
                rows.append((f"{name}, first {levels} level(s)", f"{codec.code_bitrate(codes) / 1000:.2f}",
                             f"{mel_distance(y, x):.3f}", f"{si_sdr(y, x):.2f}", "-"))
                if levels == (4 if name == "tiny-rvq" else 2):
                    shown[f"{name} ({codec.code_bitrate(codes) / 1000:.0f} kbps)"] = y[0]
        methods = {"rvq refit (2 kbps)": (rvq, RVQConfig()), "grvq refit (2 kbps)": (rvq, GRVQConfig()),
                   "fsq baseline (2 kbps)": (rvq, FSQConfig()), "ptq int8 weights": (rvq, PTQConfig()),
                   "ptq int4 weights": (rvq, PTQConfig(weight_bits=4))}
        for label, (codec, config) in methods.items():
            t0 = time.perf_counter()
            q = pq.quantize(codec, config, calib=calib, progress=False).model
            seconds = time.perf_counter() - t0
            codes = q.encode(x)
            y = q.decode(codes)[..., : x.shape[-1]]
            rows.append((f"tiny-rvq + {label}", f"{q.code_bitrate(codes) / 1000:.2f}", f"{mel_distance(y, x):.3f}",
                         f"{si_sdr(y, x):.2f}", f"{seconds:.1f}"))
            if label.startswith("fsq"):
                shown[f"tiny-rvq + {label}"] = y[0]
    path = save_spectrograms(shown, Path(out_dir or tempfile.mkdtemp(prefix="polyquant-audio-")) / "spectrograms.png")
    title = (f"tiny 16 kHz codecs (0.57 M parameters, hop 320), {clips} held-out synthetic 1 s clips; methods "
             f"calibrated on {calib_clips} other clips")
    note = (f"Spectrograms (top to bottom: {', '.join(shown)}): {path}. Lower mel distance and higher SI-SDR are "
            "better. benchmarks/audio.md has 3 seeds, PESQ / STOI and the quantizer-only comparison with "
            "vector-quantize-pytorch.")
    return text_table(title, ("codec", "kbps", "mel distance", "SI-SDR dB", "calib s"), rows, note)


if __name__ == "__main__":
    print(run_demo())
