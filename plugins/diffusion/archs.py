"""The diffusers transformers the diffusion plugin quantizes, and where FP4DiT's rules land in each.

FP4DiT's skip list (the Hunyuan branch's ``quant_model.py::quant_module_refactor``: patch embedding, timestep and
text embedders, final norm and projection stay float; every other Linear is quantized) and its first-FFN-linear
exception (E3M0 on the linear before GELU) mapped to each class's module names (relative to the transformer):

| class                      | blocks (reconstruction order)                  | kept float                              | first FFN linear(s)                          |
|----------------------------|------------------------------------------------|-----------------------------------------|----------------------------------------------|
| DiTTransformer2DModel      | transformer_blocks                             | pos_embed, blocks' norm1.emb (timestep  | ff.net.0.proj                                |
|                            |                                                | + label embedders), proj_out_1/2        |                                              |
| PixArtTransformer2DModel   | transformer_blocks                             | pos_embed, adaln_single (timestep       | ff.net.0.proj                                |
|                            |                                                | embedder + its t_block linear),         |                                              |
|                            |                                                | caption_projection, proj_out            |                                              |
| SD3Transformer2DModel      | transformer_blocks                             | pos_embed, time_text_embed,             | ff.net.0.proj, ff_context.net.0.proj         |
|                            |                                                | context_embedder, norm_out, proj_out    |                                              |
| FluxTransformer2DModel     | transformer_blocks, single_transformer_blocks  | x_embedder, time_text_embed,            | ff.net.0.proj, ff_context.net.0.proj,        |
|                            |                                                | context_embedder, norm_out, proj_out    | single blocks' proj_mlp                      |

(Only the top-level ``proj_out`` is float: Flux's single blocks have their own ``proj_out``, which is quantized.)
A model holding one of these classes (the plugin's ``DiTDenoiser`` wraps one as ``.transformer``) is handled
through ``find_transformer``, which gives the prefix that turns these relative names into the model's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Layout", "LAYOUTS", "find_transformer", "keep_float_patterns", "ff1_patterns", "block_names",
           "TINY_CONFIGS", "tiny_transformer", "example_kwargs", "transformer_class", "transformer_config",
           "build_transformer"]


@dataclass(frozen=True)
class Layout:
    """Where FP4DiT's rules land in one diffusers transformer class (fnmatch patterns relative to it).

    Args:
        blocks: the ModuleList attributes holding the transformer blocks, in forward order.
        keep_float: module names kept float (the spec's skip list).
        ff1: the first FFN linear(s), before GELU (E3M0 in FP4DiT).
    """

    blocks: tuple[str, ...]
    keep_float: tuple[str, ...]
    ff1: tuple[str, ...]


_FF1 = "transformer_blocks.*.ff.net.0.proj"
_FF1_CONTEXT = "transformer_blocks.*.ff_context.net.0.proj"
LAYOUTS: dict[str, Layout] = {
    "DiTTransformer2DModel": Layout(
        ("transformer_blocks",),
        ("pos_embed", "pos_embed.*", "transformer_blocks.*.norm1.emb.*", "proj_out_1", "proj_out_2", "norm_out"),
        (_FF1,)),
    "PixArtTransformer2DModel": Layout(
        ("transformer_blocks",),
        ("pos_embed", "pos_embed.*", "adaln_single", "adaln_single.*", "caption_projection", "caption_projection.*",
         "proj_out", "norm_out", "norm_out.*"),
        (_FF1,)),
    "SD3Transformer2DModel": Layout(
        ("transformer_blocks",),
        ("pos_embed", "pos_embed.*", "time_text_embed", "time_text_embed.*", "context_embedder", "norm_out",
         "norm_out.*", "proj_out"),
        (_FF1, _FF1_CONTEXT)),
    "FluxTransformer2DModel": Layout(
        ("transformer_blocks", "single_transformer_blocks"),
        ("x_embedder", "pos_embed", "pos_embed.*", "time_text_embed", "time_text_embed.*", "context_embedder",
         "norm_out", "norm_out.*", "proj_out"),
        (_FF1, _FF1_CONTEXT, "single_transformer_blocks.*.proj_mlp")),
}


def transformer_class(name: str) -> type[nn.Module]:
    """The diffusers class called ``name`` (one of ``LAYOUTS``); ValueError for any other name."""
    if name not in LAYOUTS:
        raise ValueError(f"unsupported diffusers transformer {name!r}; the diffusion plugin quantizes "
                         f"{', '.join(LAYOUTS)}")
    import diffusers

    return getattr(diffusers, name)


def find_transformer(model: nn.Module) -> tuple[str, nn.Module, Layout]:
    """The first module of ``model`` (itself included) that is one of ``LAYOUTS``' classes: (name prefix, ending
    in "." unless empty, the module, its layout). ValueError naming the classes otherwise."""
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__name__ in LAYOUTS and cls.__module__.startswith("diffusers."):
            return (f"{name}." if name else ""), module, LAYOUTS[cls.__name__]
    raise ValueError(f"{type(model).__name__} holds no supported diffusers transformer; the diffusion plugin "
                     f"quantizes {', '.join(LAYOUTS)}")


def keep_float_patterns(model: nn.Module) -> list[str]:
    """The model's names of the layers FP4DiT keeps float (fnmatch patterns)."""
    prefix, _, layout = find_transformer(model)
    return [prefix + p for p in layout.keep_float]


