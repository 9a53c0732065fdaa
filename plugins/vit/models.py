"""Models of the ViT plugin: the shipped digits ViT, timm architectures, and pickle-free checkpoints.

A model is described by a JSON-able *model config*, so artifacts can rebuild it without code from a file:

    {"source": "vit", "kwargs": {...}}               timm VisionTransformer(**kwargs) (the digits ViT's form)
    {"source": "timm", "name": "deit_tiny_patch16_224", "kwargs": {"img_size": 32}, "data": {...}}
                                                     timm.create_model(name, pretrained=False, **kwargs); "data"
                                                     (optional): the preprocessing of the model's weights (mean,
                                                     std, interpolation, crop_pct, input_size), given to timm as
                                                     its pretrained_cfg_overlay
    {"source": "hybrid", "kwargs": {...}}            the digits MobileViT hybrid (``hybrid.HybridConfig``)

The shipped models' configs also name them ("name": "digits-vit"): ``is_shipped`` tells them apart from a user's
model of the same architecture, and they carry the digits preprocessing as their ``pretrained_cfg``.

    load_digits_vit() -> nn.Module                    the shipped, trained digits ViT (eval mode)
    build_model(spec, model_args=None) -> (model, model_config)
                                                     'digits-vit', 'digits-hybrid[-v2]', a timm model folder
                                                     (``load_timm_folder``), a polyquant checkpoint path, or a timm
                                                     architecture name (random weights) with its kwargs
    load_timm_folder(path) -> (model, model_config)   a folder written by timm's ``save_for_hf(model, DIR,
                                                     safe_serialization=True)``: config.json + model.safetensors
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
allocated. A "timm" config names a registered timm model; its input and head kwargs have typed bounds, and any
other kwarg must be a named parameter of the architecture's own class (its ``__init__`` signature), hold plain
JSON values (numbers, short names, short lists) and not name a file, a download, a device or a layer factory
(``_TIMM_DENIED``). Such a config is first built and counted on the meta device. Every refusal is a
``ValueError`` naming the bad key.
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
    "is_shipped",
    "load_timm_folder",
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

# "timm": typed bounds for the input, the head and the common architecture overrides; any other kwarg is checked
# against the architecture's own signature (``_check_plain``, then ``_timm_parameters``).
_TIMM_KWARGS: dict[str, _Field] = {
    "img_size": _Ints(8, 4096, 1, 2, single=True),  # timm's save_for_hf records [H, W]
    "in_chans": _IN_CHANS,
    "num_classes": _NUM_CLASSES,
    "depth": _Int(1, 64),
    "embed_dim": _Int(1, 1024),
    "depths": _Ints(1, 32, 1, 6),
    "num_heads": _Ints(1, 256, 1, 6, single=True),
}
_TIMM_INPUT = ("img_size", "in_chans", "num_classes")  # the only kwargs built without a count on the meta device
# kwargs never taken from a file: downloads, paths, devices, layer factories, feature-extraction wrappers
_TIMM_DENIED = re.compile(r"pretrained|checkpoint|^path$|_path$|file|url|cache|^dir$|_dir$|hub|device|dtype|^dd$|"
                          r"_layer$|_fn$|features_only|out_indices|feature_cfg|scriptable|exportable|no_jit|kwargs")
_TIMM_STRING = re.compile(r"[A-Za-z0-9_.\-]{0,64}")  # a string kwarg: a short name (an activation, a pool type)
MAX_TIMM_KWARGS = 64  # kwargs of one "timm" config
MAX_LIST = 64  # entries of one list kwarg (also per nesting level; two levels at most)
_TIMM_NAME = re.compile(r"\w+(\.\w+)?")  # an architecture, optionally with a pretrained tag; no hub ids or paths
_DATA_KEYS = ("mean", "std", "interpolation", "crop_pct", "input_size")  # a "timm" config's "data" (preprocessing)

_SOURCES: dict[str, tuple[str, ...]] = {  # source -> its top-level keys
    "vit": ("source", "name", "kwargs"),
    "timm": ("source", "name", "kwargs", "data"),
    "hybrid": ("source", "name", "kwargs"),
}


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
    if source == "timm" and len(kwargs) > MAX_TIMM_KWARGS:
        raise ValueError(f"{where}: {len(kwargs)} kwargs, more than MAX_TIMM_KWARGS = {MAX_TIMM_KWARGS}")
    checked: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in schema:
            checked[key] = _check_value(where, key, value, schema[key])
        elif source == "timm":
            checked[key] = _check_plain(where, key, value)
        else:
            raise ValueError(f"{where}: kwarg {_short(key)} is not allowed; allowed: {', '.join(schema)}")
    out: dict[str, Any] = {"source": source, "kwargs": checked}
    if source != "timm" and "name" in config:  # only the shipped models are named
        if config["name"] not in DIGITS_MODELS:
            raise ValueError(f"{where}: name {_short(config['name'])} is not a shipped model "
                             f"({', '.join(DIGITS_MODELS)})")
        out["name"] = config["name"]
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
        if "data" in config:
            out["data"] = _check_data(where, config["data"])
    return out


def _check_plain(where: str, key: Any, value: Any, depth: int = 0) -> Any:
    """A "timm" kwarg outside the typed schema: a plain JSON value (None, a bool, a bounded number, a short name,
    or a list of at most ``MAX_LIST`` of those, two levels deep), under a name that ``_TIMM_DENIED`` does not
    match. Whether the architecture takes it is checked against its signature when it is built."""
    if depth == 0 and (not isinstance(key, str) or not key.isidentifier() or _TIMM_DENIED.search(key)):
        raise ValueError(f"{where}: kwarg {_short(key)} is not allowed (files, downloads, devices and layer "
                         "factories are never taken from a model config)")
    bad = f"{where}: {key} = {_short(value)}"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > 2**31:
            raise ValueError(f"{bad} is not an integer in [-2^31, 2^31]")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e9:
            raise ValueError(f"{bad} is not a finite number in [-1e9, 1e9]")
        return value
    if isinstance(value, str):
        if not _TIMM_STRING.fullmatch(value):
            raise ValueError(f"{bad} is not a short name (letters, digits, '_', '.', '-'; at most 64)")
        return value
    if isinstance(value, (list, tuple)) and depth < 2:
        if len(value) > MAX_LIST:
            raise ValueError(f"{bad} has more than MAX_LIST = {MAX_LIST} entries")
        return tuple(_check_plain(where, key, v, depth + 1) for v in value)
    raise ValueError(f"{bad} is not a number, a name, or a list of them")


def _check_data(where: str, data: Any) -> dict[str, Any]:
    """A "timm" config's preprocessing: mean / std (1 to 4 numbers, std > 0), interpolation, crop_pct,
    input_size [C, H, W]; each optional."""
    from .data import INTERPOLATIONS

    if not isinstance(data, dict):
        raise ValueError(f"{where}: data must be a dict, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _DATA_KEYS:
            raise ValueError(f"{where}: data key {_short(key)} is not allowed; allowed: {', '.join(_DATA_KEYS)}")
        if key in ("mean", "std"):
            low = 1e-6 if key == "std" else -10.0
            ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= 10.0 for v in value)
            if not ok:
                raise ValueError(f"{where}: data.{key} = {_short(value)} is not a list of 1 to 4 numbers in "
                                 f"[{low}, 10]")
            out[key] = tuple(float(v) for v in value)
        elif key == "interpolation":
            out[key] = _check_value(where, "data.interpolation", value, _Choice(INTERPOLATIONS))
        elif key == "crop_pct":
            out[key] = _check_value(where, "data.crop_pct", value, _Float(0.1, 2.0))
        else:
            out[key] = _check_value(where, "data.input_size", value, _Ints(1, 4096, 3, 3))
    return out


def _check_size(where: str, parameters: int) -> None:
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"{where}: about {parameters:.3g} parameters, more than MAX_PARAMETERS = {MAX_PARAMETERS:.3g}")


def _timm_parameters(name: str, kwargs: dict[str, Any], overlay: dict[str, Any]) -> int:
    """Parameter count of ``timm.create_model(name, **kwargs)``, built on the meta device (allocates nothing);
    ``ValueError`` for a kwarg that is not a named parameter of the architecture's class (timm's builder takes a
    few of its own that the class never sees)."""
    import inspect

    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"model config ('timm'): cannot count the parameters of {name!r} with {kwargs}: "
                         f"{type(e).__name__}: {e}") from None
    params = inspect.signature(type(model)).parameters
    named = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    foreign = [key for key in kwargs if key not in named and key not in _TIMM_KWARGS]
    if foreign:
        raise ValueError(f"model config ('timm', {name!r}): kwarg {foreign[0]!r} is not a parameter of "
                         f"{type(model).__name__}; it takes: {', '.join(sorted(named - {'device', 'dtype'}))}")
    return count_parameters(model)


def model_from_config(config: Any) -> nn.Module:
    """Build the architecture a model config describes (weights: timm's random init), once
    ``validate_model_config`` accepts it; ``ValueError`` otherwise (also for a combination timm rejects)."""
    checked = validate_model_config(config)
    source, kwargs = checked["source"], checked["kwargs"]
    try:
        if source == "vit":
            from timm.models.vision_transformer import VisionTransformer

            model: nn.Module = VisionTransformer(**kwargs)
            return _shipped(model, checked["name"], checked)[0] if "name" in checked else model
        if source == "hybrid":
            from .hybrid import HybridConfig, build_hybrid

            model = build_hybrid(HybridConfig(**kwargs))
            return _shipped(model, checked["name"], checked)[0] if "name" in checked else model
        import timm

        name = checked["name"]
        overlay = _timm_overlay(checked)
        if any(key not in _TIMM_INPUT for key in kwargs):
            _check_size(f"model config ('timm', {name!r})", _timm_parameters(name, kwargs, overlay))
        return timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    except (AssertionError, TypeError) as e:  # timm asserts some combinations; a kwarg a timm model does not take
        raise ValueError(f"model config ({source!r}): timm rejects {kwargs}: {type(e).__name__}: {e}") from None


def _timm_overlay(checked: dict[str, Any]) -> dict[str, Any]:
    """timm's ``pretrained_cfg_overlay`` of a checked "timm" config: its "data", and an input_size that follows an
    ``img_size`` kwarg (timm keeps the registered 224 in the model's pretrained_cfg otherwise)."""
    overlay = dict(checked.get("data", {}))
    kwargs = checked["kwargs"]
    if "img_size" in kwargs and "input_size" not in overlay:
        size = kwargs["img_size"]
        h, w = (size, size) if isinstance(size, int) else (size[0], size[-1])
        overlay["input_size"] = (kwargs.get("in_chans", 3), h, w)
    return overlay


def is_shipped(model_config: dict[str, Any] | None) -> bool:
    """Whether a model config names one of the shipped digits models (``DIGITS_MODELS``)."""
    return isinstance(model_config, dict) and model_config.get("name") in DIGITS_MODELS \
        and model_config.get("source") in ("vit", "hybrid")


def _shipped(model: nn.Module, name: str, config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A shipped model with its name in its config and the digits preprocessing (``load_digits_data``: pixels in
    [0, 1] normalized with mean 0.5, std 0.5, bilinear, no crop) as its ``pretrained_cfg``."""
    from polyquant.api import describe_model

    size, chans = input_spec(model)
    model.pretrained_cfg = {"input_size": (chans, size, size), "mean": (0.5,) * chans, "std": (0.5,) * chans,
                            "interpolation": "bilinear", "crop_pct": 1.0}
    config = {**config, "name": name}
    return describe_model(model, config), config


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
        raise ValueError(f"{path} has no model config (metadata key {_META_MODEL!r}); not a polyquant checkpoint. "
                         f"{FOLDER_HINT}")
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


FOLDER_HINT = ("Pass the folder timm writes with timm.models.save_for_hf(model, DIR, safe_serialization=True) "
               "(config.json + model.safetensors), or a timm architecture name with --model-args JSON (random "
               "weights)")
MAX_CONFIG_BYTES = 1 << 20  # a timm folder's config.json


def load_timm_folder(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, model config) from a timm model folder as ``timm.models.save_for_hf(model, DIR,
    safe_serialization=True)`` writes it: ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``)
    and ``model.safetensors``.

    The architecture and its ``model_args`` pass ``validate_model_config`` (a registered timm name; kwargs checked
    against its signature); from ``pretrained_cfg`` only the preprocessing is kept (mean, std, interpolation,
    crop_pct, input_size). A pickled ``pytorch_model.bin`` (``save_for_hf``'s default) is refused, never read.
    ``ValueError`` (one line, what to pass) for anything else.
    """
    from polyquant.api import describe_model
    from polyquant.checkpoint import read_checkpoint

    path = Path(path)
    config_path, weights = path / "config.json", path / "model.safetensors"
    if not weights.is_file():
        if (path / "pytorch_model.bin").exists():
            raise ValueError(f"{path} holds a pickled pytorch_model.bin, which polyquant never loads; save it again "
                             "with timm.models.save_for_hf(model, DIR, safe_serialization=True)")
        raise ValueError(f"{path} has no model.safetensors. {FOLDER_HINT}")
    if not config_path.is_file():
        raise ValueError(f"{path} has no config.json. {FOLDER_HINT}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{config_path} is larger than MAX_CONFIG_BYTES = {MAX_CONFIG_BYTES:,}")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict) or not isinstance(hf.get("architecture"), str):
        raise ValueError(f"{config_path} names no timm 'architecture'. {FOLDER_HINT}")
    kwargs = hf.get("model_args", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"{config_path}: model_args must be a JSON object")
    if "num_classes" not in kwargs and "num_classes" in hf:  # timm before model_args: the head at the root
        kwargs = {**kwargs, "num_classes": hf["num_classes"]}
    cfg = hf.get("pretrained_cfg", {})
    data = {k: cfg[k] for k in _DATA_KEYS if isinstance(cfg, dict) and cfg.get(k) is not None}
    config: dict[str, Any] = {"source": "timm", "name": hf["architecture"], "kwargs": kwargs}
    if data:
        config["data"] = data
    try:
        model = model_from_config(config)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    try:
        model.load_state_dict(read_checkpoint(weights)[0], strict=True)
    except RuntimeError as e:  # tensors of another architecture
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(f"{weights}: its tensors do not match {config_path} ({first})") from None
    config = validate_model_config(json.loads(json.dumps(config)))  # as an artifact will store it
    return describe_model(model.eval(), config), config


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
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Resolve a ``--model`` argument: 'digits-vit', 'digits-hybrid[-v2]', a timm model folder
    (``load_timm_folder``), a polyquant checkpoint path, or a timm architecture name (random weights). Returns
    (model in eval mode, model config).

    ``model_args`` (the CLI's ``--model-args`` JSON) and the keyword arguments apply to a timm architecture name
    only (``timm.create_model``, checked by ``validate_model_config``; the keywords win over ``model_args``); the
    ones left None keep the model's own values. ``ValueError`` for them with any other ``spec``.
    """
    from polyquant.api import describe_model

    overrides = {"img_size": img_size, "in_chans": in_chans, "num_classes": num_classes, "depth": depth,
                 "embed_dim": embed_dim, "depths": depths, "num_heads": num_heads}
    kwargs = {**(model_args or {}), **{k: v for k, v in overrides.items() if v is not None}}
    path = Path(spec)
    named = spec in DIGITS_MODELS or spec == "digits_vit" or path.is_dir() or path.suffix == ".safetensors" \
        or path.is_file()
    if named and kwargs:
        raise ValueError(f"model arguments ({', '.join(kwargs)}) apply to a timm architecture name only; {spec} "
                         "records its own")
    if spec in ("digits-vit", "digits_vit"):
        model, config, _ = load_checkpoint(DIGITS_VIT_PATH)
        return _shipped(model, "digits-vit", config)
    if spec in HYBRID_NAMES:
        from .hybrid import load_digits_hybrid

        model, info = load_digits_hybrid(HYBRID_NAMES[spec])
        return _shipped(model, spec, {"source": "hybrid", "kwargs": dict(info["config"])})
    if path.is_dir():
        return load_timm_folder(path)
    if path.suffix == ".safetensors" or path.is_file():
        model, config, _ = load_checkpoint(path)
        return model, config
    config = {"source": "timm", "name": spec, "kwargs": kwargs}
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
