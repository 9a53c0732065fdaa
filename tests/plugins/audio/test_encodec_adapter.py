"""EnCodec from the ``encodec`` package and from ``transformers`` as a codec: the adapter's codes are EnCodec's own,
and the plugin's methods run on it and round-trip through an artifact (random-init models: no hub here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import polyquant as pq
from polyquant.plugins.audio import synth
from polyquant.plugins.audio.encodec_adapter import build_encodec, from_encodec, from_transformers
from polyquant.plugins.audio.ptq import PTQConfig
from polyquant.plugins.audio.rvq import RVQConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_HF = {"sampling_rate": 8000, "num_filters": 4, "hidden_size": 16, "upsampling_ratios": [4, 2],
           "codebook_size": 64, "target_bandwidths": [6.0, 12.0], "num_lstm_layers": 1}


def _randomize_codebooks(books: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in books:
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # encodec's own
def test_encodec_package_codes_match_encodecs_own() -> None:
    encodec = pytest.importorskip("encodec")
    torch.manual_seed(0)
    model = encodec.EncodecModel.encodec_model_24khz(pretrained=False).eval()
    model.set_target_bandwidth(3.0)  # 4 codebooks at 75 Hz
    _randomize_codebooks([layer.codebook for layer in model.quantizer.vq.layers], 1)
    for layer in model.quantizer.vq.layers:  # trained codebooks: no k-means on the first batch
        layer._codebook.inited.fill_(True)
    x = torch.from_numpy(synth.clip(3, seconds=0.2, sr=24_000))[None, None]
    with torch.no_grad():
        (theirs, _), = model.encode(x)  # (B, n_q, T)
        codec = from_encodec(model, bandwidth=3.0)
        ours = codec.encode(x)  # (B, T, n_q), weight norm folded, kernels' search
        assert codec.bitrate() == 3000.0 and ours.shape == (1, 15, 4)
        assert torch.equal(ours, theirs.transpose(1, 2))
        y = codec.decode(ours)
        assert torch.allclose(y, model.decode([(theirs, None)]), atol=1e-5)
    int8 = pq.quantize(codec, PTQConfig(), calib=[x], progress=False).model
    with torch.no_grad():
        assert torch.isfinite(int8(x)).all()


def test_transformers_encodec_methods_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    config = {"transformers": TINY_HF, "bandwidth": 12.0, "seed": 0}
    codec = build_encodec(config)
    assert codec.bitrate() == 12000.0  # 1000 Hz x 2 codebooks x 6 bits
    x = torch.from_numpy(synth.dataset(4, seed=5, seconds=0.2))[:, None]
    x = x[..., : 1600]  # 0.2 s at 8 kHz
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    hf = EncodecModel(EncodecConfig(**TINY_HF)).eval()
    _randomize_codebooks([layer.codebook.embed for layer in hf.quantizer.layers], 2)
    with torch.no_grad():
        theirs = hf.quantizer.encode(hf.encoder(x), bandwidth=12.0)  # (n_q, B, T)
        assert torch.equal(from_transformers(hf, 12.0).encode(x), theirs.permute(1, 2, 0))
    qm = pq.quantize(codec, RVQConfig(bandwidth=12.0, codebook_size=64, kmeans_iters=5, epochs=1), calib=[x],
                     progress=False)
    with torch.no_grad():
        out = qm.model(x)
    restored = pq.load(pq.save(qm, tmp_path / "hf.safetensors"))
    with torch.no_grad():
        assert torch.equal(restored.model(x), out)
