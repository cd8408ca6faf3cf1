import json

import pytest

from svi_infer.longvideo.generator import LongVideoGenerator, ResumeMismatchError
from svi_infer.longvideo.outputs import parts_dir
from svi_infer.settings import GenerationSettings
from svi_infer.video_io import read_video
from tests.helpers import interrupt_at

SMALL = dict(frames_per_clip=13, steps=2, height=48, width=80, num_clips=3)


def _generate(model, image, out, **kw):
    settings = GenerationSettings(**{**SMALL, **kw})
    return LongVideoGenerator(model, settings).generate(image, ["a boat", "the sea"], out, progress=False)


@pytest.mark.parametrize(
    "mode",
    [
        dict(handoff="pixel", ref_pad_num=-1, motion_frames=1),  # Shot
        dict(handoff="pixel", ref_pad_num=0, motion_frames=5),  # Film
        dict(handoff="pixel", ref_pad_num=2, motion_frames=1),  # anchor twice, then zeros
        dict(handoff="latent", motion_latents=1),  # SVI 2.0 Pro
        dict(handoff="latent", motion_latents=2),
    ],
    ids=["shot", "film", "pad2", "pro", "pro2"],
)
def test_three_clips_each_mode(tiny21, first_frame, tmp_path, mode):
    result = _generate(tiny21, first_frame, tmp_path / "v.mp4", **mode)
    settings = GenerationSettings(**{**SMALL, **mode})
    overlap = settings.overlap_frames
    expected = 13 + 2 * (13 - overlap)  # clip 0 whole, later clips drop the frames that repeat the seam
    assert result.frames == expected and result.clips == 3
    frames = read_video(result.video)
    assert frames.shape == (expected, 48, 80, 3)
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["complete"] and sidecar["frames"] == expected
    assert [c["seed"] for c in sidecar["clips"]] == [42, 43, 44]  # seed_policy=increment: seed + k
    assert sidecar["settings"]["seed_policy"] == "increment"
    assert [c["prompt"] for c in sidecar["clips"]] == ["a boat", "the sea", "a boat"]
    assert [c["frames"] for c in sidecar["clips"]] == [[0, 13], [13, 26 - overlap], [26 - overlap, expected]]
    assert sidecar["settings"]["handoff"] == mode["handoff"]
    assert not parts_dir(result.video).exists()


@pytest.mark.slow
def test_wan22_two_experts_latent_handoff(tiny22, first_frame, tmp_path):
    result = _generate(tiny22, first_frame, tmp_path / "v.mp4", handoff="latent", steps=8)
    assert read_video(result.video).shape[0] == 13 + 2 * 8


def test_pixel_handoff_feeds_the_last_frames_on(tiny21, first_frame, tmp_path, monkeypatch):
    """Clip k>0 is conditioned on exactly the last m frames that clip k-1 wrote."""
    seen = []
    original = LongVideoGenerator._clip

    def spy(self, k, prompt, seed, anchor, anchor_latent, tail, negative, progress):
        seen.append(None if tail is None else tail.clone())
        return original(self, k, prompt, seed, anchor, anchor_latent, tail, negative, progress)

    monkeypatch.setattr(LongVideoGenerator, "_clip", spy)
    result = _generate(tiny21, first_frame, tmp_path / "v.mp4", num_clips=2, ref_pad_num=0, motion_frames=5)
    assert seen[0] is None and seen[1].shape == (3, 5, 48, 80)
    assert result.frames == 13 + 8


@pytest.mark.slow
@pytest.mark.parametrize("handoff", ["pixel", "latent"])
def test_resume_gives_the_same_video(tiny21, first_frame, tmp_path, monkeypatch, handoff):
    full = _generate(tiny21, first_frame, tmp_path / "full.mp4", handoff=handoff, motion_frames=1)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _generate(tiny21, first_frame, tmp_path / "resumed.mp4", handoff=handoff, motion_frames=1)
    state = json.loads((parts_dir(tmp_path / "resumed.mp4") / "state.json").read_text())
    assert len(state["clips"]) == 2
    resumed = _generate(tiny21, first_frame, tmp_path / "resumed.mp4", handoff=handoff, motion_frames=1)
    assert (tmp_path / "full.mp4").read_bytes() == (tmp_path / "resumed.mp4").read_bytes()
    assert (read_video(full.video) == read_video(resumed.video)).all()
    side = [json.loads(p.read_text())["clips"] for p in (full.sidecar, resumed.sidecar)]
    assert [(c["seed"], c["frames"]) for c in side[0]] == [(c["seed"], c["frames"]) for c in side[1]]


def test_resume_with_other_settings_is_refused(tiny21, first_frame, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _generate(tiny21, first_frame, tmp_path / "v.mp4")
    with pytest.raises(ResumeMismatchError, match="resume=false"):
        _generate(tiny21, first_frame, tmp_path / "v.mp4", cfg_scale=3.0)
    settings = GenerationSettings(**{**SMALL, "cfg_scale": 3.0})
    result = LongVideoGenerator(tiny21, settings).generate(
        first_frame, ["x"], tmp_path / "v.mp4", resume=False, progress=False
    )
    assert result.clips == 3


def test_random_seeds_are_recorded(tiny21, first_frame, tmp_path):
    result = _generate(tiny21, first_frame, tmp_path / "v.mp4", seed_policy="random", num_clips=2)
    seeds = [c["seed"] for c in json.loads(result.sidecar.read_text())["clips"]]
    assert len(set(seeds)) == 2 and all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(frames_per_clip=12), "4k\\+1"),
        (dict(motion_frames=13), "motion_frames"),
        (dict(height=50), "multiple of 16"),
        (dict(handoff="latent", motion_latents=3), "motion_latents"),
        (dict(handoff="vae"), "handoff"),
        (dict(seed=0, seed_policy="multiply"), "same noise"),
    ],
)
def test_bad_settings_are_refused(tiny21, bad, message):
    with pytest.raises(ValueError, match=message):
        LongVideoGenerator(tiny21, GenerationSettings(**{**SMALL, **bad}))


def test_memory_of_the_loop_does_not_hold_clips(tiny21, first_frame, tmp_path, monkeypatch):
    """Only the tail (m frames) is carried from clip to clip, whatever the number of clips."""
    tails = []
    original = LongVideoGenerator._clip

    def spy(self, k, prompt, seed, anchor, anchor_latent, tail, negative, progress):
        tails.append(0 if tail is None else tail.numel())
        return original(self, k, prompt, seed, anchor, anchor_latent, tail, negative, progress)

    monkeypatch.setattr(LongVideoGenerator, "_clip", spy)
    _generate(tiny21, first_frame, tmp_path / "v.mp4", num_clips=4)
    assert tails == [0] + [3 * 1 * 48 * 80] * 3
