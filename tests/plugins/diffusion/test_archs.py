"""The diffusers transformer classes of issue 23 item 2 (DiT, PixArt, SD3, Flux) with tiny random configs: where
FP4DiT's rules land in each, the quantized attention products against diffusers' own processors, and quantize ->
save -> load (fake and packed) for FP4DiT and the baselines."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import polyquant as pq  # noqa: E402
from polyquant.config import UsageError  # noqa: E402
from polyquant.formats import FloatFormat  # noqa: E402
from polyquant.nn import QuantLinear, QuantMatMul  # noqa: E402
from polyquant.plugins.diffusion.archs import (LAYOUTS, TINY_CONFIGS, block_names, build_transformer,  # noqa: E402
                                               example_kwargs, tiny_transformer, transformer_config)
from polyquant.plugins.diffusion.baselines import (AdaRoundConfig, FixedBiasConfig, Int8Config,  # noqa: E402
                                                   IntMinMaxConfig)
from polyquant.plugins.diffusion.fp4dit import FP4DiTConfig  # noqa: E402
from polyquant.plugins.diffusion.methods import quantize_dit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = list(TINY_CONFIGS)

# module names (relative to the transformer, block 0) FP4DiT quantizes / keeps float, per class
QUANTIZED = {
    "DiTTransformer2DModel": ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.norm1.linear",
                              "transformer_blocks.0.ff.net.2"],
    "PixArtTransformer2DModel": ["transformer_blocks.0.attn2.to_k", "transformer_blocks.0.ff.net.2"],
    "SD3Transformer2DModel": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.norm1_context.linear",
                              "transformer_blocks.0.attn.to_add_out"],
    "FluxTransformer2DModel": ["transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.proj_out",
                               "single_transformer_blocks.0.norm.linear"],
}
FLOAT = {
    "DiTTransformer2DModel": ["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "proj_out_1", "proj_out_2"],
    "PixArtTransformer2DModel": ["adaln_single.linear", "caption_projection.linear_1", "proj_out"],
    "SD3Transformer2DModel": ["time_text_embed.text_embedder.linear_1", "context_embedder", "norm_out.linear",
                              "proj_out"],
    "FluxTransformer2DModel": ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_2",
                               "norm_out.linear", "proj_out"],
}
FF1 = {
    "DiTTransformer2DModel": ["transformer_blocks.0.ff.net.0.proj"],
    "PixArtTransformer2DModel": ["transformer_blocks.1.ff.net.0.proj"],
    "SD3Transformer2DModel": ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.0.proj"],
    "FluxTransformer2DModel": ["transformer_blocks.0.ff_context.net.0.proj", "single_transformer_blocks.0.proj_mlp"],
}


def _out(model: torch.nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


@pytest.mark.parametrize("name", CLASSES)
def test_layout_places_fp4dit_rules(name: str) -> None:
    model = tiny_transformer(name)
    q = quantize_dit(copy.deepcopy(model), FP4DiTConfig(group_size=8))
    mods = dict(q.named_modules())
    for n in QUANTIZED[name]:
        assert isinstance(mods[n], QuantLinear) and mods[n].weight_quantizer.fmt == FloatFormat(2, 1), n
    for n in FF1[name]:
        assert mods[n].weight_quantizer.fmt == FloatFormat(3, 0), n  # E3M0 before GELU
    for n in FLOAT[name]:
        assert type(mods[n]) is torch.nn.Linear, n
    assert all(n.startswith(LAYOUTS[name].blocks) for n in block_names(model))
    # every attention got both products, q and k quantized by rows
    attn = [m for m in q.modules() if hasattr(m, "matmul_qk")]
    assert attn and all(isinstance(m.matmul_av, QuantMatMul) for m in attn)


@pytest.mark.parametrize("name", CLASSES)
def test_patched_attention_matches_diffusers(name: str) -> None:
    """With the quantizers raw (identity), the patched model computes what diffusers' processors compute."""
    model = tiny_transformer(name)
    x = example_kwargs(model, seed=3)
    q = quantize_dit(copy.deepcopy(model), FP4DiTConfig(group_size=8))  # not calibrated: every quantizer raw
    ref = _out(model, x)
    assert torch.allclose(_out(q, x), ref, atol=1e-5 * float(ref.abs().max()) + 1e-6)


