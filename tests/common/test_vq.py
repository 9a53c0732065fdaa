"""k-means and the VQ family: hand-computed cases, determinism, EMA updates, dead codes, rate/distortion order."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from polyquant.vq import GroupedResidualVQ, ProductVQ, ResidualVQ, VectorQuantizer, batched_kmeans, kmeans
from polyquant import vq as vq_mod
from polyquant.vq import _update_centroids


def _blobs(centers: list[list[float]], per: int = 50, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centers)
    x = c.repeat_interleave(per, 0) + spread * torch.randn(len(centers) * per, c.shape[1], generator=g)
    return x[torch.randperm(x.shape[0], generator=g)]


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


# ---------------------------------------------------------------------------------------------------------------------
# k-means


def test_kmeans_hand_computed_1d() -> None:
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    centers, codes = kmeans(x, 2)
    order = centers[:, 0].argsort()
    assert torch.allclose(centers[order, 0], torch.tensor([0.1, 10.1]), atol=1e-6)
    assert codes.dtype == torch.int64
    assert codes[0] == codes[1] == codes[2] and codes[3] == codes[4] == codes[5] and codes[0] != codes[3]
    assert torch.allclose(centers[codes], torch.tensor([[0.1]] * 3 + [[10.1]] * 3), atol=1e-6)


def test_kmeans_recovers_blobs() -> None:
    true = [[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]]
    x = _blobs(true)
    centers, codes = kmeans(x, 4, seed=3)
    d = torch.cdist(centers, torch.tensor(true))
    assert d.min(dim=1).values.max() < 0.05  # every centroid sits on a blob ...
    assert sorted(d.argmin(dim=1).tolist()) == [0, 1, 2, 3]  # ... and every blob has one
    assert torch.equal(codes, torch.cdist(x, centers).argmin(1))


def test_kmeans_deterministic_and_chunk_independent() -> None:
    x = torch.randn(500, 3)
    a = kmeans(x, 8, seed=5)
    b = kmeans(x, 8, seed=5)
    c = kmeans(x, 8, seed=5, batch_size=64)  # 8 row chunks
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[0], c[0], atol=1e-5) and torch.equal(a[1], c[1])


def test_kmeans_fewer_distinct_points_than_k() -> None:
    x = torch.tensor([[1.0, 1.0]] * 5 + [[3.0, 0.0]] * 5)
    centers, codes = kmeans(x, 4)
    assert torch.isfinite(centers).all()
    assert torch.equal(centers[codes], x)
    centers, codes = kmeans(torch.tensor([[2.0]]), 3)  # k > N
    assert centers.shape == (3, 1) and torch.equal(centers, torch.full((3, 1), 2.0)) and codes.tolist() == [0]


def test_kmeans_k_equals_n() -> None:
    x = torch.randn(6, 2)
    centers, codes = kmeans(x, 6)
    assert torch.allclose(centers[codes], x)
    assert sorted(codes.tolist()) == list(range(6))


def test_cluster_stats_matmul_path_matches_scatter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reproducible one-hot path used on accelerators gives the same sums as the CPU scatter-add."""
    x = torch.randn(2, 300, 3)
    codes = torch.randint(0, 7, (2, 300))
    sums, counts = vq_mod._cluster_stats(x, codes, 7, None)
    monkeypatch.setattr(vq_mod, "_exact_scatter", lambda x: False)
    sums2, counts2 = vq_mod._cluster_stats(x, codes, 7, 64)
    assert torch.equal(counts, counts2) and torch.allclose(sums, sums2, atol=1e-5)
    assert torch.equal(counts[0], torch.bincount(codes[0], minlength=7))
    assert torch.allclose(sums[1, 3], x[1][codes[1] == 3].sum(0), atol=1e-5)


