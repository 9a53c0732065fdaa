"""Why the grids rank as they do on the shipped digits DiT (issue 23): the weights' tails and each 4-bit grid's
weight error, per group of 32 (FP4DiT's group size on this model), on the linears FP4DiT quantizes.

Minifloat grids put their levels densely near zero and sparsely at the top, which pays off on heavy-tailed groups
(positive excess kurtosis, as large pretrained DiTs have) and costs on light-tailed ones. This reports the excess
kurtosis of the quantized linears' weights (whole tensors, and the mean over groups of 32 after centering) and the
relative weight MSE ``|q(W) - W|^2 / |W|^2`` of every grid FP4DiT and its baselines use, absmax scaled per group
(INT4 asymmetric: min-max per group).

    python benchmarks/diffusion_weights.py     # writes results_cpu/diffusion_weights.json and diffusion_weights.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from _env import environment, write_report

from polyquant.primitives import choose_qparams, fake_quantize
from polyquant.plugins.diffusion.archs import keep_float_patterns
from polyquant.plugins.diffusion.methods import build_model
from polyquant.plugins.diffusion.models import SHIPPED

HERE = Path(__file__).resolve().parent
GROUP = 32


def _quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import fnmatch

    keep = keep_float_patterns(model)
    return {n: m.weight.detach() for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and not any(fnmatch.fnmatchcase(n, p) for p in keep)}


def _excess_kurtosis(x: torch.Tensor) -> torch.Tensor:  # over the last dim
    z = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    return (z**4).mean(-1) - 3


def _rel_mse(w: torch.Tensor, fmt: str) -> float:  # w: (groups, GROUP)
    """Relative MSE of the core's min-max fake quantization per group: absmax-scaled (symmetric) for the FP grids,
    asymmetric with a zero point for INT4 (the int_minmax baseline's quantizer)."""
    name, symmetric = ("int4", False) if fmt == "int4 asym" else (fmt, True)
    block = (1, GROUP)
    scale, zero_point = choose_qparams(w, name, block, symmetric=symmetric)
    q = fake_quantize(w, name, scale, zero_point if not symmetric else None, block)
    return float(((q - w) ** 2).sum() / (w**2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results_cpu" / "diffusion_weights.json")
    parser.add_argument("--table", type=Path, default=HERE / "diffusion_weights.md")
    args = parser.parse_args()
    env = environment("cpu")
    weights = _quantized_weights(build_model({"name": SHIPPED}))
    groups = torch.cat([w.reshape(-1, GROUP) for w in weights.values()])
    flat = torch.cat([w.reshape(-1) for w in weights.values()])
    gauss = torch.randn(groups.shape, generator=torch.Generator().manual_seed(0))  # the small-sample reference
    kurt = {"whole": float(_excess_kurtosis(flat)), "per_group_mean": float(_excess_kurtosis(groups).mean()),
            "gaussian_per_group_mean": float(_excess_kurtosis(gauss).mean()),
            "per_layer": {n: float(_excess_kurtosis(w.reshape(-1))) for n, w in weights.items()}}
    grids = ("e2m1", "e3m0", "e1m2", "int4 asym")
    mse: dict[str, Any] = {g: _rel_mse(groups, g) for g in grids}
    mse_gauss = {g: _rel_mse(gauss, g) for g in grids}
    report = {"benchmark": "diffusion_weights", "group_size": GROUP, "layers": len(weights),
              "groups": int(groups.shape[0]), "excess_kurtosis": kurt, "relative_weight_mse": mse, "relative_mse_gaussian_groups": mse_gauss,
              "environment": env}
    lines = [f"Digits DiT, the {len(weights)} linears FP4DiT quantizes, groups of {GROUP} ({groups.shape[0]} groups); "
             f"commit {env['git_sha']} (dirty: {env['git_dirty']})", "",
             f"Excess kurtosis: {kurt['whole']:+.2f} over all their weights (0: Gaussian, negative: lighter tails), "
             f"{kurt['per_group_mean']:+.2f} mean per group of {GROUP} (Gaussian groups of {GROUP}: "
             f"{kurt['gaussian_per_group_mean']:+.2f}, the small-sample bias).", "",
             "| grid (absmax per group; INT4: min-max) | relative weight MSE, digits DiT | same, Gaussian groups |",
             "|---|---|---|"]
    lines += [f"| {g} | {100 * v:.2f}% | {100 * mse_gauss[g]:.2f}% |" for g, v in mse.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(report, args.out, args.table, text)


if __name__ == "__main__":
    main()