@pytest.mark.parametrize("name", CLASSES)
def test_quantize_save_load_fake_and_packed(name: str, tmp_path: Path) -> None:
    model = tiny_transformer(name)
    calib = [example_kwargs(model, seed=s) for s in range(3)]
    x = example_kwargs(model, seed=7)
    ref = _out(model, x)
    errors = {}
    for config in (FP4DiTConfig(group_size=8, recon_iters=2, recon_batch=2), IntMinMaxConfig(group_size=8),
                   Int8Config()):
        qm = pq.quantize(model, config, calib=calib, progress=False)
        out = _out(qm.model, x)
        errors[type(config).__name__] = float((out - ref).norm() / ref.norm())
        path = tmp_path / f"{type(config).__name__}.safetensors"
        pq.save(qm, path)
        fake = pq.load(path)  # rebuilt from the recorded class + config alone
        assert type(fake.model) is type(model) and fake.model_config == transformer_config(model)
        assert torch.allclose(_out(fake.model, x), out, atol=1e-6)
        packed = pq.load(path, mode="packed", cpu_dtype=torch.float32)
        # packed GEMMs sum in another order: a later activation may round to the next code (int8: W8A8Linear)
        assert float((_out(packed.model, x) - out).norm() / out.norm()) < 2e-3
    # W4 is a real perturbation, W8A8 a much smaller one
    assert 1e-3 < errors["FP4DiTConfig"] < 0.2 and errors["Int8Config"] < errors["FP4DiTConfig"] / 3


def test_fixed_bias_scales_are_powers_of_two_and_adaround_grids() -> None:
    model = tiny_transformer("DiTTransformer2DModel")
    calib = [example_kwargs(model, seed=s) for s in range(2)]
    fb = pq.quantize(model, FixedBiasConfig(group_size=8), calib=calib, progress=False).model
    rb = pq.quantize(model, FP4DiTConfig(group_size=8), calib=calib, progress=False).model
    for (n, a), (_, b) in zip(fb.named_modules(), rb.named_modules()):
        if isinstance(a, QuantLinear):
            s = a.weight_quantizer.scale
            assert torch.equal(s, torch.exp2(torch.round(torch.log2(s)))), n
            assert bool((s >= b.weight_quantizer.scale).all()) and bool((s < 2 * b.weight_quantizer.scale).all())
    ada = pq.quantize(model, AdaRoundConfig(grid="int", group_size=8, recon_iters=2, recon_batch=2), calib=calib,
                      progress=False).model
    q = ada.get_submodule("transformer_blocks.0.attn1.to_q").weight_quantizer
    assert q.fmt.name == "int4" and not q.spec.symmetric


def test_errors() -> None:
    model = tiny_transformer("SD3Transformer2DModel")
    with pytest.raises(UsageError, match="group_size 32 does not divide .* in_features 16"):
        quantize_dit(copy.deepcopy(model), FP4DiTConfig(group_size=32))
    with pytest.raises(UsageError, match="the FP grid needs a group size"):
        quantize_dit(copy.deepcopy(model), AdaRoundConfig(grid="fp", group_size=0))
    with pytest.raises(UsageError, match="holds no supported diffusers transformer"):
        quantize_dit(torch.nn.Sequential(torch.nn.Linear(8, 8)), FP4DiTConfig(group_size=8))
    with pytest.raises(ValueError, match="unsupported diffusers transformer 'UNet2DModel'"):
        build_transformer({"diffusers": "UNet2DModel", "config": {}})
    with pytest.raises(ValueError, match="unknown key"):
        build_transformer({"diffusers": "FluxTransformer2DModel", "config": {"num_layerz": 2}})
    with pytest.raises(ValueError, match="diffusers model config is"):
        build_transformer({"diffusers": "FluxTransformer2DModel"})
    # an attention whose processor has no quantized path keeps float q / k / v, with a warning
    from diffusers.models.attention_processor import AttnProcessor2_0

    dit = tiny_transformer("DiTTransformer2DModel")
    dit.transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())
    dit.transformer_blocks[1].attn1.processor = object()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_dit(dit, FP4DiTConfig(group_size=8))
    assert any("transformer_blocks.1.attn1" in str(w.message) for w in caught)
    assert hasattr(q.transformer_blocks[0].attn1, "matmul_qk") and not hasattr(q.transformer_blocks[1].attn1,
                                                                               "matmul_qk")
