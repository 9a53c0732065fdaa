"""Timing helpers shared by the benchmark scripts (imported as ``from _timing import graph_ms``, as ``_env``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["graph_ms"]


def graph_ms(fn: Callable[[], object], bench: Callable[[Callable[[], object]], float]) -> dict[str, object]:
    """``{"graph_ms": t}``: ``bench`` (a median-ms timer) of ``fn`` captured in a CUDA graph and replayed, i.e. the
    GPU time without the per-call Python, dispatch and launch gaps.

    ``{"graph_ms": None, "graph_error": reason}`` when the capture or replay fails (an op that synchronizes with
    the host cannot be captured). Call it on CUDA only.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator settles) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        t = bench(graph.replay)
    except Exception as err:  # noqa: BLE001 - recorded in the row instead of stopping the run
        return {"graph_ms": None, "graph_error": f"{type(err).__name__}: {str(err)[:160]}"}
    del graph
    return {"graph_ms": round(t, 4)}
