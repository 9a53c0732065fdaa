"""Product patches of the timm attention modules this plugin quantizes (registrations in ``polyquant.surgery``).

Each forward below is the module's reference (non-fused) path with its two products computed by
``self.matmul_qk`` and ``self.matmul_av`` (``polyquant.surgery.PRODUCT_NAMES``):

| timm class                                   | matmul_qk              | matmul_av                   | product    |
|----------------------------------------------|------------------------|-----------------------------|------------|
| ``layers.Attention`` (ViT / DeiT, MobileViT) | q @ k^T                | attn @ v                    | QuantMatMul|
| ``swin_transformer.WindowAttention``         | q @ k^T                | attn @ v                    | QuantMatMul|
| ``efficientformer.Attention``                | q @ k^T                | attn @ v                    | QuantMatMul|
| ``efficientformer_v2.Attention2d[Downsample]``| q @ k                 | attn @ v                    | QuantMatMul|
| ``mobilevit.LinearSelfAttention`` (v2)       | key * scores           | relu(value) * context       | QuantMul   |

Where the softmax scale goes in ``layers.Attention``: by default the product sees the raw q and its output is
scaled (AdaLog / PTQ4ViT reference code); a module with ``scaled_query = True`` quantizes q * scale instead
(timm's own order, used by Q-HyViT). ``patch_attention`` sets it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.nn import QuantMatMul
from polyquant.surgery import ProductSite, patch_products, register_product_patch

__all__ = ["QuantMul", "register_timm_attention", "patch_attention", "vit_attention_classes"]

try:  # timm >= 1.0.20 resolves attention masks with these helpers
    from timm.layers import maybe_add_mask, resolve_self_attn_mask
except ImportError:  # pragma: no cover - older timm

    def resolve_self_attn_mask(n: int, attn: Tensor, attn_mask: Tensor | None, is_causal: bool = False
                               ) -> Tensor | None:
        if is_causal:
            return torch.full((n, n), float("-inf"), dtype=attn.dtype, device=attn.device).triu_(1)
        return attn_mask

    def maybe_add_mask(attn: Tensor, mask: Tensor | None) -> Tensor:
        return attn if mask is None else attn + mask


class QuantMul(QuantMatMul):
    """a * b (broadcast elementwise product) with both operands fake-quantized: MobileViTv2's separable attention."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a * b


def _vit_attention_forward(self: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    # timm.layers.Attention (ViT / DeiT Block, MobileViT v1).
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, hd) each
    q, k = self.q_norm(q), self.k_norm(k)
    if getattr(self, "scaled_query", False):
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))  # (B, H, N, N)
    else:
        attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
    attn = self.attn_drop(attn.softmax(dim=-1))
    x = self.matmul_av(attn, v)  # (B, H, N, hd)
    x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _window_attention_forward(self: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    # timm.models.swin_transformer.WindowAttention (relative position bias and shift mask kept).
    B_, N, C = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B_, H, N, hd)
    attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
    attn = attn + self._get_rel_pos_bias()
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = self.matmul_av(attn, v).transpose(1, 2).reshape(B_, N, -1)
    return self.proj_drop(self.proj(x))


