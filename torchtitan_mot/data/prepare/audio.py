"""Audio: decoding (soundfile), resampling and mel filterbank (librosa), STFT (torch), and
the default audio tokenizer, log-mel frames quantised by a codebook fitted on the user's clips.

torchaudio is not used: its newest PyPI release (2.11.1 on 2026-12-01) pins torch==2.11.1,
so installing it would replace the torch 2.13 this project runs on.
One id per hop (`hop_length / sample_rate` seconds); any sample rate and clip length.
"""

from pathlib import Path
from typing import Any

import numpy as np

from .tokenizers import BadInput, ModalityTokenizer, fit_codebook, nearest, register


def read_audio(path: str | Path, origin: str, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform at `sample_rate`; BadInput naming `origin` if the file is missing,
    empty or undecodable."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{origin}: audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise BadInput(f"{origin}: audio file {path} is empty (0 bytes)")
    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as e:
        raise BadInput(f"{origin}: unreadable audio ({type(e).__name__}: {e})") from None
    if len(wave) == 0:
        raise BadInput(f"{origin}: audio file {path} holds no samples")
    wave = wave.mean(axis=1)
    if rate != sample_rate:
        import librosa

        wave = librosa.resample(wave, orig_sr=rate, target_sr=sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


@register
class LogMelAudioTokenizer(ModalityTokenizer):
    """k-means codebook over log-mel frames (Hann window, power spectrum, Slaney mel)."""

    kind = "logmel_vq"

    def __init__(self, codebook: np.ndarray, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> None:
        if codebook.ndim != 2 or codebook.shape[1] != n_mels:
            raise ValueError(f"codebook shape {codebook.shape} does not fit {n_mels} mel bands")
        import librosa
        import torch

        self.codebook = codebook.astype(np.float32)
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self._mel = torch.from_numpy(librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels))
        self._window = torch.hann_window(n_fft)

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def tokens_per_item(self) -> None:
        return None

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """(samples,) waveform -> (frames, n_mels) log-mel features (short clips zero-padded
        to one frame)."""
        import torch

        x = torch.from_numpy(np.asarray(wave, dtype=np.float32))
        if len(x) < self.n_fft:
            x = torch.nn.functional.pad(x, (0, self.n_fft - len(x)))
        spec = torch.stft(
            x, self.n_fft, self.hop_length, window=self._window, center=False, return_complex=True
        ).abs().pow(2)
        return torch.log(self._mel @ spec + 1e-6).T.contiguous().numpy()

    @classmethod
    def fit(
        cls, waves: Any, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, codebook_size: int, seed: int
    ) -> "LogMelAudioTokenizer":
        shape = cls(np.zeros((1, n_mels)), sample_rate, n_fft, hop_length, n_mels)
        codebook = fit_codebook((shape.log_mel(w) for w in waves), codebook_size, seed, "--audio-codebook-size")
        return cls(codebook, sample_rate, n_fft, hop_length, n_mels)

    def encode(self, items: list[Any]) -> list[np.ndarray]:
        return [nearest(self.log_mel(w), self.codebook) for w in items]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Ids -> (frames, n_mels) quantised log-mel spectrogram (there is no vocoder)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.codebook_size})")
        return self.codebook[ids]

    def save(self, directory: Path) -> dict[str, Any]:
        np.save(directory / "audio_codebook.npy", self.codebook)
        return {
            "kind": self.kind,
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "files": {"codebook": "audio_codebook.npy"},
        }

    @classmethod
    def load(cls, directory: Path, entry: dict[str, Any]) -> "LogMelAudioTokenizer":
        codebook = np.load(Path(directory) / entry["files"]["codebook"])
        return cls(codebook, entry["sample_rate"], entry["n_fft"], entry["hop_length"], entry["n_mels"])
