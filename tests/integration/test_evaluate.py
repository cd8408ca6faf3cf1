"""svi_infer.evaluate: drift metrics with known answers on small synthetic videos, the CLI, a tiny-model video."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from svi_infer.evaluate.cli import main
from svi_infer.evaluate.metrics import clip_ranges, evaluate_frames, summary_scalars
from svi_infer.evaluate.reading import evaluate_video
from svi_infer.evaluate.report import format_summary
from svi_infer.longvideo.generator import LongVideoGenerator
from svi_infer.settings import GenerationSettings
from svi_infer.video_io import write_mp4

H, W, FPS = 32, 48, 16
PREFIX = "svi_infer.evaluate: error: "


def _texture(seed: int = 0, lo: int = 40, hi: int = 150) -> np.ndarray:
    """A smooth-ish random ``H x W`` texture (4x4 blocks + noise), values in [lo, hi]."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(lo, hi, (H // 4, W // 4, 3)).repeat(4, 0).repeat(4, 1)
    noise = rng.integers(-10, 11, blocks.shape)
    return np.clip(blocks + noise, lo, hi).astype(np.uint8)


def _smooth(seed: int = 0) -> np.ndarray:
    """Smooth colour waves, periodic in x: a 1 px slide changes little, like consecutive video frames."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (3, 2))
    waves = [128 + 60 * np.sin(2 * np.pi * x + p[0]) + 30 * np.cos(2 * np.pi * y + p[1]) for p in phase]
    return np.stack(waves, axis=-1).round().astype(np.uint8)


def _moving(n: int, texture: np.ndarray | None = None) -> np.ndarray:
    """``n`` frames of a texture sliding 1 px per frame to the left, wrapping around: every frame step alike and
    every frame the same pixels (the same colour statistics)."""
    texture = _texture() if texture is None else texture
    return np.stack([np.roll(texture, -i, axis=1) for i in range(n)])


def _box_blur(frames: np.ndarray, radius: int = 2) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.BoxBlur(radius))) for f in frames])


def _values(report: dict, key: str) -> list:
    return [c[key] for c in report["clips"]]


# -- segmentation -----------------------------------------------------------------------------------
def test_clip_ranges_exact():
    assert clip_ranges(241, 81, 1) == [(0, 81), (81, 161), (161, 241)]
    assert clip_ranges(250, 81, 1) == [(0, 81), (81, 161), (161, 241), (241, 250)]  # trailing partial clip
    assert clip_ranges(50, 81, 1) == [(0, 50)]
    assert clip_ranges(81, 81, 1) == [(0, 81)]
    assert clip_ranges(37, 13, 5) == [(0, 13), (13, 21), (21, 29), (29, 37)]
    assert clip_ranges(26, 13, 0) == [(0, 13), (13, 26)]
    for args in [(10, 13, 13), (10, 13, -1), (10, 0, 0), (0, 13, 1)]:
        with pytest.raises(ValueError):
            clip_ranges(*args)


def test_clips_must_fit_and_not_overlap():
    frames = _moving(20)
    for clips in ([(0, 10), (5, 20)], [(0, 21)], [(3, 3)], []):
        with pytest.raises(ValueError):
            evaluate_frames(frames, FPS, clips)
    with pytest.raises(ValueError):
        evaluate_frames(frames.astype(np.float32), FPS, [(0, 20)])


# -- known answers ----------------------------------------------------------------------------------
def test_linear_colour_shift_drifts_linearly():
    """Every channel brightens by one code value per frame: clip k's mean differs from clip 0's by the
    difference of their mean frame index, std unchanged (clips of equal length), so colour drift =
    sqrt(3) * that / 255 exactly. Clips of 21 frames also cross the 16-frame measuring chunks."""
    clips = clip_ranges(5 * 21, 21, 0)
    n = clips[-1][1]
    frames = (_moving(n).astype(np.int16) + np.arange(n)[:, None, None, None]).astype(np.uint8)
    report = evaluate_frames(frames, FPS, clips, reference=frames[0])
    centre = [np.mean(range(s, e)) for s, e in clips]
    expected = [math.sqrt(3) * (c - centre[0]) / 255 for c in centre]
    assert _values(report, "color_drift_first") == pytest.approx(expected, rel=1e-6, abs=1e-9)
    hist = _values(report, "hist_drift_first")
    ref = _values(report, "color_drift_ref")
    assert hist[0] == 0 and all(b > a for a, b in zip(hist, hist[1:], strict=False)) and hist[-1] <= 1
    assert all(b > a for a, b in zip(ref, ref[1:], strict=False))
    s, e = clips[2]
    f = frames[s:e].astype(np.float64) / 255
    assert report["clips"][2]["mean"] == pytest.approx(f.mean(axis=(0, 1, 2)).tolist(), rel=1e-9)
    assert report["clips"][2]["std"] == pytest.approx(f.std(axis=(0, 1, 2)).tolist(), rel=1e-6)
    steps = np.abs(np.diff(frames[s:e].astype(np.int16), axis=0)).mean(axis=(1, 2, 3)) / 255
    assert report["clips"][2]["motion"] == pytest.approx(steps.mean(), rel=1e-9)
    summary = report["summary"]
    assert summary == summary_scalars(report)
    assert summary["color_drift_last"] == pytest.approx(expected[-1], rel=1e-6)
    slope = math.sqrt(3) * FPS * 60 / 255  # one code value per frame, per minute
    assert summary["color_drift_rate_per_min"] == pytest.approx(slope, rel=0.02)
    assert summary["seam_flicker_max"] < 1.2
    json.dumps(report, allow_nan=False)


def test_frozen_video_has_no_motion_and_unit_flicker():
    frames = np.repeat(_texture()[None], 37, axis=0)
    report = evaluate_frames(frames, FPS, clip_ranges(37, 13, 1))
    assert _values(report, "motion") == [0.0, 0.0, 0.0]
    assert [s["flicker"] for s in report["seams"]] == [1.0, 1.0]  # 0/0 guarded: (0 + eps) / (0 + eps)
    summary = report["summary"]
    assert summary["motion_min"] == 0.0 and summary["seam_flicker_max"] == 1.0
    assert summary["color_drift_last"] == pytest.approx(0.0, abs=1e-9)
    assert summary["hist_drift_last"] == pytest.approx(0.0, abs=1e-6)
    assert summary["sharpness_ratio_last"] == pytest.approx(1.0)


def test_cut_between_frozen_clips_is_large_and_finite():
    a, b = _texture(1)[None], _texture(2)[None]
    frames = np.concatenate([np.repeat(a, 25, axis=0), np.repeat(b, 12, axis=0)])  # cut at clip 2's seam
    seams = evaluate_frames(frames, FPS, clip_ranges(37, 13, 1))["seams"]
    assert [s["frame"] for s in seams] == [13, 25]
    assert seams[0]["flicker"] == 1.0
    assert math.isfinite(seams[1]["flicker"]) and seams[1]["flicker"] > 20


def test_motion_is_in_unit_range():
    frames = np.zeros((13, H, W, 3), np.uint8)
    frames[1::2] = 255  # black, white, black, ...: every step is the largest possible
    assert evaluate_frames(frames, FPS, [(0, 13)])["clips"][0]["motion"] == 1.0


def test_hard_cut_at_a_seam_flickers():
    clips = clip_ranges(13 + 4 * 12, 13, 1)
    frames = _moving(clips[-1][1], _smooth(1))
    cut = clips[2][0]
    frames[cut:] = _moving(len(frames) - cut, _smooth(2))  # another scene from clip 2 on, same motion
    report = evaluate_frames(frames, FPS, clips)
    flicker = {s["clip"]: s["flicker"] for s in report["seams"]}
    others = [v for k, v in flicker.items() if k != 2]
    assert all(0.8 < v < 1.25 for v in others)
    assert flicker[2] > 5 and flicker[2] > 5 * max(others)
    assert report["summary"]["seam_flicker_max"] == flicker[2]


def test_blurred_tail_loses_sharpness():
    clips = clip_ranges(13 + 4 * 12, 13, 1)
    frames = _moving(clips[-1][1], _texture(3, lo=0, hi=255))
    tail = clips[3][0]
    frames[tail:] = _box_blur(frames[tail:])
    report = evaluate_frames(frames, FPS, clips)
    sharp = _values(report, "sharpness")
    assert all(0.8 < v / sharp[0] < 1.25 for v in sharp[1:3])
    assert sharp[3] < 0.5 * sharp[0] and sharp[4] < 0.5 * sharp[0]
    assert report["summary"]["sharpness_ratio_last"] < 0.5
    assert report["summary"]["sharpness_ratio_min"] == min(v / sharp[0] for v in sharp)


def test_reference_ssim_is_one_then_falls_as_it_drifts():
    rng = np.random.default_rng(5)
    ref = _texture(4, lo=0, hi=255)
    clips = clip_ranges(13 + 4 * 12, 13, 1)
    frames = np.repeat(ref[None], clips[-1][1], axis=0).astype(np.int16)
    for k, (s, e) in enumerate(clips[2:], start=1):  # clips 2, 3, 4: more and more noise
        frames[s:e] += rng.integers(-25 * k, 25 * k + 1, frames[s:e].shape)
    frames = np.clip(frames, 0, 255).astype(np.uint8)
    wide = np.pad(ref, ((0, 0), (8, 8), (0, 0)))  # another aspect ratio: fitted (centre crop) back to ref
    report = evaluate_frames(frames, FPS, clips, reference=wide)
    ssim = _values(report, "ssim_ref")
    assert ssim[0] == pytest.approx(1.0, abs=1e-5) and ssim[1] == pytest.approx(1.0, abs=1e-5)
    assert ssim[2] < 0.99 and ssim[2] > ssim[3] > ssim[4]
    assert _values(report, "color_drift_ref")[0] == pytest.approx(0.0, abs=1e-9)
    assert report["reference"]["sharpness"] == pytest.approx(report["clips"][0]["sharpness"])
    summary = report["summary"]
    assert summary["ssim_ref_first"] == ssim[0] and summary["ssim_ref_last"] == ssim[-1]
    assert summary["ssim_ref_min"] == ssim[-1]

    plain = evaluate_frames(frames, FPS, clips)  # no reference: the reference metrics are absent, not zero
    assert plain["reference"] is None
    for clip in plain["clips"]:
        assert not {"color_drift_ref", "hist_drift_ref", "ssim_ref"} & clip.keys()
    assert not [k for k in plain["summary"] if "ref" in k]


def test_summary_of_a_long_video_fits_one_screen():
    clips = clip_ranges(4 + 39 * 3, 4, 1)  # 40 clips
    report = evaluate_frames(_moving(clips[-1][1]), FPS, clips)
    text = format_summary(report)
    assert len(text.splitlines()) <= 40
    assert "  ... 28 more ..." in text and "  ... 27 more ..." in text  # 40 clips, 39 seams: 6 + 6 shown of each
    assert text.splitlines()[0] == "frames: 121 frames, 32x48, 16 fps, 7.56 s; 40 clips (given)"


# -- files and the CLI --------------------------------------------------------------------------------
def _shifting_video(path, n=37, clip_frames=13):
    frames = (_moving(n, _smooth()).astype(np.int16) + np.arange(n)[:, None, None, None]).astype(np.uint8)
    write_mp4(path, frames, FPS)
    return frames


def _sidecar(video, clips, **settings):
    record = {"settings": {"frames_per_clip": 13, "motion_frames": 1, "fps": FPS, **settings}}
    record["clips"] = [{"index": k, "frames": list(c)} for k, c in enumerate(clips)]
    video.with_suffix(".json").write_text(json.dumps(record))


def test_sidecar_drives_the_segmentation(tmp_path):
    video = tmp_path / "v.mp4"
    _shifting_video(video)
    _sidecar(video, [(0, 10), (10, 30), (30, 37)])  # no clip_ranges() gives this: it must come from the file
    report = evaluate_video(video)
    assert [(c["start"], c["end"]) for c in report["clips"]] == [(0, 10), (10, 30), (30, 37)]
    assert [s["frame"] for s in report["seams"]] == [10, 30]
    seg = report["settings"]["segmentation"]
    assert seg["source"] == "sidecar" and seg["sidecar"] == str(video.with_suffix(".json"))
    assert report["settings"]["fps"] == FPS and report["video"] == str(video)

    explicit = evaluate_video(video, clip_frames=13, overlap=1)  # explicit values override the sidecar
    assert [(c["start"], c["end"]) for c in explicit["clips"]] == [(0, 13), (13, 25), (25, 37)]
    assert explicit["settings"]["segmentation"]["source"] == "arguments"
    half = evaluate_video(video, clip_frames=19)  # the overlap still comes from the sidecar's settings
    assert [(c["start"], c["end"]) for c in half["clips"]] == [(0, 19), (19, 37)]

    video.with_suffix(".json").write_text('{"not": "a sidecar"}')
    default = evaluate_video(video)  # no sidecar: 81 frames, overlap 1 -> one clip for 37 frames
    assert default["settings"]["segmentation"]["source"] == "default"
    assert [(c["start"], c["end"]) for c in default["clips"]] == [(0, 37)] and default["seams"] == []
    assert "seam_flicker_max" not in default["summary"]


def test_cli_end_to_end(tmp_path, capsys):
    from matplotlib.image import imread

    video, ref = tmp_path / "boat.mp4", tmp_path / "first.png"
    frames = _shifting_video(video)
    Image.fromarray(frames[0]).save(ref)
    out = tmp_path / "eval"
    main([str(video), "--reference", str(ref), "--clip-frames", "13", "--overlap", "1", "--output-dir", str(out)])
    stdout = capsys.readouterr().out
    report = json.loads((out / "boat.eval.json").read_text())
    assert set(report) == {"video", "settings", "reference", "clips", "seams", "summary"}
    assert report["reference"]["path"] == str(ref) and len(report["clips"]) == 3 and len(report["seams"]) == 2
    drift = _values(report, "color_drift_first")
    assert drift[0] == 0 and drift[1] > 0.05 and drift[2] > drift[1]  # 1 code value per frame, through x264
    ssim = _values(report, "ssim_ref")
    assert 0.5 < ssim[0] <= 1.0 and ssim[2] < ssim[0]
    assert report["summary"] == summary_scalars(report)
    image = imread(out / "boat.eval.png")
    assert image.ndim == 3 and image.shape[0] > 300
    assert not list(out.glob(".*.tmp*"))  # atomic writes leave nothing behind
    for text in ("boat.mp4: 37 frames, 32x48, 16 fps", "colour vs first", "SSIM ref", "flicker", "headline figures:"):
        assert text in stdout
    assert f"report: {out / 'boat.eval.json'}" in stdout and len(stdout.splitlines()) < 40

    _sidecar(video, [(0, 13), (13, 25), (25, 37)])
    main([str(video)])  # default paths, beside the video; clips from the sidecar
    assert (tmp_path / "boat.eval.json").is_file() and (tmp_path / "boat.eval.png").is_file()
    assert "3 clips (sidecar)" in capsys.readouterr().out


def _bad_inputs(tmp_path):
    video = tmp_path / "v.mp4"
    _shifting_video(video)
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "afile").write_text("")
    return {
        "missing video": [str(tmp_path / "nope.mp4")],
        "unreadable video": [str(tmp_path / "text.mp4")],
        "missing reference": [str(video), "--reference", str(tmp_path / "nope.png")],
        "unreadable reference": [str(video), "--reference", str(tmp_path / "text.png")],
        "overlap >= clip frames": [str(video), "--clip-frames", "13", "--overlap", "13"],
        "zero clip frames": [str(video), "--clip-frames", "0"],
        "output dir is a file": [str(video), "--output-dir", str(tmp_path / "afile")],
    }


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    video = tmp_path / "v.mp4"
    _sidecar(video.with_name("w.mp4"), [(0, 13), (13, 50)])
    write_mp4(video.with_name("w.mp4"), _moving(37), FPS)
    cases["sidecar does not fit"] = [str(video.with_name("w.mp4"))]
    _sidecar(video.with_name("x.mp4"), [(0, 13), (13, 25)])
    write_mp4(video.with_name("x.mp4"), _moving(37), FPS)
    cases["sidecar of a shorter video"] = [str(video.with_name("x.mp4"))]
    for name, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith(PREFIX), (name, err)

    assert not list(tmp_path.rglob("*.eval.*"))


def test_python_m_runs_the_module(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "svi_infer.evaluate", str(tmp_path / "missing.mp4")], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"{PREFIX}video {tmp_path / 'missing.mp4'} does not exist"]


# -- a video from the tiny model ----------------------------------------------------------------------
def test_tiny_model_video(tiny21, first_frame, image_file, tmp_path):
    settings = GenerationSettings(frames_per_clip=13, steps=2, height=48, width=80, num_clips=3)
    result = LongVideoGenerator(tiny21, settings).generate(first_frame, ["a boat"], tmp_path / "v.mp4", progress=False)
    sidecar = json.loads(result.sidecar.read_text())
    report = evaluate_video(result.video, reference=image_file)
    assert report["settings"]["segmentation"]["source"] == "sidecar"
    assert [[c["start"], c["end"]] for c in report["clips"]] == [c["frames"] for c in sidecar["clips"]]
    assert len(report["seams"]) == 2 and report["settings"]["num_frames"] == result.frames
    metrics = ["color_drift_first", "hist_drift_first", "color_drift_ref", "hist_drift_ref", "sharpness"]
    for clip in report["clips"]:
        values = [clip[k] for k in [*metrics, "ssim_ref", "motion"]] + clip["mean"] + clip["std"]
        assert all(math.isfinite(v) for v in values)
    assert all(math.isfinite(s["flicker"]) for s in report["seams"])
    expected = {"color_drift_last", "hist_drift_last", "sharpness_ratio_last", "ssim_ref_first", "ssim_ref_last"}
    expected |= {"seam_flicker_max", "seam_flicker_mean", "motion_min", "motion_mean"}
    assert expected <= report["summary"].keys()
    assert all(isinstance(v, float) and math.isfinite(v) for v in report["summary"].values())
