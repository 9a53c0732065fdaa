"""The quantizable Mamba-1 mixer: the pure-torch math of ``transformers``' ``MambaMixer`` (whole sequences, no
cache), written out so that Quamba's quantization points inside it can be placed (Chiang et al., "Quamba: A
Post-Training Quantization Recipe for Selective State Space Models", ICLR 2025, arXiv 2410.13229).

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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QuantMambaMixer", "selective_scan", "replace_mixers", "mixers"]


def selective_scan(u: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """y_t = C_t . h_t + D u_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, h_0 = 0, in float32.

    u, dt: (B, L, D); a: (D, N) (negative); b, c: (B, L, N); d: (D,) -> y (B, L, D). The state stays float.
    """
    u, dt, b, c = u.float(), dt.float(), b.float(), c.float()
    decay = torch.exp(dt[..., None] * a.float())  # (B, L, D, N)
    drive = (dt * u)[..., None] * b[:, :, None, :]  # (B, L, D, N)
    h = u.new_zeros(u.shape[0], u.shape[2], a.shape[1])  # (B, D, N)
    ys = []
    # unbind, not decay[:, t]: the backward of L index ops would write L full-size gradients
    for decay_t, drive_t, c_t in zip(decay.unbind(1), drive.unbind(1), c.unbind(1)):
        h = decay_t * h + drive_t
        ys.append((h * c_t[:, None, :]).sum(-1))  # (B, D)
    return torch.stack(ys, dim=1) + u * d.float()  # (B, L, D)


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
        self.in_proj, self.conv1d, self.x_proj, self.out_proj = mixer.in_proj, mixer.conv1d, mixer.x_proj, mixer.out_proj
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

    @staticmethod
    def _q(quantizer: nn.Module | None, x: Tensor) -> Tensor:
        return x if quantizer is None else quantizer(x)

    def forward(self, hidden_states: Tensor, cache_params: Any = None, attention_mask: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        if cache_params is not None:
            raise NotImplementedError("the quantized Mamba mixer runs whole sequences: call the model with "
                                      "use_cache=False (cached decoding is not implemented yet)")
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, L, D) each
        x = self.conv1d(x.transpose(1, 2))[..., :length]  # (B, D, L), causal: the right padding dropped
        u = self._q(self.u_quantizer, self.act(x).transpose(1, 2).contiguous())  # (B, L, D): the SSM input
        if attention_mask is not None:
            u = u * attention_mask[:, :, None].to(u.dtype)
        n = self.ssm_state_size
        dt, b, c = self.x_proj(u).split([self.time_step_rank, n, n], dim=-1)
        dt = F.softplus(self.dt_proj(dt.contiguous()).float() + self._q(self.dt_bias_quantizer, self.dt_bias).float())
        a = -torch.exp(self._q(self.A_log_quantizer, self.A_log).float())  # (D, N)
        y = selective_scan(u, dt, a, b, c, self._q(self.D_quantizer, self.D))  # (B, L, D)
        y = y * F.silu(z.float())
        return self.out_proj(y.to(hidden_states.dtype))  # (B, L, d_model)


def mixers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Mamba-1 mixer of ``model`` (HF ``MambaMixer`` or ``QuantMambaMixer``) by name."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return {name: m for name, m in model.named_modules() if isinstance(m, (MambaMixer, QuantMambaMixer))}


def replace_mixers(model: nn.Module) -> dict[str, QuantMambaMixer]:
    """Replace every HF ``MambaMixer`` of ``model`` by a ``QuantMambaMixer`` (in place); ``ValueError`` when
    the model has none (not a Mamba-1 model)."""
    from polyquant.nn import set_submodule
    from transformers.models.mamba.modeling_mamba import MambaMixer

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MambaMixer)]
    if not found and not any(isinstance(m, QuantMambaMixer) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no transformers MambaMixer: not a Mamba-1 model")
    out = {}
    for name, m in found:
        out[name] = QuantMambaMixer(m)
        set_submodule(model, name, out[name])
    return out
