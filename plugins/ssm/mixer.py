"""The quantizable Mamba-1 mixer: the pure-torch math of ``transformers``' ``MambaMixer`` (whole sequences, and
step by step with HF's cache), written out so that Quamba's quantization points inside it can be placed (Chiang et
al., "Quamba: A Post-Training Quantization Recipe for Selective State Space Models", ICLR 2025, arXiv 2410.13229).

The HF mixer calls ``conv1d.weight`` / ``dt_proj.weight`` directly and runs the scan in one function, so module
surgery alone cannot reach the conv output, dt, B, C or the scan parameters; ``QuantMambaMixer`` replaces each
``MambaMixer`` (same parameters, same submodule names) and calls its submodules, so that core quant layers
(``QuantLinear`` / ``QuantConv1d`` / ``RotatedLinear``) put in their place act. In the float state (no quantizer)
it computes what ``MambaMixer`` computes (tested).

    x, z   = in_proj(h).chunk(2)                       (B, L, D) each         [in_proj: input, weight, output q]
    u      = silu(conv1d(x))                           causal depthwise conv  [conv1d: weight q; u_quantizer]
    dt, B, C = x_proj(u).split(R, N, N)                                       [x_proj: weight, output q]
    dt     = softplus(dt_proj(dt) + dt_bias)           bias moved out         [dt_proj: weight, output q; dt_bias q]
    y      = scan(u, dt, A = -exp(A_log), B, C) + D u                         [A_log q, D q]
    out    = out_proj(y * silu(z))                                            [out_proj: (H y), weight W H^T]

Cached decoding (``cache_params``: the ``transformers`` cache ``MambaForCausalLM`` builds, a ``DynamicCache`` of
linear-attention layers) runs the same points on each chunk: the conv state holds the last ``conv_kernel`` conv
inputs (in_proj's quantized x, what the conv sees), the SSM state the float h after the chunk. A prefill (no state
yet) is the whole-sequence path plus the two state writes; a later chunk (a decode step: length 1) convolves the
cached inputs followed by the new ones and continues the scan from the cached h (``selective_scan``'s ``h0``; one
``scan_step`` formula for both).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QuantMambaMixer", "maybe_quantize", "causal_conv", "selective_scan", "scan_step", "replace_mixers",
           "mixers"]


def scan_step(h: Tensor, decay: Tensor, drive: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the recurrence: h_t = decay_t * h_{t-1} + drive_t, y_t = C_t . h_t (without D u_t).

    h, decay, drive: (B, D, N) float32; c: (B, N) -> (h_t (B, D, N), y_t (B, D)).
    """
    h = decay * h + drive
    return h, (h * c[:, None, :]).sum(-1)


