"""The ssm command line on a user's own transformers folder (issue 22, item 5): ``polyquant quantize ssm/METHOD
--model FOLDER --calib-text FILE`` and ``polyquant load ART --eval-text FILE``, for Mamba-1 and Mamba-2 folders,
byte-level and with a tokenizer saved in the folder; and the one-line errors that leave files alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from polyquant.cli import main  # noqa: E402
from polyquant.plugins.ssm.models import text_bytes  # noqa: E402

BPB = re.compile(r"(\w+) (\d+\.\d+), float (\d+\.\d+)")


def _save(folder: Path, kind: str, *, hidden: int = 32, vocab: int = 256) -> Path:
    """A seeded tiny random transformers Mamba-1 / Mamba-2 causal LM saved with save_pretrained."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "mamba":
            lm = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, state_size=8))
        else:
            lm = Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
                                                state_size=8, expand=2, head_dim=16, num_heads=2 * hidden // 16,
                                                n_groups=1, chunk_size=16))
    lm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("texts")
    calib, held_out = root / "calib.txt", root / "eval.txt"
    calib.write_bytes(text_bytes("train", limit=40_000))
    held_out.write_bytes(text_bytes("test", limit=40_000))
    return calib, held_out


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_user_folder_quantize_then_load_with_eval_text(kind: str, tmp_path: Path, texts, capsys) -> None:
    folder = _save(tmp_path / "model", kind)
    calib, held_out = texts
    art = tmp_path / "q.safetensors"
    rc, out, _ = _run(["quantize", "ssm/quamba", "--model", str(folder), "--calib-text", str(calib), "--eval-text",
                       str(held_out), "--calib-batches", "2", "--seq-len", "32", "--quiet", "--out", str(art)], capsys)
    assert rc == 0 and art.is_file()
    assert ("MambaForCausalLM" if kind == "mamba" else "Mamba2ForCausalLM") in out
    m = re.search(r"held-out bits per byte: float (\d+\.\d+), quamba (\d+\.\d+)", out)
    assert m is not None, out
    fp, q = float(m.group(1)), float(m.group(2))
    assert q != fp and abs(q / fp - 1) < 0.02  # W8A8 of a random model: close to float, measured < 0.5%
    from polyquant.artifact import load as load_artifact

    hf_config = load_artifact(art).config["model"]["hf_config"]
    assert hf_config["model_type"] == kind and not any(k.startswith("_") for k in hf_config)  # no local paths
    for mode in ("fake", "packed"):
        rc, out, _ = _run(["load", str(art), "--mode", mode, "--eval-text", str(held_out), "--model", str(folder),
                           "--seq-len", "32", "--eval-batches", "2"], capsys)
        assert rc == 0, out
        hit = BPB.search(out)
        assert hit is not None and hit.group(1) == "quamba", out
        assert abs(float(hit.group(2)) / float(hit.group(3)) - 1) < 0.02  # 4 decimals: may print equal
        if mode == "packed":
            assert "packed layers (" in out and "HadamardLinear(W8A8Linear)" in out and "W8A8Linear" in out
    # without the folder, the artifact still rebuilds itself (its transformers config travels in the manifest)
    rc, out, _ = _run(["load", str(art), "--eval-text", str(held_out), "--seq-len", "32", "--eval-batches", "1"],
                      capsys)
    assert rc == 0 and "pass --model FOLDER" in out and "quamba" in out
    other = _save(tmp_path / "other", kind, hidden=64)  # another model: refused as the float reference
    rc, _, err = _run(["load", str(art), "--eval-text", str(held_out), "--model", str(other)], capsys)
    assert rc == 2 and "not the model this artifact was quantized from" in err


@pytest.mark.parametrize("method", ["naive", "smoothquant", "quarot"])
def test_baselines_on_a_mamba2_folder(method: str, tmp_path: Path, texts, capsys) -> None:
    folder = _save(tmp_path / "model", "mamba2")
    calib, held_out = texts
    rc, out, _ = _run(["quantize", f"ssm/{method}", "--model", str(folder), "--calib-text", str(calib), "--eval-text",
                       str(held_out), "--calib-batches", "1", "--seq-len", "32", "--quiet"], capsys)
    assert rc == 0, out
    m = re.search(rf"held-out bits per byte: float (\d+\.\d+), {method} (\d+\.\d+)", out)
    assert m is not None and abs(float(m.group(2)) / float(m.group(1)) - 1) < 0.02, out


