"""Quamba W8A8 points on ``transformers``' Mamba-2 (``Mamba2ForCausalLM``): the quantizable mixer and its placement.

Mamba-2 (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality", ICML 2024, arXiv 2405.21060) with Quamba's quantization points (Chiang et al., "Quamba: A
Post-Training Quantization Recipe for Selective State Space Models", ICLR 2025, arXiv 2410.13229). As for Mamba-1
(``mixer.py``), the HF ``Mamba2Mixer`` calls ``conv1d.weight`` directly and scans in one function, so surgery alone
cannot reach x, B, C or the scan parameters: ``QuantMamba2Mixer`` replaces it (same parameters, same submodule
names) and calls its submodules. In the float state it computes what ``Mamba2Mixer``'s torch path computes
(whole sequences, tested against the HF model's logits with and without a padding mask; cached decoding, tested
against HF's own cached generation).

    z, xBC, dt = in_proj(h).split(D, D + 2 G N, H)                  [in_proj: input, weight, output q]
    xBC        = silu(conv1d(xBC))        causal depthwise conv     [conv1d: weight q]
    x, BC      = xBC.split(D, 2 G N)                                [u_quantizer on x; bc_quantizer on B and C]
    dt         = clamp(softplus(dt + dt_bias), *time_step_limit)    [dt_bias q]   (dt: in_proj's output q)
    y          = ssd_scan(x, dt, A = -exp(A_log), B, C) + D x       per-head scalar A, G groups of B / C  [A_log q, D q]
    out        = out_proj(norm(y, z))     gated RMSNorm, float      [out_proj: (y H), weight W H^T when rotated]

D = d_inner = H * P (H heads of P channels), G = n_groups, N = state_size. The placement, per mixer ``<m>``;
``mamba2_placements(act, weight, u)`` returns exactly this table and ``quantize_mamba2_mixer`` installs it:

| point (Quamba, Mamba-2)                          | quantizer                          | spec                        |
|--------------------------------------------------|------------------------------------|-----------------------------|
| norm output -> in_proj                           | <m>.in_proj.input_quantizer        | act (of x H when rotate_in) |
| in_proj weight                                   | <m>.in_proj.weight_quantizer       | weight (of W H^T likewise)  |
| z, xBC, dt (one in_proj output scale)            | <m>.in_proj.output_quantizer       | act                         |
| conv1d weight (int8 in: xBC above)               | <m>.conv1d.weight_quantizer        | weight                      |
| x after conv1d + SiLU = the SSM input u          | <m>.u_quantizer                    | u (Quamba: abs percentile)  |
| B and C (one scale)                              | <m>.bc_quantizer                   | act                         |
| A_log, D, dt_bias (per-head vectors)             | <m>.{A_log,D,dt_bias}_quantizer    | weight (abs-max)            |
| gated norm output -> out_proj (Hadamard point)   | <m>.out_proj.input_quantizer       | act (of y H when rotate_out)|
| out_proj weight                                  | <m>.out_proj.weight_quantizer      | weight (of W H^T likewise)  |

There is no dt quantizer of its own: dt leaves in_proj (Mamba-2 has no x_proj / dt_proj), already int8 at the
in_proj output scale, as Quamba shares one scale for x and z. The conv1d input is that same int8 tensor (no input
quantizer). The gated RMSNorm, embedding, final norm, lm_head, the residual stream and the scan state stay float.

Cached decoding (``cache_params``: the cache ``Mamba2ForCausalLM`` builds, a ``DynamicCache`` of linear-attention
layers) runs the same points on each chunk, as ``mixer.py`` does for Mamba-1: the conv state holds the last
``conv_kernel`` conv inputs (in_proj's quantized xBC, (B, conv_dim, K): HF's layout, zero-padded on the left for a
prompt shorter than K), the SSM state the float per-head state after the chunk ((B, H, P, N): HF's layout). A
prefill (no state for the layer yet) is the whole-sequence path plus the two state writes; a later chunk (a decode
step: length 1; longer chunks too) convolves the cached inputs followed by the new ones with ``conv1d`` itself (fake
quant ``QuantConv1d`` or packed ``PackedConv`` alike) and continues the scan from the cached state (``ssd_scan``'s
``h0``; one ``ssd_step`` formula for both).
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.nn import ActQuantizer, QuantConv1d, QuantLinear, QuantSpec, RotatedLinear, set_submodule
from polyquant.surgery import replace_modules

from .mixer import causal_conv, maybe_quantize
from .sizes import check_hadamard_size

__all__ = ["QuantMamba2Mixer", "ssd_scan", "ssd_scan_state", "ssd_step", "mamba2_mixers", "replace_mamba2_mixers",
           "mamba2_placements", "quantize_mamba2_mixer", "MAMBA2_POINTS"]

# Every quantization point of a Mamba-2 mixer (relative quantizer name), in data-flow order (the docstring table).
MAMBA2_POINTS: tuple[str, ...] = (
    "in_proj.input_quantizer", "in_proj.weight_quantizer", "in_proj.output_quantizer",
    "conv1d.weight_quantizer",
    "u_quantizer", "bc_quantizer",
    "A_log_quantizer", "D_quantizer", "dt_bias_quantizer",
    "out_proj.input_quantizer", "out_proj.weight_quantizer",
)
_OWN_POINTS = ("u", "bc", "A_log", "D", "dt_bias")  # the quantizers the mixer itself owns (``<point>_quantizer``)


def ssd_step(h: Tensor, decay: Tensor, dx: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One step of Mamba-2's recurrence: h_t = decay_t h_{t-1} + dx_t B_t^T, y_t = h_t C_t (without D x_t).

    h: (B, H, P, N) float32; decay: (B, H) (exp(dt A)); dx: (B, H, P) (dt x); b, c: (B, H, N) (per head) ->
    (h_t (B, H, P, N), y_t (B, H, P)).
    """
    h = decay[..., None, None] * h + dx[..., None] * b[:, :, None, :]  # (B, H, P, N)
    return h, (h @ c[..., None]).squeeze(-1)  # (B, H, P)


