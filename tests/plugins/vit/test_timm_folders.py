"""Issue 29: a user's own timm models (a ViT and an EfficientFormer, trained here from tiny configs and saved with
timm's own ``save_for_hf(..., safe_serialization=True)``) quantized and evaluated from the command line on the
user's image folders, with the same accuracy as through the Python API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

import polyquant as pq  # noqa: E402
from polyquant.cli import main  # noqa: E402
from polyquant.plugins.vit.data import evaluate_folder, load_image_folder, preprocess_for  # noqa: E402
from polyquant.plugins.vit.methods import METHODS  # noqa: E402
from polyquant.plugins.vit.models import build_model  # noqa: E402

SIZE = 32
CLASSES = ("red", "green", "blue")
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {  # tiny configs: seconds to train and evaluate
    "vit": ("vit_tiny_patch16_224", {"img_size": SIZE, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    # EfficientFormer-V2: v1 (efficientformer_l1) fixes its attention biases at 7x7 tokens, i.e. 224 x 224 inputs
    "efficientformer": ("efficientformerv2_s0", {"img_size": SIZE, "embed_dims": (8, 16, 24, 32),
                                                 "depths": (1, 1, 1, 1), "num_vit": 1}),
}


def _write_images(root: Path, per_class: int, seed: int) -> Path:
    """Class folders of noisy RGB images whose dominant channel is the class (PNG, SIZE x SIZE)."""
    gen = torch.Generator().manual_seed(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.rand(SIZE, SIZE, 3, generator=gen) * 0.6
            pixels[..., c] += 0.4
            Image.fromarray((pixels * 255).round().to(torch.uint8).numpy(), mode="RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread (the CLI's --threads 1 sets the same), restored afterwards: on a busy 2-core machine the
    default threads make these tiny models 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    return _write_images(root / "train", 12, seed=0), _write_images(root / "val", 8, seed=1)


def _train_and_save(kind: str, train: Path, target: Path) -> Path:
    """Train the tiny timm model on ``train`` (read as the CLI reads it) and save it with timm's save_for_hf."""
    from timm.models import save_for_hf

    name, kwargs = ARCHITECTURES[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=len(CLASSES), **kwargs)
    data = load_image_folder(train, preprocess_for(model, size=SIZE))  # timm keeps 224 in its pretrained_cfg
    assert data.labels is not None
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(data.images), data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_for_hf(model.eval(), str(target), safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def saved_models(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: _train_and_save(kind, folders[0], root / kind) for kind in ARCHITECTURES}


def _top1(out: str, prefix: str) -> list[float]:
    """The percentages of the line starting with ``prefix`` ('DIR top-1 (N images): float 90.00%, ...')."""
    line = next(ln for ln in out.splitlines() if ln.startswith(prefix))
    return [float(part.split("%")[0].split()[-1]) for part in line.split(":", 1)[1].split(",")]


# (kind, method, method options): Q-HyViT and its hybrid baseline on the EfficientFormer, AdaLog's harness on the ViT
CASES = [
    ("vit", "minmax", ["--wbits", "8", "--abits", "8"]),
    ("vit", "adalog", ["--wbits", "6", "--abits", "6", "--eq-n", "64", "--steps", "1", "--search-rounds", "1"]),
    ("efficientformer", "qhyvit", ["--wbits", "6", "--abits", "6", "--grid", "4", "--search-rounds", "1"]),
    ("efficientformer", "hybrid_minmax", ["--wbits", "8", "--abits", "8"]),
]


@pytest.mark.parametrize("kind, method, options", CASES, ids=[f"{k}-{m}" for k, m, _ in CASES])
def test_user_timm_folder_quantizes_and_evaluates_as_the_python_api(
    kind: str, method: str, options: list[str], saved_models: dict[str, Path], folders: tuple[Path, Path],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    train, val = folders
    folder = saved_models[kind]
    out = tmp_path / "q.safetensors"
    argv = ["quantize", f"vit/{method}", "--model", str(folder), "--calib-data", str(train), "--eval-data", str(val),
            "--calib", "16", *options, "--out", str(out), "--quiet", "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    cli_float, cli_quant = _top1(capsys.readouterr().out, f"{val} top-1")

    # the Python API on the same model, images and config
    model, _ = build_model(str(folder))
    prep = preprocess_for(model)
    calib = load_image_folder(train, prep, limit=16, seed=0).images
    evaluation = load_image_folder(val, prep)
    parsed: dict[str, Any] = {"--calib": 16, **{k: int(v) for k, v in zip(options[::2], options[1::2])}}
    fields = {"--calib": "calib_size", "--eq-n": "eq_n", "--search-rounds": "search_round" if kind == "vit"
              else "search_rounds", "--wbits": "wbits", "--abits": "abits", "--steps": "steps", "--grid": "grid"}
    config = METHODS[method](**{fields[k]: v for k, v in parsed.items()})
    qm = pq.quantize(model, config, calib=[calib], progress=False)
    assert cli_float == pytest.approx(evaluate_folder(model, evaluation), abs=0.006)
    assert cli_quant == pytest.approx(evaluate_folder(qm.model, evaluation), abs=0.006)
    assert cli_float >= 90.0  # the tiny model learned its task: the numbers are not chance

    # the artifact rebuilt by 'polyquant load' gives the same top-1 on the same folder (fake and packed)
    for mode in ("fake", "packed"):
        assert main(["load", str(out), "--mode", mode, "--cpu-dtype", "fp32", "--threads", "1", "--eval-data",
                     str(val)]) == 0
        (loaded,) = _top1(capsys.readouterr().out, f"{val} top-1")
        assert loaded == pytest.approx(cli_quant, abs=1.0 if mode == "packed" else 0.006)

    # --eval (digits) is refused for a user's model, leaving the artifact as it was
    before = out.read_bytes()
    assert main(["load", str(out), "--eval"]) == 2
    assert "--eval-data" in capsys.readouterr().err and out.read_bytes() == before


def test_pickled_timm_folder_is_refused_with_the_save_hint(saved_models: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from timm.models import save_for_hf

    model, _ = build_model(str(saved_models["vit"]))
    save_for_hf(model, str(tmp_path / "pickled"))  # timm's default: a pickled pytorch_model.bin
    assert main(["quantize", "vit/minmax", "--model", str(tmp_path / "pickled"), "--quiet"]) == 2
    assert "safe_serialization=True" in capsys.readouterr().err


def test_timm_name_with_model_args_is_checked_against_its_signature(capsys: pytest.CaptureFixture[str]) -> None:
    args = ('{"embed_dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "num_vit": 1, "num_classes": 3, "img_size": 32, '
            '"drop_path_rate": 0.1}')
    model, config = build_model("efficientformer_l1", model_args=json.loads(args))
    assert config["kwargs"]["embed_dims"] == [8, 16, 24, 32] and model.num_classes == 3
    for bad, key in [('{"pretrained": true}', "pretrained"), ('{"checkpoint_path": "/tmp/x"}', "checkpoint_path"),
                     ('{"embed_dim": 8}', "embed_dim"), ('{"drop_rate": 0.0, "nope": 1}', "nope")]:
        assert main(["quantize", "vit/minmax", "--model", "efficientformer_l1", "--model-args", bad, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert key in err and len(err.strip().splitlines()) == 1


def test_model_without_normalization_needs_mean_and_std(folders: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from polyquant.plugins.vit.models import digits_vit_config, load_digits_vit, save_checkpoint

    ckpt = tmp_path / "mine.safetensors"
    save_checkpoint(load_digits_vit(), ckpt, digits_vit_config())  # a polyquant checkpoint records no mean / std
    assert main(["quantize", "vit/minmax", "--model", str(ckpt), "--calib-data", str(folders[0]), "--quiet"]) == 2
    assert "--mean and --std" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    ({"model_args": {"checkpoint_path": "/tmp/x.pth"}}, "checkpoint_path"),
    ({"model_args": {"pretrained": True}}, "pretrained"),
    ({"architecture": "hf-hub:timm/vit_tiny_patch16_224"}, "not a registered timm model"),
    ({"pretrained_cfg": {"mean": [0.5, "x", 0.5]}}, "data.mean"),
    ({"pretrained_cfg": {"interpolation": "lanczos9"}}, "data.interpolation"),
])
def test_hostile_folder_config_is_refused(saved_models: dict[str, Path], tmp_path: Path, edit: dict[str, Any],
                                          message: str, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    folder = shutil.copytree(saved_models["vit"], tmp_path / "forged")
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["quantize", "vit/minmax", "--model", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_foreign_safetensors_error_says_what_to_pass(saved_models: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    weights = saved_models["efficientformer"] / "model.safetensors"  # timm's weights alone: no architecture
    assert main(["quantize", "vit/qhyvit", "--model", str(weights), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a polyquant checkpoint" in err and "save_for_hf(model, DIR, safe_serialization=True)" in err
