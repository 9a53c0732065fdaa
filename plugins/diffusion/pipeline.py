"""Quantize the transformer of a diffusers pipeline in place, calibrated on the inputs it sees while the pipeline
samples (its own scheduler loop, prompts or labels, guidance), and load an artifact back into a pipeline.

    import polyquant as pq
    from polyquant.plugins.diffusion.fp4dit import FP4DiTConfig
    from polyquant.plugins.diffusion.pipeline import load_into_pipeline, quantize_pipeline

    pipe = PixArtAlphaPipeline.from_pretrained(DIR)                   # DiT, PixArt, SD3 or Flux pipelines
    qm = quantize_pipeline(pipe, FP4DiTConfig(abits=8),
                           run=lambda p: p(prompts, num_inference_steps=20, output_type="latent"))
    pq.save(qm, "pixart_w4a8.safetensors")                           # pipe.transformer is now quantized
    load_into_pipeline(pipe2, "pixart_w4a8.safetensors", mode="packed")  # codes + scales, no float copy

Calibration (``calib.record_calls``) runs ``run(pipe)`` with a forward pre-hook on ``pipe.transformer`` that keeps every
call's inputs (keyword arguments, tensors copied to the CPU): FP4DiT's timestep calibration through the real
sampler. Only the transformer's inputs are held (latents and text states per call); the core's block
reconstruction then captures one block's activations at a time (``polyquant.reconstruct``), so the held memory is
the calibration inputs plus one block's inputs and outputs, whatever the depth. ``peak_rss_mib`` reports the
process's peak resident memory (CPU; on CUDA ``torch.cuda.max_memory_allocated`` is the figure to read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["quantize_pipeline", "load_into_pipeline", "transformer_forward", "peak_rss_mib",
           "calls_bytes", "load_folder"]


def transformer_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """``forward_fn`` of recorded calls: the transformer's first output (the noise / velocity prediction)."""
    return model(**batch, return_dict=False)[0]


def calls_bytes(calls: list[dict[str, Any]]) -> int:
    """Bytes of the tensors the recorded calls hold."""
    from polyquant.nn import tensors_in

    return sum(t.numel() * t.element_size() for c in calls for t in tensors_in(c))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux ``ru_maxrss`` is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize_pipeline(pipe: Any, config: Any, run: Callable[[Any], Any], *, progress: bool | None = None) -> Any:
    """Quantize ``pipe.transformer`` with ``config`` (a diffusion method's config), calibrated on the calls
    ``run(pipe)`` makes, and put the quantized transformer into ``pipe`` (in place). Returns the
    ``QuantizedModel`` (``polyquant.save`` writes it; ``model_config`` rebuilds the architecture)."""
    import polyquant as pq
    from polyquant.api import progress_default
    from polyquant.nn import Calibration

    from .archs import find_transformer

    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer (U-Net pipelines are not supported)")
    find_transformer(transformer)  # ValueError for an unsupported class, before the calibration run
    show = progress_default() if progress is None else bool(progress)
    from .calib import record_calls

    calls = record_calls(transformer, lambda: run(pipe), progress=show)
    device = next(transformer.parameters()).device  # the recorded calls are on the CPU: quantize where it runs
    qm = pq.quantize(transformer, config, calib=Calibration(calls, transformer_forward), progress=show, device=device)
    pipe.transformer = qm.model
    return qm


def load_into_pipeline(pipe: Any, path: str, *, mode: str = "packed", device: str | torch.device | None = None,
                       cpu_dtype: torch.dtype = torch.bfloat16) -> Any:
    """Load a diffusion artifact of a transformer (``quantize_pipeline``'s) into ``pipe`` in place of its
    transformer (``polyquant.load``; packed: codes + scales through the core's packed modules). Returns the
    ``QuantizedModel``. ``device``: default, where the pipeline's transformer is. ValueError when the artifact's
    transformer is another class than the pipeline's."""
    import polyquant as pq

    old = getattr(pipe, "transformer", None)
    if device is None and old is not None:
        device = next(old.parameters()).device  # where the pipeline runs
    qm = pq.load(path, mode=mode, device=device, cpu_dtype=cpu_dtype)
    if old is not None and type(qm.model) is not type(old):
        raise ValueError(f"{path}: holds a {type(qm.model).__name__}, the pipeline's transformer is a "
                         f"{type(old).__name__}")
    pipe.transformer = qm.model
    return qm


def load_folder(path: str | Path) -> tuple[Any, nn.Module]:
    """A user's diffusers folder (``save_pretrained`` layout, safetensors weights, local files only): a pipeline
    (``model_index.json``) -> (pipeline, its transformer); a transformer (``config.json`` of one of
    ``archs.LAYOUTS``' classes) -> (None, transformer). ValueError (one line) for anything else."""
    import json

    from .archs import find_transformer, transformer_class

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (a diffusers folder written by save_pretrained)")
    try:
        if (path / "model_index.json").is_file():
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
            transformer = getattr(pipe, "transformer", None)
            if transformer is None:
                raise ValueError(f"{path}: a {type(pipe).__name__} has no transformer (U-Net pipelines are not "
                                 "supported)")
            find_transformer(transformer)
            return pipe, transformer.eval()
        if (path / "config.json").is_file():
            name = json.loads((path / "config.json").read_text()).get("_class_name")
            cls = transformer_class(str(name))
            return None, cls.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
    except ValueError:
        raise
    except Exception as e:  # diffusers / huggingface_hub / safetensors raise their own errors on bad folders
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load it with diffusers: {first[:200]}") from None
    raise ValueError(f"{path}: neither a pipeline (model_index.json) nor a transformer (config.json) folder")
