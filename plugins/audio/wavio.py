"""WAV files in and out (the standard library's ``wave``: PCM 8 / 16 / 24 / 32-bit), checked for a codec.

    read_wav(path, sample_rate, *, downmix=False) -> (1, T) float32 in [-1, 1]   (resampled when the rates differ)
    write_wav(path, wav, sample_rate)                                          (16-bit PCM, atomic)
    check_audio(wav, what) -> wav                                               (mono, non-empty, finite, not silent)

Errors are one-line ``UsageError``s naming the file; an existing output file is only replaced once the new one is
complete.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polyquant.config import UsageError

__all__ = ["read_wav", "write_wav", "check_audio", "MAX_WAV_BYTES", "SILENCE"]

MAX_WAV_BYTES = 1 << 30
SILENCE = 1e-5  # peak |x| below this (about -100 dBFS) counts as silent


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # unsigned 8-bit
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    return np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)


def check_audio(wav: Tensor, what: str) -> Tensor:
    """``wav`` (C, T) or (T,) must be mono, non-empty, finite and not silent; returns it as (1, T) float32."""
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2 or wav.shape[0] != 1:
        raise UsageError(f"{what}: expected mono audio, got {wav.shape[0] if wav.dim() == 2 else tuple(wav.shape)} "
                         "channels (pass --downmix to average the channels)")
    if wav.shape[-1] == 0:
        raise UsageError(f"{what}: the audio is empty")
    if not bool(torch.isfinite(wav).all()):
        raise UsageError(f"{what}: the audio has NaN or Inf samples")
    if float(wav.abs().max()) < SILENCE:
        raise UsageError(f"{what}: the audio is silent (peak below {SILENCE:g}); nothing to encode or calibrate on")
    return wav.float()


def read_wav(path: str | os.PathLike[str], sample_rate: int, *, downmix: bool = False) -> Tensor:
    """A PCM WAV file as (1, T) float32 at ``sample_rate``: resampled (torchaudio) when the file's rate differs,
    channels averaged with ``downmix`` (else a stereo file is refused)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise UsageError(f"{p}: no such file")
        if p.stat().st_size > MAX_WAV_BYTES:
            raise UsageError(f"{p}: larger than {MAX_WAV_BYTES >> 20} MiB")
        with wave.open(str(p), "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(frames)
    except (wave.Error, EOFError) as e:
        raise UsageError(f"{p}: not a PCM WAV file ({e})") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot read ({e.strerror or e})") from None
    if width not in (1, 2, 3, 4) or channels < 1:
        raise UsageError(f"{p}: {8 * width}-bit samples are not supported (PCM 8/16/24/32-bit)")
    x = _pcm_to_float(raw, width)
    x = x[: len(x) // channels * channels].reshape(-1, channels).T  # (C, T)
    wav = torch.from_numpy(np.ascontiguousarray(x))
    if channels > 1 and downmix:
        wav = wav.mean(0, keepdim=True)
    wav = check_audio(wav, str(p))
    if rate != sample_rate:
        try:
            import torchaudio.functional as AF
        except (ImportError, OSError, RuntimeError):
            raise UsageError(f"{p}: sampled at {rate} Hz, the codec needs {sample_rate} Hz; install torchaudio to "
                             "resample, or resample the file yourself") from None
        wav = AF.resample(wav, rate, sample_rate)
    return wav


def write_wav(path: str | os.PathLike[str], wav: Tensor, sample_rate: int) -> Path:
    """(1, T) or (T,) float audio as 16-bit PCM (clipped to [-1, 1]); written to a temporary file, then renamed."""
    p = Path(path)
    x = wav.detach().float().reshape(-1).clamp(-1, 1).cpu().numpy()
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes()  # read_wav's scale
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(sample_rate)
            f.writeframes(pcm)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p