def test_empty_cluster_reseeded_from_farthest_points() -> None:
    x = torch.tensor([[[0.0], [3.0], [10.0]]])
    centers = torch.tensor([[[1.0], [100.0], [200.0]]])
    codes = torch.zeros(1, 3, dtype=torch.int64)  # everything in cluster 0, clusters 1 and 2 empty
    dist2 = torch.tensor([[1.0, 4.0, 81.0]])
    new = _update_centroids(x, codes, dist2, centers)
    assert torch.allclose(new[0, :, 0], torch.tensor([13.0 / 3.0, 10.0, 3.0]))


def test_batched_kmeans() -> None:
    offsets = torch.tensor([0.0, 100.0, -50.0])
    base = _blobs([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], per=30)
    x = base[None] + offsets[:, None, None]  # (3, 90, 2)
    centers, codes = batched_kmeans(x, 3, seed=1)
    assert centers.shape == (3, 3, 2) and codes.shape == (3, 90)
    for b in range(3):
        recon = centers[b][codes[b]]
        assert _mse(recon, x[b]) < 0.01
    again = batched_kmeans(x, 3, seed=1)
    assert torch.equal(again[0], centers) and torch.equal(again[1], codes)


def test_kmeans_validation() -> None:
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kmeans(torch.randn(3), 2)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        batched_kmeans(torch.randn(3, 2), 2)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.randn(3, 2), 0)
    with pytest.raises(ValueError, match="N = 0"):
        kmeans(torch.randn(0, 2), 2)
    with pytest.raises(ValueError, match="floating-point"):
        kmeans(torch.ones(3, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="batch_size"):
        kmeans(torch.randn(3, 2), 2, batch_size=0)


# ---------------------------------------------------------------------------------------------------------------------
# VectorQuantizer


def test_keyword_only_constructors() -> None:
    with pytest.raises(TypeError):
        VectorQuantizer(4, 8)  # type: ignore[misc]
    with pytest.raises(TypeError):
        ResidualVQ(4, 2, 8)  # type: ignore[misc]


def test_vq_encode_decode_roundtrip() -> None:
    vq = VectorQuantizer(dim=3, codebook_size=16).fit(torch.randn(400, 3))
    x = torch.randn(2, 5, 3)
    codes = vq.encode(x)
    assert codes.shape == (2, 5) and codes.dtype == torch.int64
    x_hat = vq.decode(codes)
    assert x_hat.shape == x.shape
    assert torch.equal(codes, torch.cdist(x.reshape(-1, 3), vq.codebook).argmin(1).view(2, 5))
    assert torch.equal(vq.encode(x_hat), codes)  # a codeword encodes to itself
    all_codes = torch.arange(16)
    assert torch.equal(vq.encode(vq.decode(all_codes)), all_codes)


def test_vq_ema_update_hand_example() -> None:
    vq = VectorQuantizer(dim=1, codebook_size=2, decay=0.5)
    vq.set_codebook(torch.tensor([[0.0], [10.0]]))
    vq.train()
    x_hat, codes, loss = vq(torch.tensor([[1.0], [2.0], [9.0]]))
    assert codes.tolist() == [0, 0, 1]
    # quantized with the codebook *before* the update; loss = mean((1-0)^2, (2-0)^2, (9-10)^2) = 2
    assert x_hat[:, 0].tolist() == [0.0, 0.0, 10.0]
    assert loss.item() == pytest.approx(2.0)
    # n0 = 0.5 * 1 + 0.5 * 2 = 1.5, m0 = 0.5 * 0 + 0.5 * 3 = 1.5  -> e0 = 1.0
    # n1 = 0.5 * 1 + 0.5 * 1 = 1.0, m1 = 0.5 * 10 + 0.5 * 9 = 9.5 -> e1 = 9.5
    assert vq.cluster_size.tolist() == [1.5, 1.0]
    assert vq.codebook[:, 0].tolist() == [1.0, 9.5]
    # An unused code keeps its value: counts and sums decay together.
    vq(torch.tensor([[1.0]]))
    assert vq.codebook[1, 0].item() == pytest.approx(9.5)


def test_vq_eval_does_not_update() -> None:
    vq = VectorQuantizer(dim=2, codebook_size=4).fit(torch.randn(50, 2))
    before = vq.codebook.clone()
    vq.eval()
    vq(torch.randn(20, 2) + 3)
    assert torch.equal(vq.codebook, before)


def test_vq_kmeans_init_on_first_batch() -> None:
    true = [[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]]
    vq = VectorQuantizer(dim=2, codebook_size=4, decay=0.9)
    assert not bool(vq.initted)
    vq.train()
    vq(_blobs(true))
    assert bool(vq.initted)
    d = torch.cdist(vq.codebook, torch.tensor(true))
    assert d.min(dim=1).values.max() < 0.1 and sorted(d.argmin(1).tolist()) == [0, 1, 2, 3]


def test_vq_straight_through_gradient() -> None:
    vq = VectorQuantizer(dim=4, codebook_size=8, commitment_weight=0.25).fit(torch.randn(100, 4))
    vq.eval()  # keep the codebook fixed so that q can be recomputed below
    x = torch.randn(10, 4, requires_grad=True)
    x_hat, _, loss = vq(x)
    (x_hat.sum() + loss).backward()
    q = vq.decode(vq.encode(x.detach()))
    expected = torch.ones(10, 4) + 0.25 * 2 * (x.detach() - q) / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert torch.allclose(x_hat, q)


def test_dead_code_restart() -> None:
    data = _blobs([[0.0, 0.0], [4.0, 4.0]], per=20)
    vq = VectorQuantizer(dim=2, codebook_size=4, decay=0.5, threshold_dead_code=1.0, seed=1)
    vq.set_codebook(torch.tensor([[0.0, 0.0], [4.0, 4.0], [1000.0, 1000.0], [-1000.0, 1000.0]]))
    vq.train()
    _, codes, _ = vq(data)
    assert set(codes.tolist()) == {0, 1}  # the far codes were unused ...
    for row in vq.codebook[2:]:  # ... so they were restarted at batch vectors
        assert (data == row).all(dim=1).any()
    assert vq.cluster_size[2:].tolist() == [1.0, 1.0]  # restarted at the threshold's count
    assert (vq.cluster_size[:2] >= 1.0).all()  # used codes stay alive
    assert not torch.equal(vq.codebook[2], vq.codebook[3])  # distinct batch vectors (sampled without replacement)


def test_vq_state_dict_roundtrip_and_errors() -> None:
    vq = VectorQuantizer(dim=2, codebook_size=8).fit(torch.randn(100, 2))
    other = VectorQuantizer(dim=2, codebook_size=8, seed=9)
    other.load_state_dict(vq.state_dict())
    x = torch.randn(30, 2)
    assert torch.equal(other.encode(x), vq.encode(x))
    with pytest.raises(ValueError, match="size 2"):
        vq.encode(torch.randn(3, 5))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(dim=2, codebook_size=8, decay=1.0)
    with pytest.raises(ValueError, match="codebook must have shape"):
        vq.set_codebook(torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Residual, grouped residual and product VQ


def test_rvq_error_decreases_with_stages() -> None:
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16).fit(x)
    errors = [_mse(rvq.decode(rvq.encode(x, num_quantizers=n)), x) for n in range(1, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    single = VectorQuantizer(dim=8, codebook_size=16).fit(x)
    single_err = _mse(single.decode(single.encode(x)), x)
    assert errors[-1] < 0.8 * single_err, (errors, single_err)
    assert errors[0] == pytest.approx(single_err, rel=0.05)


def test_rvq_encode_decode_and_forward_consistent() -> None:
    x = torch.randn(300, 4)
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8).fit(x)
    rvq.eval()
    xs = torch.randn(2, 7, 4)
    codes = rvq.encode(xs)
    assert codes.shape == (2, 7, 3)
    x_hat, fcodes, loss = rvq(xs)
    assert torch.equal(fcodes, codes)
    assert torch.allclose(x_hat, rvq.decode(codes), atol=1e-6)
    skipped = torch.cat([codes[..., :2], torch.full_like(codes[..., :1], -1)], dim=-1)  # -1: stage not used
    assert torch.allclose(rvq.decode(codes[..., :2]), rvq.decode(skipped))
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="num_quantizers"):
        rvq.encode(xs, num_quantizers=4)


def test_rvq_codebooks_feed_the_kernels() -> None:
    from polyquant.kernels import rvq_assign, rvq_decode

    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=3, codebook_size=16).fit(torch.randn(500, 6))
    books = rvq.codebooks
    assert books.shape == (3, 16, 6) and torch.equal(books[1], rvq.layers[1].embed)
    xs = torch.randn(4, 9, 6)
    codes = rvq.encode(xs)
    assert torch.equal(rvq_assign(xs, books), codes)  # kernels' greedy residual search = the module's
    assert torch.allclose(rvq_decode(codes, books), rvq.decode(codes), atol=1e-6)