def _efficientformer_attention_forward(self: Any, x: Tensor) -> Tensor:
    # timm.models.efficientformer.Attention (Meta3D blocks).
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
    q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)  # (B, H, N, d)
    attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
    attn = (attn + self.get_attention_biases(x.device)).softmax(dim=-1)
    x = self.matmul_av(attn, v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
    return self.proj(x)


def _efficientformerv2_attention_forward(self: Any, x: Tensor) -> Tensor:
    # timm.models.efficientformer_v2.Attention2d (talking heads are 1x1 convs, quantized as convs).
    B = x.shape[0]
    if self.stride_conv is not None:
        x = self.stride_conv(x)
    q = self.q(x).reshape(B, self.num_heads, -1, self.N).permute(0, 1, 3, 2)
    k = self.k(x).reshape(B, self.num_heads, -1, self.N).permute(0, 1, 2, 3)
    v = self.v(x)
    v_local = self.v_local(v)
    v = v.reshape(B, self.num_heads, -1, self.N).permute(0, 1, 3, 2)
    attn = self.matmul_qk(q, k) * self.scale
    attn = attn + self.get_attention_biases(x.device)
    attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
    x = self.matmul_av(attn, v).transpose(2, 3)
    x = x.reshape(B, self.dh, self.resolution[0], self.resolution[1]) + v_local
    if self.upsample is not None:
        x = self.upsample(x)
    return self.proj(self.act(x))


def _efficientformerv2_attention_down_forward(self: Any, x: Tensor) -> Tensor:
    # timm.models.efficientformer_v2.Attention2dDownsample.
    B = x.shape[0]
    q = self.q(x).reshape(B, self.num_heads, -1, self.N2).permute(0, 1, 3, 2)
    k = self.k(x).reshape(B, self.num_heads, -1, self.N).permute(0, 1, 2, 3)
    v = self.v(x)
    v_local = self.v_local(v)
    v = v.reshape(B, self.num_heads, -1, self.N).permute(0, 1, 3, 2)
    attn = self.matmul_qk(q, k) * self.scale
    attn = (attn + self.get_attention_biases(x.device)).softmax(dim=-1)
    x = self.matmul_av(attn, v).transpose(2, 3)
    x = x.reshape(B, self.dh, self.resolution2[0], self.resolution2[1]) + v_local
    return self.proj(self.act(x))


def _linear_self_attention_forward(self: Any, x: Tensor, x_prev: Tensor | None = None) -> Tensor:
    # timm.models.mobilevit.LinearSelfAttention (MobileViTv2), self-attention path.
    if x_prev is not None:
        raise NotImplementedError("quantized LinearSelfAttention supports self-attention only (x_prev=None)")
    qkv = self.qkv_proj(x)  # (B, 1 + 2d, P, N)
    query, key, value = qkv.split([1, self.embed_dim, self.embed_dim], dim=1)
    scores = self.attn_drop(F.softmax(query, dim=-1))  # (B, 1, P, N)
    context = self.matmul_qk(key, scores).sum(dim=-1, keepdim=True)  # (B, d, P, 1)
    out = self.matmul_av(F.relu(value), context.expand_as(value))  # (B, d, P, N)
    return self.out_drop(self.out_proj(out))


def vit_attention_classes() -> tuple[type[nn.Module], ...]:
    """The plain ViT / Swin attention classes (what the AdaLog harness quantizes)."""
    from timm.layers.attention import Attention
    from timm.models.swin_transformer import WindowAttention

    return (Attention, WindowAttention)


_REGISTERED = [False]


def register_timm_attention() -> None:
    """Register the product patches of the table above (once per process)."""
    if _REGISTERED[0]:
        return
    from timm.layers.attention import Attention
    from timm.models.efficientformer import Attention as EFAttention
    from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample
    from timm.models.mobilevit import LinearSelfAttention
    from timm.models.swin_transformer import WindowAttention

    register_product_patch(Attention, _vit_attention_forward)
    register_product_patch(WindowAttention, _window_attention_forward)
    register_product_patch(EFAttention, _efficientformer_attention_forward)
    register_product_patch(Attention2d, _efficientformerv2_attention_forward)
    register_product_patch(Attention2dDownsample, _efficientformerv2_attention_down_forward)
    register_product_patch(LinearSelfAttention, _linear_self_attention_forward, product=QuantMul)
    _REGISTERED[0] = True


def patch_attention(
    model: nn.Module,
    make_product: Callable[[ProductSite], QuantMatMul],
    *,
    scaled_query: bool,
    ignore: Iterable[str] = (),
    classes: Iterable[type[nn.Module]] | None = None,
) -> list[str]:
    """Quantize the products of every registered timm attention module of ``model`` (in place); returns the
    patched module names. ``scaled_query``: whether ``layers.Attention``'s first product sees q * scale (Q-HyViT)
    or the raw q (AdaLog). ``classes``: patch only these (None: every registered class)."""
    register_timm_attention()
    names = patch_products(model, make_product, ignore=ignore, classes=classes)
    if scaled_query:
        for name in names:
            model.get_submodule(name).scaled_query = True
    return names
