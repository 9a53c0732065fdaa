"""``polyquant demo ssm``: Quamba W8A8 beside naive, SmoothQuant and QuaRot W8A8 on the shipped byte-level Mamba-1
and Mamba-2, and on the Mamba-1's outlier-injected copy (offline, a few seconds)."""

from __future__ import annotations

import copy
import time

__all__ = ["run_demo"]


def run_demo(calib_batches: int = 4, eval_batches: int = 4, seq_len: int = 128) -> str:
    """Held-out bits per byte of float and every method on the three models (``calib_batches`` x (4, seq_len)
    stdlib-train bytes; ``eval_batches`` x (4, seq_len) stdlib-test bytes) as a table."""

    import polyquant as pq
    from polyquant.demo import demo_threads, text_table

    from .methods import METHODS
    from .models import SHIPPED, SHIPPED2, bits_per_byte, build_model, byte_batches, inject_outliers, text_bytes

    with demo_threads():
        calib = byte_batches(text_bytes("train"), batches=calib_batches, batch_size=4, seq_len=seq_len, seed=1)
        held_out = byte_batches(text_bytes("test"), batches=eval_batches, batch_size=4, seq_len=seq_len, seed=2)
        mamba1 = build_model({"name": SHIPPED})
        models = {"Mamba-1": mamba1, "Mamba-2": build_model({"name": SHIPPED2}),
                  "Mamba-1 + outliers": inject_outliers(copy.deepcopy(mamba1))}
        rows = []
        for label, model in models.items():
            fp = bits_per_byte(model, held_out)
            rows.append((label, "float", f"{fp:.4f}", "-", "-"))
            for method, cls in METHODS.items():
                t0 = time.perf_counter()
                q = pq.quantize(model, cls(), calib=calib, progress=False).model
                seconds = time.perf_counter() - t0
                bpb = bits_per_byte(q, held_out)
                rows.append((label, method, f"{bpb:.4f}", f"{100 * (bpb / fp - 1):+.2f}%", f"{seconds:.1f}"))
    header = ("model", "method", "bits/byte", "vs float", "calib s")
    title = (f"byte-level Mamba on Python stdlib sources ({calib_batches} x (4, {seq_len}) calibration bytes, "
             f"{eval_batches} x (4, {seq_len}) held-out bytes), W8A8 static per-tensor int8")
    note = ("Outliers: 4 of 128 SSM-input channels x30 per mixer; benchmarks/ssm.md has 3 seeds and the "
            "alpha sweep. Fake-quant simulation on the CPU.")
    return text_table(title, header, rows, note)


if __name__ == "__main__":
    print(run_demo())
