"""Calibration inputs of a diffusion transformer across timesteps, through the real scheduler loop.

FP4DiT (and Q-Diffusion before it) calibrates on the inputs the model sees while it samples: here the float model
runs ``models.sample`` (diffusers DDIM or PLMS = ``PNDMScheduler(skip_prk_steps=True)``, 20 steps as the spec)
from seeded noise for the given labels, and every model call's inputs (x_t, t, labels) are recorded, one batch
per call. Only those inputs are held (B x C x S x S floats per call), not activations: the core's ``calibrate``
and ``reconstruct`` re-run them block by block.

    batches = timestep_batches(model, labels, steps=20, scheduler="plms", seed=0)   # [{"x_t", "t", "labels"}]
    calib = Calibration(batches, dit_forward)   # or just the list: a DiTDenoiser takes model(**batch)

``record_calls(transformer, run)`` is the general recorder under it: any code that samples (a diffusers pipeline,
``pipeline.quantize_pipeline``) runs with a forward pre-hook on the transformer that keeps each call's keyword
inputs.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["record_calls", "timestep_batches", "dit_forward"]


@torch.no_grad()
def record_calls(transformer: nn.Module, run: Callable[[], Any], *, progress: bool = False,
                 total: int | None = None) -> list[dict[str, Any]]:
    """Run ``run()`` and return the keyword inputs of every ``transformer`` call it made, in order (positional
    arguments named after the forward's parameters; None values and ``return_dict`` dropped; tensors on the
    CPU). ``progress``: a bar counting the calls (``total``: how many are expected). ValueError when ``run`` never
    calls the transformer."""
    from tqdm.auto import tqdm

    from polyquant.nn import to_device

    signature = inspect.signature(transformer.forward)
    calls: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc="calibration (sampling)", unit="call", disable=not progress)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = signature.bind_partial(*args, **kwargs).arguments
        kept = {k: v for k, v in bound.items() if v is not None and k != "return_dict"}
        calls.append(to_device(kept, "cpu", copy=True))  # copies: the caller may change its tensors in place
        bar.update(1)

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
        bar.close()
    if not calls:
        raise ValueError("the calibration run never called the transformer")
    return calls


def _transformer(model: nn.Module) -> nn.Module:
    # a DiTDenoiser / UNetDenoiser, or a bare diffusers DiT / UNet (whose forward calls ``sample``)
    return getattr(model, "transformer", None) or getattr(model, "unet", None) or model


@torch.no_grad()
def timestep_batches(model: nn.Module, labels: Tensor, *, steps: int = 20, scheduler: str = "plms", seed: int = 0,
                     batch_size: int | None = None, progress: bool = False) -> list[dict[str, Tensor]]:
    """The float ``model``'s inputs at every step of sampling ``labels`` (N,) from the noise of ``seed``: one dict
    ``{"x_t": (B, C, S, S), "t": (B,) int64, "labels": (B,)}`` per model call (PLMS calls the model steps + 1
    times), on the CPU, in sampling order. ``batch_size`` splits the labels into several sampling runs (seeds
    ``seed``, ``seed + 1``, ...). ``progress``: a bar over the model calls. The model is not changed."""
    from .models import sample

    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(labels) == 0:
        raise ValueError("timestep_batches needs at least one label")
    size = len(labels) if batch_size is None else batch_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunks = labels.split(size)
    transformer = _transformer(model)

    def run() -> None:
        for i, chunk in enumerate(chunks):
            sample(transformer, chunk, steps=steps, scheduler=scheduler, seed=seed + i)

    calls = record_calls(transformer, run, progress=progress,
                         total=len(chunks) * (steps + 1 if scheduler == "plms" else steps))
    return [{"x_t": c["hidden_states"] if "hidden_states" in c else c["sample"], "t": c["timestep"],
             "labels": c["class_labels"]} for c in calls]


def dit_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``forward_fn`` of a ``polyquant.nn.Calibration`` of ``timestep_batches``: the noise prediction of a
    ``DiTDenoiser`` (or a bare diffusers DiT) at one recorded batch."""
    from .models import noise_prediction

    if hasattr(model, "transformer") and not hasattr(model, "transformer_blocks"):
        return model(**batch)
    return noise_prediction(model, batch["x_t"], batch["t"], batch["labels"])
