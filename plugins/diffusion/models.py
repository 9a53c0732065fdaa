"""Models of the diffusion plugin: the shipped class-conditional digits DiT (diffusers ``DiTTransformer2DModel``), its
sampling loop over diffusers schedulers, the shipped digits classifier and the metrics of issue 23 item 5.

    build_model(model_config) -> DiTTransformer2DModel   {"name": "digits-dit"} (the shipped checkpoint) or an
                                                         architecture {"num_layers": ..., ...} (seeded random weights)
    build_denoiser(model_config) -> DiTDenoiser          the same DiT as one call eps = m(x_t, t, labels) (what the
                                                         plugin's methods quantize: module names "transformer.*")
    digits_images(split, size=8) -> (images (N, 1, S, S) in [-1, 1], labels (N,))   fixed 70/30 stratified split
    noise_prediction(model, x_t, t, labels) -> eps (B, 1, S, S)
    sample(model, labels, *, steps=20, scheduler="ddim", seed=0, guidance_scale=1.0, return_trajectory=False)
        -> images (B, 1, S, S), or (images, [eps per step])
    load_classifier() -> DigitsClassifier; classifier_features(images) -> (B, 64); classify(images) -> (B,)
    noise_mse(traj_a, traj_b) -> [float per step]; psnr(a, b) -> float; frechet_distance(fa, fb) -> float;
    class_accuracy(images, labels) -> percent

Sampling follows the spec (FP4DiT evaluates with PLMS, 20 steps): the DDPM noise schedule the model was trained with
(``NOISE_SCHEDULE``: diffusers ``DDPMScheduler``, 1000 linear-beta timesteps, epsilon prediction), sampled with
``DDIMScheduler`` (eta 0) or ``PNDMScheduler(skip_prk_steps=True)`` (PLMS) built from the same config. Both are
deterministic given the starting noise, which comes from a generator seeded with ``seed`` alone: a float and a
quantized model sampled with the same labels and seed start from the same x_T, so their noise predictions can be
compared step by step (``noise_mse``) and their samples pixel by pixel (``psnr``).

The model is class-conditional over the 10 digits (``num_embeds_ada_norm=10``); diffusers' ``LabelEmbedding`` keeps
an 11th row for the null class (index 10, trained with label dropout 0.1), which ``sample`` uses for classifier-free
guidance when ``guidance_scale`` != 1. Checkpoints are safetensors (no pickle) with the architecture and the training
record as JSON in the metadata; ``train.py`` writes them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant import metrics

__all__ = ["SHIPPED", "SHIPPED_PATH", "CLASSIFIER_PATH", "ARCH_DEFAULTS", "NUM_CLASSES", "NULL_CLASS",
           "NOISE_SCHEDULE", "SCHEDULERS", "check_config", "named_or_arch", "build_model", "Denoiser", "DiTDenoiser",
           "build_denoiser", "zero_batch", "dit_from_arch", "save_dit",
           "digits_images", "make_scheduler", "noise_prediction", "sample", "DigitsClassifier", "load_classifier",
           "save_classifier", "classifier_features", "classify", "noise_mse", "psnr", "frechet_distance",
           "class_accuracy"]

ASSET_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED = "digits-dit"  # the shipped DiT's name (assets/digits_dit.safetensors)
SHIPPED_PATH = ASSET_DIR / "digits_dit.safetensors"
CLASSIFIER_PATH = ASSET_DIR / "digits_classifier.safetensors"
_META_MODEL = "polyquant_model"  # metadata key of the architecture (JSON)
_META_TRAIN = "train"  # metadata key of the training record (JSON)

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # diffusers' LabelEmbedding: the extra row used for classifier-free guidance
SPLIT_SEED = 0  # random_state of the stratified train/test split (1257 train / 540 test images)
TEST_FRACTION = 0.3

# The shipped DiT: 8x8x1 images, patch 2 -> 16 tokens, width 64 (4 heads of 16), 4 adaLN-zero blocks.
ARCH_DEFAULTS: dict[str, int] = {"sample_size": 8, "patch_size": 2, "num_layers": 4, "num_attention_heads": 4,
                                 "attention_head_dim": 16, "seed": 0}
_BOUNDS = {"sample_size": (4, 64), "patch_size": (1, 8), "num_layers": (1, 12), "num_attention_heads": (1, 16),
           "attention_head_dim": (4, 128), "seed": (0, 2**31 - 1)}

# The DDPM noise schedule of training (diffusers DDPMScheduler arguments); samplers are built from its config.
NOISE_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                  "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": True}
SCHEDULERS = ("ddim", "plms")


# --- the DiT ------------------------------------------------------------------------------------------------------


def named_or_arch(model_config: Any, shipped: str, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """``{"name": shipped}`` as it is, or an architecture (keys of ``defaults``) with the defaults filled in (its
    values are checked by the caller); ``ValueError`` for anything else (``what`` names the model kind)."""
    if not isinstance(model_config, dict):
        raise ValueError(f"a {what} config is a JSON object, got {type(model_config).__name__}")
    if "name" in model_config:
        if set(model_config) != {"name"} or model_config["name"] != shipped:
            raise ValueError(f"unknown {what} {model_config!r}; the shipped model is {{'name': {shipped!r}}}")
        return dict(model_config)
    unknown = sorted(set(model_config) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} config key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **model_config}


def check_config(model_config: Any) -> dict[str, Any]:
    """``{"name": "digits-dit"}`` or an architecture (``ARCH_DEFAULTS``' keys) with its defaults filled in;
    ``ValueError`` naming the bad key otherwise."""
    cfg = named_or_arch(model_config, SHIPPED, ARCH_DEFAULTS, "diffusion model")
    if "name" in cfg:
        return cfg
    for key, (lo, hi) in _BOUNDS.items():
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"diffusion model config: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    if cfg["sample_size"] % cfg["patch_size"]:
        raise ValueError(f"diffusion model config: sample_size {cfg['sample_size']} is not a multiple of "
                         f"patch_size {cfg['patch_size']}")
    return cfg


def dit_from_arch(arch: dict[str, int]) -> nn.Module:
    """A ``DiTTransformer2DModel`` of the architecture (1 input channel, epsilon only: no learned sigma, 10 classes),
    weights from the current global RNG (callers seed or fork it)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=arch["num_attention_heads"], attention_head_dim=arch["attention_head_dim"],
        in_channels=1, out_channels=1, num_layers=arch["num_layers"], sample_size=arch["sample_size"],
        patch_size=arch["patch_size"], num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
    )


