"""Forged artifacts of every plugin: a real artifact with one tensor replaced (another shape, dtype, a NaN / Inf /
3e38 / 0 / -1 value, an out-of-range code), saved again with valid checksums (anyone can recompute them).
``polyquant.load`` in both modes must refuse each with ``ArtifactError``, or load a model whose outputs on the
example inputs are finite: never a raw torch error, never a NaN output. A store (embeddings) checks its rows where
a search reads them (bounded cost on a memory-mapped store): a ``ValueError`` naming the damaged tensor at the call
counts as refused. A seeded sample of the mutations per method keeps the run bounded; ``FORGED_SAMPLE`` mutations of
each tensor kind (codes, scales, float tensors) are tried."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import polyquant as pq
from polyquant import artifact
from polyquant.nn import tensors_in
from polyquant.plugins import discover, load

FORGED_SAMPLE = 8  # mutations per method and mode (seeded)


def _methods() -> list[tuple[str, str]]:
    """Each plugin's first method (the contract test covers the others' restore on real artifacts)."""
    return [(name, next(iter(info.spec.methods))) for name, info in discover().items()
            if info.available and info.spec is not None and info.spec.methods]


def mutations(t: Tensor) -> list[tuple[str, Tensor]]:
    """Every forged replacement of ``t`` this test knows: shapes, dtypes and values."""
    flat = t.reshape(-1)
    out = [("empty", flat[:0].clone()), ("one value", flat[:1].clone()), ("flattened", flat.clone()),
           ("extra dim", t.unsqueeze(0).clone()), ("extra row", torch.cat([flat, flat[:1]]).reshape(-1))]
    if t.ndim >= 1 and t.shape[0] > 1:
        out.append(("half the rows", t[: t.shape[0] // 2].clone()))
    if t.is_floating_point():
        out += [(f"as {d}", t.to(d)) for d in (torch.float16, torch.bfloat16, torch.float64) if d != t.dtype]
        for v in (float("nan"), float("inf"), -float("inf"), 3e38, 0.0, -1.0):
            u = t.clone()
            u.reshape(-1)[0] = v
            out.append((f"a value {v}", u))
    else:
        out.append(("as int64" if t.dtype != torch.int64 else "as int32",
                    t.to(torch.int32 if t.dtype == torch.int64 else torch.int64)))
        u = t.clone()
        u.reshape(-1)[0] = 255 if t.dtype == torch.uint8 else -2
        out.append(("an out-of-range value", u))
    return [(name, u) for name, u in out if u.numel() or t.numel()]


def _outputs_finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors_in(out) if t.is_floating_point())


@pytest.mark.parametrize("plugin,method", _methods(), ids=[f"{p}/{m}" for p, m in _methods()])
def test_forged_artifacts_are_refused_or_load_finite(plugin: str, method: str, tmp_path: Path) -> None:
    ex = load(plugin).example(method)
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib, progress=False)
    real = artifact.load(pq.save(qm, tmp_path / "real.safetensors"))
    forged_cases = [(key, what, u) for key, t in real.tensors.items() for what, u in mutations(t)]
    rng = random.Random(f"{plugin}/{method}")
    # sample across the kinds of tensors, so that a plugin with many float tensors still gets codes and scales
    kinds: dict[str, list[tuple[str, str, Tensor]]] = {}
    for case in forged_cases:
        kinds.setdefault(case[0].rpartition(".")[2] if not case[0].startswith("float.") else "float", []).append(case)
    sample = [c for group in kinds.values() for c in rng.sample(group, min(len(group), FORGED_SAMPLE))]
    path = tmp_path / "forged.safetensors"
    failures = []
    for key, what, u in sample:
        artifact.save(dataclasses.replace(real, tensors={**real.tensors, key: u}), path)
        for mode in ("fake", "packed"):
            try:
                loaded = pq.load(path, mode=mode)
            except artifact.ArtifactError:
                continue
            except Exception as e:  # noqa: BLE001 - any other error is the defect this test looks for
                failures.append(f"{key} {what} ({mode}, load): {type(e).__name__}: {str(e)[:150]}")
                continue
            try:
                with torch.no_grad():
                    out = loaded(ex.inputs)
            except ValueError as e:
                if "tensor '" in str(e):
                    continue  # a row check naming the tensor (see the module docstring)
                failures.append(f"{key} {what} ({mode}, call): ValueError: {str(e)[:150]}")
                continue
            except Exception as e:  # noqa: BLE001 - any other error is the defect this test looks for
                failures.append(f"{key} {what} ({mode}): {type(e).__name__}: {str(e)[:150]}")
                continue
            if not _outputs_finite(out):
                failures.append(f"{key} {what} ({mode}): loaded, outputs not finite")
    assert not failures, f"{len(failures)} of {2 * len(sample)} forged loads:\n" + "\n".join(failures[:20])
