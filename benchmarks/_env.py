"""The environment a benchmark ran in, for its JSON report: commit, library versions, device, driver.

Benchmark scripts run as ``python benchmarks/<name>.py``; Python puts the script's folder (benchmarks/) first on
``sys.path``, so they import this module as ``from _env import environment`` (no package, no install).

| key                   | value                                                      | None when                  |
|-----------------------|------------------------------------------------------------|----------------------------|
| git_sha               | ``git rev-parse HEAD`` of the checkout holding this file   | no git / no checkout       |
| git_dirty             | ``git status --porcelain`` lists changes (untracked too)   | no git / no checkout       |
| python, torch, triton | versions                                                   | triton cannot be imported  |
| platform              | ``platform.platform()``                                    | -                          |
| device                | device type asked for: ``"cuda"``, ``"cpu"``               | -                          |
| device_name           | GPU name (``torch.cuda.get_device_name``), else the CPU's  | -                          |
| cuda                  | CUDA version torch was built with (``torch.version.cuda``) | not on CUDA                |
| cuda_driver           | driver version, from ``nvidia-smi``                        | not on CUDA, no nvidia-smi |
| hbm_spec_GBps         | specified peak memory bandwidth (``hbm_spec_gbps``)        | not on CUDA, GPU not known |
"""

from __future__ import annotations

import json
import platform
import statistics
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "hbm_spec_gbps", "seed_stats", "mean_pm_std", "write_report"]

# (pattern on the device name, specified peak HBM bandwidth in GB/s): NVIDIA's data sheets. The first match wins.
_HBM_SPEC_GBPS: list[tuple[str, float]] = [
    (r"\bH200\b", 4800.0),  # H200 SXM / NVL, HBM3e (not GH200: "\b" needs a non-letter before the H)
    (r"\bH100\b.*\bPCIe\b", 2000.0),  # H100 PCIe, HBM2e
    (r"\bH100\b.*\b(SXM|HBM3)\b", 3350.0),  # H100 SXM, HBM3 (torch names it "NVIDIA H100 80GB HBM3")
]


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb * 1024 / 1024**3 if sys.platform != "darwin" else kb / 1024**3, 3)


def hbm_spec_gbps(device_name: str) -> float | None:
    """Specified peak memory bandwidth (GB/s) of a GPU named ``device_name``; None for a GPU not in the table."""
    for pattern, gbps in _HBM_SPEC_GBPS:
        if re.search(pattern, device_name):
            return gbps
    return None


def _run(cmd: list[str]) -> str | None:
    """stdout of ``cmd`` run in this file's folder, stripped; None when it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=20,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _triton_version() -> str | None:
    try:
        import triton
    except (ImportError, OSError, RuntimeError):  # a triton built for another driver or torch raises these too
        return None
    return str(triton.__version__)


def package_version(dist: str) -> str | None:
    """The installed version of a distribution (``"faiss-cpu"``), or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, object]:
    """What a benchmark report records about where it ran (module docstring): one flat, JSON-ready dict.

    Args:
        device: the torch device type the benchmark runs on, ``"cuda"`` or ``"cpu"``.
    """
    sha = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain"]) if sha else None
    on_cuda = device.startswith("cuda") and torch.cuda.is_available()
    name = torch.cuda.get_device_name() if on_cuda else (platform.processor() or platform.machine() or "cpu")
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if on_cuda else None
    return {
        "git_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": name,
        "cuda": torch.version.cuda if on_cuda else None,
        "cuda_driver": driver.splitlines()[0].strip() if driver else None,
        "hbm_spec_GBps": hbm_spec_gbps(name) if on_cuda else None,
    }


def seed_stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value) and the per-seed values of a metric measured once per seed."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def mean_pm_std(s: dict[str, Any], fmt: str) -> str:
    """``seed_stats`` as "mean ± std" with ``fmt`` (a leading "+" signs the mean only)."""
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt.lstrip('+')}}"


def write_report(report: dict[str, Any], out: Path, table: Path, text: str) -> None:
    """Write a benchmark's JSON report to ``out`` (its folder created) and its markdown ``text`` to ``table``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    table.write_text(text)