def test_tokenizer_in_the_folder_is_used(tmp_path: Path, texts, capsys) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    calib, held_out = texts
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"])
    tok.train_from_iterator([calib.read_text(encoding="utf-8", errors="replace")], trainer=trainer)
    folder = _save(tmp_path / "model", "mamba", vocab=320)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    rc, out, _ = _run(["quantize", "ssm/naive", "--model", str(folder), "--calib-text", str(calib), "--eval-text",
                       str(held_out), "--calib-batches", "1", "--seq-len", "32", "--quiet"], capsys)
    assert rc == 0, out
    m = re.search(r"held-out bits per byte: float (\d+\.\d+), naive (\d+\.\d+)", out)
    assert m is not None
    # a random model over ~320 tokens: about log2(320) bits per token, fewer bits per byte (tokens span bytes)
    assert 1.0 < float(m.group(1)) < 8.5


def test_errors_are_one_line_and_leave_files_alone(tmp_path: Path, texts, capsys) -> None:
    calib, _ = texts
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    out_file = tmp_path / "keep.safetensors"
    out_file.write_bytes(b"not touched")
    not_mamba = tmp_path / "gpt"
    not_mamba.mkdir()
    (not_mamba / "config.json").write_text('{"model_type": "gpt2"}')
    odd = _save(tmp_path / "odd", "mamba", hidden=10)  # d_inner 20: no Hadamard size
    cases = [
        (["--calib-text", str(short)], "shorter than one sequence of 128"),
        (["--model", str(tmp_path / "missing")], "not a folder"),
        (["--model", str(not_mamba)], "not a Mamba model"),
        (["--model", str(odd), "--calib-text", str(calib)], r"d_inner of .* is 20, .*2\^k, 12 \* 2\^k or 40 \* 2\^k"),
        (["--calib-text", str(tmp_path)], "not a regular file"),
    ]
    for extra, message in cases:
        rc, _, err = _run(["quantize", "ssm/quamba", "--quiet", "--calib-batches", "1", "--out", str(out_file),
                           "--force", *extra], capsys)
        assert rc == 2, (extra, err)
        lines = [line for line in err.splitlines() if line.startswith("polyquant: error:")]
        assert len(lines) == 1 and re.search(message, lines[0]), (extra, err)
        assert out_file.read_bytes() == b"not touched"


def test_bits_per_byte_arithmetic_with_and_without_a_tokenizer() -> None:
    from polyquant.plugins.ssm.models import bits_per_byte, encode

    class Uniform(torch.nn.Module):  # every next token equally likely: log2(vocab) bits per token
        def __init__(self, vocab: int) -> None:
            super().__init__()
            self.vocab = vocab

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, self.vocab)

    ids, bpt = encode(b"hello world", None, 256)
    assert ids.tolist() == list(b"hello world") and bpt == 1.0
    assert bits_per_byte(Uniform(256), [ids[None]], bpt) == pytest.approx(8.0)

    class TwoBytes:  # a stand-in tokenizer: one token per two characters
        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            return {"input_ids": [ord(text[i]) for i in range(0, len(text), 2)]}

    ids, bpt = encode(b"abcdefgh", TwoBytes(), 512)
    assert ids.tolist() == [97, 99, 101, 103] and bpt == 2.0
    assert bits_per_byte(Uniform(512), [ids[None]], bpt) == pytest.approx(9.0 / 2.0)  # log2(512) bits per 2 bytes
    with pytest.raises(ValueError, match="no tokenizer"):
        encode(b"abc", None, 512)
    with pytest.raises(ValueError, match="beyond the model's vocabulary"):
        encode(b"abcdefgh", TwoBytes(), 100)


def test_forged_transformers_configs_are_refused_in_one_line() -> None:
    from polyquant.plugins.ssm.models import build_model, check_config

    for bad, message in (({"model_type": "mamba", "num_hidden_layers": 10**9}, r"num_hidden_layers must be an integer"),
                         ({"model_type": "mamba", "hidden_size": -3}, "hidden_size must be an integer"),
                         ({"model_type": "mamba2", "hidden_size": 64, "num_heads": 3, "head_dim": 16},
                          "invalid mamba2 config"),
                         ({"model_type": "llama"}, "not a Mamba model")):
        with pytest.raises(ValueError, match=message):
            build_model(check_config({"hf_config": bad}))
