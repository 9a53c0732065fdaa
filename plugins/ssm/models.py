"""Models of the SSM plugin: ``transformers`` Mamba causal LMs (``MambaForCausalLM``, ``Mamba2ForCausalLM``): the
shipped byte-level Mamba-1 checkpoint, seeded tiny architectures, and a user's ``save_pretrained`` folder.

    build_model(model_config) -> MambaLM            {"name": "byte-mamba"} (the shipped checkpoint), an architecture
                                                    {"hidden_size": ..., ...} with seeded random weights, or
                                                    {"hf_config": {...}} (a transformers Mamba / Mamba-2 config;
                                                    the weights come from the artifact)
    load_pretrained(path) -> (MambaLM, model_config) a user's folder (config.json + weights), local files only
    MambaLM(lm)(ids (B, L) int64) -> logits (B, L, vocab)
    text_bytes(split) -> bytes                      the local corpus: Python standard-library sources
    encode(data, tokenizer) -> ids (T,)             bytes as ids (byte-level models) or a tokenizer's ids
    bits_per_byte(model, ids, bytes_per_token) -> float

``MambaLM`` wraps the transformers model so that it returns the logits tensor (what the core's contract compares)
and keeps the cache off (``use_cache=False``) for whole sequences; token-by-token generation with the cache runs on
``model.lm`` (``decode.py``; Mamba-1 and Mamba-2).
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

__all__ = ["MambaLM", "ByteMamba", "build_model", "check_config", "load_pretrained", "load_tokenizer", "encode",
           "text_bytes", "byte_batches", "token_batches", "bits_per_byte", "SHIPPED", "SHIPPED2", "SHIPPED_PATH",
           "SHIPPED_PATHS", "ARCH_DEFAULTS", "MODEL_TYPES", "inject_outliers", "save_shipped"]

SHIPPED = "byte-mamba"  # the shipped Mamba-1 checkpoint's name (plugins/ssm/assets/byte_mamba.safetensors)
SHIPPED2 = "byte-mamba2"  # the shipped Mamba-2 checkpoint's name (plugins/ssm/assets/byte_mamba2.safetensors)
SHIPPED_PATHS = {SHIPPED: Path(__file__).with_name("assets") / "byte_mamba.safetensors",
                 SHIPPED2: Path(__file__).with_name("assets") / "byte_mamba2.safetensors"}
SHIPPED_PATH = SHIPPED_PATHS[SHIPPED]
_META_MODEL = "polyquant_model"

# The architecture of the shipped model; an architecture config may change these (bounded, see check_config).
# version 1: MambaForCausalLM; 2: Mamba2ForCausalLM with heads of head_dim channels (one group of B / C).
ARCH_DEFAULTS: dict[str, int] = {"version": 1, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 16,
                                 "expand": 2, "conv_kernel": 4, "head_dim": 16, "seed": 0}
_BOUNDS = {"version": (1, 2), "hidden_size": (4, 1024), "num_hidden_layers": (1, 8), "state_size": (1, 64),
           "expand": (1, 4), "conv_kernel": (2, 8), "head_dim": (1, 256), "seed": (0, 2**31 - 1)}


MODEL_TYPES = ("mamba", "mamba2")  # transformers model_type values this plugin quantizes


class MambaLM(nn.Module):
    """A transformers Mamba causal LM (``MambaForCausalLM`` / ``Mamba2ForCausalLM``) as ids (B, L) int64 ->
    logits (B, L, vocab), no cache. ``lm`` is the transformers model."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def vocab_size(self) -> int:
        return int(self.lm.config.vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits  # (B, L, vocab)


class ByteMamba(MambaLM):
    """``MambaForCausalLM`` (version 1) or ``Mamba2ForCausalLM`` (version 2) over bytes (vocab 256) of an
    architecture dict (``ARCH_DEFAULTS``'s keys)."""

    def __init__(self, arch: dict[str, int]) -> None:
        from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

        common = dict(vocab_size=256, hidden_size=arch["hidden_size"], num_hidden_layers=arch["num_hidden_layers"],
                      state_size=arch["state_size"], expand=arch["expand"], conv_kernel=arch["conv_kernel"],
                      use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        if arch.get("version", 1) == 1:
            super().__init__(MambaForCausalLM(MambaConfig(**common)))
        else:
            heads = arch["expand"] * arch["hidden_size"] // arch["head_dim"]
            super().__init__(Mamba2ForCausalLM(Mamba2Config(**common, head_dim=arch["head_dim"], num_heads=heads,
                                                            n_groups=1, chunk_size=64)))


def _lm_class(model_type: str) -> type[nn.Module]:
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    return {"mamba": MambaForCausalLM, "mamba2": Mamba2ForCausalLM}[model_type]


_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _decode_floats(value: Any) -> Any:
    """transformers' JSON form of non-finite floats, ``{"__float__": "Infinity"}``, back to floats (Mamba-2's
    ``time_step_limit`` is ``(0.0, inf)``)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[value["__float__"]]
        return {k: _decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_floats(v) for v in value]
    return value


# Bounds of a transformers config's sizes (an artifact's config is untrusted JSON: transformers builds per-layer
# lists from num_hidden_layers before any weight is read, so an absurd value must not reach it).
_HF_BOUNDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 512), "hidden_size": (1, 65536), "intermediate_size": (1, 262144),
    "vocab_size": (1, 2**20), "state_size": (1, 1024), "expand": (1, 16), "conv_kernel": (1, 64),
    "num_heads": (1, 65536), "head_dim": (1, 65536), "n_groups": (1, 65536), "chunk_size": (1, 65536),
}


def _hf_config(config: dict[str, Any]) -> Any:
    """The transformers config of a ``{"hf_config": ...}`` model config; ``ValueError`` (one line) for another model
    type, a size out of ``_HF_BOUNDS`` or any config transformers refuses."""
    from transformers import Mamba2Config, MambaConfig

    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a Mamba model; the ssm plugin quantizes "
                         f"{', '.join(MODEL_TYPES)} (transformers MambaForCausalLM, Mamba2ForCausalLM)")
    for key, (lo, hi) in _HF_BOUNDS.items():
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi):
            raise ValueError(f"invalid {model_type} config: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    cls = MambaConfig if model_type == "mamba" else Mamba2Config
    fields = {k: _decode_floats(v) for k, v in config.items()
              if k not in ("model_type", "transformers_version") and not k.startswith("_")}
    try:
        out = cls.from_dict(fields)
    except Exception as e:  # transformers / huggingface_hub raise their own validation errors too
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"invalid {model_type} config: {first}") from None
    out.use_cache = False
    return out


def check_config(model_config: Any) -> dict[str, Any]:
    """``{"name": "byte-mamba"}``, ``{"hf_config": {...}}`` or an architecture with its defaults filled in;
    ``ValueError`` otherwise."""
    if not isinstance(model_config, dict):
        raise ValueError(f"an ssm model config is a JSON object, got {type(model_config).__name__}")
    if "hf_config" in model_config:
        if set(model_config) != {"hf_config"} or not isinstance(model_config["hf_config"], dict):
            raise ValueError("an hf_config model config is {'hf_config': {...a transformers config...}} alone")
        _hf_config(model_config["hf_config"])
        return dict(model_config)
    if "name" in model_config:
        if set(model_config) != {"name"} or model_config["name"] not in SHIPPED_PATHS:
            raise ValueError(f"unknown ssm model {model_config!r}; the shipped models are "
                             f"{', '.join(repr({'name': n}) for n in SHIPPED_PATHS)}")
        return dict(model_config)
    unknown = sorted(set(model_config) - set(ARCH_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ssm model config key(s) {unknown}; known: {sorted(ARCH_DEFAULTS)}")
    cfg = {**ARCH_DEFAULTS, **model_config}
    for key, (lo, hi) in _BOUNDS.items():
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"ssm model config: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    if cfg["version"] == 2 and (cfg["expand"] * cfg["hidden_size"]) % cfg["head_dim"]:
        raise ValueError(f"ssm model config: d_inner {cfg['expand'] * cfg['hidden_size']} is not a multiple of "
                         f"head_dim {cfg['head_dim']}")
    return cfg


def build_model(model_config: dict[str, Any] | None = None) -> MambaLM:
    """The float model a config describes (the shipped checkpoint, seeded random weights, or a transformers
    config's skeleton with seeded random weights that an artifact then fills), in eval mode and recorded with
    ``describe_model``. The global RNG is untouched."""
    from polyquant.api import describe_model
    from polyquant.checkpoint import read_checkpoint

    cfg = check_config({"name": SHIPPED} if model_config is None else model_config)
    if "hf_config" in cfg:
        hf = _hf_config(cfg["hf_config"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model: MambaLM = MambaLM(_lm_class(hf.model_type)(hf))
            except Exception as e:  # an inconsistent config fails only when the layers are built
                raise ValueError(f"invalid {hf.model_type} config: {e}") from None
    elif "name" in cfg:
        path = SHIPPED_PATHS[cfg["name"]]
        tensors, meta = read_checkpoint(path)
        arch = check_config(json.loads(meta[_META_MODEL]))
        with torch.random.fork_rng(devices=[]):
            model = ByteMamba(arch)
        if model.lm.lm_head.weight.device.type != "meta":  # the core sizes a config on the meta device first
            model.load_state_dict(tensors, strict=False)  # a tied lm_head.weight is the embedding
        missing = set(model.state_dict()) - set(tensors) - _tied(model)
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)[:3]}")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = ByteMamba(cfg)
    return describe_model(model.eval(), cfg)


def load_pretrained(path: str | Path, *, progress: bool = False) -> tuple[MambaLM, dict[str, Any]]:
    """A user's transformers Mamba / Mamba-2 folder (``save_pretrained``: config.json and weights), local files only,
    float32, and its model config ``{"hf_config": ...}`` (the artifact then needs no folder to rebuild).
    ``progress``: transformers' loading bar. ``ValueError`` with one line for a missing folder, no config.json,
    another model type or weights that do not load."""
    from transformers.utils import logging as hf_logging

    from polyquant.api import describe_model

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (pass 'tiny' or a transformers save_pretrained folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no config.json (not a transformers save_pretrained folder)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: unreadable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    hf = _hf_config(raw)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        lm = _lm_class(hf.model_type).from_pretrained(folder, config=hf, local_files_only=True, dtype=torch.float32,
                                                      use_safetensors=True)  # never a pickled .bin
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder}: the weights do not load: {first}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config = json.loads(lm.config.to_json_string(use_diff=False))
    model_config = {"hf_config": {k: v for k, v in config.items() if not k.startswith("_")}}  # no local paths
    return describe_model(MambaLM(lm).eval(), model_config), model_config


def load_tokenizer(path: str | Path) -> Any | None:
    """The tokenizer saved in a folder (transformers ``AutoTokenizer``, local files only), or None when the folder
    has none (then the model must be byte-level: vocab 256)."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: the tokenizer does not load: {e}") from None


def encode(data: bytes, tokenizer: Any | None, vocab_size: int) -> tuple[Tensor, float]:
    """Token ids (T,) int64 of ``data`` and its bytes per token: the bytes themselves for a byte-level model
    (no tokenizer, vocab 256), else the tokenizer's ids of the UTF-8 text. ``ValueError`` for a model that needs a
    tokenizer and has none, or ids beyond the vocabulary."""
    if tokenizer is None:
        if vocab_size != 256:
            raise ValueError(f"the model has a {vocab_size}-token vocabulary and no tokenizer: save the tokenizer in "
                             "its folder (tokenizer.save_pretrained) or pass --tokenizer FOLDER")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), 1.0
    text = data.decode("utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    if out.numel() and int(out.max()) >= vocab_size:
        raise ValueError(f"the tokenizer gives id {int(out.max())}, beyond the model's vocabulary of {vocab_size}")
    return out, len(text.encode("utf-8")) / max(out.numel(), 1)


def _tied(model: MambaLM) -> set[str]:
    """The state-dict key of lm_head's weight when it is the embedding's (not stored), else nothing."""
    return {"lm.lm_head.weight"} if getattr(model.lm.config, "tie_word_embeddings", False) else set()


def save_shipped(model: ByteMamba, arch: dict[str, int], meta: dict[str, Any]) -> Path:
    """Write the shipped checkpoint of the architecture's version (train.py): the state dict without the tied
    lm_head, the architecture and the training record in its metadata."""
    from polyquant.checkpoint import save_checkpoint

    state = {k: v for k, v in model.state_dict().items() if k not in _tied(model)}
    path = SHIPPED_PATHS[SHIPPED if arch.get("version", 1) == 1 else SHIPPED2]
    return save_checkpoint(state, path, {_META_MODEL: json.dumps(arch), "train": json.dumps(meta)})


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


def token_batches(ids: Tensor, *, batches: int, batch_size: int, seq_len: int, seed: int,
                  unit: str = "tokens") -> list[Tensor]:
    """``batches`` seeded random windows of the token ids (T,): int64 (batch_size, seq_len) each. ``ValueError``
    when the text is shorter than one sequence."""
    if ids.numel() < seq_len:
        raise ValueError(f"the text has {ids.numel()} {unit}, shorter than one sequence of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        start = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=g)
        out.append(torch.stack([ids[s: s + seq_len] for s in start.tolist()]))
    return out


def byte_batches(data: bytes, *, batches: int, batch_size: int, seq_len: int, seed: int) -> list[Tensor]:
    """``token_batches`` of the bytes themselves (byte-level models)."""
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
    return token_batches(ids, batches=batches, batch_size=batch_size, seq_len=seq_len, seed=seed, unit="bytes")


def bits_per_byte(model: nn.Module, batches: list[Tensor], bytes_per_token: float = 1.0) -> float:
    """Mean next-token cross-entropy over ``batches`` in bits, per byte of text (each position predicts the next
    token; ``bytes_per_token`` is 1 for byte-level models, the text's bytes / tokens for a tokenizer's ids)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids)[:, :-1].float()  # (B, L-1, vocab)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return total / count / math.log(2) / bytes_per_token


def inject_outliers(model: nn.Module, *, channels: int = 4, factor: float = 30.0) -> nn.Module:
    """Give the SSM input u of every mixer ``channels`` outlier channels (in place), as real Mamba checkpoints
    show: conv1d's weight and bias of those channels times ``factor`` (u = silu(conv) grows about ``factor``-fold
    where positive), x_proj's and out_proj's columns of them divided by ``factor`` (dt, B, C and the block output
    keep their scale). Not function-preserving (SiLU): the variant is its own float model. Channels 0, 1, ...
    spaced evenly over d_inner."""
    from .mixer import mixers

    found = mixers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no Mamba-1 mixer: inject_outliers scales Mamba-1's x_proj / "
                         "out_proj columns")
    for m in found.values():
        d = m.intermediate_size
        idx = torch.arange(channels) * (d // channels)
        with torch.no_grad():
            m.conv1d.weight[idx] *= factor
            if m.conv1d.bias is not None:
                m.conv1d.bias[idx] *= factor
            m.x_proj.weight[:, idx] /= factor
            m.out_proj.weight[:, idx] /= factor
    return model