def test_rvq_training_and_quantizer_dropout() -> None:
    x = torch.randn(256, 4)
    rvq = ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, quantizer_dropout=True, seed=2)
    rvq.train()
    seen_dropped = False
    for _ in range(8):
        xin = x.clone().requires_grad_(True)
        x_hat, codes, loss = rvq(xin)
        assert codes.shape == (256, 4)
        used = (codes[0] >= 0).sum().item()
        assert used >= 1 and bool((codes[:, :used] >= 0).all()) and bool((codes[:, used:] == -1).all())
        seen_dropped |= used < 4
        (x_hat.sum() + loss).backward()
        assert torch.isfinite(xin.grad).all()
    assert seen_dropped
    assert all(bool(layer.initted) for layer in rvq.layers)


def test_grouped_rvq() -> None:
    x = torch.randn(600, 8)
    grvq = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16).fit(x)
    codes = grvq.encode(x)
    assert codes.shape == (600, 2, 2)
    recon = grvq.decode(codes)
    one_stage = grvq.decode(grvq.encode(x, num_quantizers=1))
    assert _mse(recon, x) < _mse(one_stage, x) < _mse(torch.zeros_like(x), x)
    grvq.eval()
    x_hat, fcodes, _ = grvq(x)
    assert torch.equal(fcodes, codes) and torch.allclose(x_hat, recon, atol=1e-6)
    # Each group only sees its own features.
    x2 = x.clone()
    x2[:, 4:] += 100
    assert torch.equal(grvq.encode(x2)[:, 0], codes[:, 0])
    with pytest.raises(ValueError, match="divisible"):
        GroupedResidualVQ(dim=8, groups=3, num_quantizers=2, codebook_size=4)


