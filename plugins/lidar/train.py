"""Train the shipped CenterPoint-Pillar on synthetic scenes (seeded; the checkpoint is ``assets/``).

    python -m polyquant.plugins.lidar.train --steps 2500 --threads 2

Training scenes are seeds ``TRAIN_SEED0 + k``; the test set is ``TEST_SEEDS``, calibration draws from
``CALIB_SEEDS`` (disjoint ranges). AdamW with a one-cycle schedule, batch 8 (2500 steps: 20,000 scenes),
CenterPoint's loss (focal + L1). The
BatchNorms are folded into their convs before saving (``polyquant.surgery.fold_batchnorm``), so the shipped
model is the deployable one: convs with biases, no BatchNorm.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .model import CenterPointPillar, GridConfig, scene_batch
from .synthetic import SceneConfig, make_scenes
from .targets import detection_loss, render_targets

__all__ = ["TRAIN_SEED0", "TEST_SEEDS", "CALIB_SEEDS", "CHECKPOINT", "train", "save_detector", "load_detector",
           "fold"]

TRAIN_SEED0 = 1_000_000
TEST_SEEDS = range(0, 200)
CALIB_SEEDS = range(10_000, 10_512)  # the calibration pool: 512 scenes (2.6% of the 20,000 seen in training)
CHECKPOINT = Path(__file__).parent / "assets" / "centerpoint_pillar.safetensors"


def fold(model: CenterPointPillar) -> CenterPointPillar:
    """Fold every BatchNorm into its conv (eval mode, in place); returns the model."""
    from polyquant.surgery import fold_batchnorm

    model.eval()
    example = scene_batch(make_scenes([TEST_SEEDS[0]]))
    fold_batchnorm(model, example)
    return model


def train(steps: int, *, batch_size: int = 8, lr: float = 2e-3, seed: int = 0, grid: GridConfig | None = None,
          scenes: SceneConfig | None = None, log_every: int = 100) -> CenterPointPillar:
    """Train a detector from scratch on ``steps * batch_size`` fresh synthetic scenes; returns it folded."""
    torch.manual_seed(seed)
    model = CenterPointPillar(grid)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    start = time.time()
    for step in range(steps):
        batch = make_scenes(range(TRAIN_SEED0 + step * batch_size, TRAIN_SEED0 + (step + 1) * batch_size), scenes)
        targets = render_targets([s.boxes for s in batch], [s.labels for s in batch], model.grid)
        loss = detection_loss(model(**scene_batch(batch)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {float(loss):.4f}  {time.time() - start:.0f} s", flush=True)
    return fold(model)


def save_detector(model: CenterPointPillar, path: Path) -> None:
    """Weights (safetensors) with the grid config in the metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"grid": json.dumps(model.grid.to_dict())})


def load_detector(path: Path = CHECKPOINT) -> CenterPointPillar:
    """The folded detector saved by ``save_detector`` (eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    grid = GridConfig.from_dict(json.loads(meta.get("grid", "{}")))
    model = fold(CenterPointPillar(grid))  # the folded skeleton: convs with biases, BatchNorms gone
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = train(args.steps)
    save_detector(model, args.out)
    from .metrics import evaluate
    from .targets import decode

    test = make_scenes(TEST_SEEDS)
    with torch.no_grad():
        dets = [d for i in range(0, len(test), 20) for d in decode(model(**scene_batch(test[i:i + 20])), model.grid)]
    result = evaluate(dets, test)
    print(json.dumps({k: result[k] for k in ("mAP", "mAPH", "range")}, indent=1))
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {math.fsum(p.numel() for p in model.parameters()):.0f} "
          "parameters)")


if __name__ == "__main__":
    main()