def build_model(model_config: dict[str, Any] | None = None) -> nn.Module:
    """The float DiT a config describes (the shipped checkpoint, or seeded random weights of an architecture), in
    eval mode and recorded with ``describe_model``. The global RNG is untouched."""
    from polyquant.api import describe_model
    from polyquant.checkpoint import read_checkpoint

    cfg = check_config({"name": SHIPPED} if model_config is None else model_config)
    if "name" in cfg:
        tensors, meta = read_checkpoint(SHIPPED_PATH)
        arch = check_config(json.loads(meta[_META_MODEL]))
        with torch.random.fork_rng(devices=[]):
            model = dit_from_arch(arch)
        state = {k: v.to(torch.float32) for k, v in tensors.items()}
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise ValueError(f"{SHIPPED_PATH}: missing tensors {sorted(missing)[:3]}")
        if model.proj_out_2.weight.device.type != "meta":  # the core sizes a config on the meta device first
            model.load_state_dict(state, strict=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = dit_from_arch(cfg)
    return describe_model(model.eval(), cfg)


class Denoiser(nn.Module):
    """A diffusers network as one call, ``forward(x_t, t, labels) -> eps`` (B, C, S, S) (``noise_prediction``), so a
    calibration batch is a dict ``{"x_t", "t", "labels"}`` (``model(**batch)``); ``model(batch)`` with that dict as
    the only argument is the same call (how the core's contract test feeds one input). Subclasses hold the network
    under its pipeline name and return it from ``net``."""

    @property
    def net(self) -> nn.Module:
        raise NotImplementedError

    @property
    def config(self) -> Any:
        return self.net.config

    def forward(self, x_t: Tensor | dict[str, Tensor], t: Tensor | int | None = None,
                labels: Tensor | None = None) -> Tensor:
        name = type(self).__name__
        if isinstance(x_t, dict):
            if t is not None or labels is not None or set(x_t) != {"x_t", "t", "labels"}:
                raise TypeError(f"{name} takes (x_t, t, labels) or one dict with exactly those keys")
            return self.forward(**x_t)
        if t is None or labels is None:
            raise TypeError(f"{name} needs a timestep t and class labels")
        return noise_prediction(self.net, x_t, t, labels)


class DiTDenoiser(Denoiser):
    """A diffusers DiT as a ``Denoiser``; the DiT is ``.transformer``, as in a diffusers pipeline."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    @property
    def net(self) -> nn.Module:
        return self.transformer


def zero_batch(model: nn.Module, t: int = 500, label: int = 0) -> dict[str, Tensor]:
    """One input of a ``Denoiser`` of ``model.config``'s size: ``{"x_t": zeros (1, C, S, S), "t": [t],
    "labels": [label]}`` (a restored model's check call, a MAC count)."""
    cfg = model.config
    s, c = int(cfg.sample_size), int(cfg.in_channels)
    return {"x_t": torch.zeros(1, c, s, s), "t": torch.tensor([int(t)]), "labels": torch.tensor([int(label)])}


def build_denoiser(model_config: dict[str, Any] | None = None) -> DiTDenoiser:
    """``build_model``'s DiT as a ``DiTDenoiser``, recorded with ``describe_model`` (the same config)."""
    from polyquant.api import describe_model, model_description

    dit = build_model(model_config)
    return describe_model(DiTDenoiser(dit).eval(), model_description(dit) or {})


def save_dit(model: nn.Module, arch: dict[str, int], record: dict[str, Any], path: str | Path = SHIPPED_PATH,
             dtype: torch.dtype = torch.float32) -> Path:
    """Write a DiT checkpoint (train.py): the state dict in ``dtype``, the architecture and the training record
    as JSON metadata."""
    from polyquant.checkpoint import save_checkpoint

    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    return save_checkpoint(state, path, {_META_MODEL: json.dumps(arch), _META_TRAIN: json.dumps(record)})


# --- data ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _digits(size: int) -> dict[str, tuple[Tensor, Tensor]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.images, digits.target, test_size=TEST_FRACTION,
                                              random_state=SPLIT_SEED, stratify=digits.target)
    out = {}
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        img = torch.as_tensor(x, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        if size != 8:
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        out[split] = (img * 2.0 - 1.0, torch.as_tensor(y, dtype=torch.int64))  # [-1, 1]
    return out


def digits_images(split: str, size: int = 8) -> tuple[Tensor, Tensor]:
    """(images (N, 1, size, size) in [-1, 1], labels (N,) int64) of scikit-learn's digits: a fixed stratified split
    (``SPLIT_SEED``: 1257 "train", 540 "test"); size 16 upsamples bilinearly. Copies (the cache stays intact)."""
    if split not in ("train", "test"):
        raise ValueError(f"split is 'train' or 'test', got {split!r}")
    if size not in (8, 16):
        raise ValueError(f"size is 8 or 16, got {size!r}")
    x, y = _digits(size)[split]
    return x.clone(), y.clone()


# --- sampling -----------------------------------------------------------------------------------------------------


def make_scheduler(name: str = "ddpm") -> Any:
    """A diffusers scheduler on ``NOISE_SCHEDULE``: "ddpm" (training: ``add_noise``), "ddim" (eta 0) or "plms"
    (``PNDMScheduler(skip_prk_steps=True)``)."""
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    if name == "ddpm":
        return DDPMScheduler(**NOISE_SCHEDULE)
    if name == "ddim":
        return DDIMScheduler(**NOISE_SCHEDULE)
    if name == "plms":
        schedule = {k: v for k, v in NOISE_SCHEDULE.items() if k != "clip_sample"}  # PNDM never clips
        return PNDMScheduler(**schedule, skip_prk_steps=True)
    raise ValueError(f"scheduler is one of ddpm, {', '.join(SCHEDULERS)}; got {name!r}")


def noise_prediction(model: nn.Module, x_t: Tensor, t: int | Tensor, labels: Tensor) -> Tensor:
    """The model's epsilon prediction (B, C, S, S) at noisy images ``x_t`` (B, C, S, S), timestep ``t`` (an int or
    a (B,) / scalar tensor) and class ``labels`` (B,) (``NULL_CLASS`` = unconditional); with a learned sigma the
    first C output channels."""
    b, c = x_t.shape[:2]
    t = torch.as_tensor(t, device=x_t.device)
    if t.dim() == 0:
        t = t.expand(b)
    out = model(x_t, timestep=t, class_labels=labels.to(x_t.device), return_dict=False)[0]  # (B, C or 2C, S, S)
    return out[:, :c]


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None)
    return (torch.device("cpu"), torch.float32) if p is None else (p.device, p.dtype if p.is_floating_point()
                                                                    else torch.float32)