def ssd_scan_state(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                   h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba-2's scan, sequentially in float32, from the state ``h0`` (zeros when None): y_t = C_t . h_t + D x_t
    with h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t.

    x: (B, L, H, P); dt: (B, L, H) (after softplus); a: (H,) (negative, one scalar per head); b, c: (B, L, G, N),
    head h reading group h // (H / G); d: (H,); h0: (B, H, P, N) -> y (B, L, H, P) float32 and the last state
    h_L (B, H, P, N) float32 (h0 itself for L = 0). HF's chunked algorithm (``mamba2_chunk_scan``, its
    ``initial_states`` / final state) computes the same in exact arithmetic; this one keeps one state.
    """
    heads, groups = x.shape[2], b.shape[2]
    if heads % groups:
        raise ValueError(f"{heads} heads cannot share {groups} groups of B / C")
    x, dt = x.float(), dt.float()
    b = b.float().repeat_interleave(heads // groups, dim=2)  # (B, L, H, N)
    c = c.float().repeat_interleave(heads // groups, dim=2)  # (B, L, H, N)
    decay = torch.exp(dt * a.float())  # (B, L, H)
    dx = x * dt[..., None]  # (B, L, H, P)
    h = x.new_zeros(x.shape[0], heads, x.shape[3], b.shape[3]) if h0 is None else h0.float()  # (B, H, P, N)
    ys = []
    for decay_t, dx_t, b_t, c_t in zip(decay.unbind(1), dx.unbind(1), b.unbind(1), c.unbind(1)):
        h, y_t = ssd_step(h, decay_t, dx_t, b_t, c_t)
        ys.append(y_t)  # (B, H, P)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)  # (B, L, H, P)
    return y + x * d.float()[:, None], h


def ssd_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
             h0: Tensor | None = None) -> Tensor:
    """``ssd_scan_state``'s y alone: x (B, L, H, P), dt (B, L, H), a (H,), b / c (B, L, G, N), d (H,), h0
    (B, H, P, N) or None (zeros) -> y (B, L, H, P) float32."""
    return ssd_scan_state(x, dt, a, b, c, d, h0)[0]


class QuantMamba2Mixer(nn.Module):
    """A ``Mamba2Mixer``'s parameters and submodules (shared, not copied) with Quamba's points (module docstring).

    Quantizers owned here (``None`` when that point stays float): ``u_quantizer`` (x after conv1d + SiLU, the SSM
    input), ``bc_quantizer`` (B and C, one scale), ``A_log_quantizer``, ``D_quantizer``, ``dt_bias_quantizer``.
    The layers' own quantizers (in_proj, conv1d, out_proj) cover the rest; ``norm`` (gated RMSNorm) stays float.
    """

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.layer_idx: int = mixer.layer_idx
        self.hidden_size: int = mixer.hidden_size
        self.intermediate_size: int = mixer.intermediate_size  # D = H * P
        self.num_heads: int = mixer.num_heads
        self.head_dim: int = mixer.head_dim
        self.n_groups: int = mixer.n_groups
        self.ssm_state_size: int = mixer.ssm_state_size
        self.conv_dim: int = mixer.conv_dim  # D + 2 G N
        self.time_step_limit: tuple[float, float] = tuple(mixer.time_step_limit)  # type: ignore[assignment]
        self.act = mixer.act
        self.in_proj, self.conv1d, self.norm, self.out_proj = mixer.in_proj, mixer.conv1d, mixer.norm, mixer.out_proj
        self.dt_bias, self.A_log, self.D = mixer.dt_bias, mixer.A_log, mixer.D
        self.u_quantizer: nn.Module | None = None
        self.bc_quantizer: nn.Module | None = None
        self.A_log_quantizer: nn.Module | None = None
        self.D_quantizer: nn.Module | None = None
        self.dt_bias_quantizer: nn.Module | None = None

    def forward(self, hidden_states: Tensor, cache_params: Any = None, attention_mask: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        """hidden_states (B, L, d_model); attention_mask (B, L) of 0 / 1 (padding) or None -> (B, L, d_model).

        With ``cache_params`` (HF's cache), the chunk continues the sequence the cache holds (none yet for this
        layer: a prefill) and the layer's conv and SSM states are updated in place. ``kwargs``: what
        ``Mamba2Block`` passes on to its mixer (ignored, as the HF torch path ignores them here).
        """
        bsz, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        conv_state = h0 = None
        if cache_params is not None:  # both None before the prefill (read before the conv state is written)
            conv_state = cache_params.get_conv_state(self.layer_idx)  # (B, conv_dim, K): the last K conv inputs
            h0 = cache_params.get_recurrent_state(self.layer_idx)  # (B, H, P, N)
        mask = None if attention_mask is None else attention_mask[:, :, None]  # (B, L, 1)
        if mask is not None:  # as HF: padding zeroed before in_proj and after the conv
            hidden_states = (hidden_states * mask).to(dtype)
        d, h, p, g, n = self.intermediate_size, self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        zxbcdt = self.in_proj(hidden_states)  # (B, L, 2 d_mlp + D + conv_dim + H)
        d_mlp = (zxbcdt.shape[-1] - 2 * d - 2 * g * n - h) // 2  # 0 for every HF config; dropped as HF drops it
        _, _, z, xbc, dt = zxbcdt.split([d_mlp, d_mlp, d, self.conv_dim, h], dim=-1)
        xbc = causal_conv(self.conv1d, xbc.transpose(1, 2), cache_params, self.layer_idx, conv_state)  # (B, C, L)
        xbc = self.act(xbc).transpose(1, 2)  # (B, L, conv_dim)
        if mask is not None:
            xbc = (xbc * mask).to(xbc.dtype)
        x, bc = xbc.split([d, 2 * g * n], dim=-1)
        x = maybe_quantize(self.u_quantizer, x.contiguous())  # (B, L, D): the SSM input u
        b, c = maybe_quantize(self.bc_quantizer, bc.contiguous()).split([g * n, g * n], dim=-1)  # (B, L, G N) each
        dt = F.softplus(dt.float() + maybe_quantize(self.dt_bias_quantizer, self.dt_bias).float())  # (B, L, H)
        dt = dt.clamp(min=self.time_step_limit[0], max=self.time_step_limit[1])
        a = -torch.exp(maybe_quantize(self.A_log_quantizer, self.A_log).float())  # (H,)
        y, state = ssd_scan_state(x.reshape(bsz, length, h, p), dt, a, b.reshape(bsz, length, g, n),
                                  c.reshape(bsz, length, g, n), maybe_quantize(self.D_quantizer, self.D), h0)
        if cache_params is not None:  # y (B, L, H, P); state (B, H, P, N), float
            cache_params.update_recurrent_state(state, self.layer_idx)
        y = self.norm(y.reshape(bsz, length, d), z)  # (B, L, D): y * silu(z), RMS-normalized per group
        return self.out_proj(y.to(dtype))  # (B, L, d_model)


def mamba2_mixers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Mamba-2 mixer of ``model`` (HF ``Mamba2Mixer`` or ``QuantMamba2Mixer``) by name."""
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    return {name: m for name, m in model.named_modules() if isinstance(m, (Mamba2Mixer, QuantMamba2Mixer))}


