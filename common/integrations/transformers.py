"""Quantized transformers models in transformers folders (``config.json`` + ``polyquant.safetensors``).

    import polyquant as pq
    from polyquant.integrations import transformers as pqt

    qm = pq.quantize(lm, NaiveConfig(), calib=batches)      # a PreTrainedModel, or a plugin's model holding one
    pqt.save_pretrained(qm, "mamba-w8a8")                   # mamba-w8a8/config.json + polyquant.safetensors
    lm = pqt.from_pretrained("mamba-w8a8", mode="packed")   # the quantized MambaForCausalLM

``config.json`` is the model's own config (``PretrainedConfig.save_pretrained``) with ``architectures`` set to the
model's class, as ``PreTrainedModel.save_pretrained`` writes it, so ``AutoConfig.from_pretrained(folder)`` reads it.
``from_pretrained`` builds that class of ``transformers`` on the config (``AutoModel.from_config`` when the config
names none) and restores the artifact into it with ``polyquant.load`` (or, for a model a plugin wraps, takes it out
of the plugin's model: see ``polyquant.integrations``). Tokenizers are not part of the folder: save them beside
it with their own ``save_pretrained``.

``mode="packed"``: the quantized layers are the core's packed modules (codes + scales, ``polyquant.packed``) inside
the transformers model; ``cpu_dtype`` is ``polyquant.load``'s.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from polyquant.api import QuantizedModel

from . import artifact_path, find_model, load_folder, save_folder

__all__ = ["save_pretrained", "from_pretrained", "FLOAT_WEIGHTS"]

FLOAT_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")  # transformers' weight files


def _pretrained_model() -> type:
    from transformers import PreTrainedModel

    return PreTrainedModel


def save_pretrained(qm: QuantizedModel, folder: str | Path, *, model: nn.Module | None = None) -> Path:
    """Write ``folder`` for the quantized transformers model of ``qm``: its ``config.json`` (with
    ``architectures``) and ``polyquant.safetensors``, no float weights. ``model``: the ``PreTrainedModel`` inside
    ``qm.model`` (default: ``qm.model`` itself, or its one transformers child such as the ssm plugin's ``.lm``).
    ValueError, nothing written, when ``folder`` already holds float weights or no transformers model is found.
    Returns the folder."""
    name = find_model(qm, _pretrained_model(), model, "transformers")
    module = qm.model.get_submodule(name)
    config = copy.deepcopy(module.config)
    config.architectures = [type(module).__name__]
    return save_folder(qm, folder, name, config.save_pretrained, FLOAT_WEIGHTS)


def from_pretrained(folder_or_artifact: str | Path, *, mode: str = "fake", device: str | torch.device | None = None,
                    cpu_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The quantized transformers model of a folder written by ``save_pretrained`` (or of its artifact file), in
    eval mode on ``device`` (default CPU). ``mode``: "fake" (outputs identical to the saved model) or "packed".
    FileNotFoundError naming a missing ``config.json`` / ``polyquant.safetensors``; ValueError when the config
    names a class ``transformers`` does not have."""
    import transformers

    artifact = artifact_path(folder_or_artifact)
    config = transformers.AutoConfig.from_pretrained(artifact.parent, local_files_only=True)
    name = (config.architectures or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if name is not None and not (isinstance(cls, type) and issubclass(cls, _pretrained_model())):
        raise ValueError(f"{artifact.parent}: config.json's architectures names {name!r}, not a transformers model")

    def skeleton() -> nn.Module:  # the float model of config.json; seeded, the global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
        return model.eval()

    return load_folder(artifact, skeleton, name, mode=mode, device=device, cpu_dtype=cpu_dtype)
