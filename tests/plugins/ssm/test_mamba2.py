"""The SSM plugin on Mamba-2 (``mixer2.py``): the float mixer equals ``transformers``' ``Mamba2ForCausalLM`` (with
and without padding), the sequential scan equals HF's chunked one, every quantizer of the table is placed exactly,
the quantized logits stay near float, the rotations are exact in float, and the errors name what is wrong."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan  # noqa: E402

from polyquant.config import UsageError  # noqa: E402
from polyquant.nn import (  # noqa: E402
    ActQuantizer, QuantConv1d, QuantLinear, QuantSpec, Quantizer, RotatedLinear, calibrate)
from polyquant.primitives import PerTensor  # noqa: E402
from polyquant.plugins.ssm.mixer2 import (  # noqa: E402
    MAMBA2_POINTS, QuantMamba2Mixer, mamba2_mixers, mamba2_placements, quantize_mamba2_mixer, replace_mamba2_mixers,
    ssd_scan)

ACT, WEIGHT = QuantSpec("int8"), QuantSpec("int8")
U = QuantSpec("int8", observer="abs_percentile", percentile=99.999)  # Quamba's alpha for Mamba
# Every quantizer of one Mamba-2 mixer with Quamba's placement (relative name -> observer); nothing else is quantized.
MIXER_QUANTIZERS = {
    "in_proj.input_quantizer": "minmax", "in_proj.weight_quantizer": "minmax", "in_proj.output_quantizer": "minmax",
    "conv1d.weight_quantizer": "minmax",
    "u_quantizer": "abs_percentile", "bc_quantizer": "minmax",
    "A_log_quantizer": "minmax", "D_quantizer": "minmax", "dt_bias_quantizer": "minmax",
    "out_proj.input_quantizer": "minmax", "out_proj.weight_quantizer": "minmax",
}
SIZES = r"2\^k, 12 \* 2\^k or 40 \* 2\^k"


def tiny_mamba2(n_groups: int, *, hidden_size: int = 64, seed: int = 0) -> Mamba2ForCausalLM:
    """A seeded 2-layer byte-vocabulary Mamba-2 (d_inner = 2 hidden_size, heads of 16), HF's init with D, the gated
    norm's weight and the conv bias drawn away from 1 / 1 / 0 so that a mixed-up head or group shows."""
    config = Mamba2Config(vocab_size=256, hidden_size=hidden_size, expand=2, head_dim=16,
                          num_heads=2 * hidden_size // 16, n_groups=n_groups, state_size=16, num_hidden_layers=2,
                          conv_kernel=4, chunk_size=8, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Mamba2ForCausalLM(config).eval()
        with torch.no_grad():
            for m in mamba2_mixers(model).values():
                m.D.normal_(1.0, 0.5)
                m.norm.weight.normal_(1.0, 0.2)
                m.conv1d.bias.normal_(0.0, 0.2)
    return model


def tokens(seed: int, batches: int, batch_size: int = 4, length: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch_size, length), generator=gen) for _ in range(batches)]


def quamba(model: nn.Module, *, rotate_in: bool = False) -> nn.Module:
    """A copy of ``model`` with Quamba's Mamba-2 placement, calibrated on 4 batches of random bytes."""
    q = copy.deepcopy(model)
    for name, m in replace_mamba2_mixers(q).items():
        quantize_mamba2_mixer(name, m, mamba2_placements(ACT, WEIGHT, U), rotate_out=True, rotate_in=rotate_in)
    calibrate(q, tokens(100, 4), progress=False)
    return q


@pytest.fixture(scope="module", params=[1, 2], ids=["groups1", "groups2"])
def model(request: pytest.FixtureRequest) -> Mamba2ForCausalLM:
    return tiny_mamba2(request.param)


