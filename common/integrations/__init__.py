"""Hugging Face folders of polyquant artifacts: a quantized diffusers model (``polyquant.integrations.diffusers``) or
transformers model (``polyquant.integrations.transformers``) saved next to its own config, one folder to share:

    folder/config.json              the model's own config (diffusers ``save_config``; transformers
                                    ``PretrainedConfig.save_pretrained``, with ``architectures``)
    folder/polyquant.safetensors    ``polyquant.save(qm)``; its ``meta["hf_model"]`` names the library model inside
                                    ``qm.model`` ("": ``qm.model`` itself); no float weights file

A bare library model loads into the float skeleton of ``config.json`` (the library's ``from_config``); one a plugin
wraps (the diffusion plugin's ``DiTDenoiser.transformer`` / ``UNetDenoiser.unet``, the ssm plugin's ``MambaLM.lm``)
is rebuilt by the plugin from the artifact's model config and taken out. A wrapper with state of its own
(diffusion/cachequant's cache corrections) is refused at save. The libraries' ``AUTO_QUANTIZER_MAPPING`` registries
are static maps of their own quantizers, so these are plain helpers. The helpers shared by both modules are here;
importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from polyquant.api import QuantizedModel

__all__ = ["ARTIFACT_NAME", "CONFIG_NAME", "MODEL_KEY", "find_model", "save_folder", "artifact_path", "load_folder"]

ARTIFACT_NAME = "polyquant.safetensors"  # the artifact's file name in a folder
CONFIG_NAME = "config.json"  # the library model's config, as the library writes it
MODEL_KEY = "hf_model"  # artifact meta: the library model's name inside qm.model ("" = qm.model itself)


def find_model(qm: QuantizedModel, base: type, model: nn.Module | None, library: str) -> str:
    """The name of the ``library`` model (an instance of ``base``) inside ``qm.model``: ``model`` if given (it must
    be a submodule of ``qm.model``), else ``qm.model`` itself ("") or its only child that is one. ValueError when
    there is none, or when the rest of ``qm.model`` holds parameters or buffers (the library model alone would not
    reproduce the quantized model), or when a wrapper cannot be rebuilt (no model config recorded)."""
    root = qm.model
    if model is None:
        if isinstance(root, base):
            return ""
        found = [name for name, child in root.named_children() if isinstance(child, base)]
        if len(found) != 1:
            raise ValueError(f"{type(root).__name__} is not a {library} model and has {len(found)} {library} models "
                             f"as children ({', '.join(found) or 'none'}); pass the one to save as model=")
        name = found[0]
    else:
        if not isinstance(model, base):
            raise ValueError(f"model is a {type(model).__name__}, not a {library} model ({base.__name__})")
        name = next((n for n, m in root.named_modules() if m is model), None)
        if name is None:
            raise ValueError(f"model (a {type(model).__name__}) is not part of the quantized model qm.model")
    if name:
        outside = sorted(k for k in root.state_dict() if not k.startswith(f"{name}."))
        if outside:
            raise ValueError(f"{type(root).__name__} holds state outside its {library} model {name!r} "
                             f"({', '.join(outside[:3])}): the {library} model alone is not the quantized model")
        if qm.model_config is None:
            raise ValueError(f"{type(root).__name__} wraps the {library} model {name!r} but records no model config, "
                             f"so it cannot be rebuilt at load; quantize the {library} model itself")
    return name


def save_folder(qm: QuantizedModel, folder: str | Path, name: str, write_config: Callable[[Path], Any],
                weights: tuple[str, ...]) -> Path:
    """Write ``folder``: the library's config (``write_config(folder)``) and the artifact of ``qm`` with ``name``
    (``find_model``'s) in its meta. ValueError, nothing written, when ``folder`` is a file or already holds float
    weights (a file matching one of the ``weights`` glob patterns)."""
    import polyquant

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if folder.is_dir():
        found = sorted(p.name for pattern in weights for p in folder.glob(pattern))
        if found:
            raise ValueError(f"{folder} already holds float weights ({found[0]}); a quantized folder holds "
                             f"{CONFIG_NAME} and {ARTIFACT_NAME} only: choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    polyquant.save(qm, folder / ARTIFACT_NAME, meta={MODEL_KEY: name})
    write_config(folder)
    return folder


def artifact_path(folder_or_artifact: str | Path) -> Path:
    """The artifact of a folder (``folder/polyquant.safetensors``), or the artifact file itself;
    FileNotFoundError naming the missing file when the folder lacks it or ``config.json``."""
    path = Path(folder_or_artifact)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or file")
    artifact = path if path.is_file() else path / ARTIFACT_NAME
    for needed in (artifact.parent / CONFIG_NAME, artifact):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not found; a quantized folder holds {CONFIG_NAME} and {ARTIFACT_NAME} "
                                    "(written by save_pretrained)")
    return artifact


def load_folder(artifact: Path, skeleton: Callable[[], nn.Module], class_name: str | None, *, mode: str,
                device: str | torch.device | None, cpu_dtype: torch.dtype) -> nn.Module:
    """The quantized library model of ``artifact`` (``artifact_path``'s): restored into ``skeleton()`` when the
    artifact is of the library model itself, else taken out of the model its plugin rebuilds (see the module
    docstring). ``class_name``: the class the folder's config names (checked; None: not checked)."""
    from polyquant import artifact as artifacts
    from polyquant.api import from_artifact

    art = artifacts.load(artifact)
    name = art.meta.get(MODEL_KEY, "")
    if not isinstance(name, str):
        raise artifacts.ArtifactError(f"{artifact}: meta {MODEL_KEY!r} must be a module name, got {name!r:.60}")
    if name:
        qm = from_artifact(art, mode=mode, device=device, cpu_dtype=cpu_dtype)
        try:
            model = qm.model.get_submodule(name)
        except AttributeError:
            raise artifacts.ArtifactError(f"{artifact}: the restored {type(qm.model).__name__} has no "
                                          f"{name!r}") from None
    else:
        model = from_artifact(art, skeleton(), mode=mode, device=device, cpu_dtype=cpu_dtype).model
    if class_name is not None and type(model).__name__ != class_name:
        raise ValueError(f"{artifact}: holds a {type(model).__name__}, {CONFIG_NAME} names {class_name}")
    return model
