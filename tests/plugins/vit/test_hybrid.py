"""The tiny MobileViT hybrids: timm building blocks, shipped checkpoints, seeded training, safe loading."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

from polyquant.plugins.vit import hybrid  # noqa: E402
from polyquant.plugins.vit.data import evaluate, load_digits_data  # noqa: E402
from polyquant.plugins.vit.hybrid import (  # noqa: E402
    HybridConfig,
    TrainConfig,
    asset_path,
    build_hybrid,
    load_digits_hybrid,
    load_hybrid,
    save_hybrid,
    train_hybrid,
)


@pytest.mark.parametrize("variant", hybrid.VARIANTS)
def test_build_uses_timm_mobilevit_blocks(variant: str) -> None:
    from timm.models.byobnet import ByobNet
    from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block

    model = build_hybrid(HybridConfig(variant=variant)).eval()
    assert isinstance(model, ByobNet)
    block = MobileVitBlock if variant == "mobilevit" else MobileVitV2Block
    assert sum(isinstance(m, block) for m in model.modules()) == 1
    assert sum(p.numel() for p in model.parameters()) < 100_000
    with torch.no_grad():
        assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("variant", hybrid.VARIANTS)
def test_shipped_checkpoint_accuracy(variant: str) -> None:
    assert asset_path(variant).is_file()
    model, info = load_digits_hybrid(variant)
    assert not model.training
    assert info["variant"] == variant and info["config"]["variant"] == variant
    data = load_digits_data(info["config"]["img_size"], info["config"]["in_chans"])
    acc = evaluate(model, data)
    assert acc >= 95.0
    assert acc == pytest.approx(info["test_accuracy"], abs=0.2)  # one test image is 0.19 points


def test_checkpoint_round_trip_and_metadata(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_hybrid(HybridConfig(variant="mobilevitv2")).eval()
    info = {"variant": "mobilevitv2", "config": hybrid.asdict(HybridConfig(variant="mobilevitv2")), "test_accuracy": 1.0}
    path = save_hybrid(model, info, tmp_path / "m.safetensors")
    loaded, got = load_hybrid(path)
    assert got == json.loads(json.dumps(info))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not (tmp_path / "m.safetensors.tmp").exists()


def test_load_rejects_foreign_file(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a polyquant hybrid checkpoint"):
        load_hybrid(path)
    with pytest.raises(FileNotFoundError, match="--train"):
        load_hybrid(tmp_path / "missing.safetensors")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="variant"):
        HybridConfig(variant="vit")
    with pytest.raises(ValueError, match="divisible"):
        HybridConfig(transformer_dim=50, num_heads=4)
    with pytest.raises(ValueError, match="img_size"):
        HybridConfig(img_size=30)
    with pytest.raises(ValueError, match="version"):
        HybridConfig(version=2)
    with pytest.raises(ValueError, match="unknown hybrid variant"):
        asset_path("nope")


def test_training_is_seeded() -> None:
    cfg = HybridConfig(variant="mobilevitv2")
    short = TrainConfig(epochs=1, batch_size=32, seed=3, max_steps=3)
    a, info_a = train_hybrid(cfg, short, progress=False)
    b, _ = train_hybrid(cfg, short, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert info_a["train"]["seed"] == 3 and 0.0 <= info_a["test_accuracy"] <= 100.0


def test_shift_augmentation_keeps_background() -> None:
    x = torch.full((4, 1, 8, 8), -1.0)
    x[:, :, 3:5, 3:5] = 1.0
    out = hybrid._shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # the blob moves, nothing is lost


def test_cli_reports_shipped_accuracy(capsys) -> None:
    assert hybrid.main(["--variant", "mobilevit"]) == 0
    assert "test accuracy" in capsys.readouterr().out
