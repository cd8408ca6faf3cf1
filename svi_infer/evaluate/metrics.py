"""The drift metrics of a video cut into clips, from frames in memory or any forward frame source.

All values are measured on the decoded 8-bit frames scaled to [0, 1]. The seam of clip ``k > 0`` is its first
frame.

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

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from svi_infer.video_io import fit_image

HIST_BINS = 32
FLICKER_EPS = 1.0 / 255.0
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # BT.601
SSIM_KERNEL, SSIM_SIGMA = 11, 1.5
CHUNK_FRAMES = 16  # frames decoded and measured at a time: memory stays bounded for long, large videos

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
