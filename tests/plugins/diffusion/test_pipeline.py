"""Diffusers pipelines (issue 23 items 2 and 6): calibration on the calls a pipeline's own sampling loop makes,
quantizing ``pipe.transformer`` in place, loading an artifact back into a pipeline (packed), and the command line
on a user's diffusers folder (a DiT pipeline, a DiT transformer folder, a PixArt text-to-image pipeline with
prompts), with its one-line errors. Every pipeline is tiny, random and built here (no hub)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import polyquant as pq  # noqa: E402
from polyquant.cli import main  # noqa: E402
from polyquant.plugins.diffusion.archs import TINY_CONFIGS, build_transformer, tiny_transformer  # noqa: E402
from polyquant.plugins.diffusion.calib import record_calls  # noqa: E402
from polyquant.plugins.diffusion.fp4dit import FP4DiTConfig  # noqa: E402
from polyquant.plugins.diffusion.pipeline import calls_bytes, load_into_pipeline, quantize_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vae(blocks: int):  # a tiny AutoencoderKL; latents are 2^(blocks - 1) times smaller than images
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * blocks,
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8)


def _dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = _vae(1)
    return DiTPipeline(transformer=tiny_transformer("DiTTransformer2DModel"), vae=vae, scheduler=DDIMScheduler())


def _pixart_pipeline():
    """PixArt-alpha with a 1-layer T5 encoder and a 13-word unigram tokenizer (512 px bins: 64 x 64 latents)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (w, -1.0) for w in "a photo of the digit zero one two cat dog red blue".split()]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
        vae = _vae(4)
    transformer = build_transformer({"diffusers": "PixArtTransformer2DModel",
                                     "config": {**TINY_CONFIGS["PixArtTransformer2DModel"], "sample_size": 64}})
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dit_pipe")
    _dit_pipeline().save_pretrained(folder)
    return folder


def _dit_run(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def test_quantize_pipeline_in_place_and_load_packed(dit_folder: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(dit_folder, use_safetensors=True, local_files_only=True)
    float_images = _dit_run(pipe)
    calls = record_calls(pipe.transformer, lambda: _dit_run(pipe))
    # DiT's pipeline runs classifier-free guidance: 3 calls of 2 x 2 latents, labels then the null class 1000
    assert len(calls) == 3 and calls[0]["hidden_states"].shape == (4, 4, 8, 8)
    assert calls[0]["class_labels"].tolist() == [1, 2, 1000, 1000] and calls_bytes(calls) > 3 * 4 * 4 * 64 * 4
    qm = quantize_pipeline(pipe, FP4DiTConfig(group_size=8, recon_iters=2, recon_batch=2), _dit_run, progress=False)
    assert pipe.transformer is qm.model
    q_images = _dit_run(pipe)
    assert 0 < float((q_images - float_images).abs().max()) < 0.5
    art = tmp_path / "dit.safetensors"
    pq.save(qm, art)
    fresh = DiffusionPipeline.from_pretrained(dit_folder, use_safetensors=True, local_files_only=True)
    loaded = load_into_pipeline(fresh, str(art), mode="packed", cpu_dtype=torch.float32)
    assert fresh.transformer is loaded.model and loaded.packing is not None
    assert torch.allclose(_dit_run(fresh), q_images, atol=1e-4)
    other = _pixart_pipeline()
    with pytest.raises(ValueError, match="holds a DiTTransformer2DModel, the pipeline's transformer is a Pix"):
        load_into_pipeline(other, str(art))


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_dit_pipeline_and_transformer_folders(dit_folder: Path, tmp_path: Path, capsys) -> None:
    art = tmp_path / "q.safetensors"
    rc, out, err = _cli(["quantize", "diffusion/fp4dit", "--model", str(dit_folder), "--group-size", "8",
                         "--calib-images", "2", "--calib-steps", "3", "--eval-images", "2", "--quiet", "--out",
                         str(art)], capsys)
    assert rc == 0 and art.is_file(), err
    assert "DiTTransformer2DModel from" in out and "DiTPipeline" in out
    err_q = float(re.search(r"relative prediction error .* = (\S+)", out).group(1))
    assert 0 < err_q < 0.2 and "peak resident memory" in out
    rc, out, err = _cli(["load", str(art), "--mode", "packed"], capsys)
    assert rc == 0 and "restored diffusion/fp4dit (packed)" in out, err
    # a transformer folder alone: a DiT samples with the plugin's DDPM sampler
    tf = tmp_path / "transformer"
    tiny_transformer("DiTTransformer2DModel").save_pretrained(tf)
    rc, out, err = _cli(["quantize", "diffusion/int_minmax", "--model", str(tf), "--group-size", "8",
                         "--calib-images", "2", "--calib-steps", "2", "--eval-images", "0", "--quiet", "--out",
                         str(tmp_path / "i.safetensors")], capsys)
    assert rc == 0 and "plms sampling" in out, err


def test_cli_text_pipeline_with_prompts(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "pixart"
    _pixart_pipeline().save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nred dog\n", encoding="utf-8")
    art = tmp_path / "p.safetensors"
    base = ["quantize", "diffusion/fp4dit", "--model", str(folder), "--group-size", "8", "--calib-images", "2",
            "--calib-steps", "2", "--eval-images", "1", "--quiet", "--out", str(art)]
    rc, out, err = _cli(base, capsys)  # no --prompts
    assert rc != 0 and "pass --prompts FILE" in err and not art.exists()
    rc, out, err = _cli(base + ["--prompts", str(prompts)], capsys)
    assert rc == 0 and "PixArtTransformer2DModel" in out and "PixArtAlphaPipeline" in out, err
    qm = pq.load(art, mode="packed", cpu_dtype=torch.float32)
    assert type(qm.model).__name__ == "PixArtTransformer2DModel"


def test_cli_folder_errors_leave_files_alone(tmp_path: Path, capsys) -> None:
    art = tmp_path / "keep.safetensors"
    art.write_bytes(b"old")
    common = ["--group-size", "8", "--quiet", "--force", "--out", str(art)]
    rc, _, err = _cli(["quantize", "diffusion/fp4dit", "--model", str(tmp_path / "nope")] + common, capsys)
    assert rc != 0 and "not a directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _cli(["quantize", "diffusion/fp4dit", "--model", str(empty)] + common, capsys)
    assert rc != 0 and "neither a pipeline" in err
    tf = tmp_path / "sd3"
    tiny_transformer("SD3Transformer2DModel").save_pretrained(tf)
    rc, _, err = _cli(["quantize", "diffusion/fp4dit", "--model", str(tf)] + common, capsys)
    assert rc != 0 and "alone cannot sample" in err
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    rc, _, err = _cli(["quantize", "diffusion/fp4dit", "--model", str(unet)] + common, capsys)
    assert rc != 0 and "unsupported diffusers transformer 'UNet2DModel'" in err
    assert art.read_bytes() == b"old" and len(err.strip().splitlines()) == 1
