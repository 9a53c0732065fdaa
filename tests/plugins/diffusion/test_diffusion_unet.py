"""The shipped digits UNet (issue 26's tiny real task): loads, samples recognisable digits, and runs under the
feature cache inside the sampling loop (DEC improving the cached samples)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from polyquant.checkpoint import read_checkpoint_metadata
from polyquant.plugins.diffusion import models as M
from polyquant.plugins.diffusion.cache import FeatureCache, dec_cache, record_features, uniform_schedule
from polyquant.plugins.diffusion.unet import UNET_PATH, UNET_SHIPPED, build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE_MARGIN = 15.0  # the record's accuracy on 100 samples minus this, for 50 samples


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return build_unet({"name": UNET_SHIPPED})


def test_shipped_unet_loads_and_samples_digits(unet: torch.nn.Module) -> None:
    from diffusers import UNet2DModel

    from polyquant.api import model_description

    assert UNET_PATH.stat().st_size < 3 * 2**20
    assert isinstance(unet, UNet2DModel) and not unet.training and len(unet.up_blocks) == 2
    assert model_description(unet) == {"name": UNET_SHIPPED}
    record = json.loads(read_checkpoint_metadata(UNET_PATH)["train"])
    labels = torch.arange(50) % 10
    images = M.sample(unet, labels, steps=20, seed=1)
    assert images.shape == (50, 1, 8, 8)
    assert M.class_accuracy(images, labels) >= record["sample_accuracy_ddim20"] - SAMPLE_MARGIN
    state = torch.random.get_rng_state()
    a, b = build_unet({"block_out_channels": [8, 16], "seed": 2}), build_unet({"block_out_channels": [8, 16], "seed": 2})
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    for bad in ({"name": "nope"}, {"depth": 2}, {"block_out_channels": [8]}, {"sample_size": 7}):
        with pytest.raises(ValueError):
            build_unet(bad)


def test_unet_feature_cache_and_dec_in_the_sampling_loop(unet: torch.nn.Module) -> None:
    labels = torch.arange(16) % 10
    steps = 20
    full = M.sample(unet, labels, steps=steps, seed=4)
    feats = record_features(unet, lambda: M.sample(unet, labels, steps=steps, seed=4))
    assert feats.shape[:2] == (steps, 16) and feats.shape[2] == unet.up_blocks[-2].resnets[-1].out_channels
    schedule = uniform_schedule(steps, 3)
    with FeatureCache(unet, schedule):
        cached = M.sample(unet, labels, steps=steps, seed=4)
    assert 25 < M.psnr(full, cached) < math.inf  # measured 38.8 dB at N = 3 over 50 steps (32 samples)
    # DEC's per-channel fit brings the cached feature closer to the true one (least squares, in sample). On this
    # UNet it does not carry over to the samples (measured -0.5 to -0.9 dB at N = 2, 3, 5; +0.5 to +2.9 dB on the
    # digits DiT): the quantization-side DEC of issue 26 is still to come, so no sample-level claim here.
    corrections = dec_cache(feats, schedule, channel_dim=1)
    for t, (a, b) in corrections.items():
        src = feats[schedule.source(t)]
        fixed = a.view(1, -1, 1, 1) * src + b.view(1, -1, 1, 1)
        assert float((fixed - feats[t]).pow(2).sum()) <= float((src - feats[t]).pow(2).sum()) + 1e-6
