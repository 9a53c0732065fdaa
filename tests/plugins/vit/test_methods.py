"""The vit plugin's public surface: entry point and methods, artifacts, command line and "+retrain" (the demo: test_vit_demo.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import polyquant as pq  # noqa: E402
from polyquant.api import from_artifact, to_artifact  # noqa: E402
from polyquant.artifact import ArtifactError  # noqa: E402
from polyquant.cli import main  # noqa: E402
from polyquant.config import ConfigError  # noqa: E402
from polyquant.plugins import discover, get_method  # noqa: E402
from polyquant.plugins.vit.adalog import AdaLogConfig, AdaLogQuantizer  # noqa: E402
from polyquant.plugins.vit.baselines import MinMaxConfig  # noqa: E402
from polyquant.plugins.vit.data import calib_set, evaluate, load_digits_data  # noqa: E402
from polyquant.plugins.vit.methods import METHODS  # noqa: E402
from polyquant.plugins.vit.models import build_model, load_digits_vit  # noqa: E402
from polyquant.plugins.vit.spec import SPEC  # noqa: E402

FAST_ADALOG = dict(calib_size=8, search_round=1, eq_n=64)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("digits-vit")[0]


@pytest.fixture(scope="module")
def adalog_w4a4(model: torch.nn.Module) -> pq.QuantizedModel:
    return pq.quantize(model, AdaLogConfig(wbits=4, abits=4, **FAST_ADALOG), calib=[calib_set(8, seed=0)])


def test_entry_point_methods_match_the_implementation() -> None:
    assert set(METHODS) == set(SPEC.methods)
    info = discover()["vit"]
    assert info.spec is not None and info.spec.methods.keys() == SPEC.methods.keys()
    assert get_method("vit", "adalog") is METHODS["adalog"] is AdaLogConfig
    assert len(set(METHODS.values())) == len(METHODS)  # one config class per method: the handler key


def test_quantize_rejects_bad_input(model: torch.nn.Module) -> None:
    calib = [calib_set(4, seed=0)]
    with pytest.raises(TypeError, match="QuantConfig"):
        pq.quantize(model, {"wbits": 4}, calib=calib)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wbits"):
        AdaLogConfig(wbits=12)
    with pytest.raises(ValueError, match="empty"):
        pq.quantize(model, MinMaxConfig(), calib=[])


def test_adalog_artifact_restores_identical_outputs(adalog_w4a4: pq.QuantizedModel, tmp_path: Path) -> None:
    qm = adalog_w4a4
    assert (qm.plugin, qm.method) == ("vit", "adalog") and qm.model_config is not None
    x = load_digits_data().x_test[:64]
    path = pq.save(qm, tmp_path / "a.safetensors")
    restored = pq.load(path)
    assert restored.config == qm.config and restored.method == "adalog"
    with torch.no_grad():
        assert torch.equal(restored.model(x), qm.model(x))
    assert any(isinstance(m, AdaLogQuantizer) for m in restored.model.modules())
    # 4-bit weights are packed two per byte: the artifact is far below the float checkpoint
    n_params = sum(p.numel() for p in load_digits_vit().parameters())
    assert path.stat().st_size < 0.35 * 4 * n_params


def test_restore_rejects_foreign_artifacts(adalog_w4a4: pq.QuantizedModel) -> None:
    art = to_artifact(adalog_w4a4)
    art.plugin = "audio"
    with pytest.raises(Exception, match="audio"):
        from_artifact(art)
    art = to_artifact(adalog_w4a4)
    art.config["method"]["version"] = 2
    with pytest.raises(ArtifactError, match="AdaLogConfig version"):
        from_artifact(art)
    art = to_artifact(adalog_w4a4)
    art.config["method"]["wbits"] = 99
    with pytest.raises(ArtifactError, match="wbits"):
        from_artifact(art)
    art = to_artifact(adalog_w4a4)
    del art.tensors["blocks.0.mlp.fc1.weight_packed"]
    with pytest.raises(ArtifactError, match="no quantized weight"):
        from_artifact(art)


def test_load_needs_the_model_when_the_artifact_does_not_describe_it(adalog_w4a4: pq.QuantizedModel,
                                                                     model: torch.nn.Module) -> None:
    art = to_artifact(adalog_w4a4)
    art.config["model"] = None
    with pytest.raises(ArtifactError, match="model="):
        from_artifact(art)
    restored = from_artifact(art, model=model)
    x = load_digits_data().x_test[:16]
    with torch.no_grad():
        assert torch.equal(restored.model(x), adalog_w4a4.model(x))


def test_cli_quantize_then_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "minmax_w8a8.safetensors"
    code = main(["quantize", "vit/minmax", "--model", "digits-vit", "--wbits", "8", "--abits", "8",
                 "--calib", "16", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file(), text
    assert "digits test accuracy: float" in text and f"saved {out}" in text
    assert main(["load", str(out), "--eval"]) == 0
    text = capsys.readouterr().out
    assert "restored minmax W8A8" in text
    acc = float(text.split("digits test accuracy:")[1].split("%")[0])
    assert acc >= evaluate(load_digits_vit()) - 0.5  # W8A8 stays within half a point of float


def test_cli_timm_model_with_random_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deit.safetensors"
    code = main(["quantize", "vit/percentile", "--model", "deit_tiny_patch16_224", "--img-size", "32",
                 "--calib", "4", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    assert main(["load", str(out)]) == 0
    assert "quantized Linear / Conv layers" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["quantize", "vit/adalog", "--wbits", "12"],
    ["quantize", "vit/adalog", "--model", "no_such_model_xyz"],
    ["quantize", "vit/nosuch"],
    ["quantize", "vit/minmax", "--calib", "many"],
    ["quantize", "vit/adalog", "--model", "/no/such/checkpoint.safetensors"],
    ["quantize", "vit/qhyvit", "--granularity", "rows"],
    ["quantize", "vit/percentile", "--percentile", "50"],
    ["quantize", "vit/adalog", "--img-size", "3"],
])
def test_cli_bad_arguments_exit_2_without_traceback(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


def test_adalog_retrain_improves_w3a3(model: torch.nn.Module) -> None:
    from polyquant.plugins.vit.quantizers import GELU_SHIFT

    calib = calib_set(64, seed=0)
    config = AdaLogConfig(wbits=3, abits=3, calib_size=16, search_round=1)
    plain = pq.quantize(model, config, calib=[calib]).model
    tuned = pq.quantize(model, dataclasses.replace(config, retrain=True, retrain_iters=150, retrain_size=64),
                        calib=[calib]).model
    x = load_digits_data().x_test
    with torch.no_grad():
        ref = torch.log_softmax(model(x), -1)
        kl = {name: float((ref.exp() * (ref - torch.log_softmax(q(x), -1))).sum(-1).mean())
              for name, q in (("plain", plain), ("tuned", tuned))}
    assert kl["tuned"] < 0.9 * kl["plain"]  # block reconstruction brings the held-out predictions closer
    # the post-GELU shift is folded with fc2's final (reconstructed) weights: b = b_fp - shift * W_q 1
    for i, block in enumerate(tuned.blocks):
        fc2 = block.mlp.fc2
        assert bool(fc2.input_quantizer.bias_folded)
        expected = model.blocks[i].mlp.fc2.bias - GELU_SHIFT * fc2.quant_weight().sum(1)
        assert torch.allclose(fc2.bias, expected, atol=1e-5)
    assert all(q.lut for q in tuned.modules() if isinstance(q, AdaLogQuantizer))  # tables again after retrain


def test_lut_flag_selects_the_inference_dequantization(model: torch.nn.Module, adalog_w4a4) -> None:
    plain = adalog_w4a4.model
    floaty = pq.quantize(model, dataclasses.replace(adalog_w4a4.config, lut=False), calib=[calib_set(8, seed=0)]).model
    quants = [q for q in floaty.modules() if isinstance(q, AdaLogQuantizer)]
    assert quants and not any(q.lut for q in quants)
    assert all(q.lut for q in plain.modules() if isinstance(q, AdaLogQuantizer))


def test_qhyvit_artifact_restores_identical_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from polyquant.artifact import load as load_artifact
    from polyquant.plugins.vit.qhyvit import QHyViTConfig

    config = QHyViTConfig(wbits=4, abits=4, calib_size=8, grid=10, search_rounds=1)
    hybrid, _ = build_model("digits-hybrid")
    qm = pq.quantize(hybrid, config, calib=[calib_set(8, seed=0)])
    path = pq.save(qm, tmp_path / "q.safetensors")
    restored = pq.load(path)
    x = load_digits_data().x_test[:32]
    with torch.no_grad():
        assert torch.equal(restored.model(x), qm.model(x))
    art = load_artifact(path)
    art.config["method"]["version"] = 7
    with pytest.raises(ArtifactError, match="QHyViTConfig version"):
        from_artifact(art)
    specs = load_artifact(path).config["quantizers"]  # the manifest records each quantizer's searched spec
    assert {s["granularity"] for s in specs.values()} == {"PerTensor", "PerChannel"}  # both were chosen
    # and the command line: quantize to an artifact, load it back and evaluate
    out = tmp_path / "cli.safetensors"
    assert main(["quantize", "vit/qhyvit", "--wbits", "8", "--abits", "8", "--calib", "8", "--grid", "10",
                 "--search-rounds", "1", "--out", str(out)]) == 0
    assert main(["load", str(out), "--eval"]) == 0
    text = capsys.readouterr().out
    assert "restored qhyvit W8A8" in text and "digits test accuracy" in text


def test_forged_sizes_are_refused_before_anything_is_built(adalog_w4a4: pq.QuantizedModel) -> None:
    # Issue 21, class 2: a model config within each bound (embed_dim 1024, depth 64, 100,000 classes: 0.9 G
    # parameters) was built (48 s, 7.9 GB) before a shape error; input_size [4, 8192, 8192] allocated 2 GB.
    import tracemalloc

    art = to_artifact(adalog_w4a4)
    art.config["model"] = {"source": "vit", "kwargs": {**art.config["model"]["kwargs"], "embed_dim": 1024,
                                                       "depth": 64, "num_heads": 4, "num_classes": 100000}}
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match=r"parameters, more than the artifact's [\d,]+ stored bytes"):
            from_artifact(art)
        assert tracemalloc.get_traced_memory()[1] < 200 * 2**20
    finally:
        tracemalloc.stop()
    art = to_artifact(adalog_w4a4)
    art.config["state"]["input_size"] = [4, 8192, 8192]
    with pytest.raises(ArtifactError, match=r"input_size \[4, 8192, 8192\] has more than MAX_INPUT_ELEMENTS"):
        from_artifact(art)
    art = to_artifact(adalog_w4a4)  # a model of another image size: pos_embed no longer fits
    art.config["model"]["kwargs"]["img_size"] = 64
    with pytest.raises(ArtifactError, match=r"float\.pos_embed: float32 \[1, 65, 64\] in the artifact"):
        from_artifact(art)


def test_bfloat16_timm_vit_quantizes_and_keeps_its_dtype(tmp_path: Path) -> None:
    # Issue 21, class 6: "Input type (float) and bias type (c10::BFloat16)" on a bfloat16 timm ViT.
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    model = model.eval().to(torch.bfloat16)
    x = torch.randn(4, 3, 32, 32).to(torch.bfloat16)
    qm = pq.quantize(model, MinMaxConfig(wbits=8, abits=8, calib_size=4, calib_batch_size=4), calib=[x])
    assert all(p.dtype == torch.bfloat16 for p in qm.model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16  # the user's model is left as it was
    with torch.no_grad():
        y, want = qm(x), model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert (y.float() - want.float()).norm() < 0.2 * want.float().norm()  # W8A8 of the same model
    path = pq.save(qm, tmp_path / "bf16.safetensors")
    for mode in ("fake", "packed"):
        loaded = pq.load(path, model, mode=mode)
        with torch.no_grad():
            got = loaded(x)
        assert got.dtype == torch.bfloat16
        if mode == "fake":
            assert torch.equal(got, y)
        else:  # bf16 GEMMs of the same codes
            assert (got.float() - y.float()).norm() < 0.05 * y.float().norm()
