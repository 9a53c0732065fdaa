"""The diffusion plugin's shipped models (digits DiT, digits classifier), sampling and metrics."""

import json
import math

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

from polyquant.checkpoint import read_checkpoint_metadata  # noqa: E402
from polyquant.plugins.diffusion import models as M  # noqa: E402

# the shipped DiT's class accuracy on 100 DDIM-20 samples (train.py's record) minus this margin, for 50 samples
SAMPLE_MARGIN = 15.0


@pytest.fixture(scope="module")
def dit():
    torch.set_num_threads(1)
    return M.build_model({"name": M.SHIPPED})


def _record() -> dict:
    return json.loads(read_checkpoint_metadata(M.SHIPPED_PATH)["train"])


def test_shipped_checkpoints_are_small_and_load(dit):
    from diffusers import DiTTransformer2DModel

    from polyquant.api import model_description

    assert M.SHIPPED_PATH.stat().st_size < 3 * 2**20
    assert M.CLASSIFIER_PATH.stat().st_size < 2**20
    assert isinstance(dit, DiTTransformer2DModel) and not dit.training
    assert model_description(dit) == {"name": M.SHIPPED}
    assert dit.config.num_embeds_ada_norm == M.NUM_CLASSES and dit.config.in_channels == 1
    assert M.build_model() is not dit  # the default config is the shipped model too
    x = torch.zeros(2, 1, 8, 8)
    eps = M.noise_prediction(dit, x, 500, torch.tensor([3, M.NULL_CLASS]))
    assert eps.shape == (2, 1, 8, 8) and torch.isfinite(eps).all()


def test_build_model_keeps_global_rng_and_checks_configs():
    state = torch.random.get_rng_state()
    a = M.build_model({"num_layers": 1, "seed": 3})
    b = M.build_model({"num_layers": 1, "seed": 3})
    M.build_model()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    for bad in ({"name": "nope"}, {"depth": 2}, {"num_layers": 0}, {"sample_size": 9}, [1]):
        with pytest.raises(ValueError):
            M.build_model(bad)


def test_digits_images_split():
    x, y = M.digits_images("train")
    x_te, y_te = M.digits_images("test", size=16)
    assert x.shape == (1257, 1, 8, 8) and x_te.shape == (540, 1, 16, 16) and len(y) == 1257 and len(y_te) == 540
    assert x.min() == -1.0 and x.max() == 1.0 and set(y.tolist()) == set(range(10))
    with pytest.raises(ValueError):
        M.digits_images("val")


def test_classifier_held_out_accuracy():
    x, y = M.digits_images("test")
    assert M.class_accuracy(x, y) > 90.0
    assert M.classifier_features(x[:5]).shape == (5, 64)
    assert M.class_accuracy(M.digits_images("test", size=16)[0], y) > 85.0  # 16x16 inputs are resized to 8x8


def test_float_samples_are_recognized_and_seeded(dit):
    labels = torch.arange(50) % 10
    images, traj = M.sample(dit, labels, steps=20, scheduler="ddim", seed=0, return_trajectory=True)
    assert images.shape == (50, 1, 8, 8) and len(traj) == 20
    assert M.class_accuracy(images, labels) >= _record()["sample_accuracy_ddim20"] - SAMPLE_MARGIN
    again, traj2 = M.sample(dit, labels, steps=20, scheduler="ddim", seed=0, return_trajectory=True)
    assert torch.equal(images, again) and M.noise_mse(traj, traj2) == [0.0] * 20
    assert M.psnr(images, again) == math.inf
    other = M.sample(dit, labels[:8], steps=20, scheduler="ddim", seed=1)
    assert not torch.equal(images[:8], other)


def test_plms_sampler(dit):
    labels = torch.arange(10)
    images, traj = M.sample(dit, labels, steps=20, scheduler="plms", seed=0, return_trajectory=True)
    assert images.shape == (10, 1, 8, 8) and len(traj) == 21  # skip_prk_steps repeats one timestep
    assert torch.isfinite(images).all()
    with pytest.raises(ValueError):
        M.sample(dit, labels, scheduler="euler")


def test_psnr_hand_value():
    a = torch.zeros(4, 1, 8, 8)
    b = torch.full_like(a, 0.2)  # MSE 0.04, range 2: 10 log10(4 / 0.04) = 20 dB
    assert M.psnr(a, b) == pytest.approx(20.0)
    assert M.psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(25.0))


def test_noise_mse_hand_value():
    a = [torch.zeros(2, 3), torch.ones(2, 3)]
    b = [torch.full((2, 3), 0.5), torch.ones(2, 3)]
    assert M.noise_mse(a, b) == [0.25, 0.0]


def test_frechet_distance_hand_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # y = 2x + 1: mu_y = 2 mu_x + 1, C_y = 4 C_x, so FD = |mu_x + 1|^2 + tr C_x + 4 tr C_x - 2 tr(2 C_x)
    mu, cov = x.mean(0), torch.cov(x.T)
    expected = float((mu + 1).pow(2).sum() + cov.trace())
    assert M.frechet_distance(x, 2 * x + 1) == pytest.approx(expected, rel=1e-9)
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (sqrt(va) - sqrt(vb))^2, with exact sample moments
    z = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)  # mean 0, cov 4/3 I
    a, b = z * torch.tensor([1.0, 2.0], dtype=torch.float64), z * torch.tensor([3.0, 2.0], dtype=torch.float64) + 1
    assert M.frechet_distance(a, b) == pytest.approx(2.0 + (4 / 3) * (3 - 1) ** 2, rel=1e-9)
