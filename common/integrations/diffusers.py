"""Quantized diffusers models in diffusers folders: a transformer / UNet folder (``config.json`` +
``polyquant.safetensors``) and a whole pipeline folder whose quantized component holds one.

    import polyquant as pq
    from polyquant.integrations import diffusers as pqd

    qm = pq.quantize(pipe.transformer, Int8Config(), calib=calls)   # or pipeline.quantize_pipeline(pipe, ...)
    pqd.save_pretrained(qm, "dit-int8")                             # dit-int8/config.json + polyquant.safetensors
    pipe.transformer = pqd.load_quantized("dit-int8", mode="packed")  # the quantized DiTTransformer2DModel

    pqd.save_pipeline(pipe, qm, "pipe-int8")        # model_index.json, vae/, scheduler/, transformer/ (quantized)
    pipe = pqd.from_pretrained("pipe-int8")         # a DiffusionPipeline; the transformer loaded by load_quantized

``load_quantized`` builds the class ``config.json``'s ``_class_name`` names (a ``diffusers.ModelMixin``) with
``from_config`` and restores the artifact into it with ``polyquant.load`` (or, for a model a plugin wraps, takes it
out of the plugin's model: see ``polyquant.integrations``). ``from_pretrained`` passes every quantized component to
``DiffusionPipeline.from_pretrained`` explicitly (diffusers then loads nothing of it); the other components load
as diffusers saved them, from the local folder only, safetensors only.

``mode="packed"``: the quantized layers are the core's packed modules (codes + scales, ``polyquant.packed``) inside
the diffusers model, so the pipeline runs them unchanged; ``cpu_dtype`` is ``polyquant.load``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyquant.api import QuantizedModel

from . import ARTIFACT_NAME, CONFIG_NAME, artifact_path, find_model, load_folder, save_folder

__all__ = ["save_pretrained", "load_quantized", "save_pipeline", "from_pretrained", "FLOAT_WEIGHTS"]

FLOAT_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")  # diffusers' weight files
INDEX_NAME = "model_index.json"  # a pipeline folder's index of components


def _model_mixin() -> type:
    from diffusers import ModelMixin

    return ModelMixin


def save_pretrained(qm: QuantizedModel, folder: str | Path, *, model: nn.Module | None = None) -> Path:
    """Write ``folder`` for the quantized diffusers model of ``qm``: its own ``config.json`` (``save_config``) and
    ``polyquant.safetensors``, no float weights. ``model``: the diffusers model inside ``qm.model`` (default:
    ``qm.model`` itself, or its one diffusers child such as ``.transformer`` / ``.unet``). ValueError, nothing
    written, when ``folder`` already holds diffusers float weights or no diffusers model is found. Returns the
    folder."""
    name = find_model(qm, _model_mixin(), model, "diffusers")
    module = qm.model.get_submodule(name)
    return save_folder(qm, folder, name, module.save_config, FLOAT_WEIGHTS)


def _model_class(folder: Path) -> type:
    """The diffusers model class ``folder/config.json`` names (``_class_name``); ValueError otherwise."""
    import diffusers

    path = folder / CONFIG_NAME
    try:
        name = json.loads(path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a diffusers config ({e})") from None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, _model_mixin())):
        raise ValueError(f"{path}: _class_name {name!r} is not a diffusers model class")
    return cls


def load_quantized(folder_or_artifact: str | Path, *, mode: str = "fake", device: str | torch.device | None = None,
                   cpu_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The quantized diffusers model of a folder written by ``save_pretrained`` (or of its artifact file), in eval
    mode on ``device`` (default CPU): what a pipeline holds (``pipe.transformer = load_quantized(folder)``).
    ``mode``: "fake" (outputs identical to the saved model) or "packed". FileNotFoundError naming a missing
    ``config.json`` / ``polyquant.safetensors``."""
    artifact = artifact_path(folder_or_artifact)
    cls = _model_class(artifact.parent)

    def skeleton() -> nn.Module:  # the float model of config.json; seeded, the global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls.from_config(cls.load_config(artifact.parent)).eval()

    return load_folder(artifact, skeleton, cls.__name__, mode=mode, device=device, cpu_dtype=cpu_dtype)


def save_pipeline(pipe: Any, qm: QuantizedModel, folder: str | Path, *, component: str = "transformer") -> Path:
    """Write a diffusers pipeline folder: ``model_index.json`` and every component as its own ``save_pretrained``
    writes it, but ``component`` (which must be the quantized model of ``qm``) as ``save_pretrained`` above:
    ``folder/<component>`` holds ``config.json`` and ``polyquant.safetensors``, no float weights. ``folder`` must
    be new or empty (ValueError otherwise, nothing written). Returns the folder."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder}: not an empty folder; save_pipeline writes a whole pipeline folder")
    components = dict(pipe.components)
    module = components.get(component)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no model component {component!r} (components: "
                         f"{', '.join(components)})")
    find_model(qm, _model_mixin(), module, "diffusers")  # pipe.<component> must be qm's model: checked first
    others = {k: v for k, v in components.items() if k != component and v is not None}
    unsaveable = [k for k, v in others.items() if not hasattr(v, "save_pretrained")]
    if unsaveable:
        raise ValueError(f"{type(pipe).__name__}: component(s) {', '.join(unsaveable)} cannot be saved")
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)  # model_index.json, as DiffusionPipeline.save_pretrained writes it
    for key, value in others.items():
        value.save_pretrained(folder / key)
    save_pretrained(qm, folder / component, model=module)
    return folder


def from_pretrained(folder: str | Path, *, pipeline_cls: type | None = None, mode: str = "fake",
                    device: str | torch.device | None = None, cpu_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The pipeline of a folder written by ``save_pipeline``: every component folder holding
    ``polyquant.safetensors`` loaded by ``load_quantized`` (``mode``, ``cpu_dtype``), the others by
    ``pipeline_cls.from_pretrained`` (default ``DiffusionPipeline``: the class ``model_index.json`` names) from the
    local folder, safetensors only. ``device``: where the pipeline is moved (default: left on the CPU)."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not found; a pipeline folder (written by save_pipeline) holds it")
    names = [k for k, v in json.loads(index.read_text()).items() if not k.startswith("_") and isinstance(v, list)]
    quantized = {k: load_quantized(folder / k, mode=mode, device=device, cpu_dtype=cpu_dtype)
                 for k in names if (folder / k / ARTIFACT_NAME).is_file()}
    if not quantized:
        raise ValueError(f"{folder}: no component holds {ARTIFACT_NAME}; load it with "
                         "DiffusionPipeline.from_pretrained")
    cls = pipeline_cls or DiffusionPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **quantized)
    return pipe if device is None else pipe.to(device)