def test_product_vq_beats_scalar_baseline() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 4, generator=g)
    mix = torch.randn(4, 8, generator=g)
    x = z @ mix + 0.05 * torch.randn(3000, 8, generator=g)  # correlated features
    # Same rate, 2 bits per feature: 16 codes per pair of features vs 4 levels per feature (1-D k-means).
    pq = ProductVQ(dim=8, num_subvectors=4, codebook_size=16).fit(x)
    scalar = ProductVQ(dim=8, num_subvectors=8, codebook_size=4).fit(x)
    pq_err, scalar_err = _mse(pq.decode(pq.encode(x)), x), _mse(scalar.decode(scalar.encode(x)), x)
    lo, hi = x.min(0).values, x.max(0).values
    step = (hi - lo) / 3
    uniform = ((x - lo) / step).round() * step + lo
    assert pq_err < scalar_err < _mse(uniform, x)
    assert pq_err < 0.9 * scalar_err, (pq_err, scalar_err)


def test_product_vq_roundtrip_and_forward() -> None:
    x = torch.randn(200, 6)
    pq = ProductVQ(dim=6, num_subvectors=3, codebook_size=8).fit(x)
    codes = pq.encode(x)
    assert codes.shape == (200, 3)
    recon = pq.decode(codes)
    assert torch.equal(pq.encode(recon), codes)
    pq.eval()
    x_hat, fcodes, loss = pq(x)
    assert torch.equal(fcodes, codes) and torch.allclose(x_hat, recon) and loss.ndim == 0
    pq.train()
    fresh = ProductVQ(dim=6, num_subvectors=3, codebook_size=8)
    fresh.train()
    _, c, _ = fresh(x)
    assert c.shape == (200, 3) and all(bool(q.initted) for q in fresh.quantizers)
    with pytest.raises(ValueError, match="divisible"):
        ProductVQ(dim=6, num_subvectors=4, codebook_size=8)


