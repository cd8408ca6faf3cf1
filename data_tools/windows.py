"""Cutting videos into fixed-length training windows at a target fps, and cropping them to a bucket."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """``frames_per_clip`` frames of one video: the source frame shown at each target-fps frame time."""

    index: int
    start: int  # first frame, counted at the target fps
    source_indices: tuple[int, ...]
    padded: bool = False


def source_index(frame: int, source_fps: float, fps: float) -> int:
    """The source frame on screen at target-fps frame ``frame`` (time ``frame / fps``)."""
    return int(math.floor(frame * source_fps / fps + 1e-9))


def resample_indices(num_source_frames: int, source_fps: float, fps: float) -> list[int]:
    """Source frame on screen at each target-fps frame time ``j / fps``, over the whole video."""
    if num_source_frames < 1 or source_fps <= 0 or fps <= 0:
        return []
    count = math.ceil(num_source_frames * fps / source_fps - 1e-9)
    return [min(source_index(j, source_fps, fps), num_source_frames - 1) for j in range(count)]


def plan_windows(
    num_source_frames: int, source_fps: float, fps: float, frames_per_clip: int, stride: int, short: str = "skip"
) -> list[Window]:
    """Windows starting every ``stride`` target frames; a too-short video gives none, or one padded window
    (its last frame repeated) when ``short == "pad"``."""
    indices = resample_indices(num_source_frames, source_fps, fps)
    if len(indices) < frames_per_clip:
        if short != "pad" or not indices:
            return []
        padded = indices + [indices[-1]] * (frames_per_clip - len(indices))
        return [Window(0, 0, tuple(padded), padded=True)]
    starts = range(0, len(indices) - frames_per_clip + 1, stride)
    return [Window(i, s, tuple(indices[s : s + frames_per_clip])) for i, s in enumerate(starts)]


def continuation_sources(
    indices: list[int], start: int, frames_per_clip: int, counts: tuple[int, ...], temporal: int = 4
) -> tuple[dict[int, tuple[int, ...]], tuple[int, ...]] | None:
    """SVI 2.0 Pro's training data as its authors make it (their answer in upstream issue #75): the window
    starting at target frame ``start`` continues a previous clip ``P_n`` of ``frames_per_clip`` frames whose last
    ``n`` latents hand over, so the window overlaps ``P_n``'s last ``1 + temporal * n`` frames (``P_n`` starts at
    ``start - (frames_per_clip - 1) + temporal * n``); the anchor is a frame before every ``P_n``.

    Returns ``({n: source indices of P_n}, anchor candidates)`` from ``indices`` (the source frame at each target
    frame), or None when the video has no frame before the previous clip (the window cannot be a continuation).
    """
    firsts = {n: start - (frames_per_clip - 1) + temporal * n for n in counts if n > 0}
    if not firsts or min(firsts.values()) < 1:
        return None
    previous = {n: tuple(indices[p : p + frames_per_clip]) for n, p in firsts.items()}
    return previous, tuple(indices[: min(firsts.values())])


# ``buckets: <name>``: landscape, portrait and square (height, width) sizes of the usual Wan resolutions
BUCKET_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    "480p": ((480, 832), (832, 480), (624, 624)),
    "720p": ((720, 1280), (1280, 720), (960, 960)),
}


def round_to_multiple(size: int, multiple: int) -> int:
    """The nearest multiple of ``multiple`` (ties go down, so 720 -> 704 for 32), never below ``multiple``."""
    return max(multiple, multiple * math.ceil(size / multiple - 0.5))


def resolve_buckets(value, spatial_multiple: int, default: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """``buckets`` as ``(height, width)`` tuples: ``None`` -> ``default``; a preset name (:data:`BUCKET_PRESETS`)
    -> its sizes rounded to ``spatial_multiple``; a list of ``[h, w]`` -> as given (each must be a multiple)."""
    if value is None:
        return (tuple(default),)
    if isinstance(value, str):
        if value not in BUCKET_PRESETS:
            raise ValueError(
                f"unknown bucket preset {value!r}; presets: "
                + "; ".join(
                    f"{name} = {', '.join(f'{h}x{w}' for h, w in sizes)}" for name, sizes in BUCKET_PRESETS.items()
                )
                + " (or a list of [height, width], or null for the model's size)"
            )
        sizes = [
            (round_to_multiple(h, spatial_multiple), round_to_multiple(w, spatial_multiple))
            for h, w in BUCKET_PRESETS[value]
        ]
        return tuple(dict.fromkeys(sizes))
    if not len(value) or any(isinstance(b, str | int) or len(b) != 2 for b in value):
        raise ValueError(f"buckets must be a preset name, null or a non-empty list of [height, width], got {value}")
    buckets = tuple((int(b[0]), int(b[1])) for b in value)
    for h, w in buckets:
        if h % spatial_multiple or w % spatial_multiple:
            raise ValueError(f"bucket {h}x{w} must be a multiple of {spatial_multiple}")
    return buckets


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The ``(height, width)`` bucket whose aspect ratio is closest to the video's (in log space)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def crop_box(
    width: int, height: int, target_h: int, target_w: int, mode: str, rng: random.Random
) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of an aspect-preserving crop with the target's aspect ratio.

    ``center``: the largest such crop, centred. ``random`` (as SVI trains): its limiting side is drawn from
    ``[side - side / 14, side]`` and it is placed uniformly at random.
    """
    aspect = target_w / target_h
    if width / height > aspect:
        ch, cw = height, min(width, round(height * aspect))
    else:
        cw, ch = width, min(height, round(width / aspect))
    if mode == "center":
        return (width - cw) // 2, (height - ch) // 2, cw, ch
    if mode != "random":
        raise ValueError(f"crop must be 'center' or 'random', got {mode!r}")
    scale = rng.uniform(1.0 - 1.0 / 14.0, 1.0)
    cw, ch = max(1, round(cw * scale)), max(1, round(ch * scale))
    return rng.randint(0, width - cw), rng.randint(0, height - ch), cw, ch


