"""Audio files for Talk: decoding, loudness normalisation, and which output frames each clip covers.

numpy and the bundled ffmpeg only, no torch: ``python -m svi_infer`` decodes and checks a Talk audio input before
torch starts up. The wav2vec2 features and their per-clip slices are in :mod:`svi_infer.audio`, which re-exports
everything here.

Bad input (missing file, no audio track, undecodable or empty track, non-finite samples) raises ``AudioError`` with
one line saying what is wrong and what to do. Silent audio is valid input: it is left unscaled; ``is_silent`` lets a
caller warn about it.
"""

from __future__ import annotations

import math
import subprocess
import warnings
from pathlib import Path

import imageio_ffmpeg
import numpy as np

SAMPLE_RATE = 16000
TARGET_LUFS = -23.0
TALK_FPS = 25.0
_LOUDNESS_BLOCK_S = 0.4  # BS.1770 gating block; pyloudnorm refuses shorter input


class AudioError(ValueError):
    """An audio input is missing, has no usable track, or cannot be decoded or encoded."""


# --------------------------------------------------------------------------------------------------- decoding


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, normalize: bool = False) -> np.ndarray:
    """Mono float32 samples of a file's first audio track (an audio file or a video with sound).

    ``normalize=True`` applies ``loudness_normalize`` (-23 LUFS), as Talk training and generation need.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist; check the path")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn"]
    cmd += ["-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        raise AudioError(_ffmpeg_problem(path, done.stderr.decode("utf-8", "replace")))
    samples = np.frombuffer(done.stdout, dtype=np.float32).copy()
    if samples.size == 0:
        raise AudioError(
            f"the audio track of {path} is empty (0 samples); give a file whose audio has a non-zero length"
        )
    if not np.isfinite(samples).all():
        raise AudioError(f"the audio of {path} decodes to NaN/inf samples; re-export it (e.g. as 16-bit wav)")
    return loudness_normalize(samples, sample_rate) if normalize else samples


def _ffmpeg_problem(path: Path, stderr: str) -> str:
    """One line for a failed ffmpeg decode: what is wrong, then what to do."""
    if "matches no streams" in stderr or "does not contain any stream" in stderr:
        return f"{path} has no audio track; give a video with sound or a separate audio file (wav, mp3, m4a, ...)"
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else "ffmpeg failed"
    return f"cannot decode the audio of {path} ({detail}); check that the file plays, or re-export it as wav"


# --------------------------------------------------------------------------------------------------- loudness


def loudness(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Integrated loudness in LUFS (BS.1770 via pyloudnorm); ``-inf`` for silence (every block below -70 LUFS).

    Audio shorter than the 0.4 s gating block is measured on a cyclic repetition of itself, which keeps its
    mean-square level (the quantity LUFS measures) instead of failing as pyloudnorm does.
    """
    import pyloudnorm

    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if x.size == 0 or not np.any(x):
        return float("-inf")
    need = math.ceil(_LOUDNESS_BLOCK_S * sample_rate) + 1
    if x.size < need:
        x = np.tile(x, math.ceil(need / x.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(pyloudnorm.Meter(sample_rate).integrated_loudness(x))


def loudness_normalize(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, target: float = TARGET_LUFS) -> np.ndarray:
    """Scale by one static gain so the integrated loudness is ``target`` LUFS (MultiTalk's ``loudness_norm``).

    Why: speech recorded at any level reaches the encoder at the level the Talk weights were trained with.
    - Silence (loudness ``-inf``) is returned unchanged, never divided into NaN.
    - Audio shorter than 0.4 s is measured as in ``loudness`` (cyclic repetition), then scaled like any other.
    - No clipping: after the gain, peaks may exceed 1.0. The samples are float and only feed the encoder (the
      muxed soundtrack is re-encoded from the original file), so hard clipping would only add distortion that
      MultiTalk's features never saw; pyloudnorm's "possible clipped samples" warning is therefore silenced.
    """
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    level = loudness(x, sample_rate)
    if not math.isfinite(level):
        return x.copy()
    gain = 10.0 ** ((target - level) / 20.0)
    return (x.astype(np.float64) * gain).astype(np.float32)


def is_silent(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bool:
    """True when no 0.4 s block reaches -70 LUFS (BS.1770's absolute gate): nothing for the lips to follow."""
    return not math.isfinite(loudness(samples, sample_rate))


# --------------------------------------------------------------------------------------------------- frames


def frames_for_samples(num_samples: int, fps: float = TALK_FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames a track of ``num_samples`` covers: ``floor(seconds * fps)``, computed without the float
    round-off by which MultiTalk's ``int(len / sr * 25)`` sometimes loses a frame (e.g. 18560 samples -> 28)."""
    return math.floor(num_samples * fps / sample_rate + 1e-9)


def clip_frames(clip_index: int, frames_per_clip: int, overlap: int) -> range:
    """Output-video frames clip ``k`` covers: ``s_k .. s_k + F - 1`` with ``s_k = k * (F - overlap)``.

    The generator drops the first ``overlap`` frames of every clip after the first (they repeat the previous
    clip's tail), so these ranges overlap by exactly ``overlap`` frames and their union has no gap.
    """
    if clip_index < 0:
        raise ValueError(f"clip_index must be >= 0, got {clip_index}")
    if not 0 <= overlap < frames_per_clip:
        raise ValueError(f"overlap must be in [0, frames_per_clip={frames_per_clip}), got {overlap}")
    start = clip_index * (frames_per_clip - overlap)
    return range(start, start + frames_per_clip)


def frames_for_clips(num_clips: int, frames_per_clip: int, overlap: int) -> int:
    """Output frames of ``num_clips`` clips: ``F + (num_clips - 1) * (F - overlap)`` (0 for no clip)."""
    if num_clips <= 0:
        return 0
    return clip_frames(num_clips - 1, frames_per_clip, overlap).stop


def clips_for_frames(num_frames: int, frames_per_clip: int, overlap: int) -> int:
    """Fewest clips whose output covers ``num_frames`` frames (at least 1): the default clip count for an audio
    track of ``num_frames`` video frames. The last clip's frames past the audio get zero features."""
    clip_frames(0, frames_per_clip, overlap)  # validates the arguments
    if num_frames <= frames_per_clip:
        return 1
    return 1 + math.ceil((num_frames - frames_per_clip) / (frames_per_clip - overlap))