# ---------------------------------------------------------------------------------------------------------------------
# non-finite data (issue 10, case 9): one NaN vector used to poison a centroid / an EMA codebook row for good


def _poisoned(n: int = 32, dim: int = 4, bad: float = float("nan")) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    x[5, 3] = bad  # in the last group / sub-vector: the first ones must not be updated either
    return x


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kmeans_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="kmeans: 1 vectors contain NaN or Inf"):
        kmeans(_poisoned(bad=bad), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        batched_kmeans(torch.stack([torch.randn(32, 4), _poisoned(bad=bad)]), 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VectorQuantizer(dim=4, codebook_size=4),
        lambda: VectorQuantizer(dim=4, codebook_size=4, kmeans_init=False),
        lambda: ResidualVQ(dim=4, num_quantizers=2, codebook_size=4),
        lambda: GroupedResidualVQ(dim=4, groups=2, num_quantizers=2, codebook_size=4),
        lambda: ProductVQ(dim=4, num_subvectors=2, codebook_size=4),
    ],
    ids=["vq", "vq-ema-only", "rvq", "grvq", "pq"],
)
def test_vq_training_rejects_non_finite_and_keeps_its_codebook(make: Callable[[], nn.Module]) -> None:
    vq = make().train()
    vq(torch.randn(32, 4))  # initialized (k-means) and one EMA step
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    with pytest.raises(ValueError, match="VQ training batch: 1 vectors contain NaN or Inf"):
        vq(_poisoned())
    after = vq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was updated
    x_hat, _, _ = vq.eval()(torch.randn(8, 4))
    assert torch.isfinite(x_hat).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        vq.fit(_poisoned())
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_set_codebook_rejects_non_finite() -> None:
    vq = VectorQuantizer(dim=4, codebook_size=32)
    with pytest.raises(ValueError, match="codebook: 1 vectors contain NaN or Inf"):
        vq.set_codebook(_poisoned())


# ---------------------------------------------------------------------------------------------------------------------
# decode of codes the codebooks lack (issue 21, class 5)


def test_vq_decode_refuses_codes_out_of_range() -> None:
    vq = VectorQuantizer(dim=4, codebook_size=8, kmeans_init=False)
    for bad in (-2, -1, 8):  # negative codes wrapped or raised IndexError, 8 raised IndexError
        with pytest.raises(ValueError, match=r"VectorQuantizer.decode: codes must lie in \[0, 8\)"):
            vq.decode(torch.tensor([0, bad]))
    with pytest.raises(ValueError, match="codes must be integers"):
        vq.decode(torch.tensor([0.0, 1.0]))
    assert torch.equal(vq.decode(torch.tensor([3], dtype=torch.uint8)), vq.codebook[3:4])


def test_rvq_decode_refuses_codes_out_of_range() -> None:
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, kmeans_init=False)
    for bad in (-2, 8):  # -2 was read as a skipped stage, 8 raised IndexError
        with pytest.raises(ValueError, match=r"ResidualVQ.decode: codes must lie in \[-1, 8\)"):
            rvq.decode(torch.tensor([[1, bad]]))
    assert torch.equal(rvq.decode(torch.tensor([[1, -1]])), rvq.decode(torch.tensor([[1]])))  # -1: skipped
    with pytest.raises(ValueError, match="expected"):
        rvq.decode(torch.tensor(1))


