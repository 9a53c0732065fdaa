"""The tiny codec, its kernel encode / decode path, token grids and code files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from polyquant.plugins.audio import synth
from polyquant.plugins.audio.codec import HOP, TinyCodec, bitrate, codebook_sizes, make_quantizer
from polyquant.plugins.audio.codes import (code_bits, cumulative_embedding, from_token_grid, kernel_decode,
                                           kernel_encode, load_codes, save_codes, token_grid)
from polyquant.plugins.audio.models import SHIPPED, SHIPPED_PATHS, build_model, shipped_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clips(n: int, seed: int, seconds: float = 0.5) -> torch.Tensor:
    return torch.from_numpy(synth.dataset(n, seed=seed, seconds=seconds))[:, None]


def test_bitrate_is_frame_rate_times_code_bits() -> None:
    assert HOP == 320
    assert bitrate(16_000, 320, [1024] * 4) == 2000.0  # 50 Hz x 4 x 10 bits
    assert bitrate(24_000, 320, [1024] * 8) == 6000.0  # EnCodec 24 kHz, 6 kbps = 8 codebooks
    assert math.isclose(bitrate(16_000, 320, [1000] * 4), 50 * 4 * math.log2(1000))
    for name in SHIPPED:
        assert build_model({"name": name}).bitrate() == 2000.0


def test_shipped_checkpoints_are_small_and_trained() -> None:
    from polyquant.plugins.audio.metrics import mel_distance

    x = _clips(4, seed=4242, seconds=1.0)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * x.std(-1, keepdim=True)
    for name, path in SHIPPED_PATHS.items():
        assert path.stat().st_size < 5 * 2**20, name
        record = shipped_record(name)
        assert record["steps"] >= 1000, (name, record)
        model = build_model({"name": name})
        assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.7e6
        with torch.no_grad():
            y = model(x)
        # far closer to the input than noise of its loudness (a silent output scores about 14)
        assert mel_distance(y, x) < 0.5 * mel_distance(noise, x), name


def test_codec_shapes_and_padding() -> None:
    model = build_model({"quantizer": {"kind": "grvq", "groups": 2, "num_quantizers": 2, "codebook_size": 16}})
    x = torch.randn(2, 1, 1000)  # not a multiple of the hop: padded to 4 frames
    codes = model.encode(x)
    assert codes.shape == (2, 4, 2, 2)
    assert model.decode(codes).shape == (2, 1, 4 * HOP)
    assert model(x).shape == x.shape
    with pytest.raises(Exception, match="quantizer kind"):
        make_quantizer({"kind": "lfq"}, 64)


@pytest.mark.parametrize("kind", ["rvq", "grvq"])
def test_kernel_path_gives_the_modules_codes_and_frames(kind: str) -> None:
    model = build_model({"name": f"tiny-{kind}"})
    z = model.latent(_clips(3, seed=5))
    q = model.quantizer
    codes = q.encode(z)  # the core module's torch search
    assert torch.equal(kernel_encode(q, z), codes)
    assert torch.equal(model.encode(_clips(3, seed=5)), codes)
    assert torch.allclose(kernel_decode(q, codes), q.decode(codes), atol=1e-6)
    # bitrate scalability: the first n stages' codes are a prefix of the full codes
    first = kernel_encode(q, z, 1)
    assert torch.equal(first, codes[..., :1])


def test_token_grid_order_and_cumulative_embedding() -> None:
    codes = torch.arange(2 * 3 * 2 * 2).view(2, 3, 2, 2)  # (B, T, G, n)
    tokens = token_grid(codes)
    # HiFi-Codec's order: L0g0, L0g1, L1g0, L1g1
    assert tokens[0, 0].tolist() == [codes[0, 0, 0, 0], codes[0, 0, 1, 0], codes[0, 0, 0, 1], codes[0, 0, 1, 1]]
    assert torch.equal(from_token_grid(tokens, 2), codes)
    model = build_model({"name": "tiny-grvq"})
    q = model.quantizer
    c = q.encode(model.latent(_clips(1, seed=3)))
    t = token_grid(c)
    full = cumulative_embedding(q, t, torch.ones_like(t, dtype=torch.bool))
    assert torch.allclose(full, q.decode(c), atol=1e-6)
    # masking the deepest level only: the sum of the level-1 codewords of both groups
    mask = torch.zeros_like(t, dtype=torch.bool)
    mask[..., 2:] = True
    deep = cumulative_embedding(q, t, mask)
    by_hand = torch.cat([q.quantizers[g].layers[1].embed[c[..., g, 1]] for g in range(2)], dim=-1)
    assert torch.allclose(deep, by_hand, atol=1e-6)


def test_code_file_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = build_model({"name": "tiny-rvq"})
    x = _clips(2, seed=8)
    codes = model.encode(x)
    path = save_codes(tmp_path / "c.safetensors", codes, 1024, {"sample_rate": 16_000, "hop": 320})
    # 10 bits per code, packed: the file is about a fifth of int64 codes plus a header
    assert path.stat().st_size < codes.numel() * 10 / 8 + 1024
    back, header = load_codes(path)
    assert torch.equal(back, codes) and header["bits"] == code_bits(1024) == 10
    assert torch.equal(model.decode(back), model.decode(codes))  # encode -> save -> load -> decode: bit-exact
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        save_codes(tmp_path / "bad.safetensors", codes + 1024, 1024, {})
    # a forged header (K smaller than the stored codes) is refused with the file named
    from polyquant.checkpoint import read_checkpoint, save_checkpoint

    tensors, meta = read_checkpoint(path)
    meta["polyquant_codes"] = meta["polyquant_codes"].replace('"codebook_size": 1024', '"codebook_size": 600')
    save_checkpoint(tensors, tmp_path / "forged.safetensors", meta)
    with pytest.raises(ValueError, match="out of range"):
        load_codes(tmp_path / "forged.safetensors")
    save_checkpoint({"x": torch.zeros(3)}, tmp_path / "other.safetensors", {})
    with pytest.raises(ValueError, match="not a polyquant audio code file"):
        load_codes(tmp_path / "other.safetensors")


def test_training_forward_quantizer_dropout_and_losses() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer({"kind": "rvq", "num_quantizers": 4, "codebook_size": 32}, 16)
    model = TinyCodec(quantizer, channels=2, dim=16).train()
    x = _clips(4, seed=1, seconds=0.2)
    used = set()
    for _ in range(8):
        y, codes, loss = model.reconstruct(x)
        used.add(int((codes[0, 0] >= 0).sum()))  # stages used this step (dropped ones are -1)
        loss.backward()
    assert y.shape == x.shape and len(used) > 1
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert codebook_sizes(quantizer) == [32] * 4


def test_dac_style_codec_trains_and_codes_by_cosine() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer({"kind": "dac", "num_quantizers": 4, "codebook_size": 1024, "code_dim": 8}, 64)
    model = TinyCodec(quantizer, channels=2, dim=64)
    assert model.bitrate() == 2000.0 and codebook_sizes(quantizer) == [1024] * 4
    model.train()
    x = _clips(2, seed=2, seconds=0.2)
    y, codes, loss = model.reconstruct(x)
    (torch.nn.functional.l1_loss(y, x) + loss).backward()
    used = int((codes[0, 0] >= 0).sum())  # quantizer dropout: the first n stages ran
    assert all(layer.out_proj.parametrizations.weight.original1.grad is not None for layer in quantizer.layers[:used])
    model.eval()
    codes = model.encode(x)  # cosine search: the module path (the kernels search by L2)
    assert codes.shape == (2, 10, 4) and not model._kernels()
    with pytest.raises(ValueError, match="no kernel path"):
        kernel_encode(quantizer, model.latent(x))
    assert model.decode(codes).shape == (2, 1, 3200)
