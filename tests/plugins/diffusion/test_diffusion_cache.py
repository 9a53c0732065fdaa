"""DeepCache on diffusers UNets and DiTs, CacheQuant's DPS schedule and DEC least-squares fit: hand-computed costs
and fits, DPS against brute force and the uniform schedule, and the cache's behaviour inside a sampling loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from polyquant.plugins.diffusion.cache import (
    CacheSchedule, FeatureCache, dec_cache, dps_schedule, fit_channel_affine, group_costs, record_features,
    schedule_cost, uniform_schedule,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unet() -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4).eval()


def _dit() -> nn.Module:
    from polyquant.plugins.diffusion.models import build_model

    return build_model({"sample_size": 8, "patch_size": 2, "num_layers": 4, "num_attention_heads": 2,
                        "attention_head_dim": 8, "seed": 1})


def test_schedules_and_their_errors() -> None:
    s = uniform_schedule(10, 3)
    assert s.refresh == (0, 3, 6, 9) and s.groups() == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [s.source(t) for t in range(10)] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    with pytest.raises(ValueError, match=">= 1"):
        uniform_schedule(10, 0)
    with pytest.raises(ValueError, match="exceeds the 10 sampling steps"):
        uniform_schedule(10, 11)
    with pytest.raises(ValueError, match="starting at 0"):
        CacheSchedule(5, (1, 3))


def test_group_costs_by_hand() -> None:
    f = torch.tensor([[0.0], [1.0], [3.0], [3.0]])
    d = group_costs(f)
    # D(j, n) = sum_{i=j}^{n-1} |F_i - F_j|
    assert d[0, 1] == 0 and d[0, 2] == 1 and d[0, 3] == 1 + 3 and d[0, 4] == 1 + 3 + 3
    assert d[1, 3] == 2 and d[2, 4] == 0 and math.isinf(d[3, 2])
    assert schedule_cost(CacheSchedule(4, (0, 2)), d) == 1 + 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dps_is_the_brute_force_optimum_and_never_worse_than_uniform(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t, n = 12, 3
    f = torch.cumsum(torch.randn(t, 4, generator=g) * torch.rand(t, 1, generator=g) * 3, 0)  # uneven drift
    d = group_costs(f)
    dps = dps_schedule(f, n)
    k, lo, hi = math.ceil(t / n), math.ceil(n / 2), 2 * n
    best = math.inf
    for cuts in itertools.combinations(range(1, t), k - 1):  # every split into k groups within the bounds
        bounds = (0, *cuts, t)
        if all(lo <= b - a <= hi for a, b in zip(bounds, bounds[1:])):
            best = min(best, schedule_cost(CacheSchedule(t, bounds[:-1]), d))
    assert len(dps.refresh) == k and schedule_cost(dps, d) == pytest.approx(best)
    assert schedule_cost(dps, d) <= schedule_cost(uniform_schedule(t, n), d) + 1e-9
    assert all(lo <= e - s <= hi for s, e in dps.groups())


def test_fit_channel_affine_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g)
    y = x * torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([1.0, 0.0, -3.0]).view(1, 3, 1, 1)
    a, b = fit_channel_affine(x, y)
    torch.testing.assert_close(a, torch.tensor([2.0, -1.0, 0.5]))
    torch.testing.assert_close(b, torch.tensor([1.0, 0.0, -3.0]), atol=1e-6, rtol=0)
    # with noise: a = Cov / Var and b = E[y] - a E[x], as numpy's least squares per channel
    noisy = y + 0.3 * torch.randn(y.shape, generator=g)
    a, b = fit_channel_affine(x, noisy)
    for c in range(3):
        xs, ys = x[:, c].reshape(-1).double(), noisy[:, c].reshape(-1).double()
        sol = torch.linalg.lstsq(torch.stack([xs, torch.ones_like(xs)], 1), ys[:, None]).solution[:, 0]
        assert float(a[c]) == pytest.approx(float(sol[0]), rel=1e-5) and float(b[c]) == pytest.approx(float(sol[1]), abs=1e-5)
    a, b = fit_channel_affine(torch.ones(2, 1, 3), torch.full((2, 1, 3), 4.0))  # constant x: a = 1, b = the shift
    assert float(a) == 1.0 and float(b) == 3.0


@pytest.mark.parametrize("build", [_unet, _dit], ids=["unet", "dit"])
def test_cached_steps_skip_the_deep_blocks(build) -> None:
    net = build()
    deep = net.mid_block.resnets[0] if hasattr(net, "mid_block") else net.transformer_blocks[2].attn1
    calls = []
    deep.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    kwargs = {"class_labels": torch.tensor([1, 2])} if not hasattr(net, "mid_block") else {}

    def call(x: torch.Tensor, t: int) -> torch.Tensor:
        return net(x, torch.tensor([t, t]), return_dict=False, **kwargs)[0]

    with torch.no_grad():
        full0, full1 = call(x0, 900), call(x1, 800)
        calls.clear()
        with FeatureCache(net, CacheSchedule(3, (0,))) as cache:
            assert torch.equal(call(x0, 900), full0)  # a refresh step is the full model
            cached1 = call(x1, 800)
            again0 = call(x0, 900)
            assert cache.step == 2
        deep_calls_in_cache = len(calls)
        assert torch.allclose(again0, full0, atol=1e-6)  # cached step, same input as the refresh: same output
        assert not torch.allclose(cached1, full1, atol=1e-4)  # another input: the deep part is stale
        assert call(x1, 800).equal(full1)  # disabled: the model is itself again
    assert deep_calls_in_cache == 1  # the deep part ran at the refresh step only


def test_cache_inside_the_sampling_loop_and_dec() -> None:
    from polyquant.plugins.diffusion.models import build_model, psnr, sample

    dit = build_model({"name": "digits-dit"})
    labels = torch.arange(8) % 10
    steps = 20
    full = sample(dit, labels, steps=steps, seed=3)
    feats = record_features(dit, lambda: sample(dit, labels, steps=steps, seed=3))
    assert feats.shape[0] == steps
    schedule = uniform_schedule(steps, 4)
    cache = FeatureCache(dit, schedule)
    with cache:
        cached = sample(dit, labels, steps=steps, seed=3)
    corrections = dec_cache(feats, schedule, channel_dim=-1)
    assert set(corrections) == {t for t in range(steps) if t % 4}
    # the corrected cache is closer to the true features than the raw cache (least squares, per channel)
    raw = sum(float((feats[t] - feats[schedule.source(t)]).pow(2).sum()) for t in corrections)
    fixed = sum(float((feats[t] - (corrections[t][0] * feats[schedule.source(t)] + corrections[t][1])).pow(2).sum())
                for t in corrections)
    assert fixed < raw
    with FeatureCache(dit, schedule, corrections):
        corrected = sample(dit, labels, steps=steps, seed=3)
    assert 15 < psnr(full, cached) < math.inf
    assert psnr(full, corrected) > psnr(full, cached)