def test_grouped_and_product_decode_refuse_codes_of_the_wrong_shape_or_range() -> None:
    grvq = GroupedResidualVQ(dim=4, groups=2, num_quantizers=2, codebook_size=8, kmeans_init=False)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., groups=2, n\)"):
        grvq.decode(torch.zeros(5, 3, 2, dtype=torch.long))  # the third group was ignored
    with pytest.raises(ValueError, match="codes must lie in"):
        grvq.decode(torch.full((5, 2, 2), -2))
    pvq = ProductVQ(dim=4, num_subvectors=2, codebook_size=8, kmeans_init=False)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., num_subvectors=2\)"):
        pvq.decode(torch.zeros(5, 3, dtype=torch.long))  # the third sub-vector was ignored
    with pytest.raises(ValueError, match=r"ProductVQ.decode: codes must lie in \[0, 8\)"):
        pvq.decode(torch.tensor([[0, -1]]))
    x = torch.randn(6, 4)
    assert pvq.decode(pvq.encode(x)).shape == (6, 4) and grvq.decode(grvq.encode(x)).shape == (6, 4)


# --- the group combinator and the codebook options (issue 24) -------------------------------------------------------


def test_grouped_vq_combinator_stacks_any_quantizer() -> None:
    from polyquant.fsq import FSQ
    from polyquant.vq import GroupedVQ

    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    g = GroupedVQ([FSQ([4, 4]), FSQ([5, 3])], dim=4)  # code_dims 0 inside -> codes (..., groups)
    x_hat, codes, _ = g(x)
    assert codes.shape == (50, 2) and torch.equal(g.decode(codes), x_hat)
    assert torch.equal(g.encode(x), codes)
    assert torch.equal(codes[:, 1], FSQ([5, 3]).encode(x[:, 2:]))
    grvq = GroupedResidualVQ(dim=4, groups=2, num_quantizers=3, codebook_size=8).fit(x)
    c = grvq.encode(x)  # (..., groups, n): group g is its own RVQ on slice g
    assert c.shape == (50, 2, 3) and torch.equal(c[:, 1], grvq.quantizers[1].encode(x[:, 2:]))
    assert torch.allclose(grvq.decode(c), torch.cat([q.decode(c[:, i]) for i, q in enumerate(grvq.quantizers)], -1))
    with pytest.raises(ValueError, match="one kind"):
        GroupedVQ([FSQ([4, 4]), ResidualVQ(dim=2, num_quantizers=2, codebook_size=4)], dim=4)
    with pytest.raises(ValueError, match="groups=2"):
        g.decode(torch.zeros(5, 3, dtype=torch.int64))


def test_laplace_smoothing_by_hand() -> None:
    from polyquant.vq import CodebookOptions

    book = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq = VectorQuantizer(dim=2, codebook_size=2, decay=0.5, kmeans_init=False, eps=1e-5,
                         options=CodebookOptions(laplace_smoothing=True))
    vq.set_codebook(book)  # counts (1, 1), sums = the codes
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # all three nearest to code 0
    vq.train()(x)
    n = torch.tensor([0.5 * 1 + 0.5 * 3, 0.5 * 1])  # EMA counts (2, 0.5)
    s = torch.stack([0.5 * book[0] + 0.5 * x.sum(0), 0.5 * book[1]])
    smoothed = (n + 1e-5) / (n.sum() + 2 * 1e-5) * n.sum()
    assert torch.allclose(vq.cluster_size, n) and torch.allclose(vq.codebook, s / smoothed[:, None], atol=1e-6)


def test_learned_codebook_trains_by_gradient_not_ema() -> None:
    from polyquant.vq import CODEBOOK_PRESETS

    vq = VectorQuantizer(dim=3, codebook_size=16, kmeans_init=False, commitment_weight=0.25,
                         options=CODEBOOK_PRESETS["hificodec"])
    assert isinstance(vq.embed, torch.nn.Parameter) and float(vq.embed.detach().abs().max()) <= 1 / 16
    before = vq.codebook.detach().clone()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    x_hat, codes, loss = vq.train()(x)
    assert torch.equal(vq.codebook.detach(), before)  # no EMA move
    q = before[codes]
    expected = 0.25 * ((x - q) ** 2).mean() + 1.0 * ((q - x) ** 2).mean()  # commitment + codebook loss
    assert torch.allclose(loss, expected)
    loss.backward()
    used = torch.zeros(16, dtype=torch.bool)
    used[codes] = True
    grad_rows = vq.embed.grad.abs().sum(1) > 0
    assert torch.equal(grad_rows, used)  # only the chosen codes receive a gradient