def replace_mamba2_mixers(model: nn.Module) -> dict[str, QuantMamba2Mixer]:
    """Replace every HF ``Mamba2Mixer`` of ``model`` by a ``QuantMamba2Mixer`` (in place) and return the new ones
    by name; ``ValueError`` when the model has neither (not a Mamba-2 model)."""
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    if not any(isinstance(m, (Mamba2Mixer, QuantMamba2Mixer)) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no transformers Mamba2Mixer: not a Mamba-2 model")
    return replace_modules(model, Mamba2Mixer, lambda name, m: QuantMamba2Mixer(m))  # type: ignore[return-value]


def mamba2_placements(act: QuantSpec, weight: QuantSpec, u: QuantSpec) -> dict[str, QuantSpec]:
    """The spec of each point of a Mamba-2 mixer (relative quantizer name -> spec; the module docstring's table).

    ``act``: activations (Quamba: static per-tensor int8, min-max); ``weight``: weights and the per-head A_log, D,
    dt_bias (per-tensor int8, abs-max); ``u``: the SSM input (Quamba: running percentile of |u|).
    """
    return {
        "in_proj.input_quantizer": act, "in_proj.weight_quantizer": weight, "in_proj.output_quantizer": act,
        "conv1d.weight_quantizer": weight,
        "u_quantizer": u, "bc_quantizer": act,
        "A_log_quantizer": weight, "D_quantizer": weight, "dt_bias_quantizer": weight,
        "out_proj.input_quantizer": act, "out_proj.weight_quantizer": weight,
    }


def quantize_mamba2_mixer(name: str, m: QuantMamba2Mixer, spec: dict[str, QuantSpec], *, rotate_out: bool,
                          rotate_in: bool) -> None:
    """Install core quant layers and ``ActQuantizer``s on the float mixer ``m`` (in place), exactly per ``spec``.

    ``spec``: relative quantizer name (``MAMBA2_POINTS``) -> spec, e.g. ``mamba2_placements(...)``; a point left
    out stays float (``{}`` gives no quantizer at all). ``rotate_out``: out_proj becomes a ``RotatedLinear``
    (online FWHT of the gated norm output, H folded into the weight: Quamba); ``rotate_in``: in_proj likewise
    (QuaRot-style). Quantizers are named ``f"{name}.<layer>"`` / ``f"{name}.<point>_quantizer"`` and not calibrated.
    ``ValueError`` for a spec key that is no point; ``UsageError`` when a rotated layer's in_features is not one of
    Quamba's Hadamard sizes (checked before anything is replaced).
    """
    unknown = sorted(set(spec) - set(MAMBA2_POINTS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], MAMBA2_POINTS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; the points are {', '.join(MAMBA2_POINTS)}"
        raise ValueError(f"no Mamba-2 quantization point {', '.join(unknown)}{hint}")
    if rotate_out:
        check_hadamard_size(m.out_proj.in_features, f"d_inner of {name}")
    if rotate_in:
        check_hadamard_size(m.in_proj.in_features, f"the hidden size of {name}")
    in_cls = RotatedLinear if rotate_in else QuantLinear
    set_submodule(m, "in_proj", in_cls(m.in_proj, weight=spec.get("in_proj.weight_quantizer"),
                                       input=spec.get("in_proj.input_quantizer"),
                                       output=spec.get("in_proj.output_quantizer"), name=f"{name}.in_proj"))
    out_cls = RotatedLinear if rotate_out else QuantLinear
    set_submodule(m, "out_proj", out_cls(m.out_proj, weight=spec.get("out_proj.weight_quantizer"),
                                         input=spec.get("out_proj.input_quantizer"), name=f"{name}.out_proj"))
    set_submodule(m, "conv1d", QuantConv1d(m.conv1d, weight=spec.get("conv1d.weight_quantizer"),
                                           name=f"{name}.conv1d"))
    for point in _OWN_POINTS:
        s = spec.get(f"{point}_quantizer")
        setattr(m, f"{point}_quantizer", None if s is None else ActQuantizer(s, name=f"{name}.{point}_quantizer"))