def selective_scan(u: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                   h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y_t = C_t . h_t + D u_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t from h_0 = ``h0`` (zeros when None),
    in float32.

    u, dt: (B, L, D); a: (D, N) (negative); b, c: (B, L, N); d: (D,); h0: (B, D, N) -> y (B, L, D) and the last
    state h_L (B, D, N). The state stays float.
    """
    u, dt, b, c = u.float(), dt.float(), b.float(), c.float()
    decay = torch.exp(dt[..., None] * a.float())  # (B, L, D, N)
    drive = (dt * u)[..., None] * b[:, :, None, :]  # (B, L, D, N)
    h = u.new_zeros(u.shape[0], u.shape[2], a.shape[1]) if h0 is None else h0.float()  # (B, D, N)
    ys = []
    # unbind, not decay[:, t]: the backward of L index ops would write L full-size gradients
    for decay_t, drive_t, c_t in zip(decay.unbind(1), drive.unbind(1), c.unbind(1)):
        h, y_t = scan_step(h, decay_t, drive_t, c_t)
        ys.append(y_t)  # (B, D)
    return torch.stack(ys, dim=1) + u * d.float(), h  # (B, L, D), (B, D, N)


def causal_conv(conv1d: nn.Module, x: Tensor, cache_params: Any, layer_idx: int, conv_state: Tensor | None) -> Tensor:
    """A mixer's causal depthwise conv of x (B, C, L) -> (B, C, L), continuing the cached inputs when there are some
    (both mixers; ``conv1d`` is an ``nn.Conv1d``, ``QuantConv1d`` or ``PackedConv``: called, its weight never read).

    ``conv1d`` pads K - 1 zeros on both sides (HF's layout, kept by the quant and packed convs), so output o covers
    inputs o - K + 1 .. o: the first L outputs are causal. With a conv state, the window is the cached inputs
    followed by the L new ones (W >= K + L, what the cache's ``update_conv_state`` returns; it also stores the last K
    inputs), and the outputs of the new inputs are W - L .. W - 1, each covering a full window of real inputs.
    """
    length = x.shape[-1]
    if cache_params is None:
        return conv1d(x)[..., :length]  # the right padding dropped
    window = cache_params.update_conv_state(x, layer_idx, conv_kernel_size=conv1d.kernel_size[0])
    if conv_state is None:  # prefill: the whole-sequence conv (the cache zero-pads a prompt shorter than K)
        return conv1d(x)[..., :length]
    w = window.shape[-1]
    return conv1d(window)[..., w - length:w]


def maybe_quantize(quantizer: nn.Module | None, x: Tensor) -> Tensor:
    """``quantizer(x)``, or ``x`` at a point the method leaves float (quantizer None)."""
    return x if quantizer is None else quantizer(x)


class QuantMambaMixer(nn.Module):
    """A ``MambaMixer``'s parameters and submodules with Quamba's quantization points (module docstring).

    Quantizers owned here (``None`` when the method leaves that point float): ``u_quantizer`` (the SSM input,
    conv1d output after SiLU = x_proj input), ``A_log_quantizer``, ``D_quantizer``, ``dt_bias_quantizer``. The
    linear layers' own quantizers cover the rest. ``dt_proj`` has no bias: it is ``dt_bias`` (Quamba's
    ``delta_bias``), added before the softplus as in the scan kernel.
    """

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.layer_idx = mixer.layer_idx
        self.intermediate_size = mixer.intermediate_size
        self.ssm_state_size = mixer.ssm_state_size
        self.time_step_rank = mixer.time_step_rank
        self.act = mixer.act
        self.in_proj, self.conv1d = mixer.in_proj, mixer.conv1d
        self.x_proj, self.out_proj = mixer.x_proj, mixer.out_proj
        dt = mixer.dt_proj
        self.dt_proj = nn.Linear(dt.in_features, dt.out_features, bias=False, device=dt.weight.device,
                                 dtype=dt.weight.dtype)
        self.dt_proj.weight = dt.weight
        self.dt_bias = nn.Parameter(dt.bias.detach().clone())
        self.A_log, self.D = mixer.A_log, mixer.D
        self.u_quantizer: nn.Module | None = None
        self.A_log_quantizer: nn.Module | None = None
        self.D_quantizer: nn.Module | None = None
        self.dt_bias_quantizer: nn.Module | None = None

    def forward(self, hidden_states: Tensor, cache_params: Any = None, attention_mask: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        """hidden_states (B, L, d_model) -> (B, L, d_model). With ``cache_params`` (HF's cache), the chunk continues
        the sequence the cache holds (none yet: a prefill) and the cache's conv and SSM states of this layer are
        updated in place."""
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        conv_state = h0 = None
        if cache_params is not None:  # both None before the prefill (read before the conv state is written)
            conv_state = cache_params.get_conv_state(self.layer_idx)  # (B, D, K): the last K conv inputs
            h0 = cache_params.get_recurrent_state(self.layer_idx)  # (B, D, N)
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, L, D) each
        x = causal_conv(self.conv1d, x.transpose(1, 2), cache_params, self.layer_idx, conv_state)  # (B, D, L)
        u = maybe_quantize(self.u_quantizer, self.act(x).transpose(1, 2).contiguous())  # (B, L, D): the SSM input
        if attention_mask is not None:
            u = u * attention_mask[:, :, None].to(u.dtype)
        n = self.ssm_state_size
        dt, b, c = self.x_proj(u).split([self.time_step_rank, n, n], dim=-1)
        dt_bias = maybe_quantize(self.dt_bias_quantizer, self.dt_bias).float()
        dt = F.softplus(self.dt_proj(dt.contiguous()).float() + dt_bias)
        a = -torch.exp(maybe_quantize(self.A_log_quantizer, self.A_log).float())  # (D, N)
        y, h = selective_scan(u, dt, a, b, c, maybe_quantize(self.D_quantizer, self.D), h0)  # (B, L, D), (B, D, N)
        if cache_params is not None:
            cache_params.update_recurrent_state(h, self.layer_idx)
        y = y * F.silu(z.float())
        return self.out_proj(y.to(hidden_states.dtype))  # (B, L, d_model)


def mixers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Mamba-1 mixer of ``model`` (HF ``MambaMixer`` or ``QuantMambaMixer``) by name."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return {name: m for name, m in model.named_modules() if isinstance(m, (MambaMixer, QuantMambaMixer))}


def replace_mixers(model: nn.Module) -> dict[str, QuantMambaMixer]:
    """Replace every HF ``MambaMixer`` of ``model`` by a ``QuantMambaMixer`` (in place); ``ValueError`` when
    the model has none (not a Mamba-1 model)."""
    from polyquant.surgery import replace_modules
    from transformers.models.mamba.modeling_mamba import MambaMixer

    if not any(isinstance(m, (MambaMixer, QuantMambaMixer)) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no transformers MambaMixer: not a Mamba-1 model")
    return replace_modules(model, MambaMixer, lambda name, m: QuantMambaMixer(m))  # type: ignore[return-value]