# --- the float mixer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padding"])
def test_float_mixer_equals_transformers(model: Mamba2ForCausalLM, padded: bool) -> None:
    x = tokens(3, 1, batch_size=2, length=21)[0]  # 21: not a multiple of HF's chunk size 8
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # row 0 left-padded
    am = mask if padded else None
    ours = copy.deepcopy(model)
    replaced = replace_mamba2_mixers(ours)
    assert sorted(replaced) == [f"backbone.layers.{i}.mixer" for i in range(2)]
    assert all(isinstance(m, QuantMamba2Mixer) for m in mamba2_mixers(ours).values())
    with torch.no_grad():
        ref = model(x, attention_mask=am).logits
        got = ours(x, attention_mask=am).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # measured: max |diff| < 1e-6, ||diff|| / ||ref|| 2e-7
    if padded:  # the mask reached the mixers: row 0 differs from its unmasked run, row 1 (no padding) does not
        with torch.no_grad():
            free = ours(x).logits
        assert not torch.allclose(got[0], free[0], atol=1e-3)
        torch.testing.assert_close(got[1], free[1], rtol=1e-5, atol=1e-5)


def test_ssd_scan_equals_hf_chunked_scan() -> None:
    gen = torch.Generator().manual_seed(0)
    bsz, length, heads, p, n = 2, 19, 4, 3, 5
    x = torch.randn(bsz, length, heads, p, generator=gen)
    dt_raw = torch.randn(bsz, length, heads, generator=gen)
    dt_bias = torch.randn(heads, generator=gen)
    a = -torch.rand(heads, generator=gen) * 2
    d = torch.randn(heads, generator=gen)
    for groups in (1, 2, 4):  # 4: one group per head
        b = torch.randn(bsz, length, groups, n, generator=gen)
        c = torch.randn(bsz, length, groups, n, generator=gen)
        ref = mamba2_chunk_scan(x, dt_raw, a, b, c, chunk_size=8, D=d, dt_bias=dt_bias, dt_softplus=True)
        dt = F.softplus(dt_raw + dt_bias)
        got = ssd_scan(x, dt, a, b, c, d)
        assert float((got - ref).norm() / ref.norm()) < 1e-5  # measured ~1e-7 (float32 rounding)


# --- the quantized mixer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotate_in", [False, True], ids=["quamba", "quamba+rotated_in_proj"])
def test_every_quantizer_is_placed_exactly(model: Mamba2ForCausalLM, rotate_in: bool) -> None:
    assert tuple(mamba2_placements(ACT, WEIGHT, U)) == MAMBA2_POINTS and set(MAMBA2_POINTS) == set(MIXER_QUANTIZERS)
    q = quamba(model, rotate_in=rotate_in)
    found = {name: m for name, m in q.named_modules() if isinstance(m, Quantizer)}
    prefix = "backbone.layers.{}.mixer"
    assert set(found) == {f"{prefix.format(i)}.{rel}" for i in range(2) for rel in MIXER_QUANTIZERS}
    for name, quantizer in found.items():
        mixer, rel = name.split(".mixer.")
        assert (quantizer.spec.fmt.name, type(quantizer.spec.granularity), quantizer.spec.symmetric,
                quantizer.spec.dynamic) == ("int8", PerTensor, True, False), name
        assert quantizer.spec.observer == MIXER_QUANTIZERS[rel], name
        assert quantizer.state == "quantized" and quantizer.scale.numel() == 1, name
        assert float(quantizer.zero_point) == 0.0, name
        # named f"{mixer}.<point>_quantizer" (the mixer's own) or f"{mixer}.<layer>.<weight|input|output>" (core's)
        assert quantizer.name == f"{mixer}.mixer.{rel if '.' not in rel else rel.removesuffix('_quantizer')}", name
    for i in range(2):
        m = q.get_submodule(prefix.format(i))
        assert isinstance(m, QuantMamba2Mixer)
        assert type(m.in_proj) is (RotatedLinear if rotate_in else QuantLinear)
        assert type(m.conv1d) is QuantConv1d and m.conv1d.input_quantizer is None  # int8 in: in_proj's output
        assert type(m.out_proj) is RotatedLinear and m.out_proj.output_quantizer is None
        assert all(type(getattr(m, f"{p}_quantizer")) is ActQuantizer for p in ("u", "bc", "A_log", "D", "dt_bias"))
    # embedding, norms (the gated one included), lm_head and the residual stream stay float
    assert type(q.backbone.embeddings) is nn.Embedding and type(q.lm_head) is nn.Linear
    floats = [q.backbone.norm_f] + [layer.norm for layer in q.backbone.layers] + \
        [layer.mixer.norm for layer in q.backbone.layers]
    assert not any(isinstance(x, Quantizer) for f in floats for x in f.modules())


