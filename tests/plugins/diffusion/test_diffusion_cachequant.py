"""CacheQuant on the digits UNet: per-timestep activation ranges by hand, the split layers and DEC(quant)'s fit,
counted MACs by hand, the method end to end (artifact round trip under the cache) and its errors, and one fast
accuracy check against the naive combination's ingredients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polyquant as pq
from polyquant.config import UsageError
from polyquant.nn import QuantSpec
from polyquant.plugins.diffusion.cache import uniform_schedule
from polyquant.plugins.diffusion.cachequant import (
    CacheQuantConfig, CachedDenoiser, SplitConv2d, StepClock, TimestepQuantizer, cached_sample, schedule_macs,
    split_runs,
)
from polyquant.plugins.diffusion.calib import timestep_batches
from polyquant.plugins.diffusion.methods import build_model
from polyquant.plugins.diffusion.models import psnr, sample
from polyquant.primitives import PerTensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return build_model({"name": "digits-unet"})


def test_step_clock_reads_the_timestep_and_picks_the_nearest() -> None:
    clock = StepClock([900, 500, 100])

    class Net(nn.Module):
        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return sample

    net = Net()
    clock.attach(net)
    for t, i in [(900, 0), (640, 1), (280, 2), (0, 2), (700, 0)]:  # 700: equidistant -> the first
        net(torch.zeros(1), timestep=torch.tensor([t, t]))
        assert clock.index == i
    net(torch.zeros(1), torch.tensor(480))  # positional
    assert clock.index == 1
    with pytest.raises(TypeError, match="without a timestep"):
        net(torch.zeros(1), None)


def test_timestep_quantizer_keeps_one_range_per_step_by_hand() -> None:
    clock = StepClock([900, 500, 100])
    q = TimestepQuantizer(QuantSpec("int8", PerTensor(), symmetric=False), clock, name="x")
    q.set_state("calibrating")
    for i, (lo, hi) in enumerate([(-1.0, 3.0), (0.0, 2.0)]):  # step 2 never runs (a skipped block)
        clock.index = i
        assert torch.equal(q(torch.tensor([lo, hi, 0.5])), torch.tensor([lo, hi, 0.5]))  # observing passes through
    q.set_state("quantized")
    # min-max asymmetric int8: scale = (hi - lo) / 255, zero point = -128 - round(lo / scale)
    assert torch.allclose(q.scale, torch.tensor([4 / 255, 2 / 255, 2 / 255]))  # step 2: nearest observed (500)
    assert q.zero_point.tolist() == [-128 + 64, -128, -128]  # -1 / (4 / 255) = -63.75 -> -64
    x = torch.tensor([-0.7, 0.3, 2.9])
    for i in range(3):
        clock.index = i
        s, z = float(q.scale[i]), float(q.zero_point[i])
        want = (torch.clamp(torch.round(x / s) + z, -128, 127) - z) * s
        assert torch.allclose(q(x), want)
    with pytest.raises(ValueError, match="static and per tensor"):
        TimestepQuantizer(QuantSpec("int8", dynamic=True), clock)
    empty = TimestepQuantizer(QuantSpec("int8", PerTensor()), clock, name="never")
    empty.set_state("calibrating")
    with pytest.raises(ValueError, match="never calibrated"):
        empty.set_state("quantized")


def test_split_conv_is_the_conv_and_dec_quant_is_the_least_squares_fit() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    clock = StepClock([10, 0])
    split = SplitConv2d(conv, 4, clock)
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(split(x), conv(x), atol=1e-6)  # a = 1, b = 0: the split is the same convolution
    with pytest.raises(ValueError, match="cannot split"):
        SplitConv2d(conv, 6, clock)
    # DEC(quant): fit Y (float cache part) ~ a P (quantized cache part) + b per step and channel; P is made
    # here by a fake "quantized" cache conv whose weights are the float ones halved plus an offset
    with torch.no_grad():
        half = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        half.weight.copy_(split.cache.weight)
    split.start_fit()
    for i in (0, 1):
        clock.index = i
        xs = torch.randn(3, 6, 5, 5)
        y = F.conv2d(xs[:, :4], split.cache.weight, None, padding=1)
        p = 0.5 * y + (i + 1.0)
        split.fit_records.setdefault(i, []).append((p, y))
    split.finish_fit()
    assert torch.allclose(split.dec_a, torch.full((2, 4), 2.0), atol=1e-5)
    assert torch.allclose(split.dec_b, torch.tensor([[-2.0] * 4, [-4.0] * 4]), atol=1e-4)
    # the closed form by hand on noisy data: a = cov(p, y) / var(p), b = mean(y) - a mean(p), per output channel
    g = torch.Generator().manual_seed(1)
    p, y = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    split.start_fit()
    clock.index = 0
    split.fit_records[0] = [(p, y)]
    split.finish_fit()
    for c in range(4):
        pc, yc = p[:, c].double().flatten(), y[:, c].double().flatten()
        a = ((pc - pc.mean()) * (yc - yc.mean())).mean() / (pc - pc.mean()).pow(2).mean()
        assert float(split.dec_a[0, c]) == pytest.approx(float(a), abs=1e-5)
        assert float(split.dec_b[0, c]) == pytest.approx(float(yc.mean() - a * pc.mean()), abs=1e-5)


def test_schedule_macs_by_hand(unet: nn.Module) -> None:
    batch = {"x_t": torch.zeros(1, 1, 8, 8), "t": torch.tensor([500]), "labels": torch.tensor([3])}
    sched = uniform_schedule(10, 5)
    r = schedule_macs(unet, sched, batch)
    # a cached step of the digits UNet (8x8, 32 / 64 channels) runs the time embedding, conv_in, down_blocks[0],
    # up_blocks[-1] and conv_out: per layer, output elements x (inputs / groups x kernel taps)
    px = 64
    temb = 32 * 128 + 128 * 128
    conv_in = px * 32 * 9
    down0 = 2 * px * 32 * 32 * 9 + 32 * 128 + 16 * 32 * 32 * 9  # resnet convs, time proj, stride-2 downsampler
    up_last = (px * 32 * 96 * 9 + 32 * 128 + px * 32 * 32 * 9 + px * 32 * 96  # resnet 0 on concat(64 + 32)
               + px * 32 * 64 * 9 + 32 * 128 + px * 32 * 32 * 9 + px * 32 * 64)  # resnet 1 on concat(32 + 32)
    conv_out = px * 1 * 32 * 9
    assert r["cached_macs"] == temb + conv_in + down0 + up_last + conv_out
    assert r["full_macs"] > 2 * r["cached_macs"]
    assert r["speedup"] == pytest.approx(10 * r["full_macs"] / (2 * r["full_macs"] + 8 * r["cached_macs"]))


def test_cachequant_end_to_end_and_round_trip(unet: nn.Module, tmp_path) -> None:
    calib = timestep_batches(unet, torch.arange(6), steps=6, scheduler="ddim", seed=0)
    config = CacheQuantConfig(steps=6, interval=2)
    qm = pq.quantize(unet, config, calib=calib, progress=False)
    model = qm.model
    assert isinstance(model, CachedDenoiser) and len(model.schedule.refresh) == 3
    assert qm.state["timesteps"] == [int(b["t"][0]) for b in calib]
    quantizers = [m for m in model.modules() if isinstance(m, TimestepQuantizer)]
    assert quantizers and all(q.scale.shape == (6,) for q in quantizers)
    assert len([m for m in model.modules() if isinstance(m, SplitConv2d)]) == 2
    for t in model.schedule.refresh:  # DEC(cache) is the identity on refresh steps
        assert torch.equal(model.cache_a[t], torch.ones_like(model.cache_a[t])) and not model.cache_b[t].any()
    assert set(model.corrections()) == set(range(6)) - set(model.schedule.refresh)
    labels = torch.tensor([1, 7])
    img = cached_sample(model, labels, seed=3)
    restored = pq.load(pq.save(qm, tmp_path / "cq.safetensors"))
    assert restored.model.schedule == model.schedule
    assert torch.equal(cached_sample(restored.model, labels, seed=3), img)
    packed = pq.load(tmp_path / "cq.safetensors", mode="packed", cpu_dtype=torch.float32)
    assert psnr(img, cached_sample(packed.model, labels, seed=3)) > 40


def test_cachequant_errors(unet: nn.Module) -> None:
    calib = timestep_batches(unet, torch.arange(2), steps=4, scheduler="ddim", seed=0)
    with pytest.raises(UsageError, match="exceeds the 4 sampling steps"):
        pq.quantize(unet, CacheQuantConfig(steps=4, interval=5), calib=calib, progress=False)
    with pytest.raises(UsageError, match="not whole sampling runs"):
        pq.quantize(unet, CacheQuantConfig(steps=3, interval=1), calib=calib, progress=False)
    with pytest.raises(UsageError, match="other timesteps"):
        split_runs(calib + timestep_batches(unet, torch.arange(2), steps=2, scheduler="ddim", seed=0) * 2, 4)
    with pytest.raises(ValueError, match="interval"):
        CacheQuantConfig(interval=0)
    dit = build_model({"name": "digits-dit"})
    with pytest.raises(UsageError, match="quantizes diffusers UNets"):
        pq.quantize(dit, CacheQuantConfig(steps=4, interval=2), calib=calib, progress=False)


def test_cachequant_accuracy_on_the_digits_unet(unet: nn.Module) -> None:
    """W8A8 with the cache every 2 of 10 DDIM steps: quantization alone is near-lossless, DPS's schedule costs no
    more than the uniform one, DEC(cache) lowers the cached feature's error on the calibration runs (least squares),
    and the full method's samples stay close to the float ones and are classified right."""
    from polyquant.plugins.diffusion.cache import dec_cache, group_costs, record_features, schedule_cost
    from polyquant.plugins.diffusion.models import class_accuracy

    steps, labels = 10, torch.arange(20) % 10
    calib = timestep_batches(unet, torch.arange(16) % 10, steps=steps, scheduler="ddim", seed=0)
    fp = sample(unet.unet, labels, steps=steps, scheduler="ddim", seed=100)
    quant_only = pq.quantize(unet, CacheQuantConfig(steps=steps, interval=1), calib=calib, progress=False).model
    assert psnr(fp, cached_sample(quant_only, labels, seed=100)) > 30
    full = pq.quantize(unet, CacheQuantConfig(steps=steps, interval=2), calib=calib, progress=False).model
    feats = record_features(unet, lambda: [unet(b) for b in calib])
    costs = group_costs(feats)
    assert schedule_cost(full.schedule, costs) <= schedule_cost(uniform_schedule(steps, 2), costs) + 1e-9
    for t, (a, b) in dec_cache(feats, full.schedule, 1).items():
        r = full.schedule.source(t)
        raw = (feats[t] - feats[r]).pow(2).sum()
        assert (feats[t] - (a.view(1, -1, 1, 1) * feats[r] + b.view(1, -1, 1, 1))).pow(2).sum() <= raw
    img = cached_sample(full, labels, seed=100)
    assert psnr(fp, img) > 25 and class_accuracy(img, labels) >= 90