def ff1_patterns(model: nn.Module) -> list[str]:
    """The model's names of the first FFN linears (fnmatch patterns)."""
    prefix, _, layout = find_transformer(model)
    return [prefix + p for p in layout.ff1]


def block_names(model: nn.Module) -> list[str]:
    """The transformer blocks' module names in forward order (the units of block reconstruction)."""
    prefix, transformer, layout = find_transformer(model)
    names = []
    for attr in layout.blocks:
        blocks = getattr(transformer, attr, None)
        names += [f"{prefix}{attr}.{i}" for i in range(len(blocks or ()))]
    return names


# --- tiny random configs (tests, examples) --------------------------------------------------------------------------

# Each class at a few thousand parameters, widths divisible by 8 (group sizes 8 and 16 divide every quantized
# linear's in_features; Flux's single-block proj_out takes dim + mlp dim = 16 + 64).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "DiTTransformer2DModel": {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
                              "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000,
                              "norm_type": "ada_norm_zero"},
    "PixArtTransformer2DModel": {"sample_size": 8, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                                 "in_channels": 4, "out_channels": 8, "cross_attention_dim": 16,
                                 "caption_channels": 32, "patch_size": 2, "norm_type": "ada_norm_single",
                                 "num_embeds_ada_norm": 1000},
    "SD3Transformer2DModel": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2,
                              "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                              "caption_projection_dim": 16, "pooled_projection_dim": 16, "out_channels": 4,
                              "pos_embed_max_size": 16},
    "FluxTransformer2DModel": {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                               "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                               "pooled_projection_dim": 16, "guidance_embeds": False, "axes_dims_rope": [2, 2, 4]},
}


def tiny_transformer(name: str, seed: int = 0) -> nn.Module:
    """A tiny random ``name`` transformer (``TINY_CONFIGS``), weights from ``seed``; the global RNG is untouched.
    The adaLN-zero output layers are re-drawn so the blocks do not start as the identity."""
    model = build_transformer({"diffusers": name, "config": TINY_CONFIGS[name]})  # described by build_transformer
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for p in model.parameters():  # diffusers zero-inits several projections: random weights everywhere
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def example_kwargs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """One random input of a transformer (keyword arguments of its forward, ``return_dict`` left out): latents
    of its configured size, timesteps, and the class's conditioning (labels, text states, pooled projections)."""
    _, transformer, _ = find_transformer(model)
    cfg = transformer.config
    name = type(transformer).__name__
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    if name == "FluxTransformer2DModel":
        tokens, text = 16, 5
        return {"hidden_states": rand(batch, tokens, int(cfg.in_channels)),
                "encoder_hidden_states": rand(batch, text, int(cfg.joint_attention_dim)),
                "pooled_projections": rand(batch, int(cfg.pooled_projection_dim)),
                "timestep": torch.rand(batch, generator=gen),
                "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                      indexing="ij"), -1).reshape(tokens, 3),
                "txt_ids": torch.zeros(text, 3)}
    size = int(cfg.sample_size)
    out: dict[str, Tensor] = {"hidden_states": rand(batch, int(cfg.in_channels), size, size),
                              "timestep": torch.randint(0, 1000, (batch,), generator=gen)}
    if name == "DiTTransformer2DModel":
        out["class_labels"] = torch.randint(0, int(cfg.num_embeds_ada_norm), (batch,), generator=gen)
    elif name == "PixArtTransformer2DModel":
        out["encoder_hidden_states"] = rand(batch, 5, int(cfg.caption_channels))
    else:  # SD3
        out["encoder_hidden_states"] = rand(batch, 5, int(cfg.joint_attention_dim))
        out["pooled_projections"] = rand(batch, int(cfg.pooled_projection_dim))
    return out


# --- user transformers: a model config that rebuilds them ----------------------------------------------------------


def transformer_config(model: nn.Module) -> dict[str, Any]:
    """The model config of a diffusers transformer (``{"diffusers": class name, "config": its init arguments}``,
    JSON): what an artifact records so ``build_transformer`` rebuilds the same architecture."""
    _, transformer, _ = find_transformer(model)
    if transformer is not model:
        raise ValueError("transformer_config takes the diffusers transformer itself")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {"diffusers": type(model).__name__, "config": config}


def build_transformer(model_config: Any) -> nn.Module:
    """The float transformer of a ``transformer_config`` (random weights: the artifact's tensors replace them), in
    eval mode and recorded with ``describe_model``. ValueError (one line) for another class or a config the class
    refuses."""
    from polyquant.api import describe_model

    if not isinstance(model_config, dict) or set(model_config) != {"diffusers", "config"} \
            or not isinstance(model_config["config"], dict):
        raise ValueError(f"a diffusers model config is {{'diffusers': class name, 'config': {{...}}}}, got "
                         f"{model_config!r:.200}")
    name, config = model_config["diffusers"], model_config["config"]
    cls = transformer_class(name)
    import inspect

    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{name} config: unknown key(s) {unknown[:5]}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls.from_config(config)
    except Exception as e:  # diffusers raises its own validation errors (ValueError, TypeError, AssertionError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"invalid {name} config: {first[:200]}") from None
    return describe_model(model.eval(), {"diffusers": name, "config": config})