def test_quantized_logits_stay_near_float(model: Mamba2ForCausalLM) -> None:
    # Measured over these 3 held-out seeds (8 x 64 random bytes), n_groups 1 and 2: ||q - f|| / ||f|| 0.050-0.052,
    # KL(f || q) 7.8e-4-8.4e-4 nats per token. Each int8 point alone gives 0.0001 (A_log) to 0.030 (u) and they add
    # in quadrature to ~0.05, as independent rounding noise should; int4 weights at the same points give 0.44-0.47.
    # The bounds are ~1.5x the measured worst; the lower one shows the quantizers act.
    q = quamba(model)
    for seed in (1, 2, 3):
        x = tokens(seed, 1, batch_size=8, length=64)[0]
        with torch.no_grad():
            f, z = model(x).logits, q(x).logits
        rel = float((z - f).norm() / f.norm())
        kl = float(F.kl_div(z.log_softmax(-1), f.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())
        assert 0.01 < rel < 0.08 and kl < 1.3e-3, (seed, rel, kl)


def test_rotations_are_exact_in_float(model: Mamba2ForCausalLM) -> None:
    ours = copy.deepcopy(model)
    originals = {name: (m.in_proj, m.out_proj) for name, m in mamba2_mixers(model).items()}
    for name, m in replace_mamba2_mixers(ours).items():
        quantize_mamba2_mixer(name, m, {}, rotate_out=True, rotate_in=True)  # no point quantized: only H, H^T
        assert type(m.out_proj) is RotatedLinear and type(m.in_proj) is RotatedLinear
        assert m.out_proj.input_quantizer is None and m.out_proj.weight_quantizer is None and m.u_quantizer is None
        in_proj, out_proj = originals[name]
        y = torch.randn(3, 7, out_proj.in_features, generator=torch.Generator().manual_seed(1))
        h = torch.randn(3, 7, in_proj.in_features, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(m.out_proj(y), out_proj(y), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m.in_proj(h), in_proj(h), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(x, Quantizer) for x in ours.modules())
    x = tokens(4, 1, batch_size=2, length=24)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


# --- errors --------------------------------------------------------------------------------------------------------


def test_unsupported_hadamard_size_names_the_sizes() -> None:
    # hidden 72: d_inner 144 = 9 heads of 16; 144 = 36 * 4 is a core (Paley) Hadamard size but not one of Quamba's
    model = tiny_mamba2(1, hidden_size=72)
    name, m = next(iter(replace_mamba2_mixers(model).items()))
    spec = mamba2_placements(ACT, WEIGHT, U)
    with pytest.raises(UsageError, match=rf"d_inner of {name} is 144,.*{SIZES}"):
        quantize_mamba2_mixer(name, m, spec, rotate_out=True, rotate_in=False)
    with pytest.raises(UsageError, match=rf"hidden size of {name} is 72,.*{SIZES}"):
        quantize_mamba2_mixer(name, m, spec, rotate_out=False, rotate_in=True)
    assert type(m.in_proj) is nn.Linear and type(m.out_proj) is nn.Linear and m.u_quantizer is None  # untouched
    quantize_mamba2_mixer(name, m, spec, rotate_out=False, rotate_in=False)  # no rotation: any size
    assert type(m.out_proj) is QuantLinear


def test_errors_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not a Mamba-2 model"):
        replace_mamba2_mixers(nn.Sequential(nn.Linear(4, 4)))
    mamba1 = MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=16, num_hidden_layers=1, state_size=4))
    assert mamba2_mixers(mamba1) == {}
    with pytest.raises(ValueError, match="MambaForCausalLM has no transformers Mamba2Mixer: not a Mamba-2 model"):
        replace_mamba2_mixers(mamba1)
    model = tiny_mamba2(1)
    name, m = next(iter(replace_mamba2_mixers(model).items()))
    assert replace_mamba2_mixers(model) == {}  # already replaced: nothing new, no error
    with pytest.raises(ValueError, match="did you mean u_quantizer"):
        quantize_mamba2_mixer(name, m, {"u_quantiser": ACT}, rotate_out=False, rotate_in=False)
