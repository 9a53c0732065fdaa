"""ZOODiP on a diffusers text-to-image pipeline (``StableDiffusionPipeline`` and others with ``tokenizer``,
``text_encoder``, ``unet``, ``vae``, ``scheduler``): a new token (``<sks>``) whose text-encoder embedding row is
learned from reference images with forward passes only, against the pipeline quantized to INT8 weights
(``zoodip.weight_only_rules``), as the paper does on Stable Diffusion v1.5 with ``optimum.quanto``.

    pipe = StableDiffusionPipeline.from_pretrained(DIR)
    quantize_pipeline_weights(pipe)                                # text encoder, UNet, VAE: INT8 weight-only
    theta, record = train_token(pipe, "<sks>", images, "a photo of <sks> dog", ZOODiPConfig(iters=..., lr=1e-2),
                                init_word="dog")
    save_token("sks.safetensors", pipe, "<sks>")                 # {token: embedding} + JSON metadata
    load_token(fresh_pipe, "sks.safetensors")                    # or fresh_pipe.load_textual_inversion(path)

The saved file is diffusers' textual-inversion format (one safetensors key, the token, holding its (1, d)
embedding), so ``load_textual_inversion`` reads it too; the metadata records the method, its config and the text
encoder's class and width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .zoodip import ZOODiPConfig, sample_timesteps, weight_only_rules, zo_train

__all__ = ["add_token", "quantize_pipeline_weights", "TokenTrainer", "train_token", "save_token", "load_token"]

_META = "polyquant_token"


def add_token(tokenizer: Any, text_encoder: nn.Module, token: str, init_word: str | None = None) -> int:
    """Add ``token`` to the tokenizer and a row to the text encoder's input embeddings (initialized from
    ``init_word``'s row, the paper's class word, or the mean row); returns its id. ValueError for a token the
    tokenizer already has or an ``init_word`` that is not one token."""
    if token in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer already has the token {token!r}: pick another placeholder")
    init_id = None
    if init_word is not None:
        ids = tokenizer.encode(init_word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the initializer word {init_word!r} is {len(ids)} tokens; it must be exactly one")
        init_id = ids[0]
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[token_id] = table[init_id] if init_id is not None else table[:token_id].mean(0)
    return token_id


def quantize_pipeline_weights(pipe: Any, bits: int = 8) -> Any:
    """The pipeline's text encoder, UNet (or transformer) and VAE with INT weights per output channel, weight-only,
    in place (their embedding tables stay float); returns the pipeline."""
    from polyquant.nn import quantize_weights

    for name in ("text_encoder", "unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            quantize_weights(module, weight_only_rules(bits), inplace=True)
    return pipe


class TokenTrainer:
    """The denoising loss of candidate rows of one token on a text-to-image pipeline: the references are encoded
    to latents once (the VAE's posterior mean times its scaling factor); per step ``set_step`` draws B latents,
    timesteps (PUTS or uniform over the scheduler's training steps) and noise; ``losses(thetas)`` runs the text
    encoder and the UNet once per candidate (the token's row set to it, restored after)."""

    def __init__(self, pipe: Any, token_id: int, images: Tensor, prompt: str, config: ZOODiPConfig) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.token_id, self.config = pipe, token_id, config
        vae = pipe.vae
        if images.dim() != 4 or images.shape[1] != int(vae.config.in_channels):
            raise ValueError(f"reference images must be (N, {vae.config.in_channels}, H, W) in [-1, 1], got "
                             f"{list(images.shape)}")
        with torch.no_grad():
            self.latents = vae.encode(images.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        tok = pipe.tokenizer
        self.ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        if not (self.ids == token_id).any():
            raise ValueError(f"the prompt {prompt!r} does not contain the new token")
        self.ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.forward_passes = 0
        self.x_t = self.t = self.eps = None

    def set_step(self) -> None:
        c = self.config
        idx = torch.randint(0, len(self.latents), (c.batch,), generator=self.gen)
        self.t = sample_timesteps(c.batch, int(self.ddpm.config.num_train_timesteps), self.gen, puts=c.puts,
                                  t_low=c.t_low, t_high=c.t_high)
        self.eps = torch.randn(self.latents[idx].shape, generator=self.gen)
        self.x_t = self.ddpm.add_noise(self.latents[idx], self.eps, self.t)

    def losses(self, thetas: Tensor) -> Tensor:
        table = self.pipe.text_encoder.get_input_embeddings().weight
        keep = table[self.token_id].detach().clone()
        out = []
        try:
            for theta in thetas:
                with torch.no_grad():
                    table[self.token_id] = theta.to(table)
                hidden = self.pipe.text_encoder(self.ids)[0]
                pred = self.pipe.unet(self.x_t, self.t, encoder_hidden_states=hidden.expand(len(self.t), -1, -1),
                                      return_dict=False)[0]
                out.append(F.mse_loss(pred.float(), self.eps))
                self.forward_passes += len(self.t)
        finally:
            with torch.no_grad():
                table[self.token_id] = keep
        return torch.stack(out)


@torch.no_grad()
def train_token(pipe: Any, token: str, images: Tensor, prompt: str, config: ZOODiPConfig, *,
                init_word: str | None = None, progress: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """ZOODiP on a text-to-image pipeline: add ``token`` (``add_token``), learn its row from ``images`` (N, C, H, W)
    in [-1, 1] with ``prompt`` (which contains the token) by forward passes only (``zoodip.zo_train``), and leave
    the learned row in the text encoder. Returns the row and the record (losses, forward passes)."""
    token_id = add_token(pipe.tokenizer, pipe.text_encoder, token, init_word)
    trainer = TokenTrainer(pipe, token_id, images, prompt, config)
    table = pipe.text_encoder.get_input_embeddings().weight
    theta, record = zo_train(trainer, table[token_id].detach().float().clone(), config, progress=progress)
    table[token_id] = theta.to(table)
    return theta, {**record, "token_id": token_id}


def save_token(path: str | Path, pipe: Any, token: str, config: ZOODiPConfig | None = None) -> Path:
    """The token's learned row as diffusers' textual-inversion file (safetensors ``{token: (1, d)}``) with JSON
    metadata (method, config, the text encoder's class and width); written atomically."""
    from polyquant.checkpoint import save_checkpoint

    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    if token not in pipe.tokenizer.get_vocab():
        raise ValueError(f"the pipeline's tokenizer has no token {token!r}")
    row = pipe.text_encoder.get_input_embeddings().weight[token_id].detach().float().reshape(1, -1).clone()
    meta = {"method": "diffusion/zoodip", "token": token, "dim": row.shape[1],
            "text_encoder": type(pipe.text_encoder).__name__, "config": None if config is None else config.to_dict()}
    return save_checkpoint({token: row}, path, {_META: json.dumps(meta)})


def load_token(pipe: Any, path: str | Path) -> int:
    """Add a ``save_token`` file's token to a (fresh) pipeline: its tokenizer and text encoder grow by one row set
    to the saved embedding; returns the token id. ValueError for a file that is not one, a token the tokenizer
    already has, or an embedding whose width is not the text encoder's."""
    from polyquant.checkpoint import read_checkpoint

    tensors, meta = read_checkpoint(path)
    if _META not in meta or len(tensors) != 1:
        raise ValueError(f"{path}: not a polyquant token embedding file")
    token, row = next(iter(tensors.items()))
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    if row.dim() != 2 or row.shape != (1, width):
        raise ValueError(f"{path}: the token embedding has size {list(row.shape[1:])}, the pipeline's text encoder "
                         f"embeds in {width}")
    token_id = add_token(pipe.tokenizer, pipe.text_encoder, token)
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight
        table[token_id] = row[0].to(table)
    return token_id
