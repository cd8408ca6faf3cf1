"""Videos on disk: the checked inputs (video, sidecar, reference image) and a forward frame stream.

Clips come from the generator's sidecar ``<video stem>.json`` when it is there (its clips' ``frames`` ranges);
otherwise, or when ``--clip-frames``/``--overlap`` are given, as the generator stitches them: clip 0 is frames
``[0, F)`` and every later clip covers the next ``F - m`` frames (a trailing partial clip counts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from svi_infer.evaluate.metrics import _check_clips, _evaluate, clip_ranges
from svi_infer.video_io import fit_image, probe_streams, read_image

DEFAULT_CLIP_FRAMES, DEFAULT_OVERLAP = 81, 1  # the generator's defaults (frames_per_clip, 1 motion frame)


class _FrameStream:
    """Frames of a video decoded in one forward pass by the bundled ffmpeg (any frame size; decord rejects some
    widths): ``stream(a, b)`` returns frames ``[a, b)``, ``a`` never before the previous call's ``b - 1``."""

    def __init__(self, video: Path, height: int, width: int):
        self.video, self.shape = video, (height, width, 3)
        self._frames = imageio_ffmpeg.read_frames(str(video), pix_fmt="rgb24", output_params=["-threads", "1"])
        next(self._frames)  # the metadata
        self._next, self._last = 0, None  # index of the next frame to decode; the last one decoded

    def __call__(self, a: int, b: int) -> np.ndarray:
        out = []
        if self._last is not None and a == self._next - 1:
            out.append(self._last)
            a += 1
        if a < self._next:
            raise RuntimeError(f"frame {a} of {self.video} was requested after frame {self._next - 1}")
        while self._next < b:
            raw = next(self._frames, None)
            if raw is None:
                raise ValueError(f"{self.video} ended after {self._next} frames")
            self._last = np.frombuffer(raw, dtype=np.uint8).reshape(self.shape)
            if self._next >= a:
                out.append(self._last)
            self._next += 1
        return np.stack(out)

    def close(self) -> None:
        self._frames.close()


@dataclass
class _Job:
    """A checked video (probed, not decoded), its segmentation and its reference: everything that can be wrong
    with the user's input is found before any frame is measured."""

    video: Path
    num_frames: int
    fps: float
    height: int
    width: int
    clips: list[tuple[int, int]]
    segmentation: dict
    reference: np.ndarray | None = None
    reference_path: Path | None = None

    def run(self) -> dict:
        stream = _FrameStream(self.video, self.height, self.width)
        try:
            report = _evaluate(stream, self.num_frames, self.height, self.width, self.fps, self.clips, self.reference)
        finally:
            stream.close()
        report["video"] = str(self.video)
        report["settings"]["segmentation"] = self.segmentation
        if report["reference"] is not None:
            report["reference"] = {"path": str(self.reference_path), **report["reference"]}
        return report


def _read_sidecar(path: Path) -> dict | None:
    """The generator's sidecar, or None when there is none (or the file is no sidecar: no ``clips`` list)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("clips"), list):
        return None
    return data


def _sidecar_overlap(settings: dict) -> int | None:
    try:
        if settings.get("handoff", "pixel") == "latent":
            return 1 + 4 * int(settings["motion_latents"])
        return int(settings["motion_frames"])
    except (KeyError, TypeError, ValueError):
        return None


def _segmentation(video: Path, num_frames: int, clip_frames: int | None, overlap: int | None):
    sidecar_file = video.with_suffix(".json")
    sidecar = _read_sidecar(sidecar_file)
    settings = (sidecar or {}).get("settings") or {}
    if sidecar is not None and clip_frames is None and overlap is None:
        try:
            ranges = [tuple(c["frames"]) for c in sidecar["clips"]]
            clips = _check_clips(ranges, num_frames)
            if clips[-1][1] != num_frames:
                raise ValueError(f"its clips end at frame {clips[-1][1]}, the video has {num_frames} frames")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"the sidecar {sidecar_file} does not fit {video} ({err}); pass --clip-frames and --overlap"
            ) from None
        info = {"source": "sidecar", "sidecar": str(sidecar_file)}
        info["clip_frames"] = settings.get("frames_per_clip")
        info["overlap"] = _sidecar_overlap(settings)
        return clips, info
    source = "arguments" if clip_frames is not None or overlap is not None else "default"
    if clip_frames is None:
        clip_frames = settings.get("frames_per_clip", DEFAULT_CLIP_FRAMES)
    if overlap is None:
        overlap = _sidecar_overlap(settings) if settings else None
        overlap = DEFAULT_OVERLAP if overlap is None else overlap
    clips = clip_ranges(num_frames, int(clip_frames), int(overlap))
    info = {"source": source, "sidecar": str(sidecar_file) if sidecar is not None else None}
    return clips, {**info, "clip_frames": int(clip_frames), "overlap": int(overlap)}


def _open(video: str | Path, reference: str | Path | None, clip_frames: int | None, overlap: int | None) -> _Job:
    """Check every input cheaply; raises ``FileNotFoundError``/``ValueError`` with a one-line message."""
    video = Path(video).expanduser()
    if not video.is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    if clip_frames is not None and clip_frames < 1:
        raise ValueError(f"--clip-frames must be >= 1, got {clip_frames}")
    if overlap is not None and overlap < 0:
        raise ValueError(f"--overlap must be >= 0, got {overlap}")
    if clip_frames is not None and overlap is not None and overlap >= clip_frames:
        raise ValueError(f"--overlap ({overlap}) must be < --clip-frames ({clip_frames})")
    image = None
    if reference is not None:
        reference = Path(reference).expanduser()
        if not reference.is_file():
            raise FileNotFoundError(f"reference image {reference} does not exist")
        image = read_image(reference)
    streams = probe_streams(video)  # ffmpeg: a clean error for anything that is not a video
    if not streams["frames"]:
        raise ValueError(f"{video} has no video frames")
    try:
        frames = imageio_ffmpeg.read_frames(str(video), pix_fmt="rgb24")
        width, height = next(frames)["size"]
        frames.close()
    except (OSError, RuntimeError, StopIteration, KeyError) as err:
        raise ValueError(f"cannot decode {video}: {err}") from None
    num_frames, fps = int(streams["frames"]), float(streams["fps"] or 0)
    if not fps > 0:
        raise ValueError(f"cannot tell the frame rate of {video}")
    clips, segmentation = _segmentation(video, num_frames, clip_frames, overlap)
    fitted = None if image is None else np.asarray(fit_image(image, height, width))
    return _Job(video, num_frames, fps, height, width, clips, segmentation, fitted, reference)


def evaluate_video(
    video: str | Path,
    reference: str | Path | None = None,
    clip_frames: int | None = None,
    overlap: int | None = None,
) -> dict:
    """The drift report of a video file, decoded clip by clip (memory does not grow with its length).

    Clips: from the sidecar ``<video stem>.json`` when present and neither ``clip_frames`` nor ``overlap`` is
    given; otherwise :func:`clip_ranges` with the given values, falling back to the sidecar's settings, then to
    81 frames and an overlap of 1. ``reference``: an image file, fitted to the video size."""
    return _open(video, reference, clip_frames, overlap).run()
