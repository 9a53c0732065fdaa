"""``polyquant demo ssm``: Quamba W8A8 beside naive, SmoothQuant and QuaRot W8A8 on the shipped byte-level Mamba-1
and Mamba-2, and on the Mamba-1's outlier-injected copy: held-out bits per byte of the fake-quant model (simulated)
and of the artifact loaded back packed (real: int8 codes, the CPU kernels), the artifact's bytes, the CPU time of
one forward, and the SQNR of every mixer's output (offline, one torch thread: about 11 s of CPU, 25 s wall on a busy
2-core machine)."""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.report import Section, Table, figure_png, pyplot

__all__ = ["run_demo"]

MODELS = ("Mamba-1", "Mamba-2", "Mamba-1 + outliers")


def _pass(model: nn.Module, names: list[str], held_out: list[Tensor]) -> tuple[float, dict[str, Tensor]]:
    """Held-out bits per byte and every named mixer's output (concatenated over the batches), from one pass."""
    from polyquant.capture import capture

    caps = capture(model, ["", *names], held_out, inputs=False, outputs=True, offload=None)
    logits = caps[""].output()[:, :-1].float()  # (N, L-1, 256)
    ids = torch.cat(held_out)[:, 1:]  # (N, L-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="mean")
    return float(nll) / math.log(2), {n: caps[n].output() for n in names}


def _float_state(model: nn.Module) -> dict[str, Tensor]:
    """The float model's state dict with a tied lm_head stored once, as the shipped checkpoints are."""
    tied = getattr(model.lm.config, "tie_word_embeddings", False)
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm.lm_head.weight")}