def test_cosine_search_returns_the_raw_code() -> None:
    from polyquant.vq import CodebookOptions

    book = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[0.1, 0.0]])
    euclid = VectorQuantizer(dim=2, codebook_size=2, kmeans_init=False)
    cos = VectorQuantizer(dim=2, codebook_size=2, kmeans_init=False, options=CodebookOptions(cosine=True))
    euclid.set_codebook(book)
    cos.set_codebook(book)
    assert int(euclid.encode(x)) == 1 and int(cos.encode(x)) == 0  # nearest vs same direction
    assert cos.eval()(x)[0].tolist() == [[10.0, 0.0]]  # DAC: the lookup is the unnormalized row


@pytest.mark.parametrize("encodec_residual", [False, True])
def test_encodec_residual_flag_cuts_later_stages_gradient(encodec_residual: bool) -> None:
    rvq = ResidualVQ(dim=2, num_quantizers=2, codebook_size=4, kmeans_init=False, encodec_residual=encodec_residual)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    rvq.fit(x0)
    x = x0.clone().requires_grad_()
    _, codes, loss = rvq.eval()(x)
    loss.backward()
    e0 = rvq.layers[0].codebook[codes[:, 0]]
    e1 = rvq.layers[1].codebook[codes[:, 1]]
    first = 2 * (x0 - e0) / x0.numel()  # d/dx of the first stage's commitment mean((x - e0)^2)
    second = 2 * (x0 - e0 - e1) / x0.numel()  # the second stage's, on the residual x - sg(e0)
    assert torch.allclose(x.grad, first if encodec_residual else first + second, atol=1e-6)


def test_train_codebooks_ema_passes_cut_error_and_revive_dead_codes() -> None:
    from polyquant.vq import CODEBOOK_PRESETS, train_codebooks

    torch.manual_seed(0)
    centers = torch.randn(8, 4) * 3
    data = centers[torch.randint(0, 8, (2000,))] + 0.1 * torch.randn(2000, 4)
    batches = list(data.split(200))
    plain = VectorQuantizer(dim=4, codebook_size=16, kmeans_init=False, decay=0.8)
    restarted = VectorQuantizer(dim=4, codebook_size=16, kmeans_init=False, decay=0.8, threshold_dead_code=1.0)
    err0 = float((plain.decode(plain.encode(data)) - data).pow(2).mean())
    for q in (plain, restarted):
        assert train_codebooks(q, batches, epochs=3) is q and not q.training
    err_plain = float((plain.decode(plain.encode(data)) - data).pow(2).mean())
    err_restart = float((restarted.decode(restarted.encode(data)) - data).pow(2).mean())
    assert err_plain < err0 and err_restart < err_plain  # restart revives the random codes far from the data
    assert err_restart < 0.05
    learned = VectorQuantizer(dim=4, codebook_size=16, options=CODEBOOK_PRESETS["hificodec"])
    with pytest.raises(ValueError, match="learned by gradient"):
        train_codebooks(learned, batches)


def test_factorized_vq_searches_projections_by_cosine_and_returns_the_raw_code() -> None:
    import torch.nn.functional as F

    from polyquant.vq import FactorizedVQ

    fvq = FactorizedVQ(dim=12, code_dim=3, codebook_size=16, seed=0)
    x = torch.randn(40, 12)
    codes = fvq.encode(x)
    with torch.no_grad():
        z = F.normalize(fvq.in_proj(x), dim=-1)
        by_hand = (z @ F.normalize(fvq.embed, dim=-1).T).argmax(-1)  # cosine nearest in the 3-d projection
        assert torch.equal(codes, by_hand)
        assert torch.allclose(fvq.decode(codes), fvq.out_proj(fvq.embed[codes]), atol=1e-6)  # raw code, projected up
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        fvq.decode(torch.tensor([16]))


