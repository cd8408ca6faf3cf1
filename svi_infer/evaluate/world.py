"""Toy-world fidelity metrics that need no trajectory: does a rolled-out video still show *this* world?

A model rolled out from a held-out first frame of the toy world (``data_tools.toy_world``) is free to move its
sprites anywhere, so its frames can never be compared pixel by pixel with the true clip. Every metric here uses
only what must persist whatever the motion: the true static background, the sprites' colours, shapes and radii,
and the true clip as a reference *level* of motion and sharpness. Sprite positions are never read.

The ground truth is the plain dict of arrays of ``<name>.truth.npz`` (``background`` uint8 ``[H, W, 3]``,
``shapes`` ``"disc"``/``"square"``, ``colours`` uint8 ``[n, 3]``, ``radii`` ``[n]``); ``positions`` may be in it
and is ignored. Values are in [0, 1] units (8-bit codes / 255).

Per frame (:func:`frame_metrics`):

* ``bg_rmse`` / ``bg_psnr``: how far the background has drifted. Per pixel ``e = max_c |frame - background|``;
  the ``K`` pixels with the largest ``e`` are dropped, ``K`` being the sprites' nominal footprint (the most pixels
  a sprite of that shape and radius can touch over its sub-pixel placements, summed over sprites), and the RMSE
  over all channels of the rest is reported. The sprites, wherever they are, are at most ``K`` pixels, so no
  position is needed to exclude them; on the true frames this is 0 up to 8-bit rounding.
  ``bg_psnr = 10 log10(1 / mse)``, capped at 60 dB.
* ``sprite_presence`` / ``sprites_kept``: are the sprites still there, with their colours and sizes? For sprite
  ``k``, ``A_k`` counts the pixels within RGB distance 0.2 of its colour and at least 0.2 from the true background
  at that pixel; its presence is ``min(1, A_k / (0.5 * area_k))`` (``area_k = pi r^2`` for a disc, ``(2r)^2`` for
  a square), averaged over sprites; ``sprites_kept`` counts the sprites with ``A_k >= 0.5 * area_k``.

Per clip (:func:`clip_metrics`, :func:`rollout_metrics`): the frame metrics' means and ``sprites_kept_min``;
``motion``, the mean absolute difference of consecutive frames, and ``motion_ratio`` to the true clip's (a frozen
rollout gives 0, a jittery one > 1); ``sharpness``, the Laplacian variance of luma as
:mod:`svi_infer.evaluate.metrics` measures it, and ``sharpness_ratio`` to the true clip's (blur gives < 1).

What they cannot see: where the sprites are or whether they move like the truth (straight lines, bounces); a
sprite melted into a blob of the right colour and about the right area counts as present; a sprite split in two
or a duplicated sprite (the extra pixels hide among the ``K`` dropped ones or just saturate presence); a spurious
object no bigger than the footprint ``K`` (dropped with the sprites); a sprite whose colour moved by more than 0.2
(counted as absent, and it keeps ``bg_rmse`` clean); motion that is wrong yet of the right magnitude. When true
sprites overlap, the occluded one loses area, so presence can dip below 1 even on the true frames.
"""

from __future__ import annotations

import numpy as np

from svi_infer.evaluate.metrics import _laplacian_var, _luma

COLOUR_TOL = 0.2  # RGB distance (in [0, 1] units) within which a pixel "has" a sprite's colour
BG_TOL = 0.2  # ... and at least this far from the true background there
AREA_SHARE = 0.5  # a sprite is kept when at least this share of its nominal area shows its colour
PSNR_CAP_DB = 60.0


def _coverage(shape: str, radius: float, centre: tuple, height: int, width: int) -> np.ndarray:
    """``[H, W]`` share of each pixel a sprite covers, the toy world's anti-aliased disc/square (one-pixel ramp);
    centre coordinates may be arrays that broadcast against ``[H, W]`` (many placements at once)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dx, dy = np.abs(xx - centre[0]), np.abs(yy - centre[1])
    dist = np.sqrt(dx * dx + dy * dy) if shape == "disc" else np.maximum(dx, dy)
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def _sprites(truth: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The truth's sprite shapes, colours (float ``[n, 3]`` in [0, 1]) and radii; positions are not read."""
    shapes = [str(s) for s in np.asarray(truth["shapes"]).reshape(-1)]
    colours = np.asarray(truth["colours"], dtype=np.float64).reshape(-1, 3) / 255.0
    radii = np.asarray(truth["radii"], dtype=np.float64).reshape(-1)
    if not len(shapes) == len(colours) == len(radii):
        raise ValueError(f"truth has {len(shapes)} shapes, {len(colours)} colours and {len(radii)} radii")
    return shapes, colours, radii


def _sprite_footprint(shape: str, radius: float) -> int:
    """Most pixels one sprite can touch (coverage > 0), over its sub-pixel placements (a 1/16 px grid): centred on a
    pixel corner a square of radius 6.84 touches 14 x 14 pixels, on a pixel centre 15 x 15."""
    m = int(np.ceil(radius)) + 2
    offsets = np.arange(16, dtype=np.float32) / 16
    ox, oy = (v.reshape(-1, 1, 1) for v in np.meshgrid(offsets, offsets))
    cover = _coverage(shape, radius, (m + ox, m + oy), 2 * m + 1, 2 * m + 1)  # [256, 2m + 1, 2m + 1]
    return int((cover > 0).sum(axis=(1, 2)).max())


def footprint(truth: dict) -> int:
    """``K``: the most pixels the sprites can touch (coverage > 0), summed over sprites. Where the sprites are does
    not matter: at most this many pixels of a true frame differ from the background."""
    shapes, _, radii = _sprites(truth)
    return int(sum(_sprite_footprint(s, float(r)) for s, r in zip(shapes, radii, strict=True)))


