"""Audio for Talk: decoding a track to 16 kHz mono and wav2vec2 features per video frame.

The encoder is a transformers ``Wav2Vec2Model`` from a local folder (e.g. chinese-wav2vec2-base), or a tiny
random twin built in code for tests. Features are all hidden states after the CNN (``hidden_states[1:]``,
stacked as ``[T, layers, dim]``), as SVI-Talk / MultiTalk use them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from torch import Tensor
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """An audio track is missing or cannot be decoded."""


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples of a file's first audio track (an audio file or a video with sound)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-ac", "1"]
    cmd += ["-ar", str(sample_rate), "-f", "f32le", "-"]
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioError(f"no readable audio track in {path}: {detail[-1] if detail else 'ffmpeg failed'}")
    samples = np.frombuffer(done.stdout, dtype=np.float32)
    if samples.size == 0:
        raise AudioError(f"the audio track of {path} is empty")
    return samples.copy()


class AudioEncoder:
    """wav2vec2 features of a waveform, on one device."""

    def __init__(self, model: Wav2Vec2Model, extractor: Wav2Vec2FeatureExtractor, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.extractor = extractor
        self.device = torch.device(device)

    @staticmethod
    def tiny(device: str | torch.device = "cpu") -> AudioEncoder:
        """Random 2-layer twin with the real 320-sample hop (50 feature frames per second)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(20251010)
            config = Wav2Vec2Config(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                conv_dim=(8,) * 7,
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2,
            )
            model = Wav2Vec2Model(config)
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, do_normalize=True)
        return AudioEncoder(model, extractor, device)

    @staticmethod
    def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> AudioEncoder:
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"audio encoder folder {path} has no config.json (a wav2vec2 folder is needed)")
        return AudioEncoder(Wav2Vec2Model.from_pretrained(path), Wav2Vec2FeatureExtractor.from_pretrained(path), device)

    @torch.no_grad()
    def features(self, samples: np.ndarray) -> tuple[Tensor, float]:
        """``[T, layers, dim]`` features and their rate in frames per second."""
        inputs = self.extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        out = self.model(inputs.to(self.device), output_hidden_states=True)
        feats = torch.stack(out.hidden_states[1:], dim=2)[0].float().cpu()  # [T, layers, dim]
        return feats, feats.shape[0] / (len(samples) / SAMPLE_RATE)


def features_for_frames(features: Tensor, rate: float, frame_times: list[float]) -> Tensor:
    """The feature frame nearest to each video frame time (seconds): ``[len(frame_times), layers, dim]``."""
    index = torch.tensor([min(max(round(t * rate), 0), features.shape[0] - 1) for t in frame_times])
    return features[index]
