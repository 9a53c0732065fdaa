"""Greedy token-by-token decoding of a ``transformers`` Mamba or Mamba-2 causal LM (float, fake-quantized or packed),
with the cache (the step path of ``QuantMambaMixer`` / ``QuantMamba2Mixer`` or HF's mixers) or without it (the whole
sequence again each step: the reference), and its latency at batch 1.

    greedy_decode(lm, prompt (B, P), steps) -> ids (B, P + steps)
    greedy_steps(lm, prompt, steps) -> (ids (B, P + steps), logits (B, steps, V))   the logits each token came from
    decode_latency(lm, prompt (1, P), steps, warmup=...) -> {"prefill_s": ..., "decode_s_per_token": ..., ...}

``lm`` is the ``MambaForCausalLM`` or ``Mamba2ForCausalLM`` (``build_model(...).lm``, ``quantize(...).model.lm``), in
eval mode. The cache is the one the model builds itself: the prefill call (``use_cache=True``, no ``cache_params``)
returns it as ``cache_params`` (a ``DynamicCache`` of linear-attention layers in transformers 5), and each step hands
it back with the one new token. The loop is written out rather than ``lm.generate``: the byte model's eos (and pad) id
is 0, a real byte, on which ``generate`` would stop and pad; and the same loop with ``use_cache=False`` is the
reference, so that the two differ only in the cache. ``lm.generate(..., do_sample=False, use_cache=True)`` also
runs on the replaced mixers (tested).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["greedy_decode", "greedy_steps", "decode_latency"]


def _next_logits(lm: nn.Module, ids: Tensor, cache: Any, *, use_cache: bool) -> tuple[Tensor, Any]:
    """The logits (B, V) of the token after ids (B, T) and the cache to pass next. With the cache, the first call
    (cache None) is the prefill of all of ids and a later one feeds only the last token; without it, every call
    runs all of ids."""
    if not use_cache:
        return lm(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float(), None
    new = ids if cache is None else ids[:, -1:]  # (B, T) or (B, 1)
    out = lm(input_ids=new, cache_params=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.cache_params


def _device(lm: nn.Module) -> torch.device:
    return lm.get_input_embeddings().weight.device


def greedy_steps(lm: nn.Module, prompt: Tensor, steps: int, *, use_cache: bool = True) -> tuple[Tensor, Tensor]:
    """Greedy (argmax) decoding of ``steps`` tokens after ``prompt`` (B, P) int64 -> the ids (B, P + steps) and
    the logits (B, steps, V) float32 each new token is the argmax of."""
    if prompt.ndim != 2 or prompt.shape[1] < 1 or steps < 0:
        raise ValueError(f"prompt is (B, P) with P >= 1 and steps >= 0, got {tuple(prompt.shape)} and {steps}")
    ids = prompt.to(_device(lm), torch.long)
    cache, logits = None, []
    with torch.no_grad():
        for _ in range(steps):
            step_logits, cache = _next_logits(lm, ids, cache, use_cache=use_cache)  # (B, V)
            logits.append(step_logits)
            ids = torch.cat([ids, step_logits.argmax(-1, keepdim=True)], dim=1)
    vocab = lm.config.vocab_size
    return ids, torch.stack(logits, dim=1) if logits else ids.new_zeros(ids.shape[0], 0, vocab, dtype=torch.float)


def greedy_decode(lm: nn.Module, prompt: Tensor, steps: int, *, use_cache: bool = True) -> Tensor:
    """Greedy decoding: prompt (B, P) int64 -> ids (B, P + steps), the prompt followed by ``steps`` argmax tokens.
    ``use_cache=False`` reruns the whole sequence for every token (the reference)."""
    return greedy_steps(lm, prompt, steps, use_cache=use_cache)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_latency(lm: nn.Module, prompt: Tensor, steps: int, *, warmup: int = 2,
                   use_cache: bool = True) -> dict[str, Any]:
    """Seconds per generated token of ``greedy_decode`` at batch 1: prompt (1, P), ``steps`` >= 2 tokens, after
    ``warmup`` untimed runs of the same decode (CUDA synchronized around each timed span).

    Returns ``prefill_s`` (the prompt call, which gives the first token), ``decode_s_per_token`` (the mean of the
    ``steps - 1`` calls after it, one token each), ``s_per_token`` (the whole decode over ``steps``), and the run's
    ``device``, ``prompt_len``, ``steps``, ``use_cache``.
    """
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"decode_latency times batch 1: prompt is (1, P), got {tuple(prompt.shape)}")
    if steps < 2 or warmup < 0:
        raise ValueError(f"steps >= 2 and warmup >= 0, got {steps} and {warmup}")
    device = _device(lm)
    for _ in range(warmup):
        greedy_steps(lm, prompt, steps, use_cache=use_cache)
    ids = prompt.to(device, torch.long)
    cache = None
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step_logits, cache = _next_logits(lm, ids, cache, use_cache=use_cache)
            ids = torch.cat([ids, step_logits.argmax(-1, keepdim=True)], dim=1)
            if i == 0:
                _sync(device)
                prefilled = time.perf_counter()
        _sync(device)
        end = time.perf_counter()
    return {"device": str(device), "prompt_len": int(prompt.shape[1]), "steps": steps, "use_cache": use_cache,
            "prefill_s": prefilled - start, "decode_s_per_token": (end - prefilled) / (steps - 1),
            "s_per_token": (end - start) / steps}
