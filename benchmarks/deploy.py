"""Deployment paths side by side, in one run: each plugin's packed model eager, compiled (``torch.compile``,
inductor) and exported to ONNX with Q / DQ (``polyquant.onnx_export``) run in ONNX Runtime, beside the float model.

    python benchmarks/deploy.py                                  # CPU, one thread
    python benchmarks/deploy.py --cases vit/minmax lidar/lidarptq --reps 50

Each case is a plugin's contract example (``example(method)``: the shipped model, a small batch of its inputs):
quantized, saved, loaded packed. Columns:
  - float ms: the float model, eager; packed ms: the packed model (default CPU compute dtype bf16: torch's int4 /
    int8 GEMMs), eager; compiled ms: the packed model under ``torch.compile`` (fullgraph where the example allows;
    compile s: the first call), error vs eager; ONNX ms: ONNX Runtime on the export of the packed model (fp32
    ``cpu_dtype``: the fake-quant values) with ``MatMulNBits`` activations in fp32 (``accuracy_level`` 1), error vs
    the packed fp32 model; ORT int8 ms: the same file with ONNX Runtime's default level 4 (MatMulNBits rounds its
    activations to int8 per block), error vs the packed fp32 model.
  - bytes: the artifact, the quantized ONNX file, the float model's ONNX file.
  - vit cases: top-1 accuracy on the digits test set (fake-quant, packed, ONNX Runtime).

Latency: median of ``--reps`` timed calls after warm-up, ``time.perf_counter``, one torch thread and one ONNX
Runtime thread. Errors: relative L2 over the example's outputs. The JSON starts with ``_env.environment``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from _env import environment, write_report
from torch import nn

import polyquant as pq
from polyquant.onnx_export import export_onnx
from polyquant.plugins import load

CASES = ["vit/minmax", "vit/adalog", "vit/qhyvit", "lidar/lidarptq", "diffusion/int8", "audio/ptq", "ssm/quamba"]


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def call(model: Callable[..., Any], inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def export(model: nn.Module, inputs: Any, path: Path) -> int:
    if isinstance(inputs, dict):
        return export_onnx(model, (), path, kwargs=inputs).bytes
    return export_onnx(model, (inputs,), path).bytes


class OrtModel:
    """An ONNX file in one ONNX Runtime session (one thread), called like the model."""

    def __init__(self, path: Path, accuracy_level: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["QDQS8ToU8Transformer"])  # see run_onnx

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        values = list(args) + list(kwargs.values())
        feed = {i.name: v.numpy() for i, v in zip(self.session.get_inputs(), values)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def vit_accuracy(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], size: int, chans: int) -> dict[str, float]:
    from polyquant.plugins.vit.data import load_digits_data

    data = load_digits_data(size, chans)
    out = {}
    for name, model in models.items():
        with torch.no_grad():
            pred = torch.cat([model(data.x_test[i:i + 64]).argmax(-1) for i in range(0, len(data.x_test), 64)])
        out[name] = round(float((pred == data.y_test).float().mean()), 4)
    return out


def run_case(case: str, reps: int, folder: Path) -> dict[str, Any]:
    plugin, method = case.split("/")
    ex = load(plugin).example(method)
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False)
    art = pq.save(qm, folder / f"{plugin}_{method}.safetensors")
    packed = pq.load(art, mode="packed").model
    packed32 = pq.load(art, mode="packed", cpu_dtype=torch.float32).model
    x = ex.inputs
    row: dict[str, Any] = {"case": case, "artifact_bytes": art.stat().st_size,
                           "graph_breaks": ex.graph_breaks}
    row["float_ms"] = median_ms(lambda: call(ex.model, x), reps)
    eager = call(packed, x)
    row["packed_ms"] = median_ms(lambda: call(packed, x), reps)
    torch._dynamo.reset()
    compiled = torch.compile(packed, fullgraph=ex.graph_breaks is None)
    t = time.perf_counter()
    first = call(compiled, x)
    row["compile_s"] = round(time.perf_counter() - t, 1)
    row["compiled_ms"] = median_ms(lambda: call(compiled, x), reps)
    row["compiled_err"] = rel(first, eager)
    torch._dynamo.reset()
    ref32 = call(packed32, x)
    row["onnx_bytes"] = export(packed32, x, folder / f"{plugin}_{method}.onnx")
    row["float_onnx_bytes"] = export(ex.model, x, folder / f"{plugin}_{method}_float.onnx")
    for level, key in ((1, "onnx"), (4, "ort_int8")):
        session = OrtModel(folder / f"{plugin}_{method}.onnx", level)
        row[f"{key}_ms"] = median_ms(lambda: call(session, x), reps)
        row[f"{key}_err"] = rel(call(session, x), ref32)
    float_session = OrtModel(folder / f"{plugin}_{method}_float.onnx", 1)
    row["float_onnx_ms"] = median_ms(lambda: call(float_session, x), reps)
    if plugin == "vit":
        from polyquant.plugins.vit.models import input_spec

        size, chans = input_spec(ex.model)
        row["accuracy"] = vit_accuracy({"float": ex.model.eval(), "fake": qm.model, "packed": packed,
                                        "onnx": OrtModel(folder / f"{plugin}_{method}.onnx", 1)}, size, chans)
    for k, v in list(row.items()):
        if isinstance(v, float) and k.endswith("_ms"):
            row[k] = round(v, 3)
        elif isinstance(v, float) and k.endswith("_err"):
            row[k] = float(f"{v:.2e}")
    print(row, flush=True)
    return row


def table(report: dict[str, Any]) -> str:
    """The markdown page of a report: where it ran, then one row per case."""
    env, rows = report["env"], report["rows"]
    lines = ["# Deployment paths: eager, compiled, ONNX (`benchmarks/deploy.py`)", "",
             f"git {env['git_sha']}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, onnxruntime "
             f"{report['onnxruntime']}, {env['device_name']}, {report['threads']} thread, median of "
             f"{report['reps']} calls. Errors: relative L2 against the eager packed model (compiled) or the packed "
             "fp32 model (ONNX). Sizes in KB.", "","| case | float ms | packed ms | compiled ms (compile s) | compiled err | ONNX ms | ONNX err | "
             "ORT int8 ms | ORT int8 err | float ONNX ms | artifact / ONNX / float ONNX KB | accuracy float / "
             "fake / packed / ONNX |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r.get("accuracy")
        acc_s = " / ".join(f"{acc[k]:.3f}" for k in ("float", "fake", "packed", "onnx")) if acc else "-"
        graph = "" if r["graph_breaks"] is None else " (breaks)"
        lines.append(
            f"| {r['case']} | {r['float_ms']} | {r['packed_ms']} | {r['compiled_ms']} ({r['compile_s']}){graph} | "
            f"{r['compiled_err']:.1e} | {r['onnx_ms']} | {r['onnx_err']:.1e} | {r['ort_int8_ms']} | "
            f"{r['ort_int8_err']:.1e} | {r['float_onnx_ms']} | {r['artifact_bytes'] // 1024} / "
            f"{r['onnx_bytes'] // 1024} / {r['float_onnx_bytes'] // 1024} | {acc_s} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=CASES)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results_cpu" / "deploy.json")
    parser.add_argument("--table", type=Path, default=Path(__file__).parent / "deploy.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_case(case, args.reps, Path(tmp)) for case in args.cases]
    report = {"env": environment("cpu"), "threads": 1, "onnxruntime": ort.__version__, "reps": args.reps,
              "rows": rows}
    write_report(report, args.out, args.table, table(report))
    print(table(report))


if __name__ == "__main__":
    main()
