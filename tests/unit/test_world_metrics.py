"""svi_infer.evaluate.world: trajectory-free toy-world scores with known answers on rendered worlds."""

import dataclasses
import math

import numpy as np
import pytest

from data_tools.toy_world import make_world, render, sprite_coverage, truth
from svi_infer.evaluate.metrics import clip_ranges, evaluate_frames
from svi_infer.evaluate.world import clip_metrics, frame_metrics, rollout_metrics

SEED = 100_004  # held-out world with two sprites (a square and a disc) that never come near each other in T frames
T = 33


@pytest.fixture(scope="module")
def world():
    w = make_world(SEED)
    assert len(w.shapes) >= 2
    return w


@pytest.fixture(scope="module")
def frames(world):
    return render(world, T)


@pytest.fixture(scope="module")
def gt(world):
    return truth(world, T)


def _shifted(world, num_frames: int, delta: float = 0.1) -> np.ndarray:
    """The world re-rendered over its background + ``delta`` (sprites drawn exactly as before)."""
    return render(dataclasses.replace(world, background=world.background + np.float32(delta)), num_frames)


def test_true_frames_score_perfectly(frames, gt):
    per_frame = frame_metrics(frames, gt)
    assert per_frame["bg_rmse"].max() < 0.003
    assert per_frame["sprite_presence"].min() > 0.99
    assert (per_frame["sprites_kept"] == len(gt["shapes"])).all()
    clip = clip_metrics(frames, frames, gt)
    assert clip["motion_ratio"] == 1.0
    assert clip["sharpness_ratio"] == 1.0
    assert clip["sprites_kept_min"] == len(gt["shapes"])
    for seed in range(100_000, 100_006):  # sprites anywhere (overlapping or not): the footprint K excludes them
        w = make_world(seed)
        assert frame_metrics(render(w, T), truth(w, T))["bg_rmse"].max() < 0.003


def test_background_shift_is_measured(world, frames, gt):
    clip = clip_metrics(_shifted(world, T), frames, gt)
    assert abs(clip["bg_rmse"] - 0.1) < 0.005
    assert clip["sprite_presence"] > 0.99  # the sprites are untouched


def test_painted_over_sprite_is_missing(world, frames, gt):
    n = len(world.shapes)
    pos = world.positions(T)
    for i in range(n):  # the test needs sprites that never touch: painting one must not erase another
        for j in range(i + 1, n):
            assert np.linalg.norm(pos[:, i] - pos[:, j], axis=1).min() > world.radii[i] + world.radii[j] + 2
    painted = frames.copy()
    for t in range(T):
        cover = sprite_coverage(world.shapes[0], float(world.radii[0]), pos[t, 0]) > 0
        painted[t][cover] = gt["background"][cover]
    per_frame = frame_metrics(painted, gt)
    assert np.allclose(per_frame["sprite_presence"], (n - 1) / n, atol=0.01)
    assert (per_frame["sprites_kept"] == n - 1).all()
    assert per_frame["bg_rmse"].max() < 0.003


def test_frozen_rollout_has_no_motion(frames, gt):
    clip = clip_metrics(np.repeat(frames[:1], T, axis=0), frames, gt)
    assert clip["motion"] == 0.0
    assert clip["motion_ratio"] == 0.0
    assert clip_metrics(frames[:1].repeat(3, axis=0), frames[:1].repeat(3, axis=0), gt)["motion_ratio"] is None


def test_blur_lowers_sharpness(frames, gt):
    x = np.pad(frames.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    box = sum(x[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
    blurred = np.round(box).astype(np.uint8)
    clip = clip_metrics(blurred, frames, gt)
    assert clip["sharpness_ratio"] < 0.8


def test_rollout_metrics_per_clip(world, frames, gt):
    clips = clip_ranges(T, 17, 1)
    records = rollout_metrics(frames, frames, gt, clips)
    assert [(r["start"], r["end"]) for r in records] == clips
    assert all(r["motion_ratio"] == 1.0 and r["bg_rmse"] < 0.003 for r in records)


def test_evaluate_colour_drift_on_world():
    w = make_world(SEED)
    num_frames = 65
    true = render(w, num_frames)
    clips = clip_ranges(num_frames, 17, 1)
    assert len(clips) == 4
    report = evaluate_frames(true, 8.0, clips)
    assert max(c["color_drift_first"] for c in report["clips"]) < 0.02
    drifted = true.copy()
    drifted[clips[1][0] :] = _shifted(w, num_frames)[clips[1][0] :]
    last = evaluate_frames(drifted, 8.0, clips)["clips"][-1]["color_drift_first"]
    assert abs(last - 0.1 * math.sqrt(3)) < 0.03
