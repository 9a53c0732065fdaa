"""Cached (step-by-step) decoding of the Mamba mixer: the scan continued from a state, cached greedy decoding vs the
uncached reference on the float, quamba fake-quant and quamba packed models, the float ``QuantMambaMixer`` vs
``transformers``' own cached generation, and the latency helper."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("transformers")

import polyquant as pq  # noqa: E402
from polyquant.plugins.ssm.decode import decode_latency, greedy_decode, greedy_steps  # noqa: E402
from polyquant.plugins.ssm.mixer import QuantMambaMixer, replace_mixers, selective_scan  # noqa: E402
from polyquant.plugins.ssm.models import SHIPPED, build_model, byte_batches, text_bytes  # noqa: E402
from polyquant.plugins.ssm.quamba import QuambaConfig  # noqa: E402

STEPS = 16
# Float: the cached and uncached paths compute the same sums in other groupings (a (B, 1, d) matmul instead of
# (B, T, d)), measured max |logit difference| ~3e-6 on logits of magnitude ~10; 1e-4 leaves room for other BLAS.
FLOAT_ATOL = 1e-4
# Fake quant: the same static scales on both paths, so identical int8 codes unless float noise moves a value across
# a rounding midpoint (a tie flip: one code by one step). Measured ~3e-6 (no flip on these prompts); 1e-3 admits
# float noise and rare small flips, and tokens must still agree except at a near tie (``_assert_agrees``).
QUANT_ATOL = 1e-3
# Packed: in_proj / out_proj are integer matmuls (exact whatever the row count), the rest the same float ops as the
# reference: measured 0; the float tolerance.
PACKED_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: one thread (conftest)


@pytest.fixture(scope="module")
def shipped() -> nn.Module:
    return build_model({"name": SHIPPED})


@pytest.fixture(scope="module")
def prompts() -> list[Tensor]:
    """Three seeded batches of held-out text: (2, 16), (2, 2) (shorter than the conv kernel, 4) and (3, 40)."""
    data = text_bytes("test", limit=50_000)
    return [byte_batches(data, batches=1, batch_size=2, seq_len=16, seed=7)[0],
            byte_batches(data, batches=1, batch_size=2, seq_len=2, seed=8)[0],
            byte_batches(data, batches=1, batch_size=3, seq_len=40, seed=10)[0]]


@pytest.fixture(scope="module")
def quantized(shipped: nn.Module) -> pq.QuantizedModel:
    calib = byte_batches(text_bytes("train", limit=50_000), batches=2, batch_size=2, seq_len=32, seed=1)
    return pq.quantize(shipped, QuambaConfig(), calib=calib, progress=False)


@pytest.fixture(scope="module")
def models(shipped: nn.Module, quantized: pq.QuantizedModel, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, tuple[nn.Module, float]]:
    """name -> (the MambaForCausalLM, its logit tolerance)."""
    float_mixer = copy.deepcopy(shipped)
    replace_mixers(float_mixer)
    path = Path(tmp_path_factory.mktemp("ssm_decode")) / "quamba"
    pq.save(quantized, path)
    packed = pq.load(path, mode="packed").model
    return {"float-quant-mixer": (float_mixer.lm, FLOAT_ATOL),
            "quamba": (quantized.model.lm, QUANT_ATOL), "quamba-packed": (packed.lm, PACKED_ATOL)}


def _assert_agrees(ref_ids: Tensor, ref_logits: Tensor, ids: Tensor, logits: Tensor, prompt_len: int,
                   atol: float) -> None:
    """Greedy runs agree as far as the maths guarantees: per row, the logits within ``atol`` up to the first
    differing token (after it the prefixes differ), and a token may differ only where the reference's top two
    logits are within 2 * atol of each other (a near tie that logit noise of ``atol`` can flip)."""
    for row in range(ids.shape[0]):
        new, ref_new = ids[row, prompt_len:], ref_ids[row, prompt_len:]  # (steps,)
        differ = (new != ref_new).nonzero()
        last = int(differ[0]) if len(differ) else new.numel() - 1
        torch.testing.assert_close(logits[row, : last + 1], ref_logits[row, : last + 1], rtol=0, atol=atol)
        if len(differ):
            step_logits = ref_logits[row, last]  # (V,)
            margin = float(step_logits[ref_new[last]] - step_logits[new[last]])
            assert margin <= 2 * atol, f"row {row} step {last}: token flipped with a reference margin {margin}"


def test_scan_continued_from_its_state_equals_one_scan() -> None:
    g = torch.Generator().manual_seed(0)
    bsz, length, d, n = 2, 9, 8, 4
    u, dt = torch.randn(bsz, length, d, generator=g), torch.rand(bsz, length, d, generator=g)
    a, d_skip = -torch.rand(d, n, generator=g) - 0.1, torch.randn(d, generator=g)
    b, c = torch.randn(bsz, length, n, generator=g), torch.randn(bsz, length, n, generator=g)
    y, h = selective_scan(u, dt, a, b, c, d_skip)
    assert y.shape == (bsz, length, d) and h.shape == (bsz, d, n)
    y1, h1 = selective_scan(u[:, :5], dt[:, :5], a, b[:, :5], c[:, :5], d_skip)  # a prefill, then steps of one
    ys = [y1]
    for t in range(5, length):
        y_t, h1 = selective_scan(u[:, t:t + 1], dt[:, t:t + 1], a, b[:, t:t + 1], c[:, t:t + 1], d_skip, h1)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, dim=1), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1, h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["float-quant-mixer", "quamba", "quamba-packed"])
def test_cached_greedy_decoding_equals_the_uncached_reference(models, prompts: list[Tensor], name: str) -> None:
    lm, atol = models[name]
    assert all(isinstance(layer.mixer, QuantMambaMixer) for layer in lm.backbone.layers)
    for prompt in prompts:
        ref_ids, ref_logits = greedy_steps(lm, prompt, STEPS, use_cache=False)
        ids, logits = greedy_steps(lm, prompt, STEPS, use_cache=True)
        assert ids.shape == (prompt.shape[0], prompt.shape[1] + STEPS) and logits.shape == (prompt.shape[0], STEPS, 256)
        assert torch.equal(ids[:, : prompt.shape[1]], prompt)
        _assert_agrees(ref_ids, ref_logits, ids, logits, prompt.shape[1], atol)


def test_float_quant_mixer_cached_equals_transformers_generation(shipped: nn.Module, models,
                                                                 prompts: list[Tensor]) -> None:
    lm, _ = models["float-quant-mixer"]
    for prompt in prompts:
        with torch.no_grad():  # transformers' own cached path (its MambaMixer), eos never reached (min_new_tokens)
            hf = shipped.lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                     max_new_tokens=STEPS, min_new_tokens=STEPS, output_logits=True,
                                     return_dict_in_generate=True)
            ours_generate = lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                        use_cache=True, max_new_tokens=STEPS, min_new_tokens=STEPS)
        ids, logits = greedy_steps(lm, prompt, STEPS, use_cache=True)
        _assert_agrees(hf.sequences, torch.stack(hf.logits, dim=1).float(), ids, logits, prompt.shape[1], FLOAT_ATOL)
        assert torch.equal(ours_generate, ids)  # generate runs on the replaced mixers too


@pytest.mark.parametrize("name", ["float-quant-mixer", "quamba"])
def test_a_chunk_after_the_prefill_continues_the_sequence(models, name: str) -> None:
    lm, atol = models[name]
    ids = byte_batches(text_bytes("test", limit=50_000), batches=1, batch_size=2, seq_len=20, seed=9)[0]
    with torch.no_grad():
        whole = lm(input_ids=ids, use_cache=False).logits  # (B, 20, V)
        cache = lm(input_ids=ids[:, :12], use_cache=True).cache_params
        chunk = lm(input_ids=ids[:, 12:], cache_params=cache, use_cache=True).logits  # (B, 8, V)
    torch.testing.assert_close(chunk, whole[:, 12:], rtol=0, atol=atol)


def test_greedy_decode_and_latency(models, prompts: list[Tensor]) -> None:
    lm, _ = models["quamba-packed"]
    prompt = prompts[0][:1]
    ids = greedy_decode(lm, prompt, 3)
    assert torch.equal(ids, greedy_steps(lm, prompt, 3)[0]) and ids.shape == (1, prompt.shape[1] + 3)
    assert torch.equal(greedy_decode(lm, prompt, 0), prompt)
    out = decode_latency(lm, prompt, 3, warmup=1)
    assert out["device"] == "cpu" and out["steps"] == 3 and out["use_cache"] is True
    assert all(out[k] > 0 for k in ("prefill_s", "decode_s_per_token", "s_per_token"))
    with pytest.raises(ValueError, match="batch 1"):
        decode_latency(lm, prompts[0], 3, warmup=0)