def nominal_area(shape: str, radius: float) -> float:
    """A sprite's area in pixels by its shape: ``pi r^2`` for a disc, ``(2r)^2`` for a square."""
    return float(np.pi * radius * radius) if shape == "disc" else float(4.0 * radius * radius)


def _check_frames(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 [N, H, W, 3] array, got {frames.dtype} {frames.shape}")
    if frames.shape[1:] != background.shape:
        raise ValueError(f"frames are {frames.shape[1:3]} but the true background is {background.shape[:2]}")
    return frames


def frame_metrics(frames: np.ndarray, truth: dict) -> dict[str, np.ndarray]:
    """Per frame of uint8 ``[N, H, W, 3]`` frames: ``bg_rmse``, ``bg_psnr``, ``sprite_presence`` (float ``[N]``)
    and ``sprites_kept`` (int ``[N]``), measured against the truth dict without its positions (module docstring)."""
    bg = np.asarray(truth["background"])
    frames = _check_frames(frames, bg)
    n, h, w = frames.shape[:3]
    shapes, colours, radii = _sprites(truth)
    x = frames.reshape(n, h * w, 3).astype(np.float32) / np.float32(255.0)
    b = bg.reshape(1, h * w, 3).astype(np.float32) / np.float32(255.0)
    diff = x - b

    # Background: drop the K worst pixels (the sprites, wherever they are), RMSE of the rest.
    err = np.abs(diff).max(axis=2)  # [N, HW]
    keep = h * w - min(footprint(truth), h * w - 1)
    kept = np.argpartition(err, keep - 1, axis=1)[:, :keep]
    sq = (diff * diff).mean(axis=2, dtype=np.float64)
    mse = np.take_along_axis(sq, kept, axis=1).mean(axis=1)
    bg_rmse = np.sqrt(mse)
    with np.errstate(divide="ignore"):
        bg_psnr = np.minimum(PSNR_CAP_DB, 10.0 * np.log10(1.0 / np.maximum(mse, 0.0)))

    # Sprites: pixels of each sprite's colour that are not just background.
    off_bg = np.sqrt((diff * diff).sum(axis=2)) >= BG_TOL  # [N, HW]
    presence = np.zeros((n, len(shapes)))
    kept_count = np.zeros(n, dtype=np.int64)
    for k, (shape, radius) in enumerate(zip(shapes, radii, strict=True)):
        near = np.linalg.norm(x - colours[k].astype(np.float32), axis=2) < COLOUR_TOL
        area = (near & off_bg).sum(axis=1)
        need = AREA_SHARE * nominal_area(shape, radius)
        presence[:, k] = np.minimum(1.0, area / need)
        kept_count += area >= need
    sprite_presence = presence.mean(axis=1) if len(shapes) else np.ones(n)
    return {"bg_rmse": bg_rmse, "bg_psnr": bg_psnr, "sprite_presence": sprite_presence, "sprites_kept": kept_count}


def _motion(frames: np.ndarray) -> float | None:
    """Mean |frame t+1 - frame t| in [0, 1] units over the clip; None for a single frame."""
    if len(frames) < 2:
        return None
    return float(np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(dtype=np.float64) / 255.0)


def _sharpness(frames: np.ndarray) -> float:
    """Laplacian variance of BT.601 luma (0-255 units), averaged over frames, exactly as svi_infer.evaluate.metrics."""
    return float(np.mean(_laplacian_var(_luma(frames))))


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None or reference == 0 else value / reference


def clip_metrics(frames: np.ndarray, truth_frames: np.ndarray | None, truth: dict) -> dict[str, float | None]:
    """One clip's scores: the frame metrics' means, ``sprites_kept_min``, ``motion``/``sharpness`` and their ratios
    to the true clip ``truth_frames`` (same length; only its motion and sharpness levels are used, so it need not
    follow the generated trajectories). A ratio is None without a true clip or when its level is 0."""
    per_frame = frame_metrics(frames, truth)
    out: dict[str, float | None] = {name: float(values.mean()) for name, values in per_frame.items()}
    out["sprites_kept_min"] = int(per_frame["sprites_kept"].min())
    frames = np.asarray(frames)
    out["motion"] = _motion(frames)
    out["sharpness"] = _sharpness(frames)
    true_motion = true_sharpness = None
    if truth_frames is not None:
        truth_frames = _check_frames(truth_frames, np.asarray(truth["background"]))
        true_motion, true_sharpness = _motion(truth_frames), _sharpness(truth_frames)
    out["motion_ratio"] = _ratio(out["motion"], true_motion)
    out["sharpness_ratio"] = _ratio(out["sharpness"], true_sharpness)
    return out


def rollout_metrics(
    frames: np.ndarray, truth_frames: np.ndarray | None, truth: dict, clips: list[tuple[int, int]]
) -> list[dict]:
    """:func:`clip_metrics` of each ``[start, end)`` range of a rollout (e.g.
    ``svi_infer.evaluate.metrics.clip_ranges``), each against the same range of the true video, with
    ``index``/``start``/``end`` added."""
    frames = np.asarray(frames)
    records = []
    for k, (start, end) in enumerate(clips):
        if not 0 <= start < end <= len(frames):
            raise ValueError(f"clip {k} = [{start}, {end}) does not fit {len(frames)} frames")
        ref = None if truth_frames is None else np.asarray(truth_frames)[start:end]
        if ref is not None and len(ref) != end - start:
            raise ValueError(f"clip {k} = [{start}, {end}) does not fit the {len(truth_frames)} true frames")
        records.append({"index": k, "start": start, "end": end, **clip_metrics(frames[start:end], ref, truth)})
    return records