@torch.no_grad()
def sample(model: nn.Module, labels: Tensor, *, steps: int = 20, scheduler: str = "ddim", seed: int = 0,
           guidance_scale: float = 1.0, return_trajectory: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Images (B, 1, S, S) of class ``labels`` (B,) int64, denoised from x_T ~ N(0, I) drawn by a CPU generator
    seeded with ``seed`` (the same noise for the same seed and batch, whatever the model) over ``steps`` of the
    scheduler ("ddim" or "plms"). ``guidance_scale`` != 1 applies classifier-free guidance with the null class.
    With ``return_trajectory`` also the noise prediction (guided, on the CPU) of every model call in order (PLMS
    with skip_prk_steps calls the model steps + 1 times). The global RNG is untouched; the model stays as it is."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler is one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an integer in [1, 1000], got {steps!r}")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    cfg = model.config if hasattr(model, "config") else None
    null_class = int(getattr(cfg, "num_embeds_ada_norm", None) or NULL_CLASS)  # a user's DiT: its own classes
    table = getattr(model, "class_embedding", None)  # a UNet's class rows (ZOODiP appends new ones)
    top = table.num_embeddings - 1 if isinstance(table, nn.Embedding) else null_class
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > top):
        raise ValueError(f"labels must be class indices in [0, {null_class - 1}] (or {null_class}: null class"
                         + (f"; {null_class + 1}..{top}: added classes)" if top > null_class else ")"))
    device, dtype = _model_device_dtype(model)
    size = int(cfg.sample_size) if cfg is not None else ARCH_DEFAULTS["sample_size"]
    channels = int(cfg.in_channels) if cfg is not None else 1
    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(len(labels), channels, size, size, generator=gen).to(device=device, dtype=dtype)  # x_T
    labels = labels.to(device)
    guided = guidance_scale != 1.0
    trajectory: list[Tensor] = []
    for t in sched.timesteps:
        if guided:
            null = torch.full_like(labels, null_class)
            cond, uncond = noise_prediction(model, torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        else:
            eps = noise_prediction(model, x, t, labels)
        if return_trajectory:
            trajectory.append(eps.detach().float().cpu())
        x = sched.step(eps, t, x, return_dict=False)[0]
    images = x.float().clamp(-1.0, 1.0).cpu()
    return (images, trajectory) if return_trajectory else images


# --- the digits classifier ----------------------------------------------------------------------------------------


class DigitsClassifier(nn.Module):
    """A small CNN on 8x8 digits in [-1, 1] (16x16 inputs are resized to 8x8): two 3x3 convs, a pool, a 64-wide
    penultimate layer (the features of ``frechet_distance``) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        h = F.relu(self.conv1(x))  # (B, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc(h.flatten(1)))  # (B, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, 10)


@functools.lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    """The shipped digits classifier (cached, eval mode; treat as read-only). The global RNG is untouched."""
    from polyquant.checkpoint import read_checkpoint

    tensors, _ = read_checkpoint(CLASSIFIER_PATH)
    with torch.random.fork_rng(devices=[]):
        clf = DigitsClassifier()
    clf.load_state_dict(tensors, strict=True)
    return clf.eval()


def save_classifier(clf: DigitsClassifier, record: dict[str, Any], path: str | Path = CLASSIFIER_PATH) -> Path:
    """Write the classifier checkpoint (train.py) with its training record as JSON metadata."""
    from polyquant.checkpoint import save_checkpoint

    return save_checkpoint(dict(clf.state_dict()), path, {_META_TRAIN: json.dumps(record)})


@torch.no_grad()
def classifier_features(images: Tensor) -> Tensor:
    """The shipped classifier's penultimate features (B, 64) of images (B, 1, S, S) in [-1, 1]."""
    return load_classifier().features(images.float().cpu())


@torch.no_grad()
def classify(images: Tensor) -> Tensor:
    """The shipped classifier's predicted class (B,) of images (B, 1, S, S) in [-1, 1]."""
    return load_classifier()(images.float().cpu()).argmax(dim=-1)


# --- metrics ------------------------------------------------------------------------------------------------------


def noise_mse(traj_a: Sequence[Tensor], traj_b: Sequence[Tensor]) -> list[float]:
    """Mean squared difference of two noise-prediction trajectories (``sample(..., return_trajectory=True)``), one
    value per step."""
    if len(traj_a) != len(traj_b):
        raise ValueError(f"trajectories have {len(traj_a)} and {len(traj_b)} steps")
    return [float((a.double() - b.double()).pow(2).mean()) for a, b in zip(traj_a, traj_b)]


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of ``b`` against ``a`` for images in [-1, 1] (range 2): the core's ``polyquant.metrics.psnr``."""
    return metrics.psnr(a, b, data_range)


def _sqrtm_psd(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite float64 matrix (eigh, negatives clipped)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) (FID's formula):
    |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2), in float64 with symmetric square roots
    (eigh), so it is real and >= 0; identical sets give 0 up to rounding. Covariances are unbiased (N - 1)."""
    a, b = feats_a.double().reshape(len(feats_a), -1), feats_b.double().reshape(len(feats_b), -1)
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two sets of >= 2 feature vectors of one width, got {tuple(a.shape)}, {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    sa = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0).sqrt().sum()
    d = (mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2.0 * cross
    return max(float(d), 0.0)


def class_accuracy(images: Tensor, labels: Tensor) -> float:
    """Percent of ``images`` (B, 1, S, S) the shipped classifier assigns to their requested ``labels`` (B,)."""
    return float((classify(images) == labels.cpu()).double().mean() * 100.0)