def test_dac_rvq_trains_projections_and_codebooks_through_the_output() -> None:
    from polyquant.vq import CODEBOOK_PRESETS

    torch.manual_seed(0)
    rvq = ResidualVQ(dim=12, num_quantizers=3, codebook_size=32, factorized_dim=4, kmeans_init=False,
                     commitment_weight=0.25, options=CODEBOOK_PRESETS["dac"])
    x = torch.randn(256, 12) @ torch.randn(12, 12) * 0.5
    x.requires_grad_(True)
    rvq.train()
    x_hat, codes, loss = rvq(x)
    ((x_hat - x.detach()) ** 2).mean().add(loss).backward()
    for stage in rvq.layers:  # the output carries every stage's projections; the codebook its codebook loss
        assert stage.in_proj.parametrizations.weight.original1.grad is not None
        assert stage.out_proj.parametrizations.weight.original1.grad.abs().sum() > 0
        assert stage.vq.embed.grad.abs().sum() > 0
    assert x.grad is not None and codes.shape == (256, 3)
    with pytest.raises(ValueError, match="factorized"):
        rvq.codebooks
    # a few steps of Adam on the reconstruction lower the error; encode / decode agree with the forward in eval
    opt = torch.optim.Adam(rvq.parameters(), lr=1e-2)
    data = x.detach()
    errs = []
    for _ in range(60):
        x_hat, _, loss = rvq(data)
        err = ((x_hat - data) ** 2).mean()
        errs.append(float(err.detach()))
        opt.zero_grad()
        (err + loss).backward()
        opt.step()
    assert errs[-1] < 0.5 * errs[0]
    rvq.eval()
    with torch.no_grad():
        assert torch.allclose(rvq(data)[0], rvq.decode(rvq.encode(data)), atol=1e-5)


def test_product_vq_with_slices_and_codebooks_of_different_sizes() -> None:
    # OMG's layout in miniature: scale as 3 x 1-d (K = 8), rotation as 2 x 2-d (K = 16), one 3-d slice (K = 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=g)
    slices, sizes = [1, 1, 1, 2, 2, 3], [8, 8, 8, 16, 16, 32]
    pvq = ProductVQ(dim=10, codebook_size=sizes, slices=slices, seed=3).fit(x, iters=15)
    assert pvq.num_subvectors == 6 and [q.codebook.shape for q in pvq.quantizers] == [
        (k, d) for d, k in zip(slices, sizes)]
    codes = pvq.encode(x)
    assert codes.shape == (600, 6) and all(int(codes[:, m].max()) < k for m, k in enumerate(sizes))
    # each slice is the core k-means of that slice alone, seeded seed + m
    parts = x.split(slices, dim=-1)
    for m, (part, k) in enumerate(zip(parts, sizes)):
        centers, _ = kmeans(part, k, iters=15, seed=3 + m)
        assert torch.allclose(pvq.quantizers[m].codebook, centers)
    x_hat = pvq.decode(codes)
    assert torch.allclose(x_hat, torch.cat([q.decode(codes[:, m]) for m, q in enumerate(pvq.quantizers)], -1))
    # a code valid for the 32-entry slice but not for an 8-entry one is refused, naming the slice
    bad = codes.clone()
    bad[0, 1] = 20
    with pytest.raises(ValueError, match="sub-vector 1"):
        pvq.decode(bad)
    with pytest.raises(ValueError, match="summing to dim"):
        ProductVQ(dim=10, codebook_size=8, slices=[4, 4])
    with pytest.raises(ValueError, match="one per slice"):
        ProductVQ(dim=10, codebook_size=[8, 8], slices=slices)
    # equal slices and K still take the batched path, with EMA counts at the cluster sizes
    even = ProductVQ(dim=8, num_subvectors=4, codebook_size=16).fit(x[:, :8])
    assert float(even.quantizers[0].cluster_size.sum()) == 600
