"""Cached (step-by-step) decoding of both Mamba mixers (``mixer.py``, ``mixer2.py``): the scans continued from a
state, cached greedy decoding vs the uncached reference on the shipped Mamba-1 and Mamba-2, their quamba fake-quant
copies and packed loads, the float mixers vs ``transformers``' own cached generation and cache contents, prompts
shorter than the conv kernel, multi-token chunks after a prefill, two groups of B / C, and the latency helper."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip("transformers")

from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan  # noqa: E402

import polyquant as pq  # noqa: E402
from polyquant.nn import QuantConv1d  # noqa: E402
from polyquant.packed import PackedConv  # noqa: E402
from polyquant.plugins.ssm.decode import decode_latency, greedy_decode, greedy_steps  # noqa: E402
from polyquant.plugins.ssm.mixer import QuantMambaMixer, replace_mixers, selective_scan  # noqa: E402
from polyquant.plugins.ssm.mixer2 import QuantMamba2Mixer, replace_mamba2_mixers, ssd_scan, ssd_scan_state  # noqa: E402
from polyquant.plugins.ssm.models import SHIPPED, SHIPPED2, build_model, byte_batches, text_bytes  # noqa: E402
from polyquant.plugins.ssm.quamba import QuambaConfig  # noqa: E402

STEPS = 16
# Float: the cached and uncached paths compute the same sums in other groupings (a (B, 1, d) matmul instead of
# (B, T, d), one state update per call), measured max |logit difference| ~3e-6 (Mamba-1 3.8e-6, Mamba-2 2.9e-6; the
# same against HF's cached generate) on logits of magnitude ~10; 1e-4 leaves room for other BLAS.
FLOAT_ATOL = 1e-4
# Fake quant: the same static scales on both paths, so identical int8 codes unless float noise moves a value across
# a rounding midpoint (a tie flip: one code by one step). Measured ~3e-6 (no flip on these prompts); 1e-3 admits
# float noise and rare small flips, and tokens must still agree except at a near tie (``_assert_agrees``).
QUANT_ATOL = 1e-3
# Packed: in_proj / out_proj are integer matmuls (exact whatever the row count), the rest the same float ops as the
# reference: measured 0; the float tolerance.
PACKED_ATOL = 1e-4
VERSIONS = {"mamba": (SHIPPED, replace_mixers, QuantMambaMixer), "mamba2": (SHIPPED2, replace_mamba2_mixers,
                                                                            QuantMamba2Mixer)}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: one thread (conftest)


@pytest.fixture(scope="module", params=list(VERSIONS))
def version(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def shipped(version: str) -> nn.Module:
    return build_model({"name": VERSIONS[version][0]})


@pytest.fixture(scope="module")
def prompts() -> list[Tensor]:
    """Four seeded batches of held-out text: (2, 16), (2, 2) and (2, 1) (shorter than the conv kernel, 4), (3, 40)."""
    data = text_bytes("test", limit=50_000)
    return [byte_batches(data, batches=1, batch_size=2, seq_len=16, seed=7)[0],
            byte_batches(data, batches=1, batch_size=2, seq_len=2, seed=8)[0],
            byte_batches(data, batches=1, batch_size=2, seq_len=1, seed=11)[0],
            byte_batches(data, batches=1, batch_size=3, seq_len=40, seed=10)[0]]


@pytest.fixture(scope="module")
def models(shipped: nn.Module, version: str, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, tuple[nn.Module, float]]:
    """name -> (the transformers causal LM, its logit tolerance)."""
    float_mixer = copy.deepcopy(shipped)
    VERSIONS[version][1](float_mixer)
    calib = byte_batches(text_bytes("train", limit=50_000), batches=2, batch_size=4, seq_len=64, seed=1)
    quantized = pq.quantize(shipped, QuambaConfig(), calib=calib, progress=False)
    path = Path(tmp_path_factory.mktemp(f"ssm_decode_{version}")) / "quamba"
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


@pytest.mark.parametrize("groups", [1, 2])
def test_scan_continued_from_its_state_equals_one_scan_and_hf(groups: int) -> None:
    g = torch.Generator().manual_seed(0)
    bsz, length, heads, p, n = 2, 11, 4, 3, 5
    x = torch.randn(bsz, length, heads, p, generator=g)
    dt = F.softplus(torch.randn(bsz, length, heads, generator=g))
    a, d = -torch.rand(heads, generator=g) * 2, torch.randn(heads, generator=g)
    b, c = torch.randn(bsz, length, groups, n, generator=g), torch.randn(bsz, length, groups, n, generator=g)
    y, h = ssd_scan_state(x, dt, a, b, c, d)
    assert y.shape == (bsz, length, heads, p) and h.shape == (bsz, heads, p, n)
    torch.testing.assert_close(ssd_scan(x, dt, a, b, c, d), y, rtol=0, atol=0)
    y1, h1 = ssd_scan_state(x[:, :3], dt[:, :3], a, b[:, :3], c[:, :3], d)  # a prefill, a chunk of 4, then steps
    ys = [y1]
    y2, h1 = ssd_scan_state(x[:, 3:7], dt[:, 3:7], a, b[:, 3:7], c[:, 3:7], d, h1)
    ys.append(y2)
    for t in range(7, length):
        y_t, h1 = ssd_scan_state(x[:, t:t + 1], dt[:, t:t + 1], a, b[:, t:t + 1], c[:, t:t + 1], d, h1)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, dim=1), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1, h, rtol=1e-6, atol=1e-6)
    # HF's chunked scan from the same initial state gives the same outputs and final state (its layout (B, H, P, N))
    h0 = torch.randn(bsz, heads, p, n, generator=g)
    ref_y, ref_h = mamba2_chunk_scan(x, dt, a, b, c, chunk_size=4, D=d, initial_states=h0, return_final_states=True)
    got_y, got_h = ssd_scan_state(x, dt, a, b, c, d, h0)
    torch.testing.assert_close(got_y, ref_y, rtol=1e-5, atol=1e-5)  # measured ~1e-6 (float32 rounding)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("name", ["float-quant-mixer", "quamba", "quamba-packed"])
def test_cached_greedy_decoding_equals_the_uncached_reference(models, version: str, prompts: list[Tensor],
                                                              name: str) -> None:
    lm, atol = models[name]
    mixers = [layer.mixer for layer in lm.backbone.layers]
    assert all(isinstance(m, VERSIONS[version][2]) for m in mixers)
    conv_type = {"float-quant-mixer": nn.Conv1d, "quamba": QuantConv1d, "quamba-packed": PackedConv}[name]
    assert all(type(m.conv1d) is conv_type for m in mixers)  # the step path runs through this conv
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
        with torch.no_grad():  # transformers' own cached path (its mixer), eos never reached (min_new_tokens)
            hf = shipped.lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                     max_new_tokens=STEPS, min_new_tokens=STEPS, output_logits=True,
                                     return_dict_in_generate=True)
            ours_generate = lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                        use_cache=True, max_new_tokens=STEPS, min_new_tokens=STEPS)
        ids, logits = greedy_steps(lm, prompt, STEPS, use_cache=True)
        _assert_agrees(hf.sequences, torch.stack(hf.logits, dim=1).float(), ids, logits, prompt.shape[1], FLOAT_ATOL)
        assert torch.equal(ours_generate, ids)  # generate runs on the replaced mixers too
    prompt = prompts[0]  # left padding: the mask reaches the prefill (the steps get none, as in HF)
    mask = torch.ones_like(prompt)
    mask[0, :5] = 0
    with torch.no_grad():
        kwargs = dict(attention_mask=mask, do_sample=False, use_cache=True, max_new_tokens=STEPS,
                      min_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True)
        hf, ours = shipped.lm.generate(prompt, **kwargs), lm.generate(prompt, **kwargs)
    _assert_agrees(hf.sequences, torch.stack(hf.logits, dim=1).float(), ours.sequences,
                   torch.stack(ours.logits, dim=1).float(), prompt.shape[1], FLOAT_ATOL)


def test_cache_holds_transformers_states(shipped: nn.Module, models, prompts: list[Tensor]) -> None:
    """After a prefill shorter than the conv kernel and a step, the float mixer's cache holds what HF's holds (the
    zero-padded conv inputs (B, C, K) and the SSM state), and a cache HF prefilled continues in ours."""
    lm, _ = models["float-quant-mixer"]
    prompt = prompts[1]  # (2, 2)
    caches = []
    with torch.no_grad():
        for model in (shipped.lm, lm):
            cache = model(input_ids=prompt, use_cache=True).cache_params
            model(input_ids=prompt[:, -1:], cache_params=cache, use_cache=True)
            caches.append(cache)
    config = shipped.lm.config
    for i in range(config.num_hidden_layers):
        ref_conv, conv = caches[0].get_conv_state(i), caches[1].get_conv_state(i)
        assert conv.shape == ref_conv.shape and conv.shape[-1] == config.conv_kernel
        assert torch.all(conv[..., 0] == 0)  # K = 4 slots, 3 inputs: the first is the prefill's zero padding
        torch.testing.assert_close(conv, ref_conv, rtol=0, atol=1e-5)
        ref_h, h = caches[0].get_recurrent_state(i), caches[1].get_recurrent_state(i)
        assert h.shape == ref_h.shape
        torch.testing.assert_close(h, ref_h, rtol=0, atol=1e-5)
    ids = torch.cat([prompt, prompt[:, -1:]], dim=1)  # what both caches hold
    nxt = prompts[0][:, :3]
    with torch.no_grad():
        whole = lm(input_ids=torch.cat([ids, nxt], dim=1), use_cache=False).logits[:, ids.shape[1]:]
        cont = lm(input_ids=nxt, cache_params=caches[0], use_cache=True).logits  # HF's cache, our mixers
    torch.testing.assert_close(cont, whole, rtol=0, atol=FLOAT_ATOL)


def test_two_groups_of_b_c_decode_as_transformers() -> None:
    """The shipped model has one group of B / C; a seeded tiny Mamba-2 with 2 groups (4 heads each), D, the gated
    norm's weight and the conv bias drawn away from 1 / 1 / 0: the float mixer's cached greedy decoding equals HF's
    generate and the uncached reference, and a chunk after a prefill continues the sequence."""
    config = Mamba2Config(vocab_size=256, hidden_size=64, expand=2, head_dim=16, num_heads=8, n_groups=2,
                          state_size=16, num_hidden_layers=2, conv_kernel=4, chunk_size=8, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = Mamba2ForCausalLM(config).eval()
        with torch.no_grad():
            for layer in hf.backbone.layers:
                layer.mixer.D.normal_(1.0, 0.5)
                layer.mixer.norm.weight.normal_(1.0, 0.2)
                layer.mixer.conv1d.bias.normal_(0.0, 0.2)
    ours = copy.deepcopy(hf)
    replace_mamba2_mixers(ours)
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                          max_new_tokens=8, min_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    ids, logits = greedy_steps(ours, prompt, 8)
    _assert_agrees(ref.sequences, torch.stack(ref.logits, dim=1).float(), ids, logits, 3, FLOAT_ATOL)
    _assert_agrees(*greedy_steps(ours, prompt, 8, use_cache=False), ids, logits, 3, FLOAT_ATOL)
    with torch.no_grad():
        whole = ours(input_ids=ids, use_cache=False).logits
        cache = ours(input_ids=ids[:, :5], use_cache=True).cache_params
        chunk = ours(input_ids=ids[:, 5:], cache_params=cache, use_cache=True).logits
    torch.testing.assert_close(chunk, whole[:, 5:], rtol=0, atol=FLOAT_ATOL)



@pytest.mark.parametrize("name", ["float-quant-mixer", "quamba", "quamba-packed"])
def test_a_chunk_after_the_prefill_continues_the_sequence(models, name: str) -> None:
    lm, atol = models[name]
    ids = byte_batches(text_bytes("test", limit=50_000), batches=1, batch_size=2, seq_len=20, seed=9)[0]
    with torch.no_grad():
        whole = lm(input_ids=ids, use_cache=False).logits  # (B, 20, V)
        for split in (2, 12):  # a prefill shorter than the conv kernel, then a chunk of 18; 12 then 8
            cache = lm(input_ids=ids[:, :split], use_cache=True).cache_params
            chunk = lm(input_ids=ids[:, split:], cache_params=cache, use_cache=True).logits  # (B, 20 - split, V)
            torch.testing.assert_close(chunk, whole[:, split:], rtol=0, atol=atol)  # measured <= 3e-6


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
