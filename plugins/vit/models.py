"""Models of the ViT plugin: the shipped digits ViT, timm architectures, and pickle-free checkpoints.

A model is described by a JSON-able *model config*, so artifacts can rebuild it without code from a file:

    {"source": "vit", "kwargs": {...}}               timm VisionTransformer(**kwargs) (the digits ViT's form)
    {"source": "timm", "name": "deit_tiny_patch16_224", "kwargs": {"img_size": 32}}
                                                     timm.create_model(name, pretrained=False, **kwargs)
    {"source": "hybrid", "kwargs": {...}}            the digits MobileViT hybrid (``hybrid.HybridConfig``)

    load_digits_vit() -> nn.Module                    the shipped, trained digits ViT (eval mode)
    build_model(spec) -> (model, model_config)         'digits-vit', 'digits-hybrid[-v2]', a checkpoint path, or a
                                                     timm model name
    validate_model_config(config) -> dict              the config checked against its source's schema (see below)
    model_from_config(config) -> nn.Module             the architecture (weights: random init / checkpoint)
    save_checkpoint(model, path, config, meta=None)    safetensors with the model config in its metadata
    load_checkpoint(path) -> (model, config, meta)

Checkpoints are safetensors files (no pickle); the model config and free-form metadata are JSON strings in the
safetensors header (keys ``polyquant_model`` and ``polyquant_meta``).

Model configs come from files (artifacts, checkpoints), so ``model_from_config`` builds nothing it has not checked
(``validate_model_config``): known top-level keys only, and per source an allowlist of kwargs with types and
bounds; nothing else reaches timm (no ``checkpoint_path``, ``pretrained``, layer names...). A "vit" or "hybrid"
config whose parameter count, estimated from its kwargs, exceeds ``MAX_PARAMETERS`` is refused before anything is
allocated; a "timm" config names a registered timm model, and when it overrides its architecture (depth, widths,
heads) the model is first counted on the meta device. Every refusal is a ``ValueError`` naming the bad key.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import input_spec

__all__ = [
    "ASSET_DIR",
    "DIGITS_VIT_PATH",
    "DIGITS_VIT_KWARGS",
    "HYBRID_NAMES",
    "DIGITS_MODELS",
    "MAX_PARAMETERS",
    "input_spec",
    "digits_vit_config",
    "validate_model_config",
    "model_from_config",
    "save_checkpoint",
    "load_checkpoint",
    "load_digits_vit",
    "build_model",
    "count_parameters",
    "affine_input_model",
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


# --- model configs: a strict schema (they are read from untrusted files) ------------------------------------

MAX_PARAMETERS = 1_000_000_000  # refuse to build a config above this many parameters (4 GB of float32 weights)


@dataclass(frozen=True)
class _Int:
    """An int in [low, high] (bools are not ints here)."""

    low: int
    high: int


@dataclass(frozen=True)
class _Ints:
    """A list of ``min_len``..``max_len`` ints in [low, high] (a tuple once checked); ``single``: an int also does."""

    low: int
    high: int
    min_len: int
    max_len: int
    single: bool = False


@dataclass(frozen=True)
class _Float:
    """A finite number in [low, high]."""

    low: float
    high: float


@dataclass(frozen=True)
class _Bool:
    """true or false."""


@dataclass(frozen=True)
class _Choice:
    """One of a few strings."""

    values: tuple[str, ...]


_Field = _Int | _Ints | _Float | _Bool | _Choice

_IMG_SIZE = _Int(8, 4096)
_IN_CHANS = _Int(1, 4)
_NUM_CLASSES = _Int(1, 100_000)

# "vit": timm VisionTransformer keyword arguments (timm's defaults for the ones a config leaves out).
_VIT_KWARGS: dict[str, _Field] = {
    "img_size": _IMG_SIZE,
    "patch_size": _Int(1, 256),
    "in_chans": _IN_CHANS,
    "num_classes": _NUM_CLASSES,
    "embed_dim": _Int(1, 8192),
    "depth": _Int(1, 64),
    "num_heads": _Int(1, 256),
    "mlp_ratio": _Float(0.25, 16.0),
    "qkv_bias": _Bool(),
    "qk_norm": _Bool(),
    "class_token": _Bool(),
    "no_embed_class": _Bool(),
    "pre_norm": _Bool(),
    "reg_tokens": _Int(0, 64),
    "global_pool": _Choice(("token", "avg", "avgmax", "max", "map", "")),
}
_VIT_DEFAULTS: dict[str, Any] = {"img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000,
                                 "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
                                 "class_token": True, "reg_tokens": 0, "global_pool": "token"}

# "hybrid": ``hybrid.HybridConfig`` fields (its defaults for the ones a config leaves out).
_HYBRID_KWARGS: dict[str, _Field] = {
    "variant": _Choice(tuple(HYBRID_NAMES.values())),
    "img_size": _IMG_SIZE,
    "in_chans": _IN_CHANS,
    "num_classes": _NUM_CLASSES,
    "stem_chs": _Int(1, 1024),
    "widths": _Ints(1, 1024, 3, 3),
    "transformer_dim": _Int(1, 2048),
    "transformer_depth": _Int(1, 64),
    "num_heads": _Int(1, 256),
    "patch_size": _Int(1, 64),
    "num_features": _Int(1, 8192),
    "version": _Int(1, 1),
}
_HYBRID_DEFAULTS: dict[str, Any] = {"in_chans": 1, "num_classes": 10, "stem_chs": 16, "widths": (16, 24, 32),
                                    "transformer_dim": 48, "transformer_depth": 2, "num_features": 96}

# "timm": the input and head of a registered model, and a few overrides that slim its architecture (tests, CLI).
_TIMM_KWARGS: dict[str, _Field] = {
    "img_size": _IMG_SIZE,
    "in_chans": _IN_CHANS,
    "num_classes": _NUM_CLASSES,
    "depth": _Int(1, 64),
    "embed_dim": _Int(1, 1024),
    "depths": _Ints(1, 32, 1, 6),
    "num_heads": _Ints(1, 256, 1, 6, single=True),
}
_TIMM_ARCHITECTURE = ("depth", "embed_dim", "depths", "num_heads")  # counted on the meta device when present
_TIMM_NAME = re.compile(r"\w+(\.\w+)?")  # an architecture, optionally with a pretrained tag; no hub ids or paths

_SOURCES: dict[str, tuple[str, ...]] = {"vit": ("source", "kwargs"), "timm": ("source", "name", "kwargs"),
                                        "hybrid": ("source", "kwargs")}  # source -> its top-level keys


def _check_value(where: str, key: str, value: Any, field: _Field) -> Any:
    """``value`` if it fits ``field`` (lists become tuples); ``ValueError`` naming ``key`` otherwise."""
    bad = f"{where}: {key} = {_short(value)}"
    if isinstance(field, _Bool):
        if not isinstance(value, bool):
            raise ValueError(f"{bad} is not a boolean")
        return value
    if isinstance(field, _Choice):
        if not isinstance(value, str) or value not in field.values:
            raise ValueError(f"{bad} is not one of {', '.join(repr(v) for v in field.values)}")
        return value
    if isinstance(field, _Float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not field.low <= value <= field.high:
            raise ValueError(f"{bad} is not a number in [{field.low}, {field.high}]")
        return float(value)
    if isinstance(field, _Ints):
        if field.single and _is_int(value):
            return _check_value(where, key, value, _Int(field.low, field.high))
        if not isinstance(value, (list, tuple)) or not field.min_len <= len(value) <= field.max_len:
            size = field.min_len if field.min_len == field.max_len else f"{field.min_len} to {field.max_len}"
            raise ValueError(f"{bad} is not a list of {size} integers")
        if not all(_is_int(v) and field.low <= v <= field.high for v in value):
            raise ValueError(f"{bad} has an entry that is not an integer in [{field.low}, {field.high}]")
        return tuple(value)
    if not _is_int(value) or not field.low <= value <= field.high:
        raise ValueError(f"{bad} is not an integer in [{field.low}, {field.high}]")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """``repr(value)``, cut to fit an error line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _vit_parameters(kwargs: dict[str, Any]) -> int:
    """Upper estimate of a timm VisionTransformer's parameter count (blocks, embeddings, head; one extra block
    covers a 'map' attention pool and the norms)."""
    k = {**_VIT_DEFAULTS, **kwargs}
    d, ratio = k["embed_dim"], k["mlp_ratio"]
    block = int((4 + 2 * ratio) * d * d + (10 + ratio) * d)  # qkv + proj + fc1 + fc2 (+ biases, norms)
    tokens = (k["img_size"] // k["patch_size"]) ** 2 + 1 + k["reg_tokens"]
    embed = k["in_chans"] * k["patch_size"] ** 2 * d + tokens * d
    return (k["depth"] + 1) * block + embed + (d + 1) * k["num_classes"]


def _hybrid_parameters(kwargs: dict[str, Any]) -> int:
    """Upper estimate of a digits hybrid's parameter count (``hybrid.build_hybrid``'s layout)."""
    k = {**_HYBRID_DEFAULTS, **kwargs}
    w0, w1, w2 = k["widths"]
    total = 9 * k["in_chans"] * k["stem_chs"]  # stem
    for cin, cout in ((k["stem_chs"], w0), (w0, w1), (w1, w2)):  # inverted residuals (expansion 2)
        mid = 2 * cin
        total += cin * mid + 9 * mid + mid * cout + 4 * (mid + cout)
    dim = max(k["transformer_dim"], w2)  # v1: transformer_dim, v2: the block's width
    total += 27 * w2 * w2 + 2 * w2 * dim + k["transformer_depth"] * (8 * dim * dim + 16 * dim)  # MobileViT block
    return total + w2 * k["num_features"] + (k["num_features"] + 1) * k["num_classes"]


def validate_model_config(config: Any) -> dict[str, Any]:
    """Check a model config against the schema of its source; returns it normalized (lists become tuples).

    Raises ``ValueError`` (one line, naming the bad key) for an unknown key or source, a kwarg outside its
    allowlist or bounds, a timm name that is not a registered model, or a "vit" / "hybrid" config estimated above
    ``MAX_PARAMETERS``. Builds nothing.
    """
    if not isinstance(config, dict) or "source" not in config:
        raise ValueError(f"a model config is a dict with a 'source' key, got {type(config).__name__}")
    source = config["source"]
    if not isinstance(source, str) or source not in _SOURCES:
        raise ValueError(f"unknown model source {_short(source)}; expected 'vit', 'timm' or 'hybrid'")
    where = f"model config ({source!r})"
    for key in config:
        if key not in _SOURCES[source]:
            raise ValueError(f"{where}: unknown key {_short(key)}; allowed: {', '.join(_SOURCES[source])}")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: kwargs must be a dict, got {type(kwargs).__name__}")
    schema = {"vit": _VIT_KWARGS, "timm": _TIMM_KWARGS, "hybrid": _HYBRID_KWARGS}[source]
    checked: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in schema:
            raise ValueError(f"{where}: kwarg {_short(key)} is not allowed; allowed: {', '.join(schema)}")
        checked[key] = _check_value(where, key, value, schema[key])
    out: dict[str, Any] = {"source": source, "kwargs": checked}
    if source == "vit":
        k = {**_VIT_DEFAULTS, **checked}
        if k["embed_dim"] % k["num_heads"]:
            raise ValueError(f"{where}: embed_dim {k['embed_dim']} is not divisible by num_heads {k['num_heads']}")
        if k["img_size"] % k["patch_size"]:
            raise ValueError(f"{where}: img_size {k['img_size']} is not a multiple of patch_size {k['patch_size']}")
        if k["global_pool"] == "token" and not k["class_token"]:
            raise ValueError(f"{where}: global_pool 'token' needs class_token true")
        _check_size(where, _vit_parameters(checked))
    elif source == "hybrid":
        _check_size(where, _hybrid_parameters(checked))
    else:
        import timm

        name = config.get("name")
        if not isinstance(name, str) or not _TIMM_NAME.fullmatch(name) or not timm.is_model(name):
            raise ValueError(f"{where}: name {_short(name)} is not a registered timm model (see timm.list_models())")
        out["name"] = name
    return out


def _check_size(where: str, parameters: int) -> None:
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"{where}: about {parameters:.3g} parameters, more than MAX_PARAMETERS = {MAX_PARAMETERS:.3g}")


