"""Tiny speech tokenizer for the demo data: k-means over log-mel frames.

A waveform becomes one token per 32 ms frame (hop 512 samples at 16 kHz): the index of the
nearest codebook entry among 256 log-mel vectors (40 bands). `decode` returns the
quantised log-mel spectrogram (not audio): enough to look at what a model generated.
Pure numpy so it runs anywhere; waveforms come from `espeak-ng` in `scripts/make_demo_data.py`.
"""

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 512
N_MELS = 40


def _mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, n_fft//2+1) triangular filters on the HTK mel scale."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    inv = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = inv(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sr)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    return np.clip(np.minimum(up, down), 0.0, None).astype(np.float32)


def log_mel(wave: np.ndarray) -> np.ndarray:
    """(samples,) float waveform at SAMPLE_RATE -> (frames, N_MELS) log-mel features."""
    wave = np.asarray(wave, dtype=np.float32)
    if len(wave) < N_FFT:
        wave = np.pad(wave, (0, N_FFT - len(wave)))
    frames = 1 + (len(wave) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(wave[idx] * np.hanning(N_FFT).astype(np.float32), axis=-1)) ** 2
    return np.log(spec @ _mel_filterbank().T + 1e-6).astype(np.float32)


class SpeechCodec:
    """Encode waveforms / decode tokens with a (codebook_size, N_MELS) log-mel codebook."""

    def __init__(self, codebook: np.ndarray):
        if codebook.ndim != 2 or codebook.shape[1] != N_MELS:
            raise ValueError(f"codebook must have shape (K, {N_MELS}), got {codebook.shape}")
        self.codebook = codebook.astype(np.float32)

    @classmethod
    def fit(cls, waves: list[np.ndarray], codebook_size: int = 256, seed: int = 0) -> "SpeechCodec":
        """Learn the codebook with k-means over the frames of all waveforms."""
        from sklearn.cluster import KMeans

        frames = np.concatenate([log_mel(w) for w in waves])
        km = KMeans(n_clusters=codebook_size, n_init=1, random_state=seed).fit(frames)
        return cls(km.cluster_centers_)

    @classmethod
    def load(cls, path: str | Path) -> "SpeechCodec":
        return cls(np.load(path))

    def save(self, path: str | Path) -> None:
        np.save(path, self.codebook)

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """Waveform -> (frames,) int64 tokens."""
        feats = log_mel(wave)
        dist = ((feats[:, None, :] - self.codebook[None]) ** 2).sum(-1)
        return dist.argmin(-1).astype(np.int64)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(frames,) tokens -> (frames, N_MELS) quantised log-mel spectrogram."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(f"tokens must lie in [0, {self.codebook_size})")
        return self.codebook[tokens]
