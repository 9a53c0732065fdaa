"""ZOODiP: the forward-difference estimator, Subspace Gradient and Adam against hand computations and references
(sklearn's PCA, torch's Adam), PUTS' range, the new class row and its errors, no autograd graph, and one fast
accuracy check on the digits UNet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import polyquant as pq
from polyquant.config import UsageError
from polyquant.plugins.diffusion.methods import build_model
from polyquant.plugins.diffusion.models import digits_images
from polyquant.plugins.diffusion.zoodip import (
    SubspaceTracker, ZOAdam, ZOODiPConfig, grow_class_embedding, sample_timesteps,
    train_embedding, zo_gradient,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quadratic(c: torch.Tensor):
    return lambda thetas: (thetas - c).pow(2).sum(1)


def test_zo_gradient_by_hand() -> None:
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64)
    g, l0 = zo_gradient(_quadratic(c), theta, queries=3, mu=1e-3, seed=7)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gi = [(float((theta + 1e-3 * z[i] - c).pow(2).sum()) - float(c.pow(2).sum())) / 1e-3 for i in range(3)]
    want = sum(gi[i] * z[i] for i in range(3)) / (3 * math.sqrt((4 + 3 - 1) / 3))
    assert l0 == pytest.approx(float(c.pow(2).sum()))
    assert torch.allclose(g, want)
    # d' = d - removed directions in the normalization; the projection is applied to the estimate
    g2, _ = zo_gradient(_quadratic(c), theta, queries=3, mu=1e-3, seed=7, removed=2, project=lambda v: 2 * v)
    assert torch.allclose(g2, 2 * want * math.sqrt(6 / 3) / math.sqrt(4 / 3))
    # averaged over seeds the estimate points along the true gradient 2 (theta - c)
    mean = sum(zo_gradient(_quadratic(c), theta, queries=2, mu=1e-4, seed=s)[0] for s in range(2000)) / 2000
    true = 2 * (theta - c)
    assert float(torch.cosine_similarity(mean, true, dim=0)) > 0.95


def test_subspace_tracker_matches_sklearn_pca() -> None:
    pytest.importorskip("sklearn")
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(0)
    d, tau = 6, 8
    plane = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0].T  # (2, d)
    values = torch.randn(tau, 2, generator=g, dtype=torch.float64) @ plane * torch.tensor([5.0, 3.0, 1, 1, 1, 1],
                                                                                          dtype=torch.float64)[:d]
    values = values + 1e-4 * torch.randn(tau, d, generator=g, dtype=torch.float64)
    tracker = SubspaceTracker(d, tau, 1e-3)
    for v in values:
        tracker.push(v)
    x = StandardScaler().fit_transform(values.numpy())
    pca = PCA(n_components=min(tau, d)).fit(x)
    i = int((pca.explained_variance_ratio_.cumsum() > 1 - 1e-3).nonzero()[0][0])
    want = torch.from_numpy(pca.components_[i + 1:])
    assert tracker.removed == want.shape[0] > 0
    # the same subspace (PCA signs are arbitrary): the projectors agree
    assert torch.allclose(tracker.basis.T @ tracker.basis, want.T @ want, atol=1e-6)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    p = tracker.project(v)
    assert torch.allclose(tracker.basis @ p, torch.zeros(tracker.removed, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(p + tracker.basis.T @ (tracker.basis @ v), v)


def test_zo_adam_is_torch_adam() -> None:
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(5, generator=g)
    p = nn.Parameter(theta.clone())
    ref = torch.optim.Adam([p], lr=1e-2, eps=1e-3)
    ours = ZOAdam(1e-2, 1e-3)
    for _ in range(5):
        grad = torch.randn(5, generator=g)
        p.grad = grad.clone()
        ref.step()
        theta = ours.step(theta, grad)
    assert torch.allclose(theta, p.detach(), atol=1e-6)


def test_puts_range_and_config_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(5000, 1000, gen, puts=True)
    assert int(t.min()) == 500 and int(t.max()) == 899  # the code's randint(500, T - 100)
    t = sample_timesteps(5000, 1000, gen, puts=False)
    assert int(t.min()) == 0 and int(t.max()) == 999
    with pytest.raises(ValueError, match="t_low < t_high"):
        ZOODiPConfig(t_low=0.9, t_high=0.5)
    with pytest.raises(ValueError, match="queries"):
        ZOODiPConfig(queries=0)


def test_new_class_row_and_size_errors() -> None:
    unet = build_model({"name": "digits-unet"}).unet
    table = unet.class_embedding.weight.detach().clone()
    idx = grow_class_embedding(unet, torch.ones(1, 128))
    assert idx == 11 and torch.equal(unet.class_embedding.weight[:11], table)
    assert torch.equal(unet.class_embedding.weight[11], torch.ones(128))
    with pytest.raises(ValueError, match="class embedding 128"):
        grow_class_embedding(unet, torch.ones(1, 64))
    with pytest.raises(ValueError, match="no class embedding table"):
        grow_class_embedding(nn.Linear(2, 2), torch.ones(1, 2))


def test_zo_steps_build_no_autograd_graph_and_backprop_does() -> None:
    unet = build_model({"name": "digits-unet"}).unet
    images, labels = digits_images("train")
    refs = images[labels == 3][:4]
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    config = ZOODiPConfig(iters=2, batch=2, tau=2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, record = train_embedding(unet, refs, config)
    assert saved == [] and record["forward_passes"] == 2 * 3 * 2  # (n + 1) x batch per step
    from polyquant.plugins.diffusion.zoodip import backprop_embedding

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backprop_embedding(unet, refs, config)
    assert sum(saved) > 10_000  # activations kept for the backward pass
    assert all(p.requires_grad for p in unet.parameters())  # left as found


def test_zoodip_errors() -> None:
    model = build_model({"name": "digits-unet"})
    with pytest.raises(UsageError, match="reference images of size"):
        pq.quantize(model, ZOODiPConfig(iters=1), calib=[torch.zeros(2, 1, 16, 16)], progress=False)
    with pytest.raises(UsageError, match="calibration batches are reference images"):
        pq.quantize(model, ZOODiPConfig(iters=1), calib=[torch.zeros(2, 8, dtype=torch.int64)], progress=False)
    dit = build_model({"name": "digits-dit"})
    with pytest.raises(UsageError, match="class-conditional diffusers UNet"):
        pq.quantize(dit, ZOODiPConfig(iters=1), calib=[torch.zeros(2, 1, 8, 8)], progress=False)


def test_zoodip_learns_a_digit_concept_on_the_int8_unet() -> None:
    """A new class learned from 16 images of a 3 against the INT8 UNet, starting from the null class: the training
    loss falls and the new class's samples are classified as 3 far above chance (10%)."""
    from polyquant.plugins.diffusion.models import classify, sample

    model = build_model({"name": "digits-unet"})
    images, labels = digits_images("train")
    refs = images[labels == 3][:16]
    qm = pq.quantize(model, ZOODiPConfig(iters=200, batch=4, tau=16, lr=1.0), calib=[refs], progress=False)
    losses = qm.report["losses"]
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50
    img = sample(qm.model.unet, torch.full((20,), qm.state["new_class"]), steps=10, scheduler="ddim", seed=5)
    assert float((classify(img) == 3).float().mean()) >= 0.4  # seeds 0..2 gave 60-80%