def _sqnr_figure(sqnr: dict[str, dict[str, list[float]]]) -> object:
    """One panel per model: each method's mixer-output SQNR (dB) against the mixer's layer index."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(sqnr), figsize=(4.2 * len(sqnr), 3.4), squeeze=False, sharey=True)
    for ax, (label, per_method) in zip(axes[0], sqnr.items()):
        # open markers of falling size and distinct dashes: methods of equal SQNR (often naive and smoothquant)
        # stay visible on top of each other
        for i, (method, values) in enumerate(per_method.items()):
            ax.plot(range(len(values)), values, marker="osD^"[i % 4], markersize=9 - 1.5 * (i % 4), fillstyle="none",
                    linestyle=("-", "--", ":", "-.")[i % 4], label=method)
        layers = max(len(v) for v in per_method.values())
        ax.set_xticks(range(layers))
        ax.set_xlabel("mixer layer")
        ax.set_ylabel("output SQNR (dB)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_demo(calib_batches: int = 4, eval_batches: int = 4, seq_len: int = 128) -> Section:
    """Every method on the three models (``calib_batches`` x (4, seq_len) stdlib-train bytes to calibrate,
    ``eval_batches`` x (4, seq_len) stdlib-test bytes held out): bits per byte fake-quant and packed, artifact
    bytes, ms per forward of one (4, seq_len) batch, and the per-layer SQNR figure, as a report section."""
    import polyquant as pq
    from polyquant.demo import checkpoint_bytes, demo_progress, demo_threads, median_seconds, packed_copy
    from polyquant.metrics import sqnr

    from .methods import METHODS
    from .mixer import mixers
    from .mixer2 import mamba2_mixers
    from .models import SHIPPED, SHIPPED2, bits_per_byte, build_model, byte_batches, inject_outliers, text_bytes

    steps = demo_progress(total=len(MODELS) * (1 + len(METHODS)) + 1)
    rows: list[list[str]] = []
    results: dict[str, dict[str, tuple[float, float, int]]] = {}  # model -> method -> (bpb fake, bpb packed, bytes)
    sqnr_db: dict[str, dict[str, list[float]]] = {}
    # one torch thread: the scan's per-step small ops ran about 10x slower on two threads of a busy 2-core machine
    # (OpenMP waits), and one thread keeps the ms comparable
    with demo_threads(1), tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folder = Path(tmp)
        calib = byte_batches(text_bytes("train"), batches=calib_batches, batch_size=4, seq_len=seq_len, seed=1)
        held_out = byte_batches(text_bytes("test"), batches=eval_batches, batch_size=4, seq_len=seq_len, seed=2)
        timed = held_out[0]  # (4, seq_len): the batch every forward is timed on
        mamba1 = build_model({"name": SHIPPED})
        models = {"Mamba-1": mamba1, "Mamba-2": build_model({"name": SHIPPED2}),
                  "Mamba-1 + outliers": inject_outliers(copy.deepcopy(mamba1))}
        for label, model in models.items():
            slug = label.lower().replace(" + ", "-").replace(" ", "-")
            names = [*mixers(model), *mamba2_mixers(model)]
            fp, fp_out = _pass(model, names, held_out)
            fp_bytes = checkpoint_bytes(_float_state(model), folder, f"{slug}-float")
            fp_ms = 1000 * median_seconds(lambda: model(timed))
            rows.append([label, "float", f"{fp:.4f}", "-", "-", f"{fp_bytes:,}", f"{fp_ms:.0f}", "-"])
            results[label] = {"float": (fp, fp, fp_bytes)}
            sqnr_db[label] = {}
            steps.update(1, step=f"{label} float")
            for method, cls in METHODS.items():
                t0 = time.perf_counter()
                qm = pq.quantize(model, cls(), calib=calib, progress=False)
                seconds = time.perf_counter() - t0
                bpb, q_out = _pass(qm.model, names, held_out)
                sqnr_db[label][method] = [sqnr(q_out[n], fp_out[n]) for n in names]
                packed, nbytes = packed_copy(qm, folder, f"{slug}-{method}", model=model)  # restored on a copy
                bpb_packed = bits_per_byte(packed, held_out)
                ms = 1000 * median_seconds(lambda: packed(timed))
                rows.append([label, method, f"{bpb:.4f}", f"{bpb_packed:.4f}", f"{100 * (bpb / fp - 1):+.2f}%",
                             f"{nbytes:,}", f"{ms:.0f}", f"{seconds:.2f}"])
                results[label][method] = (bpb, bpb_packed, nbytes)
                steps.update(1, step=f"{label} {method}")
        figure = figure_png(
            _sqnr_figure(sqnr_db), "per-layer SQNR",
            "SQNR of each mixer's output, fake-quant vs float model on the same held-out bytes (end to end: layer "
            "1 sees layer 0's error); higher is better.")
        steps.update(1, step="figure")
        threads = torch.get_num_threads()
    out = results["Mamba-1 + outliers"]
    ratio = results["Mamba-1"]["float"][2] / results["Mamba-1"]["quamba"][2]
    n_params = sum(p.numel() for p in mamba1.parameters())

    header = ["model", "method", "bpb fake-quant", "bpb packed", "vs float (fake-quant)", "artifact bytes",
              f"ms / forward (4, {seq_len})", "quantize s (one run)"]
    note = ("Bits per byte (bpb, lower is better) on the same held-out bytes. Simulated: the fake-quant model (float "
            "weights on the int8 grid, quantize-dequantize activations, float32). Real: the artifact saved, then "
            "loaded back packed (int8 codes: in_proj / out_proj int8 x int8 torch._int_mm, x_proj / dt_proj torch's "
            "int8 weight-only GEMM computing in bf16, conv1d decoded to float; the SSM scan and its activation points "
            "stay float quantize-dequantize); its bpb and ms per forward are the packed model's. Float row: its bpb "
            "and ms are the float model's, its bytes the float32 safetensors checkpoint (tied lm_head stored once); "
            "bpb packed '-': the float model has no packed form. Artifact bytes: the .safetensors file; the "
            "embedding, the tied lm_head (stored twice), norms, A_log, D and biases stay float32, which on the "
            f"{n_params / 1000:.0f} k-parameter Mamba-1 leaves the artifact only {ratio:.1f}x smaller. ms: median of 5 "
            f"after a warm-up on {threads} torch thread(s), CPU; the quantized models run the plugin's pure-torch "
            "mixers (a sequential scan, one step per byte), the float rows transformers' (Mamba-1 also sequential; "
            "Mamba-2 its chunked scan, hence that float row's lower ms). Outliers: 4 of 128 SSM-input channels x30 "
            "per mixer.")
    table = Table(f"W8A8 on the byte-level Mamba: simulated vs real ({calib_batches} x (4, {seq_len}) calibration "
                  f"bytes, {eval_batches} x (4, {seq_len}) held-out bytes)", header, rows, note)
    headline = (f"Mamba-1 + outliers: quamba {out['quamba'][0]:.3f} bpb vs naive {out['naive'][0]:.3f}, "
                f"smoothquant {out['smoothquant'][0]:.3f}, quarot {out['quarot'][0]:.3f} (float "
                f"{out['float'][0]:.3f}); packed quamba {out['quamba'][1]:.3f}; artifact {ratio:.1f}x smaller "
                "than the float checkpoint")
    return Section(
        domain="ssm",
        title=("Quamba, naive, SmoothQuant and QuaRot W8A8 (static per-tensor int8) on the shipped byte-level "
               "Mamba-1, Mamba-2 and an outlier-injected Mamba-1, Python stdlib sources"),
        headline=headline,
        reduced=(f"{calib_batches} x (4, {seq_len}) calibration and {eval_batches} x (4, {seq_len}) held-out bytes, "
                 "one seed and the paper's alpha only (benchmarks/ssm_quamba.py: 8 x (4, 128) calibration windows, "
                 "16 x (8, 128) held-out, 3 seeds, the alpha sweep and ablations)"),
        tables=[table], figures=[figure],
        notes=["benchmarks/ssm.md has 3 seeds, the alpha sweep, KL to the float model and per-layer SQNR; "
               "benchmarks/ssm_quamba.py writes it."])


if __name__ == "__main__":
    print(run_demo())
