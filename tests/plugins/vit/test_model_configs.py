"""Model configs are untrusted input (artifacts, checkpoints): only an allowlisted, bounded schema is built."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import polyquant as pq  # noqa: E402
from polyquant import artifact  # noqa: E402
from polyquant.artifact import ArtifactError  # noqa: E402
from polyquant.plugins.vit import hybrid  # noqa: E402
from polyquant.plugins.vit.models import (  # noqa: E402
    DIGITS_MODELS,
    DIGITS_VIT_KWARGS,
    MAX_PARAMETERS,
    build_model,
    load_checkpoint,
    model_from_config,
    save_checkpoint,
    validate_model_config,
)

DIGITS = dict(DIGITS_VIT_KWARGS)


class Built(Exception):
    """Raised by the patched model constructors: the config reached a constructor."""


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model constructor raises ``Built``: a refused config must be refused before anything is built."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise Built(f"a constructor was called with {kwargs}")

    monkeypatch.setattr(timm.models.vision_transformer, "VisionTransformer", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(hybrid, "build_hybrid", refuse)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- configs the plugin records still build ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", DIGITS_MODELS)
def test_shipped_model_configs_round_trip(spec: str) -> None:
    model, config = build_model(spec)
    stored = json.loads(json.dumps(config))  # as an artifact stores it: tuples are lists
    assert validate_model_config(stored)["source"] == config["source"]
    assert shapes(model_from_config(stored)) == shapes(model)


@pytest.mark.parametrize("name, kwargs", [
    ("deit_tiny_patch16_224", {"img_size": 32, "num_classes": 10, "depth": 2}),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "num_classes": 10, "embed_dim": 32, "depths": (2, 2, 2, 2),
                                      "num_heads": (1, 2, 4, 8)}),
    ("vit_tiny_patch16_224", {"img_size": 32, "in_chans": 1}),
])
def test_timm_name_configs_round_trip(name: str, kwargs: dict[str, Any]) -> None:
    model, config = build_model(name, **kwargs)
    assert config == {"source": "timm", "name": name, "kwargs": kwargs}
    assert shapes(model_from_config(json.loads(json.dumps(config)))) == shapes(model)


def test_checkpoint_with_a_hostile_config_is_refused(tmp_path: Path, no_build: None) -> None:
    path = tmp_path / "evil.safetensors"
    save_checkpoint(nn.Linear(1, 1), path, {"source": "vit", "kwargs": {**DIGITS, "depth": 200_000}})
    with pytest.raises(ValueError, match="depth"):
        load_checkpoint(path)


# --- what is refused -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, key", [
    ({"source": "vit", "kwargs": {**DIGITS, "depth": 200_000}}, "depth"),
    ({"source": "vit", "kwargs": {**DIGITS, "embed_dim": 10**6}}, "embed_dim"),
    ({"source": "vit", "kwargs": {**DIGITS, "embed_dim": 8192, "depth": 64, "num_heads": 64}}, "MAX_PARAMETERS"),
    ({"source": "vit", "kwargs": {**DIGITS, "img_size": 4096, "patch_size": 1}}, "MAX_PARAMETERS"),
    ({"source": "hybrid", "kwargs": {"transformer_dim": 2048, "transformer_depth": 64, "num_heads": 8}},
     "MAX_PARAMETERS"),
    ({"source": "hybrid", "kwargs": {"widths": [1] * 100_000}}, "widths"),
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"img_size": 10**6}}, "img_size"),
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"num_classes": 10**9}}, "num_classes"),
])
def test_oversized_configs_are_refused_before_building(config: dict[str, Any], key: str, no_build: None) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=key):
        model_from_config(config)
    assert time.perf_counter() - t0 < 1.0


def test_timm_architecture_overrides_are_counted_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered model may not be grown past MAX_PARAMETERS through its architecture kwargs; the count is
    taken on the meta device, and the model is never built for real."""
    devices: list[torch.device] = []
    create = timm.create_model

    def spy(*args: Any, **kwargs: Any) -> nn.Module:
        devices.append(torch.get_default_device())
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    config = {"source": "timm", "name": "swin_tiny_patch4_window7_224",
              "kwargs": {"embed_dim": 1024, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}}
    with pytest.raises(ValueError, match="MAX_PARAMETERS"):
        model_from_config(config)
    assert devices == [torch.device("meta")] and MAX_PARAMETERS == 1_000_000_000


