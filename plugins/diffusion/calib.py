"""Calibration inputs of a diffusion transformer across timesteps, through the real scheduler loop.

FP4DiT (and Q-Diffusion before it) calibrates on the inputs the model sees while it samples: here the float model
runs ``models.sample`` (diffusers DDIM or PLMS = ``PNDMScheduler(skip_prk_steps=True)``, 20 steps as the spec)
from seeded noise for the given labels, and every model call's inputs (x_t, t, labels) are recorded, one batch
per call. Only those inputs are held (B x C x S x S floats per call), not activations: the core's ``calibrate``
and ``reconstruct`` re-run them block by block.

    batches = timestep_batches(model, labels, steps=20, scheduler="plms", seed=0)   # [{"x_t", "t", "labels"}]
    calib = Calibration(batches, dit_forward)   # or just the list: a DiTDenoiser takes model(**batch)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["timestep_batches", "dit_forward"]


class _Recorder(nn.Module):
    """Stands in for the DiT in ``models.sample``: records each call's inputs, then runs the DiT."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.calls: list[dict[str, Tensor]] = []

    @property
    def config(self) -> Any:
        return self.transformer.config

    def forward(self, hidden_states: Tensor, timestep: Tensor, class_labels: Tensor, return_dict: bool = False) -> Any:
        self.calls.append({"x_t": hidden_states.detach().cpu().clone(), "t": timestep.detach().cpu().clone(),
                           "labels": class_labels.detach().cpu().clone()})
        return self.transformer(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=return_dict)


def _transformer(model: nn.Module) -> nn.Module:
    return getattr(model, "transformer", model)  # a DiTDenoiser or a bare diffusers DiT


@torch.no_grad()
def timestep_batches(model: nn.Module, labels: Tensor, *, steps: int = 20, scheduler: str = "plms", seed: int = 0,
                     batch_size: int | None = None) -> list[dict[str, Tensor]]:
    """The float ``model``'s inputs at every step of sampling ``labels`` (N,) from the noise of ``seed``: one dict
    ``{"x_t": (B, C, S, S), "t": (B,) int64, "labels": (B,)}`` per model call (PLMS calls the model steps + 1
    times), on the CPU, in sampling order. ``batch_size`` splits the labels into several sampling runs (seeds
    ``seed``, ``seed + 1``, ...). The model is not changed."""
    from .models import sample

    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(labels) == 0:
        raise ValueError("timestep_batches needs at least one label")
    size = len(labels) if batch_size is None else batch_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    recorder = _Recorder(_transformer(model))
    for i, chunk in enumerate(labels.split(size)):
        sample(recorder, chunk, steps=steps, scheduler=scheduler, seed=seed + i)
    return recorder.calls


def dit_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``forward_fn`` of a ``polyquant.nn.Calibration`` of ``timestep_batches``: the noise prediction of a
    ``DiTDenoiser`` (or a bare diffusers DiT) at one recorded batch."""
    from .models import noise_prediction

    if hasattr(model, "transformer") and not hasattr(model, "transformer_blocks"):
        return model(**batch)
    return noise_prediction(model, batch["x_t"], batch["t"], batch["labels"])
