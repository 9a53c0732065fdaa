"""A real diffusers StableDiffusionPipeline built from tiny configs (word-level tokenizer, CLIP text encoder,
UNet2DConditionModel, VAE): ZOODiP's token learned against the INT8 pipeline with forward passes only, saved in
diffusers' textual-inversion format and loaded into a fresh pipeline (ours and diffusers' loader), its errors; and
the feature cache inside the pipeline's own DDIM / PLMS loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from polyquant.plugins.diffusion.textual import (  # noqa: E402
    add_token, load_token, quantize_pipeline_weights, save_token, train_token,
)
from polyquant.plugins.diffusion.zoodip import ZOODiPConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORDS = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "a", "photo", "of", "dog", "cat", "red", "digit"]


def _pipeline(width: int = 32, seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                      special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="[UNK]", model_max_length=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=width, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=8,
                                            projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
                                    norm_num_groups=4, attention_head_dim=4)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompt: str) -> torch.Tensor:
    return pipe(prompt, num_inference_steps=2, height=8, width=8, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_token_learned_on_the_int8_pipeline_saved_and_loaded(tmp_path: Path) -> None:
    from polyquant.nn import QuantWeightModule

    pipe = quantize_pipeline_weights(_pipeline())
    assert any(isinstance(m, QuantWeightModule) for m in pipe.unet.modules())
    assert any(isinstance(m, QuantWeightModule) for m in pipe.text_encoder.modules())
    dog = pipe.text_encoder.get_input_embeddings().weight[WORDS.index("dog")].detach().clone()
    refs = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    config = ZOODiPConfig(iters=4, tau=2, batch=2, lr=1e-2)  # the paper's lr for a CLIP token table
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("ZOODiP built an autograd graph"),
                                                  lambda t: t):
        theta, record = train_token(pipe, "<sks>", refs, "a photo of <sks>", config, init_word="dog")
    assert record["forward_passes"] == 4 * (2 + 1) * 2 and len(record["losses"]) == 4
    assert not torch.equal(theta, dog) and float((theta - dog).norm()) < 1.0  # moved a little from the class word
    images = _images(pipe, "a photo of <sks>")
    path = save_token(tmp_path / "sks.safetensors", pipe, "<sks>", config)
    assert path.stat().st_size < 4096  # the learned row and metadata only
    fresh = quantize_pipeline_weights(_pipeline())
    token_id = load_token(fresh, path)
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[token_id], theta)
    assert torch.allclose(_images(fresh, "a photo of <sks>"), images, atol=1e-5)
    other = _pipeline()  # diffusers' own textual-inversion loader reads the file too
    other.load_textual_inversion(str(path))
    row = other.text_encoder.get_input_embeddings().weight[other.tokenizer.convert_tokens_to_ids("<sks>")]
    assert torch.equal(row, theta)


def test_token_errors(tmp_path: Path) -> None:
    pipe = _pipeline()
    with pytest.raises(ValueError, match="already has the token 'dog'"):
        add_token(pipe.tokenizer, pipe.text_encoder, "dog")
    with pytest.raises(ValueError, match="2 tokens; it must be exactly one"):
        add_token(pipe.tokenizer, pipe.text_encoder, "<x>", init_word="red dog")
    refs = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="does not contain the new token"):
        train_token(pipe, "<y>", refs, "a photo of dog", ZOODiPConfig(iters=1))
    path = tmp_path / "t.safetensors"
    pipe.tokenizer.add_tokens(["<z>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    save_token(path, pipe, "<z>")
    with pytest.raises(ValueError, match="size \\[32\\], the pipeline's text encoder embeds in 48"):
        load_token(_pipeline(width=48), path)
    with pytest.raises(ValueError, match="not a polyquant token embedding file"):
        from polyquant.checkpoint import save_checkpoint

        load_token(_pipeline(), save_checkpoint({"a": torch.zeros(1, 32), "b": torch.zeros(1)}, tmp_path / "x.st", {}))


@pytest.mark.parametrize("scheduler", ["ddim", "plms"])
def test_feature_cache_inside_a_stable_diffusion_pipeline(scheduler: str) -> None:
    """DeepCache on a UNet2DConditionModel inside the pipeline's own scheduler loop (classifier-free guidance sends
    both halves in one call; PLMS calls the UNet steps + 1 times): the deep blocks run on refresh calls only, the
    cached images differ a little from the full ones, and disabling restores the model."""
    from diffusers import PNDMScheduler

    from polyquant.plugins.diffusion.cache import FeatureCache, uniform_schedule

    pipe = _pipeline()
    if scheduler == "plms":
        pipe.scheduler = PNDMScheduler(skip_prk_steps=True)
    steps = 6
    calls = steps + 1 if scheduler == "plms" else steps

    def run() -> torch.Tensor:
        return pipe("a photo of dog", num_inference_steps=steps, height=8, width=8, output_type="pt",
                    guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images

    full = run()
    deep = []
    handle = pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: deep.append(1))  # inside the block
    with FeatureCache(pipe, uniform_schedule(calls, 3)) as cache:
        cached = run()
        assert cache.step == calls - 1
    handle.remove()
    assert len(deep) == len(range(0, calls, 3))
    assert 0 < float((cached - full).abs().max()) < 0.5
    assert torch.equal(run(), full)
