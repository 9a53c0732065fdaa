"""Tiny MobileViT hybrids for the digits task, built from timm's own blocks (``ByobNet`` + ``MobileVitBlock``).

The model is a real timm ``ByobNet``: conv-BN-SiLU stem -> three inverted-residual (MV2, depthwise) blocks ->
one MobileViT block (3x3 conv -> 1x1 conv -> unfold -> 2 transformer layers -> fold -> 1x1 conv -> fusion 3x3
conv) -> 1x1 conv -> pool -> linear. So quantization code meets exactly the modules it meets in timm's
``mobilevit_*`` / ``mobilevitv2_*``: ``ConvNormAct`` with ``BatchNormAct2d``, timm ``Attention`` with
LayerNorm (v1) or ``LinearSelfAttention`` with ``GroupNorm1`` (v2), and the conv <-> transformer bridges.

| variant      | transformer                                   | norm in transformer | params |
|--------------|-----------------------------------------------|---------------------|--------|
| mobilevit    | ViT ``Block`` (4-head softmax attention)      | LayerNorm           | ~80k   |
| mobilevitv2  | ``LinearTransformerBlock`` (separable attn.)  | GroupNorm(1)        | ~35k   |

    from polyquant.plugins.vit.hybrid import load_digits_hybrid
    model, info = load_digits_hybrid()           # trained float model (eval mode) + its metadata
    info["test_accuracy"]                         # accuracy (%) on data.load_digits_data()'s test split

Checkpoints ship in ``assets/digits_hybrid[_<variant>].safetensors``; the config and training record live in the
safetensors metadata (JSON strings, no pickle). Retrain with ``python -m polyquant.plugins.vit.hybrid --train``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HybridConfig",
    "TrainConfig",
    "VARIANTS",
    "build_hybrid",
    "train_hybrid",
    "save_hybrid",
    "load_hybrid",
    "load_digits_hybrid",
    "asset_path",
    "main",
]

VARIANTS = ("mobilevit", "mobilevitv2")
ASSET_DIR = Path(__file__).resolve().parent / "assets"
_FORMAT = "polyquant.vit.hybrid"  # metadata tag of the checkpoint files


@dataclass(frozen=True)
class HybridConfig:
    """Architecture of the digits hybrid.

    Args:
        variant: "mobilevit" (v1: softmax attention + LayerNorm) or "mobilevitv2" (separable attention +
            GroupNorm(1)).
        img_size: input resolution (digits are upsampled to it by ``data.load_digits_data``).
        in_chans: input channels (1: gray digits).
        num_classes: classifier outputs.
        stem_chs: stem conv channels (stride 2).
        widths: output channels of the three inverted-residual blocks (strides 1, 2, 1).
        transformer_dim: token width inside the MobileViT block (v1; v2 uses ``widths[-1]``).
        transformer_depth: transformer layers in the MobileViT block.
        num_heads: attention heads (v1).
        patch_size: MobileViT unfold patch size.
        num_features: channels of the final 1x1 conv before pooling.
        version: config schema version.
    """

    variant: Literal["mobilevit", "mobilevitv2"] = "mobilevit"
    img_size: int = 32
    in_chans: int = 1
    num_classes: int = 10
    stem_chs: int = 16
    widths: tuple[int, int, int] = (16, 24, 32)
    transformer_dim: int = 48
    transformer_depth: int = 2
    num_heads: int = 4
    patch_size: int = 2
    num_features: int = 96
    version: int = 1

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown hybrid variant {self.variant!r}; choose one of {VARIANTS}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths must be three positive integers, got {self.widths!r}")
        for name in ("img_size", "in_chans", "num_classes", "stem_chs", "transformer_dim", "transformer_depth",
                     "num_heads", "patch_size", "num_features"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.transformer_dim % self.num_heads:
            raise ValueError(f"transformer_dim {self.transformer_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % (4 * self.patch_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of 4 * patch_size = {4 * self.patch_size}")
        if self.version != 1:
            raise ValueError(f"unsupported HybridConfig version {self.version!r}; this polyquant reads 1")


@dataclass(frozen=True)
class TrainConfig:
    """Seeded training recipe (AdamW + cosine schedule, random shifts as the only augmentation).

    Args:
        epochs: passes over the 1257 training images.
        batch_size: images per step.
        lr: peak learning rate (linear warm-up over the first epoch, cosine decay to 0).
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        max_shift: random translation in pixels (of the upsampled image), filled with the background value.
        seed: seeds initialisation, batch order and augmentation.
        threads: torch intra-op threads during training (the result is deterministic for a fixed value).
        max_steps: stop after this many optimisation steps (None: train all epochs; for quick checks).
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 3
    seed: int = 0
    threads: int = 2
    max_steps: int | None = None


