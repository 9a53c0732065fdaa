"""Models of the SSM plugin: a byte-level ``transformers`` Mamba-1 (``MambaForCausalLM``) and its shipped checkpoint.

    build_model(model_config) -> ByteMamba          {"name": "byte-mamba"} (the shipped checkpoint) or an
                                                    architecture {"hidden_size": ..., ...} with seeded random weights
    ByteMamba(config)(ids (B, L) int64) -> logits (B, L, 256)
    text_bytes(split) -> bytes                      the local corpus: Python standard-library sources
    bits_per_byte(model, ids) -> float

``ByteMamba`` wraps ``MambaForCausalLM`` so that the model returns the logits tensor (what the core's contract
compares) and keeps the cache off (``use_cache=False``): the quantized mixer runs whole sequences (phase 1).
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ByteMamba", "build_model", "check_config", "text_bytes", "byte_batches", "bits_per_byte",
           "SHIPPED", "SHIPPED_PATH", "ARCH_DEFAULTS", "inject_outliers"]

SHIPPED = "byte-mamba"  # the shipped checkpoint's name (plugins/ssm/assets/byte_mamba.safetensors)
SHIPPED_PATH = Path(__file__).with_name("assets") / "byte_mamba.safetensors"
_META_MODEL = "polyquant_model"

# The architecture of the shipped model; an architecture config may change these (bounded, see check_config).
ARCH_DEFAULTS: dict[str, int] = {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "expand": 2,
                                 "conv_kernel": 4, "seed": 0}
_BOUNDS = {"hidden_size": (4, 1024), "num_hidden_layers": (1, 8), "state_size": (1, 64), "expand": (1, 4),
           "conv_kernel": (2, 8), "seed": (0, 2**31 - 1)}


class ByteMamba(nn.Module):
    """``MambaForCausalLM`` over bytes (vocab 256): ids (B, L) -> logits (B, L, 256), float32, no cache."""

    def __init__(self, arch: dict[str, int]) -> None:
        super().__init__()
        from transformers import MambaConfig, MambaForCausalLM

        config = MambaConfig(vocab_size=256, hidden_size=arch["hidden_size"], num_hidden_layers=arch["num_hidden_layers"],
                             state_size=arch["state_size"], expand=arch["expand"], conv_kernel=arch["conv_kernel"],
                             use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        self.lm = MambaForCausalLM(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits  # (B, L, 256)


def check_config(model_config: Any) -> dict[str, Any]:
    """``{"name": "byte-mamba"}`` or an architecture with its defaults filled in; ``ValueError`` otherwise."""
    if not isinstance(model_config, dict):
        raise ValueError(f"an ssm model config is a JSON object, got {type(model_config).__name__}")
    if "name" in model_config:
        if model_config != {"name": SHIPPED}:
            raise ValueError(f"unknown ssm model {model_config!r}; the shipped model is {{'name': {SHIPPED!r}}}")
        return dict(model_config)
    unknown = sorted(set(model_config) - set(ARCH_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ssm model config key(s) {unknown}; known: {sorted(ARCH_DEFAULTS)}")
    cfg = {**ARCH_DEFAULTS, **model_config}
    for key, (lo, hi) in _BOUNDS.items():
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"ssm model config: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return cfg


def build_model(model_config: dict[str, Any] | None = None) -> ByteMamba:
    """The float model a config describes (the shipped checkpoint, or seeded random weights), in eval mode and
    recorded with ``describe_model``. The global RNG is untouched."""
    from polyquant.api import describe_model
    from polyquant.checkpoint import read_checkpoint

    cfg = check_config({"name": SHIPPED} if model_config is None else model_config)
    if "name" in cfg:
        tensors, meta = read_checkpoint(SHIPPED_PATH)
        arch = check_config(json.loads(meta[_META_MODEL]))
        with torch.random.fork_rng(devices=[]):
            model = ByteMamba(arch)
        if model.lm.lm_head.weight.device.type != "meta":  # the core sizes a config on the meta device first
            model.load_state_dict(tensors, strict=False)  # lm_head.weight is tied to the embedding
        missing = set(model.state_dict()) - set(tensors) - {"lm.lm_head.weight"}
        if missing:
            raise ValueError(f"{SHIPPED_PATH}: missing tensors {sorted(missing)[:3]}")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = ByteMamba(cfg)
    return describe_model(model.eval(), cfg)


def save_shipped(model: ByteMamba, arch: dict[str, int], meta: dict[str, Any]) -> Path:
    """Write the shipped checkpoint (train.py): the state dict without the tied lm_head, the architecture and
    the training record in its metadata."""
    from polyquant.checkpoint import save_checkpoint

    state = {k: v for k, v in model.state_dict().items() if k != "lm.lm_head.weight"}
    return save_checkpoint(state, SHIPPED_PATH, {_META_MODEL: json.dumps(arch), "train": json.dumps(meta)})


# --- data: the Python standard-library sources ------------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    """The top-level ``*.py`` files of this Python's standard library, sorted by name (a fixed list per version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def text_bytes(split: str, *, limit: int | None = None) -> bytes:
    """The corpus: every 10th stdlib file (by sorted name, index % 10 == 0) is held out ("test"), the rest
    "train"; at most ``limit`` bytes."""
    if split not in ("train", "test"):
        raise ValueError(f"split is 'train' or 'test', got {split!r}")
    files = [p for i, p in enumerate(_stdlib_files()) if (i % 10 == 0) == (split == "test")]
    out = bytearray()
    for p in files:
        out += p.read_bytes()
        if limit is not None and len(out) >= limit:
            return bytes(out[:limit])
    return bytes(out)


def byte_batches(data: bytes, *, batches: int, batch_size: int, seq_len: int, seed: int) -> list[Tensor]:
    """``batches`` seeded random windows of ``data``: int64 (batch_size, seq_len) each. ``ValueError`` when
    ``data`` is shorter than one sequence."""
    if len(data) < seq_len:
        raise ValueError(f"the text has {len(data)} bytes, shorter than one sequence of {seq_len}")
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        start = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=g)
        out.append(torch.stack([t[s: s + seq_len] for s in start.tolist()]))
    return out


def bits_per_byte(model: nn.Module, batches: list[Tensor]) -> float:
    """Mean next-byte cross-entropy over ``batches`` in bits (each position predicts the next byte)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids)[:, :-1].float()  # (B, L-1, 256)
            loss = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return total / count / math.log(2)


def inject_outliers(model: nn.Module, *, channels: int = 4, factor: float = 30.0) -> nn.Module:
    """Give the SSM input u of every mixer ``channels`` outlier channels (in place), as real Mamba checkpoints
    show: conv1d's weight and bias of those channels times ``factor`` (u = silu(conv) grows about ``factor``-fold
    where positive), x_proj's and out_proj's columns of them divided by ``factor`` (dt, B, C and the block output
    keep their scale). Not function-preserving (SiLU): the variant is its own float model. Channels 0, 1, ...
    spaced evenly over d_inner."""
    from .mixer import mixers

    for m in mixers(model).values():
        d = m.intermediate_size
        idx = torch.arange(channels) * (d // channels)
        with torch.no_grad():
            m.conv1d.weight[idx] *= factor
            if m.conv1d.bias is not None:
                m.conv1d.bias[idx] *= factor
            m.x_proj.weight[:, idx] /= factor
            m.out_proj.weight[:, idx] /= factor
    return model
