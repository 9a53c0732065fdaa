"""Models of the audio plugin: the shipped tiny codecs and seeded tiny architectures.

    build_model(model_config) -> Codec         {"name": "tiny-rvq"} / {"name": "tiny-grvq"} (shipped checkpoints),
                                               {"quantizer": {"kind": ..., ...}, "channels": 8, "dim": 64,
                                               "seed": 0} (seeded random weights), or an EnCodec skeleton
                                               ({"encodec": "24khz", ...} / {"transformers": {...}, ...}:
                                               ``encodec_adapter.build_encodec``)
    save_shipped(model, name, record)          writes assets/<name>.safetensors (train.py)

Both shipped codecs run at 2 kbps (50 frames/s x 4 codes x 10 bits): ``tiny-rvq`` an EnCodec-style RVQ 4 x 1024,
``tiny-grvq`` a HiFi-Codec-style GRVQ 2 groups x 2 layers x 1024. ``python -m polyquant.plugins.audio.train``
reproduces them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from polyquant.api import describe_model
from polyquant.checkpoint import read_checkpoint, save_checkpoint
from polyquant.config import UsageError

from .codec import QUANTIZER_KINDS, Codec, TinyCodec, make_quantizer

__all__ = ["SHIPPED", "SHIPPED_PATHS", "build_model", "save_shipped", "shipped_record"]

_ASSETS = Path(__file__).with_name("assets")
SHIPPED: dict[str, dict[str, Any]] = {
    "tiny-rvq": {"quantizer": {"kind": "rvq", "num_quantizers": 4, "codebook_size": 1024}, "channels": 8, "dim": 64},
    "tiny-grvq": {"quantizer": {"kind": "grvq", "groups": 2, "num_quantizers": 2, "codebook_size": 1024},
                  "channels": 8, "dim": 64},
}
SHIPPED_PATHS = {name: _ASSETS / f"{name.replace('-', '_')}.safetensors" for name in SHIPPED}
_META = "polyquant_model"
_BOUNDS = {"channels": (1, 64), "dim": (2, 1024), "num_quantizers": (1, 32), "codebook_size": (2, 65536),
           "groups": (1, 64), "code_dim": (1, 1024), "seed": (0, 2**31 - 1)}


def _check(model_config: dict[str, Any]) -> dict[str, Any]:
    unknown = set(model_config) - {"name", "quantizer", "channels", "dim", "seed"}
    if unknown:
        raise UsageError(f"unknown audio model option(s) {sorted(unknown)}")
    q = model_config.get("quantizer", {})
    if not isinstance(q, dict) or q.get("kind") not in QUANTIZER_KINDS:
        raise UsageError(f"an audio model needs a quantizer {{'kind': one of {QUANTIZER_KINDS}, ...}}, got {q!r}")
    for key, value in [*model_config.items(), *q.items()]:
        if key in _BOUNDS:
            lo, hi = _BOUNDS[key]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise UsageError(f"audio model option {key} must be an integer in [{lo}, {hi}], got {value!r}")
    return model_config


def build_model(model_config: dict[str, Any]) -> Codec:
    """The codec of a model config (eval mode; the config is recorded for ``polyquant.save``)."""
    if "encodec" in model_config or "transformers" in model_config:
        from .encodec_adapter import build_encodec

        return build_encodec(model_config)
    name = model_config.get("name")
    if name is not None:
        if name not in SHIPPED:
            raise UsageError(f"unknown audio model {name!r}; shipped: {sorted(SHIPPED)}")
        model = _skeleton(SHIPPED[name])
        if model.decoder.out.weight.device.type != "meta":  # the core sizes a config on the meta device first
            tensors, _ = read_checkpoint(SHIPPED_PATHS[name])
            model.load_state_dict(tensors)
        return describe_model(model.eval(), {"name": name})
    cfg = _check(dict(model_config))
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = _skeleton(cfg)
    return describe_model(model.eval(), cfg)


def _skeleton(cfg: dict[str, Any]) -> TinyCodec:
    dim = int(cfg.get("dim", 64))
    quantizer = make_quantizer(cfg["quantizer"], dim)
    # trained codebooks are loaded as they are: no k-means on the first batch of a fit or training forward
    for m in quantizer.modules():
        if hasattr(m, "initted"):
            m.initted.fill_(True)
    return TinyCodec(quantizer, channels=int(cfg.get("channels", 8)), dim=dim)


def save_shipped(model: TinyCodec, name: str, record: dict[str, Any], path: Path | None = None) -> Path:
    """Write a trained codec as ``name``'s checkpoint with its training record in the metadata."""
    return save_checkpoint(model.state_dict(), path or SHIPPED_PATHS[name],
                           {_META: json.dumps({"name": name}), "record": json.dumps(record)})


def shipped_record(name: str) -> dict[str, Any]:
    """The training record stored with a shipped checkpoint (steps, seed, losses, seconds)."""
    from polyquant.checkpoint import read_checkpoint_metadata

    return json.loads(read_checkpoint_metadata(SHIPPED_PATHS[name]).get("record", "{}"))
