"""WAV input / output with its errors, and the audio / codebook metrics against hand-computed values."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from polyquant.config import UsageError
from polyquant.plugins.audio import synth
from polyquant.plugins.audio.metrics import (MelLoss, code_usage, mel_distance, pesq_wb, si_sdr, sqnr, stft_distance,
                                             stoi)
from polyquant.plugins.audio.wavio import read_wav, write_wav

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_pcm(path: Path, data: np.ndarray, rate: int, width: int = 2) -> None:
    """data (T, C) float in [-1, 1] as PCM of ``width`` bytes."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(data.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        if width == 2:
            f.writeframes(np.round(data * 32767).astype("<i2").tobytes())
        else:  # 24-bit little endian
            v = np.round(data * (2**23 - 1)).astype(np.int32).reshape(-1)
            b = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8)
            f.writeframes(b.tobytes())


def test_wav_round_trip_and_formats(tmp_path: Path) -> None:
    x = torch.from_numpy(synth.clip(1, seconds=0.25))
    path = write_wav(tmp_path / "a.wav", x, 16_000)
    back = read_wav(path, 16_000)
    assert back.shape == (1, x.numel()) and float((back[0] - x).abs().max()) <= 0.5 / 32768 + 1e-7
    _write_pcm(tmp_path / "b24.wav", x.numpy()[:, None].astype(np.float64), 16_000, width=3)
    assert float((read_wav(tmp_path / "b24.wav", 16_000)[0] - x).abs().max()) < 1e-6


def test_wav_resample_downmix_and_errors(tmp_path: Path) -> None:
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    _write_pcm(tmp_path / "8k.wav", tone[:, None], 8000)
    up = read_wav(tmp_path / "8k.wav", 16_000)
    assert up.shape == (1, 16_000)  # resampled by torchaudio
    _write_pcm(tmp_path / "stereo.wav", np.stack([tone, -tone * 0.5], axis=1), 16_000)
    with pytest.raises(UsageError, match="mono"):
        read_wav(tmp_path / "stereo.wav", 16_000)
    mixed = read_wav(tmp_path / "stereo.wav", 16_000, downmix=True)
    assert torch.allclose(mixed[0], torch.from_numpy(tone * 0.25).float(), atol=1e-4)
    _write_pcm(tmp_path / "silent.wav", np.zeros((100, 1)), 16_000)
    with pytest.raises(UsageError, match="silent"):
        read_wav(tmp_path / "silent.wav", 16_000)
    _write_pcm(tmp_path / "empty.wav", np.zeros((0, 1)), 16_000)
    with pytest.raises(UsageError, match="empty"):
        read_wav(tmp_path / "empty.wav", 16_000)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(UsageError, match="not a PCM WAV"):
        read_wav(tmp_path / "text.wav", 16_000)
    with pytest.raises(UsageError, match="no such file"):
        read_wav(tmp_path / "missing.wav", 16_000)


def test_si_sdr_and_sqnr_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16000, generator=g)
    x = x - x.mean(-1, keepdim=True)
    noise = torch.randn(4, 16000, generator=g)
    noise = noise - noise.mean(-1, keepdim=True)
    noise = noise - (noise * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True) * x  # orthogonal to x
    noise = noise / noise.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True) * 10 ** (-20 / 20)
    # y = 3 (x + n): SI-SDR ignores the scale, 20 dB by construction
    assert math.isclose(si_sdr(3 * (x + noise), x), 20.0, abs_tol=1e-6)
    assert math.isclose(sqnr(x + noise, x), 20.0, abs_tol=1e-6)


def test_code_usage_by_hand() -> None:
    perplexity, dead = code_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert math.isclose(perplexity, 2.0) and dead == 0.5
    perplexity, dead = code_usage(torch.arange(8), 8)
    assert math.isclose(perplexity, 8.0) and dead == 0.0


def test_spectral_distances_and_perceptual_scores() -> None:
    x = torch.from_numpy(synth.dataset(2, seed=3, seconds=1.0))[:, None]
    assert mel_distance(x, x) == 0.0 and stft_distance(x, x) < 1e-6
    noisy = x + 0.05 * torch.randn_like(x)
    noisier = x + 0.2 * torch.randn_like(x)
    assert 0 < mel_distance(noisy, x) < mel_distance(noisier, x)
    assert 0 < stft_distance(noisy, x) < stft_distance(noisier, x)
    loss = MelLoss()
    assert float(loss(x, x)) == 0.0 and float(loss(noisy, x)) < float(loss(noisier, x))
    speech = torch.from_numpy(synth.speech(16000, np.random.default_rng(0)).astype(np.float32))[None]
    speech = speech / speech.abs().max() * 0.5
    p_clean, p_noisy = pesq_wb(speech, speech), pesq_wb(speech + 0.05 * torch.randn_like(speech), speech)
    s_clean, s_noisy = stoi(speech, speech), stoi(speech + 0.05 * torch.randn_like(speech), speech)
    if p_clean is not None:  # pip pesq installed (the audio extra)
        assert p_clean > 4.0 and p_noisy < p_clean
    if s_clean is not None:
        assert s_clean > 0.99 and s_noisy < s_clean
