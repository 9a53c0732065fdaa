"""``polyquant demo vit``: AdaLog vs min-max at W4A4 on the shipped digits ViT (offline, well under a minute)."""

from __future__ import annotations

import time

__all__ = ["run_demo"]


def run_demo(wbits: int = 4, abits: int = 4, calib_size: int = 16) -> str:
    """Quantize the shipped digits ViT with AdaLog (one search round, ``calib_size`` images) and with min-max
    uniform PTQ, evaluate both on the 540 held-out digits and return a table."""

    import polyquant as pq
    from polyquant.demo import demo_threads, text_table

    from .adalog import AdaLogConfig
    from .baselines import MinMaxConfig
    from .data import calib_set, evaluate
    from .models import build_model

    with demo_threads():
        model, _ = build_model("digits-vit")
        calib = [calib_set(calib_size, seed=0)]
        rows = [("float", "-", f"{evaluate(model):.2f}", "-")]
        t0 = time.perf_counter()
        q = pq.quantize(model, AdaLogConfig(wbits=wbits, abits=abits, calib_size=calib_size, search_round=1),
                        calib=calib, progress=False).model
        rows.append(("adalog", f"W{wbits}A{abits}", f"{evaluate(q):.2f}", f"{time.perf_counter() - t0:.1f}"))
        t0 = time.perf_counter()
        q = pq.quantize(model, MinMaxConfig(wbits=wbits, abits=abits, calib_size=calib_size), calib=calib,
                        progress=False).model
        rows.append(("minmax", f"W{wbits}A{abits}", f"{evaluate(q):.2f}", f"{time.perf_counter() - t0:.1f}"))
    header = ("method", "bits", "top-1 %", "calib s")
    title = f"digits ViT (sklearn 8x8 digits at 32x32, 540 test images, {calib_size} calibration images)"
    note = "AdaLog: one FPCS round here (benchmarks/vit.py runs the full three); fake-quant simulation."
    return text_table(title, header, rows, note)


if __name__ == "__main__":
    print(run_demo())
