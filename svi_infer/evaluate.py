"""Drift metrics over a long video, clip by clip: does minute 10 still look like minute 1?

``python -m svi_infer.evaluate video.mp4 [--reference first_frame.png] [--clip-frames F --overlap m]
[--output-dir D]`` writes ``<video stem>.eval.json`` (the report) and ``<video stem>.eval.png`` (one plot per
metric over time, seams marked) beside the video, or in ``--output-dir``, and prints a one-screen summary.

Clips come from the generator's sidecar ``<video stem>.json`` when it is there (its clips' ``frames`` ranges);
otherwise, or when ``--clip-frames``/``--overlap`` are given, as the generator stitches them: clip 0 is frames
``[0, F)`` and every later clip covers the next ``F - m`` frames (a trailing partial clip counts). The seam of
clip ``k > 0`` is its first frame. All values are measured on the decoded 8-bit frames scaled to [0, 1].

Per clip (clip 0 is "first"):

* colour statistics: per-channel RGB mean and standard deviation over all the clip's pixels;
* colour drift: Euclidean distance between the 6-vectors (R, G, B mean, R, G, B std) of the clip and of the
  first clip (``color_drift_first``) or of the reference image (``color_drift_ref``); 0 = identical statistics,
  a uniform shift of every channel by ``d`` gives ``d * sqrt(3)``;
* histogram drift: Hellinger distance between per-channel 32-bin histograms (``sqrt(1 - sum(sqrt(p * q)))``),
  averaged over R, G, B; bounded in [0, 1] (0 = same distribution, 1 = disjoint);
* sharpness: variance of the 3x3 Laplacian of the BT.601 luma (0-255 units, valid region, as OpenCV's
  ``Laplacian(...).var()``), averaged over the clip's frames; blur lowers it;
* SSIM to the reference: torchmetrics' SSIM (Gaussian 11x11 window, sigma 1.5) of each frame's luma against the
  reference's, averaged over the clip; 1 = the reference itself;
* motion: mean absolute difference between consecutive frames within the clip, ~0 for a frozen clip.

Per seam: flicker = ``(d_seam + eps) / (median_step + eps)``, where ``d_seam`` is the mean absolute difference
from frame ``s - 1`` to the seam frame ``s`` and ``median_step`` the median of the consecutive-frame differences
within the two neighbouring clips; ``eps = 1/255`` (one 8-bit code value) keeps frozen clips finite: a frozen
seam in frozen clips gives exactly 1.0 and a cut between frozen clips a large ratio. 1.0 = the seam looks like
any other frame step; a hard cut gives >> 1.

The reference image (``--reference``) is fitted to the video size as the generator fits its anchor image
(centre crop to the aspect ratio, bicubic resize). Without one, the reference-based metrics are absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from svi_infer.atomic import write_json, write_with
from svi_infer.video_io import fit_image, probe_streams, read_image

HIST_BINS = 32
FLICKER_EPS = 1.0 / 255.0
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # BT.601
SSIM_KERNEL, SSIM_SIGMA = 11, 1.5
CHUNK_FRAMES = 16  # frames decoded and measured at a time: memory stays bounded for long, large videos
DEFAULT_CLIP_FRAMES, DEFAULT_OVERLAP = 81, 1  # the generator's defaults (frames_per_clip, 1 motion frame)
MAX_ROWS = 12  # longer tables print their first and last MAX_ROWS // 2 rows

FrameSource = Callable[[int, int], np.ndarray]  # (start, end) -> uint8 [end - start, H, W, 3]


# -- segmentation ------------------------------------------------------------------------------------
def clip_ranges(num_frames: int, clip_frames: int, overlap: int) -> list[tuple[int, int]]:
    """Output-frame ranges ``[start, end)`` of the clips as the generator stitches them: clip 0 is
    ``[0, clip_frames)``, each later clip the next ``clip_frames - overlap`` frames; a trailing partial clip
    counts (and a video shorter than one clip is one clip)."""
    if num_frames < 1:
        raise ValueError(f"the video has no frames (num_frames={num_frames})")
    if clip_frames < 1:
        raise ValueError(f"clip frames must be >= 1, got {clip_frames}")
    if not 0 <= overlap < clip_frames:
        raise ValueError(f"overlap must be >= 0 and < clip frames ({clip_frames}), got {overlap}")
    ranges = [(0, min(clip_frames, num_frames))]
    step = clip_frames - overlap
    while ranges[-1][1] < num_frames:
        start = ranges[-1][1]
        ranges.append((start, min(start + step, num_frames)))
    return ranges


def _check_clips(clips, num_frames: int) -> list[tuple[int, int]]:
    checked = []
    for k, clip in enumerate(clips):
        try:
            start, end = (int(v) for v in clip)
        except (TypeError, ValueError):
            raise ValueError(f"clip {k} must be a (start, end) pair of frame indices, got {clip!r}") from None
        if not 0 <= start < end <= num_frames:
            raise ValueError(f"clip {k} = [{start}, {end}) does not fit a video of {num_frames} frames")
        if checked and start < checked[-1][1]:
            raise ValueError(f"clip {k} = [{start}, {end}) overlaps clip {k - 1} = {list(checked[-1])}")
        checked.append((start, end))
    if not checked:
        raise ValueError("no clips to evaluate")
    return checked


# -- measurement -----------------------------------------------------------------------------------
def _counts(frames: np.ndarray) -> np.ndarray:
    """Per-channel 256-bin counts of uint8 frames ``[..., 3]`` -> int64 ``[3, 256]``: exact sums, sums of squares
    and coarser histograms all follow from them."""
    return np.stack([np.bincount(frames[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.int64)


def _hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over channels of the Hellinger distance of two ``[3, bins]`` count histograms, in [0, 1]."""
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    bc = np.sqrt(p * q).sum(axis=1)
    return float(np.sqrt(np.clip(1.0 - bc, 0.0, 1.0)).mean())


