"""Models of the ViT plugin: the shipped digits ViT, timm architectures, and pickle-free checkpoints.

A model is described by a JSON-able *model config*, so artifacts can rebuild it without code from a file:

    {"source": "vit", "kwargs": {...}}               timm VisionTransformer(**kwargs) (the digits ViT's form)
    {"source": "timm", "name": "deit_tiny_patch16_224", "kwargs": {"img_size": 32}}
                                                     timm.create_model(name, pretrained=False, **kwargs)
    {"source": "hybrid", "kwargs": {...}}            the digits MobileViT hybrid (``hybrid.HybridConfig``)

    load_digits_vit() -> nn.Module                    the shipped, trained digits ViT (eval mode)
    build_model(spec) -> (model, model_config)         'digits-vit', 'digits-hybrid[-v2]', a checkpoint path, or a
                                                     timm model name
    model_from_config(config) -> nn.Module             the architecture (weights: random init / checkpoint)
    save_checkpoint(model, path, config, meta=None)    safetensors with the model config in its metadata
    load_checkpoint(path) -> (model, config, meta)

Checkpoints are safetensors files (no pickle); the model config and free-form metadata are JSON strings in the
safetensors header (keys ``polyquant_model`` and ``polyquant_meta``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "ASSET_DIR",
    "DIGITS_VIT_PATH",
    "DIGITS_VIT_KWARGS",
    "HYBRID_NAMES",
    "DIGITS_MODELS",
    "input_spec",
    "digits_vit_config",
    "model_from_config",
    "save_checkpoint",
    "load_checkpoint",
    "load_digits_vit",
    "build_model",
    "count_parameters",
]

ASSET_DIR = Path(__file__).resolve().parent / "assets"
DIGITS_VIT_PATH = ASSET_DIR / "digits_vit.safetensors"

# Tiny pre-LN ViT on 8x8 digits upsampled to 32x32: patch 4 -> 64 tokens + CLS, dim 64, depth 4, 4 heads, MLP 4x.
DIGITS_VIT_KWARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "class_token": True,
    "global_pool": "token",
}

HYBRID_NAMES = {"digits-hybrid": "mobilevit", "digits-hybrid-v2": "mobilevitv2"}  # --model names -> variants
DIGITS_MODELS = ("digits-vit", *HYBRID_NAMES)

_META_MODEL = "polyquant_model"
_META_EXTRA = "polyquant_meta"


def digits_vit_config() -> dict[str, Any]:
    return {"source": "vit", "kwargs": dict(DIGITS_VIT_KWARGS)}


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Build the architecture a model config describes (weights: timm's random init)."""
    if not isinstance(config, dict) or "source" not in config:
        raise ValueError(f"a model config is a dict with a 'source' key, got {config!r}")
    source = config["source"]
    kwargs = dict(config.get("kwargs", {}))
    if source == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**kwargs)
    if source == "timm":
        import timm

        name = config.get("name")
        if not isinstance(name, str) or not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
        return timm.create_model(name, pretrained=False, **kwargs)
    if source == "hybrid":
        from .hybrid import HybridConfig, build_hybrid

        if "widths" in kwargs:
            kwargs["widths"] = tuple(kwargs["widths"])
        return build_hybrid(HybridConfig(**kwargs))
    raise ValueError(f"unknown model source {source!r}; expected 'vit', 'timm' or 'hybrid'")


def save_checkpoint(model: nn.Module, path: str | Path, config: dict[str, Any], meta: dict[str, Any] | None = None
                    ) -> None:
    """Save the float weights of ``model`` with its model config (safetensors; atomic)."""
    from polyquant.checkpoint import save_checkpoint as save_tensors

    metadata = {_META_MODEL: json.dumps(config, sort_keys=True), _META_EXTRA: json.dumps(meta or {}, sort_keys=True)}
    save_tensors(model.state_dict(), path, metadata)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, model config, metadata) from a checkpoint written by ``save_checkpoint``."""
    from polyquant.api import describe_model
    from polyquant.checkpoint import read_checkpoint, read_checkpoint_metadata

    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    if _META_MODEL not in metadata:
        raise ValueError(f"{path} has no model config (metadata key {_META_MODEL!r}); not a polyquant checkpoint")
    config = json.loads(metadata[_META_MODEL])
    meta = json.loads(metadata.get(_META_EXTRA, "{}"))
    model = model_from_config(config)
    model.load_state_dict(read_checkpoint(path)[0], strict=True)
    return describe_model(model.eval(), config), config, meta


def load_digits_vit() -> nn.Module:
    """The shipped digits ViT (trained by ``python -m polyquant.plugins.vit.train``), in eval mode."""
    if not DIGITS_VIT_PATH.is_file():
        raise FileNotFoundError(f"{DIGITS_VIT_PATH} is missing; run 'python -m polyquant.plugins.vit.train'")
    return load_checkpoint(DIGITS_VIT_PATH)[0]


def build_model(spec: str, **timm_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Resolve a ``--model`` argument: 'digits-vit', a checkpoint path, or a timm model name (random weights;
    ``timm_kwargs`` such as img_size go to ``timm.create_model``). Returns (model in eval mode, model config)."""
    from polyquant.api import describe_model

    if spec in ("digits-vit", "digits_vit"):
        model, config, _ = load_checkpoint(DIGITS_VIT_PATH)
        return model, config
    if spec in HYBRID_NAMES:
        from .hybrid import load_digits_hybrid

        model, info = load_digits_hybrid(HYBRID_NAMES[spec])
        config = {"source": "hybrid", "kwargs": dict(info["config"])}
        return describe_model(model, config), config
    path = Path(spec)
    if path.suffix == ".safetensors" or path.is_file():
        model, config, _ = load_checkpoint(path)
        return model, config
    config = {"source": "timm", "name": spec, "kwargs": dict(timm_kwargs)}
    return describe_model(model_from_config(config).eval(), config), config


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution (float ``nn.Conv2d`` or a quantized ``QuantConv2d``)."""
    for m in model.modules():
        chans = getattr(m, "in_channels", None)
        if isinstance(chans, int) and (isinstance(m, nn.Conv2d) or hasattr(m, "weight_quantizer")):
            return chans
    return None


def input_spec(model: nn.Module) -> tuple[int, int]:
    """(image size, channels) a model expects: from its patch embedding, its config, or timm's pretrained cfg.

    Works on float models and on their quantized copies (``QuantConv2d`` keeps the conv's hyper-parameters).
    """
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        size = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else int(pe.img_size)
        chans = getattr(getattr(pe, "proj", None), "in_channels", None)
        return int(size), int(chans) if isinstance(chans, int) else 3
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = _first_conv_channels(model)
    if "input_size" in cfg:
        c, h, _ = cfg["input_size"]
        return int(h), first if first is not None else int(c)
    return 32, first if first is not None else 3