def crop_resize(frames: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Crop ``[T, H, W, 3]`` uint8 frames to ``box`` and resize (bilinear, antialiased) to ``height x width``."""
    import torch  # here, not at the top: the CLI plans windows and buckets before torch loads
    import torch.nn.functional as F

    x, y, w, h = box
    clip = torch.from_numpy(np.ascontiguousarray(frames[:, y : y + h, x : x + w])).permute(0, 3, 1, 2).float()
    if (h, w) != (height, width):
        clip = F.interpolate(clip, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return clip.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _rgb(frame: np.ndarray) -> np.ndarray:
    """An ``[H, W, 3]`` frame from what decord returns. decord2 gives some widths (16, 24, 32, 48, 96, 144, ...) a
    wrong shape such as ``[H, W, 4]``: the buffer then holds RGB rows padded to ``nbytes / H`` bytes, so each row's
    first ``3 W`` bytes are the pixels (taking channels 0-2 instead scrambles the picture)."""
    if frame.shape[-1] == 3:
        return frame
    height, width = frame.shape[:2]
    return np.ascontiguousarray(frame.reshape(height, -1)[:, : 3 * width].reshape(height, width, 3))


def read_frames(reader, source_indices: tuple[int, ...]) -> np.ndarray:
    """``[len(source_indices), H, W, 3]`` uint8 frames from a decord reader (each distinct frame decoded once)."""
    unique = sorted(set(source_indices))
    try:
        batch = reader.get_batch(unique).asnumpy()
    except Exception:  # decord2's batch copy fails for the widths it gives a wrong shape (see _rgb)
        batch = np.stack([_rgb(reader[i].asnumpy()) for i in unique])
    position = {idx: i for i, idx in enumerate(unique)}
    return batch[[position[i] for i in source_indices]]