def _color_distance(a: dict, b: dict) -> float:
    va = np.array(a["mean"] + a["std"], dtype=np.float64)
    vb = np.array(b["mean"] + b["std"], dtype=np.float64)
    return float(np.linalg.norm(va - vb))


def _luma(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 BT.601 luma in [0, 1]."""
    return frames.astype(np.float32) @ (LUMA_WEIGHTS / 255.0)


def _laplacian_var(luma: np.ndarray) -> np.ndarray:
    """Variance of the 3x3 Laplacian (valid region) of ``[n, H, W]`` luma in [0, 1], in 0-255 units, per frame."""
    y = luma * np.float32(255.0)
    if y.shape[1] < 3 or y.shape[2] < 3:
        return np.zeros(len(y))
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4.0 * y[:, 1:-1, 1:-1]
    return lap.reshape(len(y), -1).var(axis=1, dtype=np.float64)


def _ssim_factor(height: int, width: int) -> int:
    """Wang et al.'s reference SSIM (ssim.m) first average-pools by ``round(min(H, W) / 256)``: at 480p, 2x2."""
    return max(1, round(min(height, width) / 256))


def _ssim_kernel(height: int, width: int) -> int | None:
    """The Gaussian window (11, or the largest odd size that fits a small pooled frame; None below 3)."""
    f = _ssim_factor(height, width)
    k = min(SSIM_KERNEL, height // f, width // f)
    k -= 1 - k % 2
    return k if k >= 3 else None


def _ssim_prepare(luma: np.ndarray):
    """``[n, H, W]`` luma -> the pooled ``[n, 1, h, w]`` float tensor SSIM is measured on."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(luma, dtype=np.float32))[:, None]
    f = _ssim_factor(*luma.shape[1:])
    return torch.nn.functional.avg_pool2d(x, f) if f > 1 else x


def _ssim(luma: np.ndarray, ref) -> np.ndarray:
    """SSIM of each ``[n, H, W]`` luma frame (in [0, 1]) against the prepared reference ``[1, 1, h, w]``."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    preds = _ssim_prepare(luma)
    with torch.no_grad():
        values = structural_similarity_index_measure(
            preds, ref.expand_as(preds).contiguous(), kernel_size=_ssim_kernel(*luma.shape[1:]), sigma=SSIM_SIGMA,
            reduction="none", data_range=1.0,
        )  # fmt: skip
    return values.double().numpy().reshape(-1)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean |a - b| per frame in [0, 1] units; ``a``, ``b`` uint8 ``[n, H, W, 3]``."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return diff.reshape(len(diff), -1).mean(axis=1, dtype=np.float64) / 255.0


@dataclass
class _ClipAccumulator:
    """Running statistics of one clip, fed chunk by chunk."""

    ssim_ref: object = None  # the prepared reference luma tensor, or None (no SSIM)
    counts: np.ndarray = field(default_factory=lambda: np.zeros((3, 256), dtype=np.int64))
    sharpness: list = field(default_factory=list)
    ssim: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # consecutive-frame differences within the clip
    last: np.ndarray | None = None  # the last frame seen, uint8 [H, W, 3]

    def update(self, chunk: np.ndarray) -> None:
        self.counts += _counts(chunk)
        luma = _luma(chunk)
        self.sharpness.extend(_laplacian_var(luma).tolist())
        if self.ssim_ref is not None:
            self.ssim.extend(_ssim(luma, self.ssim_ref).tolist())
        previous = chunk[:-1] if self.last is None else np.concatenate([self.last[None], chunk[:-1]])
        current = chunk[1:] if self.last is None else chunk
        if len(current):
            self.steps.extend(_mean_abs_diff(current, previous).tolist())
        self.last = chunk[-1].copy()

    @property
    def hist(self) -> np.ndarray:
        """``[3, HIST_BINS]`` counts."""
        return self.counts.reshape(3, HIST_BINS, 256 // HIST_BINS).sum(axis=2)

    def stats(self) -> dict:
        levels = np.arange(256, dtype=np.float64) / 255.0
        n = self.counts.sum(axis=1)
        mean = self.counts @ levels / n
        var = self.counts @ (levels * levels) / n - mean * mean
        std = np.sqrt(np.maximum(var, 0.0))
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _image_stats(image: np.ndarray) -> tuple[dict, np.ndarray, float]:
    acc = _ClipAccumulator()
    acc.update(image[None])
    return acc.stats(), acc.hist, float(acc.sharpness[0])


def _evaluate(
    source: FrameSource, num_frames: int, height: int, width: int, fps: float, clips, reference: np.ndarray | None
) -> dict:
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    clips = _check_clips(clips, num_frames)
    ssim_ref = ref_stats = ref_hist = None
    ref_record = None
    if reference is not None:
        reference = np.asarray(reference)
        if reference.ndim != 3 or reference.shape[2] != 3 or reference.dtype != np.uint8:
            raise ValueError(f"the reference must be a uint8 [H, W, 3] image, got {reference.dtype} {reference.shape}")
        if reference.shape[:2] != (height, width):
            reference = np.asarray(fit_image(Image.fromarray(reference), height, width))
        ref_stats, ref_hist, ref_sharpness = _image_stats(reference)
        if _ssim_kernel(height, width) is not None:
            ssim_ref = _ssim_prepare(_luma(reference)[None])
        ref_record = {**ref_stats, "sharpness": ref_sharpness}

    # Frames are requested in increasing order only, so a video can be decoded as one forward stream.
    records, seams, first_stats, first_hist, previous = [], [], None, None, None
    for k, (start, end) in enumerate(clips):
        before = None
        if k:
            before = previous.last if clips[k - 1][1] == start else source(start - 1, start)[0]
        acc = _ClipAccumulator(ssim_ref=ssim_ref)
        for a in range(start, end, CHUNK_FRAMES):
            chunk = source(a, min(a + CHUNK_FRAMES, end))
            if a == start and before is not None:
                seam_diff = float(_mean_abs_diff(chunk[:1], before[None])[0])
            acc.update(chunk)
        stats = acc.stats()
        if k == 0:
            first_stats, first_hist = stats, acc.hist
        record = {
            "index": k,
            "start": start,
            "end": end,
            "num_frames": end - start,
            "start_s": start / fps,
            "end_s": end / fps,
            **stats,
            "color_drift_first": _color_distance(stats, first_stats),
            "hist_drift_first": _hellinger(acc.hist, first_hist),
        }
        if ref_stats is not None:
            record["color_drift_ref"] = _color_distance(stats, ref_stats)
            record["hist_drift_ref"] = _hellinger(acc.hist, ref_hist)
        record["sharpness"] = float(np.mean(acc.sharpness))
        if ref_stats is not None and acc.ssim:
            record["ssim_ref"] = float(np.mean(acc.ssim))
        record["motion"] = float(np.mean(acc.steps)) if acc.steps else None
        records.append(record)
        if k:
            neighbours = previous.steps + acc.steps
            baseline = float(np.median(neighbours)) if neighbours else None
            flicker = None if baseline is None else (seam_diff + FLICKER_EPS) / (baseline + FLICKER_EPS)
            seams.append(
                {"clip": k, "frame": start, "time_s": start / fps, "diff": seam_diff, "baseline": baseline,
                 "flicker": flicker}
            )  # fmt: skip
        previous = acc

    report = {
        "video": None,
        "settings": {
            "fps": float(fps),
            "num_frames": int(num_frames),
            "height": int(height),
            "width": int(width),
            "num_clips": len(clips),
            "segmentation": {"source": "given"},
            "color_distance": "euclidean over RGB mean and std, [0, 1] units",
            "hist_bins": HIST_BINS,
            "hist_distance": "hellinger, mean over RGB channels, in [0, 1]",
            "sharpness": "variance of the 3x3 Laplacian of BT.601 luma, 0-255 units",
            "ssim": {
                "on": "BT.601 luma",
                "pooling": _ssim_factor(height, width),
                "kernel_size": _ssim_kernel(height, width),
                "sigma": SSIM_SIGMA,
            },
            "flicker_eps": FLICKER_EPS,
        },
        "reference": ref_record,
        "clips": records,
        "seams": seams,
    }
    report["summary"] = summary_scalars(report)
    return report


def evaluate_frames(
    frames: np.ndarray, fps: float, clips: list[tuple[int, int]], reference: np.ndarray | None = None
) -> dict:
    """The drift report (JSON-serialisable) of uint8 ``[N, H, W, 3]`` frames cut into ``clips`` (``[start, end)``
    frame ranges, in order, not overlapping). ``reference``: a uint8 ``[h, w, 3]`` image, fitted to the frame
    size when it differs; without it the reference-based metrics are absent."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be a non-empty uint8 [N, H, W, 3] array, got {frames.dtype} {frames.shape}")
    n, h, w = frames.shape[:3]
    return _evaluate(lambda a, b: frames[a:b], n, h, w, fps, clips, reference)


def summary_scalars(report: dict) -> dict[str, float]:
    """Flat float scalars of a report, to log as curves (keys that do not apply are absent):

    ``color_drift_last``/``_max`` and ``hist_drift_last``/``_max`` (vs the first clip), ``color_drift_rate_per_min``
    (least-squares slope of the colour drift over clip start time, per minute; 2+ clips), ``sharpness_ratio_last``
    /``_min`` (clip / first clip; first clip's sharpness > 0), with a reference ``color_drift_ref_first``/``_last``,
    ``hist_drift_ref_first``/``_last``, ``ssim_ref_first``/``_last``/``_min``, with seams ``seam_flicker_max``/
    ``_mean``, with motion ``motion_min``/``_mean``."""
    clips, seams = report["clips"], report["seams"]
    out: dict[str, float] = {}
    first, last = clips[0], clips[-1]
    for name in ("color_drift", "hist_drift"):
        values = [c[f"{name}_first"] for c in clips]
        out[f"{name}_last"] = float(values[-1])
        out[f"{name}_max"] = float(max(values))
    if len(clips) > 1:
        t = np.array([c["start_s"] for c in clips]) / 60.0
        if np.ptp(t) > 0:
            out["color_drift_rate_per_min"] = float(np.polyfit(t, [c["color_drift_first"] for c in clips], 1)[0])
    if first["sharpness"] > 0:
        ratios = [c["sharpness"] / first["sharpness"] for c in clips]
        out["sharpness_ratio_last"] = float(ratios[-1])
        out["sharpness_ratio_min"] = float(min(ratios))
    for name in ("color_drift_ref", "hist_drift_ref", "ssim_ref"):
        if name in first:
            out[f"{name}_first"] = float(first[name])
            out[f"{name}_last"] = float(last[name])
    if "ssim_ref" in first:
        out["ssim_ref_min"] = float(min(c["ssim_ref"] for c in clips))
    flicker = [s["flicker"] for s in seams if s["flicker"] is not None]
    if flicker:
        out["seam_flicker_max"] = float(max(flicker))
        out["seam_flicker_mean"] = float(np.mean(flicker))
    motion = [c["motion"] for c in clips if c["motion"] is not None]
    if motion:
        out["motion_min"] = float(min(motion))
        out["motion_mean"] = float(np.mean(motion))
    return out


# -- videos on disk --------------------------------------------------------------------------------
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
            return 1 + 4 * int(settings["num_motion_latents"])
        return int(settings["num_motion_frames"])
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


# -- output ----------------------------------------------------------------------------------------
def output_paths(video: str | Path, output_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``<video stem>.eval.json`` and ``<video stem>.eval.png`` beside the video or in ``output_dir``."""
    video = Path(video)
    folder = video.parent if output_dir is None else Path(output_dir).expanduser()
    return folder / f"{video.stem}.eval.json", folder / f"{video.stem}.eval.png"


def _plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clips, seams = report["clips"], report["seams"]
    t = [c["start_s"] for c in clips]
    has_ref = report.get("reference") is not None
    versus = [("vs first clip", "{}_first"), ("vs reference", "{}_ref")]
    panels = [
        ("colour drift (distance of RGB mean + std)", [(lab, key.format("color_drift")) for lab, key in versus]),
        ("histogram drift (Hellinger)", [(lab, key.format("hist_drift")) for lab, key in versus]),
        ("sharpness (Laplacian variance)", [("clip", "sharpness")]),
        ("SSIM to reference (luma)", [("clip", "ssim_ref")]),
        ("motion (mean |frame step|)", [("clip", "motion")]),
    ]
    panels = [(title, [(lab, key) for lab, key in lines if key in clips[0]]) for title, lines in panels]
    panels = [p for p in panels if p[1]]
    rows = len(panels) + (1 if seams else 0)
    fig = Figure(figsize=(9, 1.9 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, lines) in zip(axes, panels, strict=False):
        for label, key in lines:
            values = [np.nan if c.get(key) is None else c[key] for c in clips]
            ax.plot(t, values, "o-", ms=3, label=label)
        if title.startswith("sharpness") and has_ref:
            ax.axhline(report["reference"]["sharpness"], color="gray", ls=":", lw=1, label="reference")
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(title, fontsize=9, loc="left")
    if seams:
        ax = axes[-1]
        ax.plot([s["time_s"] for s in seams], [np.nan if s["flicker"] is None else s["flicker"] for s in seams], "o-",
                ms=3, color="C3")  # fmt: skip
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        top = max([x["flicker"] for x in seams if x["flicker"] is not None], default=1.0)
        ax.set_ylim(0.0, max(2.0, 1.1 * top))
        ax.set_title("seam flicker (1 = an ordinary frame step)", fontsize=9, loc="left")
    for ax in axes:
        for s in seams:
            ax.axvline(s["time_s"], color="gray", alpha=0.25, lw=0.8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("clip start (s)", fontsize=8)
    name = Path(report["video"]).name if report.get("video") else "frames"
    fig.suptitle(f"{name}: {len(clips)} clips, {report['settings']['num_frames']} frames", fontsize=10)
    fig.savefig(path, format="png", dpi=100)


def write_report(report: dict, json_path: Path, png_path: Path) -> None:
    """The report as JSON and its plot as PNG, each written atomically."""
    write_json(json_path, report)
    write_with(png_path, lambda tmp: _plot(report, tmp))


def _fmt(value, spec: str, width: int) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def _elide(rows: list[str], total: int) -> list[str]:
    if total <= MAX_ROWS:
        return rows
    half = MAX_ROWS // 2
    return rows[:half] + [f"  ... {total - 2 * half} more ..."] + rows[-half:]


def format_summary(report: dict, json_path: Path | None = None, png_path: Path | None = None) -> str:
    """A one-screen text summary: clip table, seam table, headline figures (long tables are elided)."""
    s, clips, seams, summ = report["settings"], report["clips"], report["seams"], report["summary"]
    name = Path(report["video"]).name if report.get("video") else "frames"
    seg = s.get("segmentation", {})
    how = seg.get("source", "given")
    if how != "sidecar" and seg.get("clip_frames") is not None:
        how += f": {seg['clip_frames']} frames, overlap {seg['overlap']}"
    ref = report.get("reference")
    lines = [
        f"{name}: {s['num_frames']} frames, {s['height']}x{s['width']}, {s['fps']:g} fps, "
        f"{s['num_frames'] / s['fps']:.2f} s; {len(clips)} clips ({how})"
        + (f"; reference {Path(ref['path']).name}" if ref and ref.get("path") else "; reference given" if ref else ""),
        "",
        f"{'clip':>4} {'t (s)':>8} {'colour vs first':>15} {'colour vs ref':>13} {'sharpness':>10} "
        f"{'SSIM ref':>8} {'motion':>8}",
    ]
    rows = [
        f"{c['index']:>4} {c['start_s']:>8.2f} {_fmt(c['color_drift_first'], '.4f', 15)} "
        f"{_fmt(c.get('color_drift_ref'), '.4f', 13)} {_fmt(c['sharpness'], '.1f', 10)} "
        f"{_fmt(c.get('ssim_ref'), '.3f', 8)} {_fmt(c['motion'], '.4f', 8)}"
        for c in clips
    ]
    lines += _elide(rows, len(rows))
    if seams:
        lines += ["", f"{'seam':>4} {'frame':>7} {'t (s)':>8} {'flicker':>8}"]
        rows = [
            f"{x['clip']:>4} {x['frame']:>7} {x['time_s']:>8.2f} {_fmt(x['flicker'], '.2f', 8)}" for x in seams
        ]  # fmt: skip
        lines += _elide(rows, len(rows))
    lines += ["", "headline figures:"]

    def headline(label: str, text: str) -> None:
        lines.append(f"  {label + ':':<38} {text}")

    headline(
        "colour drift, last clip vs first", f"{summ['color_drift_last']:.4f} (histogram {summ['hist_drift_last']:.4f})"
    )
    if "color_drift_ref_last" in summ:
        headline(
            "colour drift vs reference, first/last",
            f"{summ['color_drift_ref_first']:.4f} / {summ['color_drift_ref_last']:.4f} "
            f"(histogram {summ['hist_drift_ref_first']:.4f} / {summ['hist_drift_ref_last']:.4f})",
        )
    if "color_drift_rate_per_min" in summ:
        headline("colour drift rate", f"{summ['color_drift_rate_per_min']:.4f} per minute")
    if "sharpness_ratio_last" in summ:
        headline(
            "sharpness, last clip / first",
            f"{summ['sharpness_ratio_last']:.3f} (lowest {summ['sharpness_ratio_min']:.3f})",
        )
    if "ssim_ref_first" in summ:
        headline(
            "SSIM to reference, first -> last",
            f"{summ['ssim_ref_first']:.3f} -> {summ['ssim_ref_last']:.3f} (lowest {summ['ssim_ref_min']:.3f})",
        )
    if "seam_flicker_max" in summ:
        worst = max((x for x in seams if x["flicker"] is not None), key=lambda x: x["flicker"])
        headline(
            "seam flicker (1 = a frame step)",
            f"max {summ['seam_flicker_max']:.2f} (clip {worst['clip']}, {worst['time_s']:.2f} s), "
            f"mean {summ['seam_flicker_mean']:.2f}",
        )
    if "motion_min" in summ:
        still = min((c for c in clips if c["motion"] is not None), key=lambda c: c["motion"])
        headline(
            "motion (mean |frame step|)",
            f"min {summ['motion_min']:.4f} (clip {still['index']}), mean {summ['motion_mean']:.4f}",
        )
    if json_path is not None:
        lines += ["", f"report: {json_path}"]
    if png_path is not None:
        lines.append(f"plot:   {png_path}")
    return "\n".join(lines)


def _error(message: str) -> None:
    print(f"svi_infer.evaluate: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m svi_infer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("video", help="the long video (mp4); its sidecar <stem>.json, when present, gives the clips")
    parser.add_argument("--reference", help="image to compare every clip with (e.g. the first frame / anchor)")
    parser.add_argument("--clip-frames", type=int, help="frames per generated clip (overrides the sidecar)")
    parser.add_argument("--overlap", type=int, help="frames each later clip repeats and drops (overrides the sidecar)")
    parser.add_argument(
        "--output-dir", help="where <stem>.eval.json and <stem>.eval.png go (default: beside the video)"
    )
    args = parser.parse_args(argv)
    try:
        job = _open(args.video, args.reference, args.clip_frames, args.overlap)
        json_path, png_path = output_paths(job.video, args.output_dir)
        if json_path.parent.exists() and not json_path.parent.is_dir():
            raise ValueError(f"--output-dir {json_path.parent} is not a directory")
    except (FileNotFoundError, ValueError) as err:
        _error(str(err))
    report = job.run()
    write_report(report, json_path, png_path)
    print(format_summary(report, json_path, png_path))


if __name__ == "__main__":
    main()