# --- model ---------------------------------------------------------------------------------------------------


def _irb(c: int, s: int, br: float = 2.0) -> Any:
    from timm.models.byobnet import ByoBlockCfg

    # Inverted residual as in timm's mobilevit configs: 1x1 expand, 3x3 depthwise, linear 1x1 project.
    return ByoBlockCfg(type="bottle", d=1, c=c, s=s, gs=1, br=br, block_kwargs=dict(bottle_in=True, linear_out=True))


def build_hybrid(config: HybridConfig | None = None) -> nn.Module:
    """A randomly initialised timm ``ByobNet`` with the tiny MobileViT (v1 or v2) layout of ``config``."""
    import timm.models.mobilevit  # noqa: F401  (registers the 'mobilevit' / 'mobilevit2' block types)
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    config = config or HybridConfig()
    w0, w1, w2 = config.widths
    if config.variant == "mobilevit":
        vit = ByoBlockCfg(type="mobilevit", d=1, c=w2, s=1, block_kwargs=dict(
            transformer_dim=config.transformer_dim, transformer_depth=config.transformer_depth,
            patch_size=config.patch_size, num_heads=config.num_heads, mlp_ratio=2.0))
    else:
        vit = ByoBlockCfg(type="mobilevit2", d=1, c=w2, s=1, br=1.0, gs=1, block_kwargs=dict(
            transformer_depth=config.transformer_depth, patch_size=config.patch_size, mlp_ratio=2.0))
    cfg = ByoModelCfg(
        blocks=(_irb(w0, 1), _irb(w1, 2), _irb(w2, 1), vit),
        stem_chs=config.stem_chs,
        stem_type="3x3",
        stem_pool="",
        downsample="",
        act_layer="silu",
        num_features=config.num_features,
    )
    return ByobNet(cfg, num_classes=config.num_classes, in_chans=config.in_chans, global_pool="avg")


# --- training ------------------------------------------------------------------------------------------------


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate every image by a random integer offset in [-max_shift, max_shift]^2 (background-filled)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    bg = float(x.amin())
    pad = F.pad(x, (max_shift,) * 4, value=bg)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * max_shift)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train_hybrid(
    config: HybridConfig | None = None,
    train: TrainConfig | None = None,
    *,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a hybrid on the digits training split; returns (model in eval mode, info dict)."""
    from tqdm.auto import tqdm

    from .data import evaluate, load_digits_data

    config = config or HybridConfig()
    train = train or TrainConfig()
    data = load_digits_data(config.img_size, config.in_chans)
    threads = torch.get_num_threads()
    torch.set_num_threads(train.threads)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(train.seed)
        model = build_hybrid(config)
        gen = torch.Generator().manual_seed(train.seed)
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=train.lr)
        n = len(data.x_train)
        steps_per_epoch = math.ceil(n / train.batch_size)
        total = train.epochs * steps_per_epoch

        def lr_at(step: int) -> float:
            if step < steps_per_epoch:
                return train.lr * (step + 1) / steps_per_epoch
            t = (step - steps_per_epoch) / max(total - steps_per_epoch, 1)
            return 0.5 * train.lr * (1.0 + math.cos(math.pi * t))

        step = 0
        model.train()
        for _ in tqdm(range(train.epochs), desc="train hybrid", disable=not progress):
            for idx in torch.randperm(n, generator=gen).split(train.batch_size):
                if train.max_steps is not None and step >= train.max_steps:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                x = _shift(data.x_train[idx], train.max_shift, gen)
                loss = F.cross_entropy(model(x), data.y_train[idx], label_smoothing=train.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        model.eval()
        acc = evaluate(model, data)
    finally:
        torch.set_num_threads(threads)
    info = {
        "variant": config.variant,
        "config": asdict(config),
        "train": asdict(train),
        "test_accuracy": acc,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "data": "polyquant.plugins.vit.data.load_digits_data(img_size, in_chans): fixed 70/30 stratified split",
        "torch": torch.__version__,
    }
    return model, info


# --- checkpoints ---------------------------------------------------------------------------------------------


def asset_path(variant: str = "mobilevit") -> Path:
    """Where the shipped checkpoint of ``variant`` lives."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown hybrid variant {variant!r}; choose one of {VARIANTS}")
    suffix = "" if variant == "mobilevit" else f"_{variant}"
    return ASSET_DIR / f"digits_hybrid{suffix}.safetensors"


