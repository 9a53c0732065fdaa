"""The audio methods: bandwidth accounting, what each method's fit must beat, and the command line with a user's
WAV file (codes and decoded audio written, decoded again from the code file bit-exactly)."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import polyquant as pq
from polyquant.cli import main
from polyquant.config import UsageError
from polyquant.plugins.audio import synth
from polyquant.plugins.audio.codes import load_codes
from polyquant.plugins.audio.fsq import FSQConfig, ProjectedFSQ
from polyquant.plugins.audio.grvq import GRVQConfig
from polyquant.plugins.audio.methods import bottleneck_for, latent_frames, synthetic_batches
from polyquant.plugins.audio.metrics import code_usage, si_sdr, sqnr
from polyquant.plugins.audio.models import build_model
from polyquant.plugins.audio.ptq import PTQConfig
from polyquant.plugins.audio.rvq import RVQConfig, stages_for
from polyquant.nn import Calibration

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codec_and_data() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    model = build_model({"name": "tiny-rvq"})
    calib = synthetic_batches(24, seed=1, seconds=1.0, batch_size=8)
    held_out = torch.cat(synthetic_batches(4, seed=99, seconds=1.0, batch_size=4))
    return model, calib, held_out


def test_stages_follow_encodecs_bandwidth_rule() -> None:
    assert stages_for(2.0, 50, 1024) == 4  # the shipped codecs: 50 Hz x 4 x 10 bits
    assert [stages_for(bw, 75, 1024) for bw in (1.5, 3, 6, 12, 24)] == [2, 4, 8, 16, 32]  # EnCodec 24 kHz
    assert stages_for(2.0, 50, 1024, groups=2) == 2  # HiFi-Codec 16 kHz: 2 groups x 2 layers
    model = build_model({"name": "tiny-rvq"})
    assert bottleneck_for(RVQConfig(bandwidth=2.0), model).num_quantizers == 4
    assert bottleneck_for(FSQConfig(bandwidth=2.0), model).groups == 4  # 4 x log2(1000) = 39.9 bits per frame
    with pytest.raises(UsageError, match="below one stage"):
        bottleneck_for(RVQConfig(bandwidth=0.4), model)
    with pytest.raises(UsageError, match="do not split"):
        bottleneck_for(GRVQConfig(groups=3, bandwidth=3.0), model)


def _latent_quality(q: torch.nn.Module, z: torch.Tensor, z_fit: torch.Tensor, k: int) -> tuple[float, float]:
    """(held-out latent SQNR, share of codes no calibration frame uses)."""
    codes = q.encode(z_fit)
    dead = np.mean([code_usage(c, k)[1] for c in codes.reshape(-1, codes.shape[-1]).T])
    return sqnr(q.decode(q.encode(z)), z), float(dead)


def test_rvq_kmeans_and_restart_beat_the_plain_ema_fit(codec_and_data) -> None:
    model, calib, held_out = codec_and_data
    z, z_fit = latent_frames(model, Calibration([held_out])), latent_frames(model, Calibration(calib))
    ours = pq.quantize(model, RVQConfig(codebook_size=64, bandwidth=1.2, kmeans_iters=10, epochs=2), calib=calib,
                       progress=False).model
    plain = pq.quantize(model, RVQConfig(codebook_size=64, bandwidth=1.2, kmeans_iters=0, epochs=3,
                                         threshold_dead_code=0.0), calib=calib, progress=False).model
    s_ours, dead_ours = _latent_quality(ours.quantizer, z, z_fit, 64)
    s_plain, dead_plain = _latent_quality(plain.quantizer, z, z_fit, 64)
    assert s_ours > s_plain + 1.0 and dead_ours < 0.05 < dead_plain
    assert si_sdr(ours(held_out), held_out) > si_sdr(plain(held_out), held_out)


def test_grvq_fits_a_group_residual_bottleneck(codec_and_data) -> None:
    model, calib, held_out = codec_and_data
    qm = pq.quantize(model, GRVQConfig(codebook_size=64, bandwidth=1.2, kmeans_iters=10, epochs=1), calib=calib,
                     progress=False)
    codes = qm.model.encode(held_out)
    assert codes.shape == (4, 50, 2, 2)  # (B, T', groups, layers): 50 Hz x 4 codes x 6 bits = 1.2 kbps
    z = latent_frames(model, Calibration([held_out]))
    assert sqnr(qm.model.quantizer.decode(qm.model.quantizer.encode(z)), z) > 3.0


def test_fsq_projection_is_pca_and_its_scale_searched(codec_and_data) -> None:
    model, calib, held_out = codec_and_data
    fsq_codec = pq.quantize(model, FSQConfig(), calib=calib, progress=False).model
    q = fsq_codec.quantizer
    assert isinstance(q, ProjectedFSQ)
    # 4 FSQ groups of 1000 codes per frame at 50 frames/s: the codec's bitrate counts the FSQ grid's codes
    assert fsq_codec.codebook_size == 1000 and abs(fsq_codec.bitrate() - 50 * 4 * math.log2(1000)) < 1e-9
    assert torch.allclose(q.proj.T @ q.proj, torch.eye(16), atol=1e-4)  # orthonormal directions
    z = latent_frames(model, Calibration(calib))
    var = ((z - q.mean) @ q.proj).var(0)
    assert bool((var[:-1] >= var[1:] - 1e-3).all())  # principal directions, largest first
    codes = q.encode(z)
    assert codes.shape == (len(z), 4) and int(codes.max()) < 1000
    assert sqnr(q.decode(codes), z) > 0


def test_ptq_int8_is_closer_to_float_than_int4(codec_and_data) -> None:
    model, calib, held_out = codec_and_data
    with torch.no_grad():
        ref = model(held_out)
        outs = {bits: pq.quantize(model, PTQConfig(weight_bits=bits), calib=calib, progress=False).model(held_out)
                for bits in (8, 4)}
    assert sqnr(outs[8], ref) > 25 and sqnr(outs[4], ref) < sqnr(outs[8], ref)


def _wav(path: Path, seconds: float, channels: int = 1, rate: int = 16_000) -> Path:
    x = synth.clip(7, seconds=seconds, sr=rate)
    data = np.repeat(x[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.round(data * 32767).astype("<i2").tobytes())
    return path


def test_command_line_encodes_a_users_wav_and_decodes_its_codes(tmp_path: Path, capsys) -> None:
    wav = _wav(tmp_path / "speech.wav", 1.5)
    art = tmp_path / "rvq.safetensors"
    rc = main(["quantize", "audio/rvq", "--input", str(wav), "--bandwidth", "2", "--codebook-size", "256",
               "--kmeans-iters", "3", "--epochs", "1", "--calib-clips", "4", "--quiet", "--out", str(art)])
    out = capsys.readouterr().out
    assert rc == 0, out
    codes_file, decoded = tmp_path / "rvq.codes.safetensors", tmp_path / "rvq.decoded.wav"
    assert codes_file.is_file() and decoded.is_file() and "kbps" in out
    codes, header = load_codes(codes_file)
    assert codes.shape == (1, 75, 5) and header["bits"] == 8  # 2 kbps / (50 Hz x 8 bits) = 5 stages
    rc = main(["load", str(art), "--codes", str(codes_file), "--wav-out", str(tmp_path / "again.wav")])
    assert rc == 0
    assert (tmp_path / "again.wav").read_bytes() == decoded.read_bytes()  # codes -> file -> decode: bit-exact
    rc = main(["load", str(art), "--codes", str(codes_file), "--levels", "1", "--wav-out", str(tmp_path / "l1.wav")])
    assert rc == 0 and "0.40 kbps" in capsys.readouterr().out
    rc = main(["load", str(art), "--mode", "packed", "--input", str(wav), "--wav-out", str(tmp_path / "p.wav")])
    assert rc == 0 and "SI-SDR" in capsys.readouterr().out


def test_command_line_errors_leave_files_alone(tmp_path: Path, capsys) -> None:
    stereo = _wav(tmp_path / "stereo.wav", 0.5, channels=2)
    art = tmp_path / "a.safetensors"
    rc = main(["quantize", "audio/fsq", "--input", str(stereo), "--calib-clips", "2", "--quiet", "--out", str(art)])
    assert rc == 2 and "mono" in capsys.readouterr().err and not art.exists()
    rc = main(["quantize", "audio/fsq", "--input", str(stereo), "--downmix", "--calib-clips", "2", "--quiet",
               "--out", str(art)])
    assert rc == 0 and art.is_file()
    before = stereo.read_bytes()
    rc = main(["load", str(art), "--input", str(stereo), "--downmix", "--wav-out", str(stereo)])
    assert rc == 2 and stereo.read_bytes() == before  # never overwrites its input
    rc = main(["load", str(art), "--codes", str(stereo)])
    assert rc == 2 and "not a" in capsys.readouterr().err
