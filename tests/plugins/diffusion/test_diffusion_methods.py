"""The diffusion plugin's methods on the shipped digits DiT: FP4DiT's quantizer placement, its errors, calibration
across timesteps, and FP4DiT vs the INT min-max baseline on samples (same labels and noise as the float model)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import polyquant as pq  # noqa: E402
from polyquant.config import ConfigError, UsageError  # noqa: E402
from polyquant.formats import FloatFormat  # noqa: E402
from polyquant.nn import QuantLinear, QuantMatMul  # noqa: E402
from polyquant.primitives import PerGroup, PerToken  # noqa: E402
from polyquant.plugins.diffusion.baselines import AdaRoundConfig, Int8Config, IntMinMaxConfig  # noqa: E402
from polyquant.plugins.diffusion.calib import dit_forward, timestep_batches  # noqa: E402
from polyquant.plugins.diffusion.fp4dit import FP4DiTConfig  # noqa: E402
from polyquant.nn import QuantMatMulKT  # noqa: E402
from polyquant.plugins.diffusion.methods import build_model, compare_samples, quantize_dit  # noqa: E402
from polyquant.plugins.diffusion.models import SHIPPED  # noqa: E402


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model({"name": SHIPPED})


@pytest.fixture(scope="module")
def calib(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return timestep_batches(model, torch.arange(10), steps=20, scheduler="plms", seed=0)


def test_calibration_follows_the_sampler(model: torch.nn.Module, calib: list) -> None:
    assert len(calib) == 21  # PLMS with skip_prk_steps: steps + 1 model calls
    assert [tuple(b) for b in calib[:1]] == [("x_t", "t", "labels")]
    assert calib[0]["x_t"].shape == (10, 1, 8, 8) and torch.equal(calib[0]["labels"], torch.arange(10))
    ts = [int(b["t"][0]) for b in calib]
    assert ts[0] > 900 and ts[-1] < 60 and len(set(ts)) == 20  # PLMS repeats its first timestep once
    # the recorded inputs reproduce the float model's own trajectory
    from polyquant.plugins.diffusion.models import sample

    _, traj = sample(model.transformer, torch.arange(10), steps=20, scheduler="plms", seed=0, return_trajectory=True)
    with torch.no_grad():
        for i in (0, 7, 20):
            assert torch.allclose(dit_forward(model, calib[i]), traj[i], atol=1e-5)
            assert torch.equal(dit_forward(model.transformer, calib[i]), dit_forward(model, calib[i]))
    two = timestep_batches(model, torch.arange(4), steps=3, scheduler="ddim", batch_size=2)
    assert len(two) == 6 and two[0]["x_t"].shape[0] == 2


def test_fp4dit_quantizers_and_float_layers(model: torch.nn.Module) -> None:
    q = quantize_dit(copy.deepcopy(model), FP4DiTConfig())
    linears = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    per_block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
                 "norm1.linear"]
    assert sorted(linears) == sorted(f"transformer.transformer_blocks.{i}.{n}" for i in range(4) for n in per_block)
    for name, m in linears.items():
        w, a = m.weight_quantizer.spec, m.input_quantizer.spec
        fmt = "e3m0" if name.endswith("ff.net.0.proj") else "e2m1"
        assert w.fmt.name == fmt and isinstance(w.fmt, FloatFormat) and w.symmetric and not w.dynamic
        assert w.granularity == PerGroup(32, axis=-1)
        assert a.fmt.name == "e3m4" and a.dynamic and a.granularity == PerToken()
        assert m.output_quantizer is None
    # attention: q and k into q @ k^T, v into attn @ v, token-wise; the softmax output stays float
    for i in range(4):
        attn = q.get_submodule(f"transformer.transformer_blocks.{i}.attn1")
        assert type(attn.matmul_qk) is QuantMatMulKT and type(attn.matmul_av) is QuantMatMul
        assert attn.matmul_av.a_quantizer is None
        for qz in (attn.matmul_qk.a_quantizer, attn.matmul_qk.b_quantizer, attn.matmul_av.b_quantizer):
            assert qz.spec.fmt.name == "e3m4" and qz.spec.dynamic and qz.spec.granularity == PerToken()
    # what FP4DiT keeps float: patch embedding, timestep / label embedders, final layer
    kept = {n for n, m in q.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)}
    assert kept == ({"transformer.pos_embed.proj", "transformer.proj_out_1", "transformer.proj_out_2"}
                    | {f"transformer.transformer_blocks.{i}.norm1.emb.{e}" for i in range(4)
                       for e in ("timestep_embedder.linear_1", "timestep_embedder.linear_2",
                                 "class_embedder.embedding_table")})
    a6 = quantize_dit(copy.deepcopy(model), FP4DiTConfig(abits=6, weight_format="e1m2", quantize_qkv=False))
    lin = a6.get_submodule("transformer.transformer_blocks.0.attn1.to_q")
    assert lin.weight_quantizer.spec.fmt.name == "e1m2" and lin.input_quantizer.spec.fmt.name == "e2m3"
    assert not hasattr(a6.get_submodule("transformer.transformer_blocks.0.attn1"), "matmul_qk")


def test_errors(model: torch.nn.Module, calib: list) -> None:
    with pytest.raises(UsageError, match="group_size 48 does not divide .*in_features 64"):
        pq.quantize(model, FP4DiTConfig(group_size=48), calib=calib[:2], progress=False)
    with pytest.raises(UsageError, match="group_size 128 does not divide"):  # the paper's 128 on a width-64 DiT
        pq.quantize(model, IntMinMaxConfig(group_size=128), calib=calib[:2], progress=False)
    with pytest.raises(ConfigError):
        FP4DiTConfig(abits=4)
    with pytest.raises(ConfigError):
        FP4DiTConfig(weight_format="e3m0")  # type: ignore[arg-type]


def test_fp4dit_vs_int_minmax_on_samples(model: torch.nn.Module, calib: list) -> None:
    # Measured on the digits DiT (benchmarks/diffusion.md: PLMS 20 steps, 50 samples, 3 seeds, W4A8): INT4 min-max
    # g32 28.1 dB, FP4DiT RTN 21.9 dB, FP4DiT + 300 scale-aware AdaRound iterations 25.5 (lr 1e-4) / 28.0 (lr
    # 1e-3) dB, INT4 g32 + 300 plain AdaRound iterations 33.3 dB, W8A8 41.2 dB. On this width-64 DiT with group 32 the
    # E2M1 / E3M0 grids do NOT beat INT4 (the paper's claim is on PixArt / Hunyuan at group 128); what holds with
    # margin: reconstruction improves each grid's RTN, INT4 min-max is ahead of FP4DiT's RTN, W8A8 is far ahead.
    labels = torch.arange(20) % 10
    results = {}
    for name, config in {"int_minmax": IntMinMaxConfig(), "fp4dit_rtn": FP4DiTConfig(),
                         "fp4dit_recon": FP4DiTConfig(recon_iters=50), "adaround_int": AdaRoundConfig(recon_iters=50),
                         "int8": Int8Config()}.items():
        qm = pq.quantize(model, config, calib=calib, progress=False)
        results[name] = compare_samples(model, qm.model, labels, steps=20, scheduler="plms", seed=1000)
    psnr = {k: r["psnr"] for k, r in results.items()}
    mse = {k: r["noise_mse"] for k, r in results.items()}
    assert all(15.0 < p < 60.0 for p in psnr.values()), results
    assert psnr["fp4dit_recon"] > psnr["fp4dit_rtn"] + 0.75 and mse["fp4dit_recon"] < mse["fp4dit_rtn"], results
    assert psnr["int_minmax"] > psnr["fp4dit_rtn"] + 3.0 and mse["int_minmax"] < mse["fp4dit_rtn"], results
    # plain AdaRound on the INT grid improves its own RTN's samples (measured +1.8 dB at 50 iterations, +5 dB at
    # 300); W8A8 is far closer to float than any W4 row
    assert psnr["adaround_int"] > psnr["int_minmax"] + 0.75, results
    assert psnr["int8"] > max(v for k, v in psnr.items() if k != "int8") + 5.0, results
    assert min(r["acc_quant"] for r in results.values()) >= 70.0, results
