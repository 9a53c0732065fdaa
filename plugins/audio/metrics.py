"""Audio and codebook metrics.

    MelLoss()(y, x) -> multi-resolution log-mel L1 (the tiny codec's training loss)
    mel_distance(y, x, sr) -> DAC-style multi-scale log-mel L1 (windows 32..2048, mels 5..320)
    stft_distance(y, x) -> multi-resolution STFT distance (spectral convergence + log-magnitude L1, auraloss-style)
    si_sdr(y, x) -> scale-invariant SDR in dB (per clip, then averaged)
    pesq_wb(y, x, sr) / stoi(y, x, sr) -> mean PESQ-WB / STOI (pip ``pesq`` / ``pystoi``; None when not installed)
    sqnr(x_hat, x) -> 10 log10(|x|^2 / |x - x_hat|^2) in dB
    code_usage(codes, k) -> (perplexity exp(H), dead-code share) of one codebook's codes

Waveforms are (B, 1, T) or (B, T) float tensors; ``y`` is the reconstruction, ``x`` the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.metrics import sqnr  # re-exported: the audio metrics in one place

__all__ = ["MelLoss", "mel_distance", "stft_distance", "si_sdr", "pesq_wb", "stoi", "sqnr", "code_usage"]

_DAC_MEL = ((32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160), (2048, 320))  # (window, mels)


def _flat(w: Tensor) -> Tensor:
    return w.reshape(-1, w.shape[-1]).float()  # (B, T)


def _mel_fb(n_fft: int, n_mels: int, sr: int, device: torch.device) -> Tensor:
    import torchaudio

    return torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sr / 2, n_mels, sr, norm="slaney",
                                                 mel_scale="slaney").to(device)  # (F, M)


def _magnitude(w: Tensor, n_fft: int, hop: int) -> Tensor:
    win = torch.hann_window(n_fft, device=w.device)
    return torch.stft(w, n_fft, hop, window=win, return_complex=True).abs()  # (B, F, frames)


def _log_mel_l1(y: Tensor, x: Tensor, n_fft: int, fb: Tensor) -> Tensor:
    """mean |ln mel(y) - ln mel(x)| of (B, T) waveforms: magnitudes at hop n_fft / 4 through the (F, M) filterbank,
    clamped at 1e-5."""
    my = (_magnitude(y, n_fft, n_fft // 4).transpose(1, 2) @ fb).clamp_min(1e-5).log()
    mx = (_magnitude(x, n_fft, n_fft // 4).transpose(1, 2) @ fb).clamp_min(1e-5).log()
    return (my - mx).abs().mean()


class MelLoss(nn.Module):
    """Multi-resolution log-mel L1: mean over ``resolutions`` of |log mel(y) - log mel(x)| (clamped at 1e-5)."""

    def __init__(self, sr: int = 16_000, resolutions: tuple[tuple[int, int], ...] = ((256, 32), (512, 64), (1024, 80))):
        super().__init__()
        self.sr, self.resolutions = sr, resolutions
        for n_fft, mels in resolutions:
            self.register_buffer(f"fb_{n_fft}", _mel_fb(n_fft, mels, sr, torch.device("cpu")), persistent=False)

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        y, x = _flat(y), _flat(x)
        total = y.new_zeros(())
        for n_fft, _ in self.resolutions:
            total = total + _log_mel_l1(y, x, n_fft, getattr(self, f"fb_{n_fft}"))
        return total / len(self.resolutions)


@torch.no_grad()
def mel_distance(y: Tensor, x: Tensor, sr: int = 16_000) -> float:
    """DAC's multi-scale mel distance: windows 32..2048 with 5..320 mels (hop window / 4), log10 magnitudes
    clamped at 1e-5, L1, summed over scales."""
    y, x = _flat(y), _flat(x)
    total = 0.0
    for n_fft, mels in _DAC_MEL:
        total += float(_log_mel_l1(y, x, n_fft, _mel_fb(n_fft, mels, sr, y.device))) / math.log(10)  # log10
    return total


@torch.no_grad()
def stft_distance(y: Tensor, x: Tensor, ffts: tuple[int, ...] = (512, 1024, 2048)) -> float:
    """Multi-resolution STFT distance (auraloss ``MultiResolutionSTFTLoss`` defaults, hop fft/4): mean over
    resolutions of spectral convergence ||X| - |Y||_F / ||X||_F plus the L1 of log magnitudes."""
    y, x = _flat(y), _flat(x)
    total = 0.0
    for n_fft in ffts:
        my, mx = _magnitude(y, n_fft, n_fft // 4), _magnitude(x, n_fft, n_fft // 4)
        sc = torch.linalg.norm(mx - my) / torch.linalg.norm(mx).clamp_min(1e-12)
        mag = (my.clamp_min(1e-7).log() - mx.clamp_min(1e-7).log()).abs().mean()
        total += float(sc + mag)
    return total / len(ffts)


@torch.no_grad()
def si_sdr(y: Tensor, x: Tensor) -> float:
    """Scale-invariant SDR (Le Roux et al. 2019), dB, mean over clips: the zero-mean reference scaled by
    <y, x> / |x|^2 against the residual."""
    y, x = _flat(y).double(), _flat(x).double()
    y, x = y - y.mean(-1, keepdim=True), x - x.mean(-1, keepdim=True)
    alpha = (y * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True).clamp_min(1e-12)
    target = alpha * x
    ratio = (target * target).sum(-1) / ((y - target) ** 2).sum(-1).clamp_min(1e-12)
    return float((10 * torch.log10(ratio.clamp_min(1e-12))).mean())


def pesq_wb(y: Tensor, x: Tensor, sr: int = 16_000) -> float | None:
    """Mean wide-band PESQ (ITU-T P.862.2) over clips, or None without the ``pesq`` package (or on clips PESQ
    cannot score, e.g. silence)."""
    try:
        from pesq import pesq
    except (ImportError, OSError, RuntimeError):
        return None
    scores = []
    for a, b in zip(_flat(y).numpy(), _flat(x).numpy()):
        try:
            scores.append(pesq(sr, b, a, "wb"))
        except Exception:  # pesq raises its own NoUtterancesError on clips without speech-like activity
            continue
    return sum(scores) / len(scores) if scores else None


def stoi(y: Tensor, x: Tensor, sr: int = 16_000) -> float | None:
    """Mean STOI over clips, or None without the ``pystoi`` package."""
    try:
        from pystoi import stoi as _stoi
    except (ImportError, OSError, RuntimeError):
        return None
    values = [_stoi(b, a, sr, extended=False) for a, b in zip(_flat(y).numpy(), _flat(x).numpy())]
    return float(sum(values) / len(values))


def code_usage(codes: Tensor, k: int) -> tuple[float, float]:
    """(perplexity exp(H) of the code histogram, share of the k codes never used) for one codebook's codes."""
    counts = torch.bincount(codes.reshape(-1).clamp_min(0).long(), minlength=k).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return math.exp(entropy), float((counts == 0).double().mean())