def save_hybrid(model: nn.Module, info: dict[str, Any], path: str | Path) -> Path:
    """Write the state dict as safetensors, with ``info`` (incl. the config) as JSON metadata; atomic."""
    from polyquant.checkpoint import save_checkpoint

    meta = {"format": _FORMAT, "format_version": "1", "info": json.dumps(info, sort_keys=True)}
    return save_checkpoint(model.state_dict(), path, meta)


def load_hybrid(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by ``save_hybrid``: (model in eval mode, info)."""
    from polyquant.checkpoint import read_checkpoint, read_checkpoint_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no hybrid checkpoint at {path}; train one with "
                                "`python -m polyquant.plugins.vit.hybrid --train`")
    meta = read_checkpoint_metadata(path)
    if meta.get("format") != _FORMAT or meta.get("format_version") != "1":
        raise ValueError(f"{path} is not a polyquant hybrid checkpoint (format {meta.get('format')!r}, "
                         f"version {meta.get('format_version')!r})")
    info = json.loads(meta["info"])
    cfg = dict(info["config"])
    cfg["widths"] = tuple(cfg["widths"])
    model = build_hybrid(HybridConfig(**cfg))
    model.load_state_dict(read_checkpoint(path)[0], strict=True)
    return model.eval(), info


def load_digits_hybrid(variant: str = "mobilevit") -> tuple[nn.Module, dict[str, Any]]:
    """The shipped, trained float hybrid for the digits task: (model in eval mode, info).

    ``info`` holds the config, the training recipe and ``test_accuracy`` (percent, on the test split of
    ``data.load_digits_data(info["config"]["img_size"])``).
    """
    return load_hybrid(asset_path(variant))


# --- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polyquant.plugins.vit.hybrid", description=__doc__.split("\n")[0])
    parser.add_argument("--train", action="store_true", help="train (seeded) and write the checkpoint")
    parser.add_argument("--variant", choices=VARIANTS + ("all",), default="all")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--out", type=Path, default=None, help="output file (default: the shipped asset path)")
    args = parser.parse_args(argv)
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    if args.out is not None and len(variants) > 1:
        parser.error("--out needs a single --variant")
    for variant in variants:
        if args.train:
            model, info = train_hybrid(HybridConfig(variant=variant), TrainConfig(epochs=args.epochs, seed=args.seed))
            path = save_hybrid(model, info, args.out or asset_path(variant))
            print(f"{variant}: test accuracy {info['test_accuracy']:.2f}% ({info['params']} params, "
                  f"{info['train_seconds']} s) -> {path}")
        else:
            _, info = load_digits_hybrid(variant)
            print(f"{variant}: test accuracy {info['test_accuracy']:.2f}% ({info['params']} params)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
