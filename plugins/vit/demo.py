"""``polyquant demo vit``: AdaLog vs min-max on the shipped digits ViT and Q-HyViT vs its min-max hybrid baseline on
the shipped digits MobileViT hybrid, at W4A4: top-1 of the fake-quant model (simulated) and of the artifact loaded
back packed (real: weight codes in the CPU kernels), the artifact's bytes, ms per batch of the float and packed
models, and the figure of the digits ViT's top-1 accuracy vs bits (min-max W8A8..W3A3, AdaLog W6A6..W3A3).
Offline, about 50 s on one core (44 s of CPU time measured with one torch thread, plus imports), most of it
AdaLog's searches at three bit widths and Q-HyViT's."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polyquant.report import Figure, Section, Table, figure_png, pyplot

__all__ = ["run_demo"]

TIMED_BATCH = 64  # test images in the batch every forward is timed on


@dataclass
class _Row:
    """One table row: top-1 of the fake-quant model (the float model's for float) and of the packed load, the
    artifact's bytes (the float checkpoint's for float), ms per timed batch, seconds of one quantize run."""

    model: str
    method: str
    top1: float
    top1_packed: float | None
    nbytes: int
    ms: float
    seconds: float | None

    def cells(self, float_bytes: int) -> list[str]:
        packed = "-" if self.top1_packed is None else f"{self.top1_packed:.2f}"
        smaller = "-" if self.method == "float" else f"{float_bytes / self.nbytes:.1f}x"
        seconds = "-" if self.seconds is None else f"{self.seconds:.1f}"
        return [self.model, self.method, f"{self.top1:.2f}", packed, f"{self.nbytes:,}", smaller, f"{self.ms:.1f}",
                seconds]


def _bits_figure(float_top1: float, curves: dict[str, dict[int, float]], caption: str) -> Figure:
    """One panel: each method's top-1 against its bit width (WbAb), the float model as a horizontal line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    for (label, points), marker in zip(curves.items(), "os^v"):
        bits = sorted(points)
        ax.plot(bits, [points[b] for b in bits], marker=marker, label=label)
    ax.axhline(float_top1, color="gray", linestyle="--", label=f"float ({float_top1:.1f}%)")
    ticks = sorted({b for points in curves.values() for b in points})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"W{b}A{b}" for b in ticks])
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("digits ViT, 540 test images (fake-quant)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return figure_png(fig, "top-1 accuracy vs bits", caption)


def run_demo(wbits: int = 4, abits: int = 4, calib_size: int = 16, eq_n: int = 64,
             minmax_bits: Sequence[int] = (8, 6, 4, 3), adalog_bits: Sequence[int] = (6, 4, 3),
             hybrid: bool = True) -> Section:
    """Quantize the shipped digits ViT with AdaLog (one search round of ``eq_n`` candidates) and min-max, and (with
    ``hybrid``) the digits hybrid with Q-HyViT and ``hybrid_minmax``, all from ``calib_size`` training images;
    the table at W``wbits``A``abits`` (fake-quant and packed top-1 on the 540 held-out digits, artifact bytes, ms
    per batch), and the figure of the ViT's top-1 at ``minmax_bits`` / ``adalog_bits`` (WbAb), as a section."""
    import polyquant as pq
    from polyquant.demo import checkpoint_bytes, demo_progress, demo_threads, median_seconds, packed_copy

    from .adalog import AdaLogConfig
    from .baselines import MinMaxConfig
    from .data import DigitsData, calib_set, evaluate, load_digits_data
    from .models import build_model, input_spec
    from .qhyvit import HybridMinMaxConfig, QHyViTConfig

    table_bits = f"W{wbits}A{abits}"
    vit_runs = list(dict.fromkeys([*(("minmax", b, b) for b in minmax_bits), *(("adalog", b, b) for b in adalog_bits),
                                   ("adalog", wbits, abits), ("minmax", wbits, abits)]))
    steps = demo_progress(total=1 + len(vit_runs) + 1 + (3 if hybrid else 0) + 1)
    rows: list[_Row] = []
    float_bytes: dict[str, int] = {}
    with demo_threads(), tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def ms(model: nn.Module, x: torch.Tensor) -> float:
            with torch.no_grad():
                return 1000 * median_seconds(lambda: model(x))

        def float_row(label: str, model: nn.Module, data: DigitsData, x: torch.Tensor) -> _Row:
            float_bytes[label] = checkpoint_bytes(model.state_dict(), folder, label.replace(" ", "-") + "-float")
            return _Row(label, "float", evaluate(model, data), None, float_bytes[label], ms(model, x), None)

        def packed_row(label: str, method: str, qm: pq.QuantizedModel, top1: float, seconds: float, data: DigitsData,
                       x: torch.Tensor) -> _Row:
            packed, nbytes = packed_copy(qm, folder, f"{label.replace(' ', '-')}-{method}")
            return _Row(label, method, top1, evaluate(packed, data), nbytes, ms(packed, x), seconds)

        # digits ViT: every (method, bits) of the table and the figure, then the table's pair packed
        vit, _ = build_model("digits-vit")
        data = load_digits_data()
        x = data.x_test[:TIMED_BATCH]  # (64, 1, 32, 32)
        calib = [calib_set(calib_size, seed=0)]
        rows.append(float_row("digits ViT", vit, data, x))
        steps.update(1, step="digits ViT float")
        runs: dict[tuple[str, int, int], tuple[pq.QuantizedModel, float, float]] = {}  # -> (qm, top-1, seconds)
        for method, w, a in vit_runs:
            config = (AdaLogConfig(wbits=w, abits=a, calib_size=calib_size, search_round=1, eq_n=eq_n)
                      if method == "adalog" else MinMaxConfig(wbits=w, abits=a, calib_size=calib_size))
            t0 = time.perf_counter()
            qm = pq.quantize(vit, config, calib=calib, progress=False)
            seconds = time.perf_counter() - t0
            runs[method, w, a] = (qm, evaluate(qm.model, data), seconds)
            steps.update(1, step=f"{method} W{w}A{a}")
        for method in ("adalog", "minmax"):
            rows.append(packed_row("digits ViT", method, *runs[method, wbits, abits], data, x))
        steps.update(1, step=f"digits ViT {table_bits} packed")

        if hybrid:  # digits MobileViT hybrid: Q-HyViT against min-max with exactly its placement
            hyb, _ = build_model("digits-hybrid")
            size, chans = input_spec(hyb)
            hdata = load_digits_data(size, chans)
            hx = hdata.x_test[:TIMED_BATCH]
            hcalib = [calib_set(calib_size, 0, size, chans)]
            rows.append(float_row("digits hybrid", hyb, hdata, hx))
            steps.update(1, step="digits hybrid float")
            for method, hconfig in (("qhyvit", QHyViTConfig(wbits=wbits, abits=abits, calib_size=calib_size)),
                                    ("hybrid_minmax", HybridMinMaxConfig(wbits=wbits, abits=abits,
                                                                         calib_size=calib_size))):
                t0 = time.perf_counter()
                qm = pq.quantize(hyb, hconfig, calib=hcalib, progress=False)
                seconds = time.perf_counter() - t0
                rows.append(packed_row("digits hybrid", method, qm, evaluate(qm.model, hdata), seconds, hdata, hx))
                steps.update(1, step=f"digits hybrid {method}")
        threads = torch.get_num_threads()

    vit_float = rows[0].top1
    curves = {label: {w: acc for (m, w, a), (_, acc, _) in sorted(runs.items()) if m == method and w == a}
              for method, label in (("minmax", "min-max"), ("adalog", "AdaLog (one search round)"))}
    figure = _bits_figure(vit_float, curves, (
        f"Top-1 of the fake-quant digits ViT on the 540 held-out digits against its weight / activation bits, one "
        f"calibration set of {calib_size} training images; the dashed line is the float model. benchmarks/vit.md "
        "has 5 seeds, AdaLog's three search rounds and the other baselines."))
    steps.update(1, step="figure")

    header = ["model", "method", "top-1 % fake-quant", "top-1 % packed", "artifact bytes", "smaller than float",
              f"ms / batch of {TIMED_BATCH}", "quantize s (one run)"]
    table = Table(
        f"{table_bits}: simulated (fake-quant) vs real (saved, loaded back packed), 540 held-out digits",
        header, [r.cells(float_bytes[r.model]) for r in rows],
        note=("Simulated: the fake-quant model (float weights on the integer grid, float32). Real: the artifact "
              "(.safetensors) saved and loaded back packed (polyquant.load(mode='packed'): 4-bit weight codes in "
              "torch's int4 CPU GEMM, 8-bit in its int8 one, computing in bf16; the activation quantizers still run "
              "as fake-quant in float around them), so bf16 rounding can flip a few images either way. The float "
              "rows: top-1 and ms of the float model, bytes of its float32 safetensors checkpoint; their packed "
              "top-1 is '-' (no packed form). ms: one forward of a batch of "
              f"{TIMED_BATCH} test images, median of 5 after a warm-up, {threads} torch thread(s); the float rows "
              "time the float model, the others the packed one. The packed eager models are slower than float on "
              "these tiny models, as benchmarks/deploy.md measured too (vit/minmax 5.9 vs 14.1 ms, one thread), "
              "which also times them compiled and in ONNX Runtime. quantize s: the wall time of one "
              "polyquant.quantize call."))
    fig_rows = [[f"W{b}A{b}", *(f"{points[b]:.2f}" if b in points else "-" for points in curves.values())]
                for b in sorted({b for points in curves.values() for b in points}, reverse=True)]
    bits_table = Table("digits ViT top-1 % (fake-quant) vs bits: the figure's points",
                       ["bits", "min-max", "AdaLog"], fig_rows,
                       note="'-': not run (by default AdaLog is left out at W8A8, where min-max already matches "
                            "float; benchmarks/vit.md has it).")

    def top1(model: str, method: str) -> float:
        return next(r.top1 for r in rows if r.model == model and r.method == method)

    mm_curve, ada_curve = curves.values()
    lower = sorted(b for b in set(mm_curve) & set(ada_curve) if b < min(wbits, abits))  # bits both ran at
    headline = (f"digits ViT {table_bits}: AdaLog {runs['adalog', wbits, abits][1]:.1f}% vs min-max "
                f"{runs['minmax', wbits, abits][1]:.1f}% top-1 (float {vit_float:.1f}%)"
                + "".join(f", W{b}A{b}: {ada_curve[b]:.1f}% vs {mm_curve[b]:.1f}%" for b in lower[:1]))
    if hybrid:
        headline += (f"; digits hybrid {table_bits}: Q-HyViT {top1('digits hybrid', 'qhyvit'):.1f}% vs min-max "
                     f"{top1('digits hybrid', 'hybrid_minmax'):.1f}% (float {top1('digits hybrid', 'float'):.1f}%)")
    ada_row = next(r for r in rows if r.method == "adalog")
    headline += f"; AdaLog's packed artifact {float_bytes['digits ViT'] / ada_row.nbytes:.1f}x smaller than float"
    return Section(
        domain="vit",
        title=("AdaLog vs min-max on the shipped digits ViT"
               + (" and Q-HyViT vs min-max on the digits MobileViT hybrid" if hybrid else "")
               + f", {table_bits} (sklearn 8x8 digits at 32x32, {calib_size} calibration images, 540 test images)"),
        headline=headline,
        reduced=(f"one calibration set of {calib_size} images (benchmarks/vit.py: 5 seeds of 32), AdaLog with one "
                 f"search round of {eq_n} candidates (3 rounds of 128), Q-HyViT otherwise at its defaults, only the "
                 "min-max baselines (the benchmark adds percentile, log2, log-sqrt2 and twin-uniform)."),
        tables=[table, bits_table], figures=[figure],
        notes=["benchmarks/vit.md has 5 calibration seeds, W3A3 to W8A8 for every method and baseline on both "
               "models, KL to the float model and the artifact sizes; benchmarks/vit.py writes it."])


if __name__ == "__main__":
    print(run_demo())
