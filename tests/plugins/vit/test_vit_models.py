"""The digits task and models, and module coverage of the harness on timm ViT / DeiT / Swin (random weights)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
pytest.importorskip("sklearn")

from polyquant.nn import QuantConv2d, QuantLinear, QuantMatMul  # noqa: E402
import polyquant as pq  # noqa: E402
from polyquant.plugins.vit.adalog import AdaLogConfig, AdaLogQuantizer  # noqa: E402
from polyquant.plugins.vit.baselines import MinMaxConfig  # noqa: E402
from polyquant.plugins.vit.data import calib_set, evaluate, load_digits_data  # noqa: E402
from polyquant.plugins.vit.harness import vit_quantizers, wrap  # noqa: E402
from polyquant.plugins.vit.recipe import Recipe  # noqa: E402
from polyquant.plugins.vit.models import (  # noqa: E402
    DIGITS_VIT_PATH,
    build_model,
    input_spec,
    load_checkpoint,
    load_digits_vit,
    save_checkpoint,
)
from polyquant.surgery import is_product_patched  # noqa: E402

TIMM_MODELS = [
    ("vit_tiny_patch16_224", {"img_size": 32}),
    ("deit_tiny_patch16_224", {"img_size": 32}),
    ("swin_tiny_patch4_window7_224", {"img_size": 56}),
]


def test_digits_split_is_fixed() -> None:
    data = load_digits_data()
    assert data.x_train.shape == (1257, 1, 32, 32) and data.x_test.shape == (540, 1, 32, 32)
    assert float(data.x_train.min()) >= -1.0 and float(data.x_train.max()) <= 1.0
    assert torch.bincount(data.y_test).min() >= 50  # stratified
    a, b = calib_set(16, seed=3), calib_set(16, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calib_set(16, seed=4))
    assert load_digits_data(16, 3).x_test.shape == (540, 3, 16, 16)
    with pytest.raises(ValueError, match="calibration size"):
        calib_set(0)


def test_shipped_digits_vit_is_trained_and_pickle_free() -> None:
    assert DIGITS_VIT_PATH.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle; safetensors header length
    model, config, meta = load_checkpoint(DIGITS_VIT_PATH)
    assert config["source"] == "vit" and config["kwargs"]["patch_size"] == 4
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    acc = evaluate(model)
    assert acc >= 95.0
    assert acc == pytest.approx(meta["test_accuracy"], abs=0.5)
    assert DIGITS_VIT_PATH.stat().st_size < 2_000_000


def test_checkpoint_round_trip(tmp_path) -> None:
    model = load_digits_vit()
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {"source": "vit", "kwargs": model_kwargs()}, {"note": "x"})
    again, _, meta = load_checkpoint(path)
    x = load_digits_data().x_test[:8]
    assert torch.equal(again(x), model(x)) and meta == {"note": "x"}


def model_kwargs() -> dict:
    return json.loads(json.dumps(load_checkpoint(DIGITS_VIT_PATH)[1]["kwargs"]))


def test_wrapped_model_in_raw_state_is_the_float_model() -> None:
    model = load_digits_vit()
    qmodel, plan = wrap(model, Recipe("adalog"))
    x = load_digits_data().x_test[:16]
    assert torch.allclose(qmodel(x), model(x), atol=1e-5)
    roles = {info.name: info.role for info in plan}
    assert roles["patch_embed.proj"] == "conv"
    assert roles["blocks.0.attn.qkv"] == "post_ln" and roles["blocks.0.mlp.fc1"] == "post_ln"
    assert roles["blocks.0.mlp.fc2"] == "post_gelu" and roles["blocks.0.attn.proj"] == "linear"
    assert roles["blocks.0.attn.matmul_av"] == "softmax" and roles["head"] == "linear"
    assert {info.norm for info in plan if info.role == "post_ln"} >= {"blocks.0.norm1", "blocks.0.norm2"}


def _check_coverage(model: nn.Module, qmodel: nn.Module) -> None:
    n_layers = sum(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    n_attn = sum(type(m).__name__ in ("Attention", "WindowAttention") for m in model.modules())
    assert n_attn > 0
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in qmodel.modules())
    assert sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in qmodel.modules()) == n_layers
    attns = [m for m in qmodel.modules() if is_product_patched(m)]
    assert len(attns) == n_attn
    calls: dict[int, int] = {}
    hooks = [mm.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
             for a in attns for mm in (a.matmul_qk, a.matmul_av)]
    size, chans = input_spec(qmodel)
    with torch.no_grad():
        out = qmodel(torch.randn(2, chans, size, size))
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * n_attn  # every attention product ran through a quantized matmul
    assert torch.isfinite(out).all()
    for m in qmodel.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            assert m.weight_quantizer.state == "quantized"
            # the patch embedding's input stays float at conv_abits = 8 (the reference's quant_input)
            assert m.input_quantizer.state == "quantized" if m.input_quantizer is not None else \
                isinstance(m, QuantConv2d)
        if isinstance(m, QuantMatMul):
            assert m.a_quantizer.state == "quantized" and m.b_quantizer.state == "quantized"


@pytest.mark.parametrize("name,kwargs", TIMM_MODELS, ids=[n for n, _ in TIMM_MODELS])
def test_timm_module_coverage_minmax(name: str, kwargs: dict) -> None:
    model, _ = build_model(name, num_classes=10, **kwargs)
    size, chans = input_spec(model)
    calib = calib_set(4, 0, size, chans)
    qmodel = pq.quantize(model, MinMaxConfig(wbits=8, abits=8, calib_size=4), calib=[calib]).model
    _check_coverage(model, qmodel)
    x = calib_set(4, 1, size, chans)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(qmodel(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.95


SLIM_SWIN = {"img_size": 56, "embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}


@pytest.mark.parametrize("name,kwargs", [("deit_tiny_patch16_224", {"img_size": 32, "depth": 3}),
                                         ("swin_tiny_patch4_window7_224", SLIM_SWIN)],
                         ids=["deit_tiny", "swin_slim"])
def test_timm_adalog_end_to_end_small_search(name: str, kwargs: dict) -> None:
    """The full AdaLog pipeline (LN reparam, shifted AdaLog + bias fold, per-head matmuls) on real timm modules,
    with a reduced search and fewer / slimmer blocks so it stays fast (same module types; Swin keeps its shifted
    windows and patch merging). Full-size coverage is ``test_timm_module_coverage_minmax``."""
    model, _ = build_model(name, num_classes=10, **kwargs)
    size, chans = input_spec(model)
    calib = calib_set(4, 0, size, chans)
    t0 = time.perf_counter()
    qmodel = pq.quantize(model, AdaLogConfig(wbits=6, abits=6, calib_size=4, eq_n=64, steps=2, search_round=1),
                         calib=[calib]).model
    assert time.perf_counter() - t0 < 120
    _check_coverage(model, qmodel)
    adalogs = [q for q in vit_quantizers(qmodel) if isinstance(q, AdaLogQuantizer)]
    assert len(adalogs) == 2 * sum(is_product_patched(m) for m in qmodel.modules())
    assert all(bool(q.bias_folded) for q in adalogs if q.shift)
    x = calib_set(4, 1, size, chans)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(qmodel(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.9
