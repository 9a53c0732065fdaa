"""Issue 11, item 4: a user checkpoint calibrated and evaluated on the user's image folders from the command line;
without data the CLI says so instead of reporting digits accuracy for a model that is not a digits model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")

from polyquant.cli import main  # noqa: E402
from polyquant.plugins.vit.data import load_digits_data  # noqa: E402
from polyquant.plugins.vit.models import digits_vit_config, load_digits_vit, save_checkpoint  # noqa: E402


def _digit_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, n: int) -> Path:
    """The first n digits as 32x32 grayscale PNGs in class folders (pixels back in [0, 255])."""
    for i in range(n):
        folder = root / f"class_{int(labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((images[i, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("user")
    ckpt = root / "my_vit.safetensors"
    save_checkpoint(load_digits_vit(), ckpt, digits_vit_config())
    data = load_digits_data()
    calib = _digit_folder(root / "calib", data.x_train, data.y_train, 24)
    # every class present in the evaluation folder, so ImageFolder's labels are the digits
    order = torch.argsort(data.y_test, stable=True)
    keep = torch.cat([order[data.y_test[order] == c][:6] for c in range(10)])
    evaluation = _digit_folder(root / "eval", data.x_test[keep], data.y_test[keep], len(keep))
    return ckpt, calib, evaluation


def test_calibrate_and_evaluate_on_user_folders(user_files, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, calib, evaluation = user_files
    out = tmp_path / "q.safetensors"
    argv = ["quantize", "vit/minmax", "--model", str(ckpt), "--calib-data", str(calib), "--eval-data",
            str(evaluation), "--wbits", "8", "--abits", "8", "--calib", "32", "--out", str(out), "--quiet",
            "--mean", "0.5", "--std", "0.5"]  # a polyquant checkpoint records no normalization: never guessed
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "found 24 images, 32 requested" in cap.err  # a smaller calibration set than asked is reported
    assert "24 calibration images from" in cap.out
    line = next(ln for ln in cap.out.splitlines() if "top-1 (60 images)" in ln)
    fp, q = (float(v.split("%")[0]) for v in line.split("float ")[1].split(", quantized "))
    assert fp >= 90.0 and q >= fp - 5.0  # the digits model on its own digits, through the folder path
    assert "digits test accuracy" not in cap.out and out.is_file()


def test_user_model_without_data_is_not_evaluated_on_digits(user_files, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _, _ = user_files
    argv = ["quantize", "vit/minmax", "--model", str(ckpt), "--wbits", "8", "--abits", "8", "--calib", "8",
            "--out", str(tmp_path / "q.safetensors"), "--quiet"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "no --calib-data" in cap.err
    assert "accuracy not evaluated" in cap.out and "digits test accuracy" not in cap.out


def test_bad_data_folders_are_one_line_errors(user_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, calib, _ = user_files
    base = ["quantize", "vit/minmax", "--model", str(ckpt), "--out", str(tmp_path / "q.safetensors"), "--quiet",
            "--mean", "0.5", "--std", "0.5"]
    assert main([*base, "--calib-data", str(tmp_path / "missing")]) == 2
    assert "--calib-data" in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((calib / "class_0").glob("*.png"))[:2]:
        (flat / p.name).write_bytes(p.read_bytes())
    assert main([*base, "--calib", "2", "--eval-data", str(flat)]) == 2
    assert "needs class folders" in capsys.readouterr().err
    assert not (tmp_path / "q.safetensors").exists()  # refused before calibration, nothing written


def test_quantize_device_defaults_to_cuda_when_available(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # issue 12: `--device` defaults to CUDA when there is one, else the CPU
    import polyquant.api

    seen: list[object] = []

    def fake_quantize(model, config, calib, forward_fn=None, *, progress=None, device=None):  # noqa: ANN001
        seen.append(device)
        raise KeyboardInterrupt  # stop before any work; main lets it through

    monkeypatch.setattr(polyquant.api, "quantize", fake_quantize)
    argv = ["quantize", "vit/minmax", "--calib", "2", "--quiet"]
    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        with pytest.raises(KeyboardInterrupt):
            main(argv)
        assert str(seen[-1]) == expected
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--device", "cpu"])
    assert str(seen[-1]) == "cpu"
