"""Audio for Talk: decoding, loudness normalisation, wav2vec2 features per video frame, per-clip slices.

Pipeline (as SVI-Talk / MultiTalk prepare audio, for training data and for generation alike):

1. ``read_audio(path, normalize=True)``: the first audio track as 16 kHz mono float32, scaled by one static gain to
   -23 LUFS (ITU-R BS.1770 integrated loudness, measured with pyloudnorm).
2. ``AudioEncoder.features(samples, fps=25)``: wav2vec2 hidden states ``[N, layers, dim]`` with one row per video
   frame, ``N = floor(seconds * fps)``. As in MultiTalk, the CNN features (50 per second) are linearly resampled
   (``align_corners=True``) to ``N`` frames *before* the transformer layers, so attention runs at the video rate.
   Without ``fps`` the raw 50-per-second features come back.
3. ``clip_audio(features, k, frames_per_clip, overlap)``: the rows of exactly the output frames clip ``k`` covers.
   Frames past the end of the audio get zero features, which the model reads as "no audio" (the same tensor as the
   audio-free CFG branch and the training-time audio dropout), not as the encoding of a quiet room.

Decoding, loudness and the clip frame arithmetic live in the torch-free :mod:`svi_infer.audio_file` (so the CLI
checks a Talk audio input before torch starts) and are re-exported here. Bad input (missing file, no audio track,
undecodable or empty track, non-finite samples, audio too short for one feature frame) raises ``AudioError`` with one
line saying what is wrong and what to do. Silent audio is valid input: it is left unscaled and encodes to finite
features; ``is_silent`` lets a caller warn about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from svi_infer.audio_file import (  # noqa: F401  (re-exported: the file half of the Talk audio pipeline)
    SAMPLE_RATE,
    TALK_FPS,
    TARGET_LUFS,
    AudioError,
    clip_frames,
    clips_for_frames,
    frames_for_clips,
    frames_for_samples,
    is_silent,
    loudness,
    loudness_normalize,
    read_audio,
)

if TYPE_CHECKING:  # transformers is heavy; it is imported only where a model is built
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

MIN_SAMPLES = 400  # wav2vec2's CNN receptive field (25 ms at 16 kHz): shorter input yields no feature frame


# --------------------------------------------------------------------------------------------------- encoder


def resample_frames(features: Tensor, num_frames: int) -> Tensor:
    """Linear resampling along dim 0 with the end frames pinned (``align_corners=True``), as MultiTalk does.

    Works on ``[T, ...]``; frame ``i`` of the output sits at input position ``i * (T - 1) / (num_frames - 1)``.
    """
    if num_frames < 1 or features.shape[0] < 1:
        raise ValueError(f"cannot resample {features.shape[0]} frames to {num_frames}")
    flat = features.reshape(features.shape[0], -1).T[None].float()  # [1, C, T]
    if features.shape[0] == 1:
        out = flat.expand(-1, -1, num_frames)
    else:
        out = F.interpolate(flat, size=num_frames, mode="linear", align_corners=True)
    return out[0].T.reshape(num_frames, *features.shape[1:]).to(features.dtype)


class AudioEncoder:
    """wav2vec2 features of a waveform, on one device."""

    def __init__(self, model: Wav2Vec2Model, extractor: Wav2Vec2FeatureExtractor, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.extractor = extractor
        self.device = torch.device(device)

    @staticmethod
    def tiny(device: str | torch.device = "cpu") -> AudioEncoder:
        """Random 2-layer twin with the real 320-sample hop (50 feature frames per second)."""
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

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
        """A local wav2vec2 folder (e.g. chinese-wav2vec2-base: config.json, weights, preprocessor_config.json)."""
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"audio encoder folder {path} has no config.json (a wav2vec2 folder is needed)")
        return AudioEncoder(Wav2Vec2Model.from_pretrained(path), Wav2Vec2FeatureExtractor.from_pretrained(path), device)

    @torch.no_grad()
    def features(self, samples: np.ndarray, fps: float | None = None) -> tuple[Tensor, float]:
        """``[T, layers, dim]`` float32 features (all hidden states after the CNN) and their rate per second.

        ``fps=None``: the raw frames, 50 per second (rate = frames / seconds).
        ``fps=25``: one row per video frame, ``T = frames_for_samples(len(samples), fps)``, rate ``fps``. The CNN
        output is resampled to ``T`` frames before the feature projection and the transformer (MultiTalk's
        patched ``Wav2Vec2Model.forward``), done here with a forward hook on the stock transformers model.
        """
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        seconds = len(samples) / SAMPLE_RATE
        if len(samples) < MIN_SAMPLES:
            least = MIN_SAMPLES / SAMPLE_RATE * 1000
            raise AudioError(f"the audio is {seconds * 1000:.0f} ms long; wav2vec2 needs at least {least:.0f} ms")
        frames = None
        if fps is not None:
            frames = frames_for_samples(len(samples), fps)
            if frames < 1:
                raise AudioError(f"the audio ({seconds * 1000:.0f} ms) is shorter than one video frame at {fps} fps")
        inputs = self.extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        hook = None
        if frames is not None:

            def to_video_rate(_module, _args, output: Tensor) -> Tensor:  # CNN output [B, C, T_cnn]
                return F.interpolate(output, size=frames, mode="linear", align_corners=True)

            hook = self.model.feature_extractor.register_forward_hook(to_video_rate)
        try:
            out = self.model(inputs.to(self.device), output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        feats = torch.stack(out.hidden_states[1:], dim=2)[0].float().cpu()  # [T, layers, dim]
        return feats, (float(fps) if fps is not None else feats.shape[0] / seconds)


# --------------------------------------------------------------------------------------------------- alignment


def features_for_frames(features: Tensor, rate: float, frame_times: list[float]) -> Tensor:
    """Features at each video frame time (seconds), linearly interpolated: ``[len(frame_times), layers, dim]``.

    Row ``i`` of ``features`` sits at ``i / rate`` seconds. A time between two rows blends them linearly (a time
    on a row, e.g. ``j / fps`` with features from ``features(..., fps)``, returns that row exactly). Before the
    first row: the first row. Between the last row and one row later: the last row. Later: zeros (no audio).
    """
    count = features.shape[0]
    pos = torch.tensor(frame_times, dtype=torch.float64) * rate
    nearest = pos.round()
    pos = torch.where((pos - nearest).abs() < 1e-6, nearest, pos).clamp(min=0.0)
    lo = pos.floor().long().clamp(max=count - 1)
    hi = (lo + 1).clamp(max=count - 1)
    w = (pos - lo).clamp(0.0, 1.0).to(torch.float32).view(-1, *([1] * (features.ndim - 1)))
    out = features[lo].float() * (1.0 - w) + features[hi].float() * w
    out[pos >= count] = 0.0
    return out.to(features.dtype)


def take_frames(features: Tensor, indices: Tensor | range | list[int]) -> Tensor:
    """Rows ``indices`` of ``[N, ...]`` features; indices at or past ``N`` give zero rows (silence), negative
    indices give row 0 (the start of the audio, as MultiTalk clamps its context windows)."""
    index = torch.as_tensor(list(indices) if isinstance(indices, range) else indices, dtype=torch.long)
    out = features[index.clamp(0, max(features.shape[0] - 1, 0))].clone()
    out[index >= features.shape[0]] = 0
    return out


def pad_frames(features: Tensor, num_frames: int) -> Tensor:
    """``[num_frames, ...]``: the track's rows, then zero rows (silence) up to ``num_frames``; longer tracks are
    cut. Lets code that clamps indices to the track's end (MultiTalk-style windows) see silence there instead of a
    repeated last frame: ``pad_frames(features, frames_for_clips(K, F, overlap))``."""
    if features.shape[0] >= num_frames:
        return features[:num_frames]
    pad = features.new_zeros(num_frames - features.shape[0], *features.shape[1:])
    return torch.cat([features, pad])


def clip_audio(features: Tensor, clip_index: int, frames_per_clip: int, overlap: int, radius: int = 0) -> Tensor:
    """Features of exactly the frames of ``clip_frames(k, F, overlap)`` (zeros past the end of the audio).

    ``radius=0``: ``[F, layers, dim]``. ``radius=r``: ``[F, 2r + 1, layers, dim]``, each frame with its ``r``
    neighbours on each side taken from the whole track (SVI-Talk / MultiTalk use ``r = 2``), so the context at a
    clip's first frames comes from the previous clip's audio, not from padding.
    """
    frames = torch.tensor(clip_frames(clip_index, frames_per_clip, overlap))
    if radius == 0:
        return take_frames(features, frames)
    offsets = torch.arange(-radius, radius + 1)
    return take_frames(features, (frames[:, None] + offsets[None]).reshape(-1)).reshape(
        frames_per_clip, 2 * radius + 1, *features.shape[1:]
    )
