"""Quantized attention products of diffusers transformers (FP4DiT quantizes q, k and v token-wise; softmax stays
float), as core product patches (``polyquant.surgery.register_product_patch``).

A patched attention module computes its two products with ``self.matmul_qk(q, k)`` (q @ k^T, both operands
quantized by their own rows: the core's ``QuantMatMulKT``) and ``self.matmul_av(attn, v)`` (only v quantized), on
q, k, v of shape (B, H, N, d) after the per-head norms (and Flux's rotary embedding), i.e. exactly the tensors the
processor hands to scaled-dot-product attention. Everything else follows the diffusers processor it replaces:

| module class   | processor                          | models                                  |
|----------------|------------------------------------|-----------------------------------------|
| Attention      | AttnProcessor2_0 / AttnProcessor   | DiT, PixArt (self and cross attention)  |
| Attention      | JointAttnProcessor2_0              | SD3 (joint image + text attention)      |
| FluxAttention  | FluxAttnProcessor                  | Flux (double and single blocks)         |

``supported(module)`` says whether a module's processor is one of these (others, e.g. IP-adapter or fused
projections, are left unpatched by the plugin, their q / k / v float).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["register", "supported", "ATTENTION_CLASSES"]

_PLAIN = ("AttnProcessor2_0", "AttnProcessor")
_JOINT = ("JointAttnProcessor2_0",)
_FLUX = ("FluxAttnProcessor",)


def _heads(x: Tensor, b: int, heads: int) -> Tensor:
    return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, N, H d) -> (B, H, N, d)


def _products(self: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    # softmax(q k^T / sqrt(d) + mask) v with both products quantized; (B, H, N, d) -> (B, H, N, d)
    scores = self.matmul_qk(q, k) * q.shape[-1] ** -0.5  # (B, H, N, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return self.matmul_av(scores.softmax(dim=-1), v)


def _plain(self: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
           attention_mask: Tensor | None) -> Tensor:
    # AttnProcessor2_0 (DiT / PixArt self- and cross-attention), (B, N, C) hidden states
    if hidden_states.ndim != 3 or self.spatial_norm is not None or self.group_norm is not None:
        raise NotImplementedError("the quantized attention takes (B, N, C) hidden states without spatial / group "
                                  "norms (diffusers DiT / PixArt attention)")
    residual = hidden_states
    b, n, _ = hidden_states.shape
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and self.norm_cross:
        context = self.norm_encoder_hidden_states(context)
    q = _heads(self.to_q(hidden_states), b, self.heads)  # (B, H, N, d)
    k, v = _heads(self.to_k(context), b, self.heads), _heads(self.to_v(context), b, self.heads)  # (B, H, M, d)
    if self.norm_q is not None:
        q = self.norm_q(q)
    if self.norm_k is not None:
        k = self.norm_k(k)
    mask = None
    if attention_mask is not None:
        mask = self.prepare_attention_mask(attention_mask, k.shape[2], b)
        mask = mask.view(b, self.heads, -1, mask.shape[-1])
    out = _products(self, q, k, v, mask)
    out = out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
    out = self.to_out[1](self.to_out[0](out))
    if self.residual_connection:
        out = out + residual
    return out / self.rescale_output_factor


def _joint(self: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> Any:
    # JointAttnProcessor2_0 (SD3): image tokens first, then the context's, one attention over both
    b, n = hidden_states.shape[:2]
    q, k, v = (_heads(f(hidden_states), b, self.heads) for f in (self.to_q, self.to_k, self.to_v))
    if self.norm_q is not None:
        q = self.norm_q(q)
    if self.norm_k is not None:
        k = self.norm_k(k)
    if encoder_hidden_states is not None:
        eq, ek, ev = (_heads(f(encoder_hidden_states), b, self.heads)
                      for f in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        if self.norm_added_q is not None:
            eq = self.norm_added_q(eq)
        if self.norm_added_k is not None:
            ek = self.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
    out = _products(self, q, k, v).transpose(1, 2).reshape(b, q.shape[2], -1).to(q.dtype)  # (B, N + M, H d)
    if encoder_hidden_states is None:
        return self.to_out[1](self.to_out[0](out))
    out, context = out[:, :n], out[:, n:]
    if not self.context_pre_only:
        context = self.to_add_out(context)
    return self.to_out[1](self.to_out[0](out)), context


def _attention_forward(self: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                       attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
    name = type(self.processor).__name__
    if name in _JOINT:
        return _joint(self, hidden_states, encoder_hidden_states)
    if name in _PLAIN:
        return _plain(self, hidden_states, encoder_hidden_states, attention_mask)
    raise NotImplementedError(f"no quantized attention for diffusers processor {name}")


def _flux_forward(self: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                  attention_mask: Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
    # FluxAttnProcessor: context tokens first, rotary embedding on q and k, heads of self.head_dim
    from diffusers.models.embeddings import apply_rotary_emb

    b = hidden_states.shape[0]

    def heads(x: Tensor) -> Tensor:  # (B, N, H d) -> (B, N, H, d), Flux's layout
        return x.unflatten(-1, (-1, self.head_dim))

    q, k, v = heads(self.to_q(hidden_states)), heads(self.to_k(hidden_states)), heads(self.to_v(hidden_states))
    q, k = self.norm_q(q), self.norm_k(k)
    joint = encoder_hidden_states is not None and self.added_kv_proj_dim is not None
    if joint:
        eq, ek, ev = (heads(f(encoder_hidden_states)) for f in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        eq, ek = self.norm_added_q(eq), self.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    out = _products(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask)  # (B, H, N, d)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, N, H d)
    if encoder_hidden_states is None:
        return out
    m = encoder_hidden_states.shape[1]
    context, out = out[:, :m], out[:, m:]
    return self.to_out[1](self.to_out[0](out.contiguous())), self.to_add_out(context.contiguous())


def _classes() -> dict[type[nn.Module], Any]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return {Attention: _attention_forward, FluxAttention: _flux_forward}


ATTENTION_CLASSES = ("Attention", "FluxAttention")
_REGISTERED = [False]


def register() -> list[type[nn.Module]]:
    """Register the product patches of diffusers' attention classes (once); returns the classes."""
    from polyquant.nn import QuantMatMulKT
    from polyquant.surgery import register_product_patch

    classes = _classes()
    if not _REGISTERED[0]:
        for cls, forward in classes.items():
            register_product_patch(cls, forward, product=QuantMatMulKT)
        _REGISTERED[0] = True
    return list(classes)


def supported(module: nn.Module) -> bool:
    """True if ``module`` is a diffusers attention whose processor the patches follow (fused q/k/v projections
    are not: their q / k / v come from one ``to_qkv``)."""
    name = type(getattr(module, "processor", None)).__name__
    if type(module).__name__ == "FluxAttention":
        return name in _FLUX and not getattr(module, "fused_projections", False)
    return type(module).__name__ == "Attention" and name in _PLAIN + _JOINT \
        and not getattr(module, "fused_projections", False)
