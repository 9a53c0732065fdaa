"""A small Mamba-like model (a selective state-space block, written for reading, not for speed).

    x (B, L, d_model)
    for each block:  x = x + out_proj( scan(silu(conv(u))) * silu(z) ),  (u, z) = in_proj(norm(x)).chunk(2)
    norm_f(x)

The block (Gu & Dao, "Mamba", 2023, much simplified):

    in_proj   Linear d_model -> 2 * d_inner       u (the scanned half) and z (the gate)
    conv      depthwise causal Conv1d over time (kernel d_conv), then SiLU
    x_proj    Linear d_inner -> d_inner + 2 * d_state: input-dependent dt (one per channel), B and C
    scan      h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,  y_t = C_t . h_t + D u_t   (A diagonal, < 0)
    out_proj  Linear d_inner -> d_model, applied to y * silu(z)

``d_inner`` is a power of two so that a Hadamard matrix of its size exists (the ``w8a8`` method rotates the input
of ``out_proj``). ``build_model(config)`` builds a seeded model from a JSON description and records it with
``polyquant.api.describe_model``, so that ``polyquant.load`` rebuilds the float skeleton from an artifact alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from polyquant.api import describe_model
from torch import Tensor, nn

DEFAULT_CONFIG: dict[str, Any] = {"d_model": 32, "d_inner": 64, "d_state": 8, "d_conv": 4, "n_layers": 2, "seed": 0}
_BOUNDS = {"d_model": (1, 4096), "d_inner": (2, 4096), "d_state": (1, 256), "d_conv": (1, 16), "n_layers": (1, 64),
           "seed": (0, 2**31 - 1)}


class MambaBlock(nn.Module):
    """One selective-scan block (see the module docstring); input and output (B, L, d_model)."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, d_conv: int) -> None:
        super().__init__()
        self.d_inner, self.d_state = d_inner, d_state
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_inner)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, d_inner + 2 * d_state, bias=False)
        self.dt_bias = nn.Parameter(torch.full((d_inner,), -2.0))  # softplus(-2) ~ 0.13: a slow start
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model)

    def scan(self, u: Tensor) -> Tensor:
        """The selective scan of u (B, L, d_inner), sequential over time."""
        dt, b, c = self.x_proj(u).split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (B, L, d_inner) > 0
        a = -torch.exp(self.A_log)  # (d_inner, d_state) < 0: a decaying state
        h = u.new_zeros(u.shape[0], self.d_inner, self.d_state)
        ys = []
        for t in range(u.shape[1]):
            decay = torch.exp(dt[:, t, :, None] * a)  # (B, d_inner, d_state)
            h = decay * h + dt[:, t, :, None] * b[:, t, None, :] * u[:, t, :, None]
            ys.append((h * c[:, t, None, :]).sum(-1) + self.D * u[:, t])
        return torch.stack(ys, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        length = u.shape[1]
        u = F.silu(self.conv(u.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: drop the right padding
        return x + self.out_proj(self.scan(u) * F.silu(z))


class MambaDemo(nn.Module):
    """``n_layers`` residual Mamba blocks and a final LayerNorm: (B, L, d_model) -> (B, L, d_model)."""

    def __init__(self, d_model: int = 32, d_inner: int = 64, d_state: int = 8, d_conv: int = 4,
                 n_layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MambaBlock(d_model, d_inner, d_state, d_conv) for _ in range(n_layers))
        self.norm_f = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)


def check_config(model_config: Any) -> dict[str, Any]:
    """The model description with its defaults filled in; ``ValueError`` for anything else (``polyquant.load``
    reports it as an invalid artifact)."""
    if not isinstance(model_config, dict):
        raise ValueError(f"a mamba_demo model config is a JSON object, got {type(model_config).__name__}")
    unknown = sorted(set(model_config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown mamba_demo model config key(s) {unknown}")
    cfg = {**DEFAULT_CONFIG, **model_config}
    for key, (lo, hi) in _BOUNDS.items():
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"mamba_demo model config: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return cfg


def build_model(model_config: dict[str, Any] | None = None) -> MambaDemo:
    """A seeded float ``MambaDemo`` from its description (``DEFAULT_CONFIG`` keys), recorded with
    ``describe_model`` so that its quantized artifacts load without the float model. The global RNG is untouched."""
    cfg = check_config({} if model_config is None else model_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = MambaDemo(cfg["d_model"], cfg["d_inner"], cfg["d_state"], cfg["d_conv"], cfg["n_layers"])
    return describe_model(model.eval(), cfg)


def make_inputs(d_model: int, *, batches: int, batch_size: int = 4, seq_len: int = 16, seed: int = 1) -> list[Tensor]:
    """``batches`` seeded random input batches (batch_size, seq_len, d_model): the demo's calibration data."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, seq_len, d_model, generator=g) for _ in range(batches)]
