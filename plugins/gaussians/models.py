"""The scenes the plugin builds: a skeleton of a layout, the shipped fitted scene, seeded procedural scenes.

    build_model({"num_gaussians": N, "sh_degree": d})          empty float scene of the layout (what a restore fills;
                                                              the description of a user's own .ply)
    build_model({"name": "fitted-s0"})                         the shipped scene (assets/fitted_s0.ply)
    build_model({"procedural": seed, "num_gaussians": N, "sh_degree": d})   a generated target scene (not fitted)

The shipped scene is reproducible: ``python -m polyquant.plugins.gaussians.models`` fits it again (seeded:
``fitting.fit_scene`` on renders of ``procedural_scene(seed)``) and writes it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from polyquant.api import describe_model
from polyquant.config import UsageError

from .model import GaussianModel, skeleton
from .scene import MAX_SH_DEGREE

__all__ = ["SHIPPED", "SHIPPED_PATHS", "build_model", "fit_shipped", "MAX_GAUSSIANS"]

_ASSETS = Path(__file__).parent / "assets"
SHIPPED: dict[str, dict[str, Any]] = {
    "fitted-s0": {"seed": 0, "target_gaussians": 20_000, "num_gaussians": 4096, "steps": 800, "views": 32,
                  "size": 64, "sh_degree": 3},
}
SHIPPED_PATHS = {name: _ASSETS / f"{name.replace('-', '_')}.ply" for name in SHIPPED}
MAX_GAUSSIANS = 1 << 26


def _int(cfg: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"model config {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def build_model(model_config: dict[str, Any]) -> GaussianModel:
    """The float scene a model config describes (see the module docstring)."""
    if not isinstance(model_config, dict):
        raise ValueError(f"a gaussians model config is a dict, got {type(model_config).__name__}")
    if "name" in model_config:
        if set(model_config) != {"name"}:
            raise ValueError(f"a shipped scene's config is {{'name': ...}} alone, got keys {sorted(model_config)}")
        name = model_config["name"]
        if name not in SHIPPED:
            raise UsageError(f"unknown gaussians scene {name!r}; shipped: {sorted(SHIPPED)}")
        from .ply import read_ply

        return describe_model(GaussianModel(read_ply(SHIPPED_PATHS[name])), {"name": name})
    n = _int(model_config, "num_gaussians", 1, MAX_GAUSSIANS)
    degree = _int(model_config, "sh_degree", 0, MAX_SH_DEGREE)
    if "procedural" in model_config:
        if set(model_config) != {"procedural", "num_gaussians", "sh_degree"}:
            raise ValueError(f"unexpected keys in a procedural scene config: {sorted(model_config)}")
        from .procedural import procedural_scene

        seed = _int(model_config, "procedural", 0, 2**31 - 1)
        return describe_model(GaussianModel(procedural_scene(seed, max(16, n), degree)), dict(model_config))
    if set(model_config) != {"num_gaussians", "sh_degree"}:
        raise ValueError(f"unexpected keys in a gaussians model config: {sorted(model_config)}")
    return skeleton(n, degree)


def fit_shipped(name: str, path: Path | None = None, progress: bool = False) -> Path:
    """Fit a shipped scene again from its recipe and write it as a .ply."""
    from .fitting import fit_scene
    from .ply import write_ply
    from .procedural import procedural_scene

    r = SHIPPED[name]
    t0 = time.perf_counter()
    target = procedural_scene(r["seed"], r["target_gaussians"], r["sh_degree"])
    scene, _ = fit_scene(target, num_gaussians=r["num_gaussians"], steps=r["steps"], seed=r["seed"],
                         views=r["views"], size=r["size"], sh_degree=r["sh_degree"], progress=progress)
    out = write_ply(scene, path or SHIPPED_PATHS[name])
    print(f"{name}: fitted in {time.perf_counter() - t0:.0f} s -> {out} ({out.stat().st_size:,} bytes)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit the shipped gaussians scenes again (seeded).")
    parser.add_argument("--name", choices=sorted(SHIPPED), default=None, help="one scene (default: all)")
    args = parser.parse_args(argv)
    import torch

    from polyquant.api import progress_default

    torch.set_num_threads(1)
    for name in [args.name] if args.name else sorted(SHIPPED):
        fit_shipped(name, progress=progress_default())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
