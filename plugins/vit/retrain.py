"""AdaLog "+retrain": BRECQ-style block reconstruction of a calibrated model on the core engine.

Reference: GoatWu/AdaLog ``utils/block_recon.py``. Blocks are the patch embedding, every ViT / Swin block, every
Swin patch merging and the head, in forward order. Weights get AdaRound (rectified sigmoid, zeta 1.1, gamma -0.1,
regularizer 0.01, beta 20 -> 2, 20 % warm-up); activation scales are learned (LSQ style, lr 4e-5, cosine) with the
quantizers active; AdaLog's q stays fixed and its scale is trained through the float (straight-through) path, so
AdaLog quantizers switch to float dequantization for the optimisation and back afterwards. Each block sees the
float model's block inputs (``block_inputs="float"``, as the reference's ``init_block_raw_inp_outp``). Loss:
BRECQ's lp_loss (squared error summed over dim 1, averaged over the rest) / 10 for blocks, KL(p_fp || p_q) for
the head. The post-GELU shifts are folded into fc2's biases after the reconstruction, with the final weights.
Runs on ``polyquant.reconstruct``; what differs from the reference is the iteration count (``iters``, paper
20000; the core scales AdaRound's learning rate as lr = min(1e-2, 1e-3 * 20000 / iters), which is the
reference's Adam default 1e-3 at 20000) and the data size (``size``, paper 1024 images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["reconstruction_blocks", "block_loss", "kl_head_loss", "retrain"]


def reconstruction_blocks(model: nn.Module) -> tuple[list[str], list[str]]:
    """(body blocks, head modules) of a timm ViT / DeiT / Swin in forward order."""
    from timm.layers import PatchEmbed
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
    from timm.models.vision_transformer import Block

    body = [n for n, m in model.named_modules() if isinstance(m, (PatchEmbed, Block, SwinTransformerBlock,
                                                                  PatchMerging))]
    head_module = getattr(model, "head", None)
    head = ["head"] if isinstance(head_module, nn.Module) and any(True for _ in head_module.parameters()) else []
    return body, head


def block_loss(out_q: Tensor, out_fp: Tensor, ctx: object) -> Tensor:
    """The reference's block loss: lp_loss(p=2) / 10 (the core's "mse" is BRECQ's lp_loss)."""
    from polyquant.reconstruct import mse_loss

    return mse_loss(out_q, out_fp, ctx) / 10  # type: ignore[arg-type]


def kl_head_loss(out_q: Tensor, out_fp: Tensor, ctx: object) -> Tensor:
    """KL(softmax(out_fp) || softmax(out_q)), batch mean (the head's loss in the reference code)."""
    return F.kl_div(F.log_softmax(out_q, dim=-1), F.log_softmax(out_fp, dim=-1), reduction="batchmean",
                    log_target=True)


def retrain(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, *, iters: int = 2000, size: int = 1024,
            seed: int = 0, batch_size: int = 32, progress: bool = False, lut: bool = True) -> nn.Module:
    """Reconstruct ``qmodel`` (calibrated, post-GELU shifts not yet folded) in place against ``fp_model``.

    ``images``: the reconstruction set (the first ``size`` are used); ``lut``: AdaLog's inference dequantization
    afterwards (tables or float). Returns ``qmodel`` with the shifts folded.
    """
    from polyquant.reconstruct import ReconstructConfig, reconstruct

    from .harness import finalize, set_lut

    data = images[:size].float()
    batches = list(data.split(batch_size))
    body, head = reconstruction_blocks(qmodel)
    set_lut(qmodel, False)
    try:
        common = dict(rounding="adaround", iters=iters, batch_size=batch_size, reg_weight=0.01,
                      beta_range=(20.0, 2.0), warmup=0.2, learn_act_scale=True, act_lr=4e-5, seed=seed,
                      block_inputs="float")
        if body:
            reconstruct(qmodel, body, batches, ReconstructConfig(loss=block_loss, **common), fp_model=fp_model,
                        progress=progress)
        if head:
            reconstruct(qmodel, head, batches, ReconstructConfig(loss=kl_head_loss, **common), fp_model=fp_model,
                        progress=progress)
    finally:
        set_lut(qmodel, lut)
    with torch.no_grad():
        return finalize(qmodel)