def _timm_parameters(name: str, kwargs: dict[str, Any]) -> int:
    """Parameter count of ``timm.create_model(name, **kwargs)``, built on the meta device (allocates nothing)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return count_parameters(timm.create_model(name, pretrained=False, **kwargs))
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"model config ('timm'): cannot count the parameters of {name!r} with {kwargs}: "
                         f"{type(e).__name__}: {e}") from None


def model_from_config(config: Any) -> nn.Module:
    """Build the architecture a model config describes (weights: timm's random init), once
    ``validate_model_config`` accepts it; ``ValueError`` otherwise (also for a combination timm rejects)."""
    checked = validate_model_config(config)
    source, kwargs = checked["source"], checked["kwargs"]
    try:
        if source == "vit":
            from timm.models.vision_transformer import VisionTransformer

            return VisionTransformer(**kwargs)
        if source == "hybrid":
            from .hybrid import HybridConfig, build_hybrid

            return build_hybrid(HybridConfig(**kwargs))
        import timm

        name = checked["name"]
        if any(key in kwargs for key in _TIMM_ARCHITECTURE):
            _check_size(f"model config ('timm', {name!r})", _timm_parameters(name, kwargs))
        return timm.create_model(name, pretrained=False, **kwargs)
    except (AssertionError, TypeError) as e:  # timm asserts some combinations; a kwarg a timm model does not take
        raise ValueError(f"model config ({source!r}): timm rejects {kwargs}: {type(e).__name__}: {e}") from None


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
    try:
        config = json.loads(metadata[_META_MODEL])
        meta = json.loads(metadata.get(_META_EXTRA, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its model config is not valid JSON ({e})") from None
    model = model_from_config(config)
    try:
        model.load_state_dict(read_checkpoint(path)[0], strict=True)
    except RuntimeError as e:  # tensors of another architecture
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(f"{path}: its tensors do not match its model config ({first})") from None
    return describe_model(model.eval(), config), config, meta


def load_digits_vit() -> nn.Module:
    """The shipped digits ViT (trained by ``python -m polyquant.plugins.vit.train``), in eval mode."""
    if not DIGITS_VIT_PATH.is_file():
        raise FileNotFoundError(f"{DIGITS_VIT_PATH} is missing; run 'python -m polyquant.plugins.vit.train'")
    return load_checkpoint(DIGITS_VIT_PATH)[0]


def build_model(
    spec: str,
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    depth: int | None = None,
    embed_dim: int | None = None,
    depths: tuple[int, ...] | None = None,
    num_heads: int | tuple[int, ...] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Resolve a ``--model`` argument: 'digits-vit', 'digits-hybrid[-v2]', a checkpoint path, or a timm model name
    (random weights). Returns (model in eval mode, model config).

    The keyword arguments apply to a timm model name only (``timm.create_model``, within the bounds of
    ``validate_model_config``); the ones left None keep the model's own values.
    """
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
    overrides = {"img_size": img_size, "in_chans": in_chans, "num_classes": num_classes, "depth": depth,
                 "embed_dim": embed_dim, "depths": depths, "num_heads": num_heads}
    config = {"source": "timm", "name": spec, "kwargs": {k: v for k, v in overrides.items() if v is not None}}
    return describe_model(model_from_config(config).eval(), config), config


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())




@torch.no_grad()
def affine_input_model(model: nn.Module, scale: float, offset: float) -> nn.Module:
    """A copy of ``model`` that takes ``x' = scale * x + offset`` and gives ``model(x)``: the patch embedding's conv
    absorbs the affine map (W' = W / scale, b' = b - sum(W) * offset / scale). Its inputs are then not centred on
    zero (e.g. scale 1.4, offset 0.44 maps the digits' [-1, 1] to [-0.96, 1.84], like standardized pixels), the case
    the reference leaves to a float first conv (issue 11's non-centred model, built without retraining)."""
    if scale == 0 or not math.isfinite(scale) or not math.isfinite(offset):
        raise ValueError(f"scale must be finite and non-zero and offset finite, got {scale}, {offset}")
    out = copy.deepcopy(model).eval()
    proj = getattr(getattr(out, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.padding != (0, 0):
        raise ValueError("the model needs a patch embedding conv without padding (patch_embed.proj)")
    w = proj.weight
    shift = w.sum(dim=(1, 2, 3)) * (offset / scale)
    proj.weight.copy_(w / scale)
    if proj.bias is None:
        proj.bias = nn.Parameter(-shift)
    else:
        proj.bias.sub_(shift)
    return out