@pytest.mark.parametrize("config, key", [
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"checkpoint_path": "/tmp/x.pth"}},
     "checkpoint_path"),
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"pretrained": True}}, "pretrained"),
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"pretrained_cfg_overlay": {"file": "/x"}}},
     "pretrained_cfg_overlay"),
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"cache_dir": "/tmp"}}, "cache_dir"),
    ({"source": "vit", "kwargs": {**DIGITS, "norm_layer": "layernorm"}}, "norm_layer"),
    ({"source": "vit", "kwargs": {**DIGITS, "checkpoint_path": "/tmp/x.pth"}}, "checkpoint_path"),
    ({"source": "hybrid", "kwargs": {"unknown": 1}}, "unknown"),
    ({"source": "vit", "kwargs": DIGITS, "pretrained": True}, "pretrained"),
    ({"source": "vit", "name": "vit_tiny_patch16_224"}, "name"),
    ({"source": "pickle", "kwargs": {}}, "source"),
    ({"kwargs": DIGITS}, "source"),
    ({"source": "vit", "kwargs": [1, 2]}, "kwargs"),
])
def test_unknown_and_forbidden_keys_are_refused(config: dict[str, Any], key: str, no_build: None) -> None:
    with pytest.raises(ValueError, match=key):
        model_from_config(config)


@pytest.mark.parametrize("name", ["definitely_not_a_timm_model", "hf-hub:timm/vit_tiny_patch16_224",
                                  "../../etc/passwd", "local-dir:/tmp", "", 42, None])
def test_timm_name_must_be_registered(name: object, no_build: None) -> None:
    with pytest.raises(ValueError, match="not a registered timm model"):
        model_from_config({"source": "timm", "name": name, "kwargs": {}})


@pytest.mark.parametrize("key, value", [
    ("depth", True), ("depth", 4.0), ("depth", "4"), ("depth", 0), ("in_chans", 5), ("num_classes", 0),
    ("num_classes", 100_001), ("img_size", 4), ("mlp_ratio", float("nan")), ("mlp_ratio", 1e9),
    ("qkv_bias", 1), ("global_pool", "evil"), ("num_heads", 3), ("patch_size", 5), ("class_token", False),
])
def test_bad_vit_values_are_refused(key: str, value: object, no_build: None) -> None:
    with pytest.raises(ValueError, match=key):
        model_from_config({"source": "vit", "kwargs": {**DIGITS, key: value}})


def test_build_model_takes_only_the_allowlisted_timm_kwargs() -> None:
    with pytest.raises(TypeError, match="checkpoint_path"):
        build_model("vit_tiny_patch16_224", checkpoint_path="/tmp/x.pth")  # type: ignore[call-arg]


# --- through an artifact ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from polyquant.plugins.vit.methods import example

    case = example("minmax")
    qm = pq.quantize(case.model, case.config, case.calib)
    return pq.save(qm, tmp_path_factory.mktemp("artifact") / "digits_minmax.safetensors")


def test_artifact_with_its_own_model_config_loads(saved: Path) -> None:
    qm = pq.load(saved)
    assert qm.model_config["source"] == "vit"
    assert torch.isfinite(qm.model(torch.zeros(1, 1, 32, 32))).all()


@pytest.mark.parametrize("forged, key", [
    ({"source": "vit", "kwargs": {**DIGITS, "depth": 200_000}}, "depth"),
    ({"source": "vit", "kwargs": {**DIGITS, "embed_dim": 10**6}}, "embed_dim"),
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"checkpoint_path": "CHECKPOINT"}},
     "checkpoint_path"),
    ({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"pretrained": True}}, "pretrained"),
    ({"source": "timm", "name": "definitely_not_a_timm_model", "kwargs": {}}, "not a registered timm model"),
], ids=["depth", "embed_dim", "checkpoint_path", "pretrained", "name"])
def test_forged_artifact_model_config_raises_artifact_error(
    saved: Path, tmp_path: Path, forged: dict[str, Any], key: str, monkeypatch: pytest.MonkeyPatch, no_build: None,
) -> None:
    target = tmp_path / "target.pth"
    torch.save({"state_dict": {}}, target)  # what a checkpoint_path kwarg would have made timm torch.load
    forged = json.loads(json.dumps(forged).replace("CHECKPOINT", str(target)))
    art = artifact.load(saved)
    art.config["model"] = forged
    path = artifact.save(art, tmp_path / "forged.safetensors")  # valid checksums: only the config is hostile
    loads: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match=key):
        pq.load(path)
    assert time.perf_counter() - t0 < 2.0 and loads == []


def test_checkpoint_whose_tensors_do_not_match_its_config_is_a_value_error(tmp_path) -> None:
    # issue 10, case 14: a usage error (exit 2 on the command line), not a library RuntimeError
    from polyquant.plugins.vit.models import digits_vit_config, load_checkpoint, load_digits_vit, save_checkpoint

    config = digits_vit_config()
    config["kwargs"] = {**config["kwargs"], "depth": 2}  # the file holds 4 blocks' tensors
    path = tmp_path / "mismatch.safetensors"
    save_checkpoint(load_digits_vit(), path, config)
    with pytest.raises(ValueError, match="do not match its model config"):
        load_checkpoint(path)
