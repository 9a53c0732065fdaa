"""Seeded synthetic 16 kHz audio in numpy: the tiny codec's training data and the benchmarks' test clips.

Kinds: harmonic tones with vibrato and an ADSR envelope, chirps, AM noise bursts (band-passed), and speech-like
signals (a jittered glottal pulse train with intonation through three moving formant resonators).
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
KINDS = ("harmonic", "chirp", "noise_burst", "speech")


def _envelope(n: int, rng: np.random.Generator) -> np.ndarray:
    a, d, r = (int(n * f) for f in rng.uniform([0.01, 0.05, 0.05], [0.1, 0.2, 0.3]))
    s = rng.uniform(0.4, 0.9)
    env = np.full(n, s)
    env[:a] = np.linspace(0, 1, a, endpoint=False)
    env[a:a + d] = np.linspace(1, s, d, endpoint=False)
    if r:
        env[n - r:] = np.linspace(s, 0, r)
    return env


def harmonic(n: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 400)
    vib = 1 + rng.uniform(0.005, 0.03) * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    phase = 2 * np.pi * np.cumsum(f0 * vib) / sr
    k = rng.integers(4, 11)
    x = sum(np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h ** rng.uniform(0.8, 1.5) for h in range(1, k + 1)
            if h * f0 < sr / 2 - 200)
    return x * _envelope(n, rng)


def chirp(n: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    f_a, f_b = rng.uniform(100, 1000), rng.uniform(1500, 6000)
    if rng.random() < 0.5:
        f_a, f_b = f_b, f_a
    t = np.arange(n) / sr
    f = f_a * (f_b / f_a) ** (t / t[-1]) if rng.random() < 0.5 else np.linspace(f_a, f_b, n)
    return np.sin(2 * np.pi * np.cumsum(f) / sr) * _envelope(n, rng)


def _resonator(x: np.ndarray, freq: np.ndarray, bw: float, sr: int) -> np.ndarray:
    # two-pole resonator with a time-varying centre frequency (sample by sample)
    r = np.exp(-np.pi * bw / sr)
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    c = 2 * r * np.cos(2 * np.pi * freq / sr)
    for i in range(len(x)):
        y0 = x[i] + c[i] * y1 - r * r * y2
        y[i], y2, y1 = y0, y1, y0
    return y * (1 - r)


def noise_burst(n: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    noise = rng.standard_normal(n)
    centre = np.full(n, rng.uniform(300, 5000))
    x = _resonator(noise, centre, rng.uniform(200, 2000), sr)
    bursts = np.zeros(n)
    for _ in range(rng.integers(2, 7)):
        start, length = rng.integers(0, n), rng.integers(n // 40, n // 6)
        bursts[start:start + length] = np.hanning(len(bursts[start:start + length]))
    return x * bursts / (np.abs(x).max() + 1e-9)


def speech(n: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 250) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6)))
    f0 *= 1 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(np.arange(1, n + 1))  # jitter
    phase = np.cumsum(f0) / sr
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per period
    source = np.convolve(pulses, np.exp(-np.arange(40) / 6.0))[:n]  # glottal-like decay
    x = np.zeros(n)
    vowels = rng.uniform([300, 900, 2400], [800, 2300, 3000], size=(rng.integers(2, 5), 3))
    knots = np.linspace(0, n - 1, len(vowels))
    for j, bw in enumerate((80, 120, 160)):
        x += _resonator(source, np.interp(np.arange(n), knots, vowels[:, j]), bw, sr) / (j + 1)
    syll = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
    return x * syll * _envelope(n, rng)


GENERATORS = {"harmonic": harmonic, "chirp": chirp, "noise_burst": noise_burst, "speech": speech}


def clip(seed: int, seconds: float = 1.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One clip (n,) float32, peak 0.5: one or two sources of random kinds plus -50 dB noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    kinds = rng.choice(KINDS, size=rng.integers(1, 3), replace=False)
    parts = [GENERATORS[k](n, rng, sr) for k in kinds]
    x = sum(p / (np.abs(p).max() + 1e-9) * rng.uniform(0.5, 1.0) for p in parts)
    x = x / (np.abs(x).max() + 1e-9) * 0.5
    x = x + 10 ** (-50 / 20) * 0.5 * rng.standard_normal(n)
    return x.astype(np.float32)


def dataset(count: int, seed: int = 0, seconds: float = 1.0) -> np.ndarray:
    """``count`` clips (count, n) from seeds seed * 1_000_003 + i."""
    return np.stack([clip(seed * 1_000_003 + i, seconds) for i in range(count)])
