"""Talk (audio) and Dance (pose) generation on the tiny model: guidance, per-clip audio/pose, muxing, side-by-side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import svi_infer.pose as pose_module
import svi_infer.variants.talk as talk_module
from svi_infer.audio import AudioEncoder, AudioError, clip_frames, clips_for_frames
from svi_infer.conditioning import first_frames_mask, with_mask
from svi_infer.longvideo.generator import LongVideoGenerator, ResumeMismatchError
from svi_infer.longvideo.outputs import parts_dir
from svi_infer.pose import (
    PoseEncoder,
    attach_pose,
    find_pose_encoder,
    fit_pose,
    pose_frames_for_clip,
    read_pose_video,
)
from svi_infer.sampler import PassInputs, TalkGuidance, sample_clip
from svi_infer.settings import GenerationSettings
from svi_infer.talk import AudioWindows, get_talk, latent_windows, set_audio
from svi_infer.variants import make_conditioning
from svi_infer.variants.dance import side_by_side_path
from svi_infer.variants.talk import attach_talk_modules
from svi_infer.variants.talk import clip_audio_windows as talk_windows
from svi_infer.video_io import probe_streams, read_video, write_mp4
from tests.helpers import interrupt_at, sine, write_wav

F = 13  # frames per clip in these tests (4k+1)
SMALL = dict(frames_per_clip=F, steps=2, height=48, width=80)
TALK = dict(SMALL, conditioning="audio", fps=25, cfg_scale=2.0, cfg_scale_audio=5.0)
DANCE = dict(SMALL, conditioning="pose", fps=25, cfg_scale=2.0)
AAC_FRAME_S = 1024 / 48000  # mux_audio writes 48 kHz AAC


def _talking(encoder: AudioEncoder):
    """Talk's conditioning with ``encoder``."""
    return make_conditioning("audio", audio_encoder=encoder)


def write_pose_video(path: Path, frames: int = 7, height: int = 40, width: int = 64) -> Path:
    """A pose video of another size and length than the generation: a block moving right, a colour per frame."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        video[i, 8:32, 4 + 6 * i : 16 + 6 * i] = (255, 40 * i % 256, 255 - 30 * i)
    write_mp4(path, video, fps=25)
    return path


@pytest.fixture
def talk21(tiny21):
    attach_talk_modules(tiny21)
    return tiny21


@pytest.fixture
def dance21(tiny21):
    torch.manual_seed(5)
    attach_pose(tiny21.transformers[0], PoseEncoder(tiny21.spec.dim))
    return tiny21


def _talk(model, **kw) -> LongVideoGenerator:
    return LongVideoGenerator(
        model,
        GenerationSettings(**{**TALK, **kw}),
        conditioning=make_conditioning("audio", audio_encoder=AudioEncoder.tiny()),
    )


# --- guidance ------------------------------------------------------------------------------------------------


def test_talk_guidance_formula_exact():
    v = {"cond": torch.tensor([7.0, 1.0]), "droptext": torch.tensor([3.0, 2.0]), "uncond": torch.tensor([2.0, 4.0])}
    g = TalkGuidance(2.0, 5.0)
    assert g.passes() == ("cond", "droptext", "uncond")
    # v_uncond + s_text (v_cond - v_droptext) + s_audio (v_droptext - v_uncond)
    assert g.combine(v).tolist() == [2 + 2 * 4 + 5 * 1, 4 + 2 * -1 + 5 * -2]
    assert TalkGuidance(1.0, 5.0).combine(v).tolist() == [2 + 4 + 5, 4 - 1 - 10]
    # audio scale 1: the uncond pass cancels, two passes give the same value
    two = TalkGuidance(2.0, 1.0)
    assert two.passes() == ("cond", "droptext")
    assert two.combine(v).tolist() == [2 + 2 * 4 + 1, 4 + 2 * -1 - 2]
    assert TalkGuidance(1.0, 1.0).passes() == ("cond",) and TalkGuidance(1.0, 1.0).combine(v).tolist() == [7.0, 1.0]


def _windows(seed: int, latent_frames: int = 3) -> AudioWindows:
    g = torch.Generator().manual_seed(seed)
    return latent_windows(torch.randn(4 * (latent_frames - 1) + 1, 5, 2, 16, generator=g))


def test_sampler_sets_each_pass_audio_and_combines_three_passes(talk21):
    """One Euler step from sigma 1 to 0 is ``noise - v`` with v the three-pass formula of per-pass forwards."""
    transformer = talk21.transformers[0]
    text = talk21.encode_text(["a person is talking"])
    negative = talk21.encode_text(["still"])
    image = torch.zeros(1, 257, talk21.spec.image_dim)
    audio = _windows(1)
    inputs = {
        "cond": PassInputs(text, image, audio=audio),
        "droptext": PassInputs(negative, image, audio=audio),
        "uncond": PassInputs(negative, image, audio=audio.zeros_like()),
    }
    seen = []
    hook = transformer.register_forward_pre_hook(lambda m, a: seen.append(get_talk(m).audio))
    y = with_mask(torch.randn(1, 16, 3, 6, 10), first_frames_mask(9, 6, 10))
    out = sample_clip(talk21, y, inputs, TalkGuidance(2.0, 5.0), 1, 5.0, torch.Generator().manual_seed(3))
    hook.remove()
    assert len(seen) == 3
    assert torch.equal(seen[0].first[0], audio.first) and torch.equal(seen[1].later[0], audio.later)
    assert torch.count_nonzero(seen[2].first) == 0 and torch.count_nonzero(seen[2].later) == 0
    assert get_talk(transformer).audio is None  # nothing left behind

    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    velocity = {}
    for name, pass_inputs in inputs.items():
        set_audio(transformer, pass_inputs.audio)
        velocity[name] = transformer(
            hidden_states=torch.cat([noise, y], 1),
            timestep=torch.tensor([1000.0]),
            encoder_hidden_states=pass_inputs.text,
            encoder_hidden_states_image=pass_inputs.image,
            return_dict=False,
        )[0]
    set_audio(transformer, None)
    v = (
        velocity["uncond"]
        + 2.0 * (velocity["cond"] - velocity["droptext"])
        + 5.0 * (velocity["droptext"] - velocity["uncond"])
    )
    assert not torch.allclose(velocity["cond"], velocity["droptext"]) and not torch.allclose(
        velocity["droptext"], velocity["uncond"]
    )
    assert torch.allclose(out, noise - v, atol=1e-5)


def test_audio_for_a_model_without_talk_modules_is_refused(tiny21):
    text = tiny21.encode_text(["x"])
    inputs = {"cond": PassInputs(text, torch.zeros(1, 257, 4), audio=_windows(1))}
    y = with_mask(torch.zeros(1, 16, 3, 6, 10), first_frames_mask(9, 6, 10))
    with pytest.raises(ValueError, match="no Talk modules"):
        sample_clip(tiny21, y, inputs, TalkGuidance(1.0, 1.0), 1, 5.0, torch.Generator())


# --- Talk: audio per clip ------------------------------------------------------------------------------------


def _numbered(n: int) -> torch.Tensor:
    """Feature rows holding ``frame index + 1``, so 0 can only mean silence."""
    return (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1).expand(n, 2, 3).clone()


def _frame_of(windows: AudioWindows) -> tuple[list, list]:
    """Per latent frame, the output frame each window row came from (-1: silence)."""
    return (windows.first[..., 0, 0] - 1).long().tolist(), (windows.later[..., 0, 0] - 1).long().tolist()


def test_talk_windows_exact_frames_at_the_seams():
    features = _numbered(30)  # audio for output frames 0..29
    # clip 0: frames 0..12; before the track: its first frame
    first, later = _frame_of(talk_windows(features, 0, F, 1))
    assert first == [[0, 0, 0, 1, 2]]
    assert later == [[0, 0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9, 10], [7, 8, 9, 10, 11, 12, 13, 14]]
    # clip 1 starts on clip 0's last frame (12, the motion frame it re-synthesises): context from clip 0's audio
    first, later = _frame_of(talk_windows(features, 1, F, 1))
    assert first == [[10, 11, 12, 13, 14]]
    assert later[-1] == [19, 20, 21, 22, 23, 24, 25, 26]
    # clip 2: frames 24..36; frames 30+ are past the audio: silence
    first, later = _frame_of(talk_windows(features, 2, F, 1))
    assert first == [[22, 23, 24, 25, 26]]
    assert later[1] == [27, 28, 29, -1, -1, -1, -1, -1] and later[2] == [-1] * 8
    # a 5-frame overlap (Film-like pixel hand-off) moves each clip by F - 5
    first, _ = _frame_of(talk_windows(features, 2, F, 5))
    assert first == [[14, 15, 16, 17, 18]]


@pytest.mark.parametrize("handoff", [dict(handoff="pixel", motion_frames=1), dict(handoff="latent")])
def test_talk_three_clips_audio_follows_the_written_frames_and_is_muxed(
    talk21, first_frame, tmp_path, monkeypatch, handoff
):
    audio = write_wav(tmp_path / "speech.wav", sine(1.4, 0.3))  # 35 frames at 25 fps
    settings = GenerationSettings(**{**TALK, **handoff})
    overlap = settings.overlap_frames
    clips = clips_for_frames(35, F, overlap)
    assert clips >= 3
    captured = {}
    original = talk_module.clip_audio_windows

    def spy(features, k, *args):
        captured["features"] = features
        captured.setdefault("clips", []).append(k)
        return original(features, k, *args)

    monkeypatch.setattr(talk_module, "clip_audio_windows", spy)
    out = tmp_path / "talk.mp4"
    result = _talk(talk21, **handoff).generate(first_frame, ["a person is talking"], out, progress=False, audio=audio)

    expected_frames = F + (clips - 1) * (F - overlap)
    assert result.clips == clips and result.frames == expected_frames
    assert captured["clips"] == list(range(clips)) and captured["features"].shape[0] == 35
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["num_clips"] == clips and sidecar["settings"]["num_clips"] is None
    assert sidecar["audio"]["frames"] == 35 and len(sidecar["audio"]["sha256"]) == 64 and not sidecar["audio"]["silent"]
    # The frames clip k wrote are the tail of clip_frames(k): its audio is the audio of those output frames.
    for k, clip in enumerate(sidecar["clips"]):
        covered = clip_frames(k, F, overlap)
        assert clip["frames"] == [covered.start + (overlap if k else 0), covered.stop]
    info = probe_streams(out)
    assert info["frames"] == expected_frames and info["video"] == pytest.approx(expected_frames / 25)
    assert info["audio_codec"] == "aac" and abs(info["audio"] - info["video"]) <= AAC_FRAME_S
    assert not parts_dir(out).exists()


def test_num_clips_explicit_overrides_the_audio_length(talk21, first_frame, tmp_path):
    audio = write_wav(tmp_path / "long.wav", sine(3.0, 0.3))  # 75 frames: 7 clips by default
    out = tmp_path / "two.mp4"
    result = _talk(talk21, num_clips=2, steps=1).generate(first_frame, ["talking"], out, progress=False, audio=audio)
    assert result.clips == 2 and result.frames == 25
    info = probe_streams(out)
    assert abs(info["audio"] - 1.0) <= AAC_FRAME_S  # the soundtrack is cut to the video
    assert GenerationSettings().num_clips is None  # without audio, None means the built-in 3


def test_silent_audio_is_generated_with_a_warning(talk21, first_frame, tmp_path):
    silent = write_wav(tmp_path / "silence.wav", sine(0.52, 0.0))  # 13 frames: one clip
    out = tmp_path / "quiet.mp4"
    with pytest.warns(UserWarning, match="is silent"):
        result = _talk(talk21, steps=1).generate(first_frame, ["talking"], out, progress=False, audio=silent)
    assert result.clips == 1 and json.loads(result.sidecar.read_text())["audio"]["silent"] is True
    assert probe_streams(out)["audio"] is not None


def test_audio_shorter_than_one_clip_is_refused_before_any_clip(talk21, first_frame, tmp_path):
    short = write_wav(tmp_path / "short.wav", sine(0.3, 0.3))  # 7 frames < 13
    out = tmp_path / "v.mp4"
    with pytest.raises(AudioError, match="shorter than one clip") as err:
        _talk(talk21).generate(first_frame, ["talking"], out, progress=False, audio=short)
    assert "\n" not in str(err.value) and not parts_dir(out).exists()


@pytest.mark.slow
def test_talk_resume_gives_the_same_bytes(talk21, first_frame, tmp_path, monkeypatch):
    audio = write_wav(tmp_path / "speech.wav", sine(1.4, 0.3))
    full = _talk(talk21).generate(first_frame, ["talking"], tmp_path / "full.mp4", progress=False, audio=audio)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _talk(talk21).generate(first_frame, ["talking"], tmp_path / "resumed.mp4", progress=False, audio=audio)
    resumed = _talk(talk21).generate(first_frame, ["talking"], tmp_path / "resumed.mp4", progress=False, audio=audio)
    assert full.video.read_bytes() == resumed.video.read_bytes()


def test_resume_with_another_audio_or_pose_is_refused(talk21, first_frame, tmp_path, monkeypatch):
    a, b = write_wav(tmp_path / "a.wav", sine(1.4, 0.3)), write_wav(tmp_path / "b.wav", sine(1.4, 0.3, freq=300.0))
    out = tmp_path / "v.mp4"
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _talk(talk21, steps=1).generate(first_frame, ["talking"], out, progress=False, audio=a)
    with pytest.raises(ResumeMismatchError, match="audio or pose"):
        _talk(talk21, steps=1).generate(first_frame, ["talking"], out, progress=False, audio=b)
    moved = Path(a).rename(tmp_path / "moved.wav")  # the content counts, not the path
    result = _talk(talk21, steps=1).generate(first_frame, ["talking"], out, progress=False, audio=moved)
    assert result.clips == 3


def test_pose_resume_with_another_pose_video_is_refused(dance21, first_frame, tmp_path, monkeypatch):
    a, b = write_pose_video(tmp_path / "a.mp4"), write_pose_video(tmp_path / "b.mp4", frames=6)
    out = tmp_path / "v.mp4"
    settings = GenerationSettings(**{**DANCE, "steps": 1, "num_clips": 2})
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            LongVideoGenerator(dance21, settings).generate(first_frame, ["dance"], out, progress=False, pose=a)
    with pytest.raises(ResumeMismatchError):
        LongVideoGenerator(dance21, settings).generate(first_frame, ["dance"], out, progress=False, pose=b)


def test_talk_inputs_are_checked(talk21, tiny21, first_frame, tmp_path):
    audio = write_wav(tmp_path / "a.wav", sine(1.0, 0.3))
    with pytest.raises(ValueError, match="needs audio="):
        _talk(talk21).generate(first_frame, ["x"], tmp_path / "v.mp4", progress=False)
    plain = LongVideoGenerator(talk21, GenerationSettings(**SMALL, num_clips=1))
    with pytest.raises(ValueError, match="audio= is for Talk"):
        plain.generate(first_frame, ["x"], tmp_path / "v.mp4", progress=False, audio=audio)
    with pytest.raises(ValueError, match="audio encoder"):
        LongVideoGenerator(talk21, GenerationSettings(**TALK))
    with pytest.raises(ValueError, match="fps=25"):
        GenerationSettings(**{**TALK, "fps": 16}).validate(talk21.spec)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        GenerationSettings(**{**SMALL, "conditioning": "speech"}).validate(talk21.spec)


def test_talk_needs_modules_and_a_matching_encoder(tiny21, tiny22):
    with pytest.raises(ValueError, match="MultiTalk's audio modules"):
        LongVideoGenerator(
            tiny21,
            GenerationSettings(**TALK),
            conditioning=make_conditioning("audio", audio_encoder=AudioEncoder.tiny()),
        )
    with pytest.raises(ValueError, match="Wan 2.1 I2V"):
        GenerationSettings(**TALK).validate(tiny22.spec)
    attach_talk_modules(tiny21)
    encoder = AudioEncoder.tiny()
    encoder.model.config.hidden_size = 32  # as if another wav2vec2 were given
    with pytest.raises(ValueError, match="2 layers x 32 features"):
        LongVideoGenerator(
            tiny21, GenerationSettings(**TALK), conditioning=make_conditioning("audio", audio_encoder=encoder)
        )


def test_tiny_talk_modules_are_the_same_in_every_build(tiny21):
    from svi_infer.model import build_model

    other = build_model(tiny21.spec)
    attach_talk_modules(tiny21)
    attach_talk_modules(other)
    a, b = (get_talk(m.transformers[0]).audio_proj.proj1.weight for m in (tiny21, other))
    assert torch.equal(a, b)


# --- Dance ---------------------------------------------------------------------------------------------------


def test_dance_three_clips_loop_the_pose_and_write_side_by_side(dance21, first_frame, tmp_path, monkeypatch):
    pose_file = write_pose_video(tmp_path / "moves.pose.mp4", frames=7, height=40, width=64)
    poses = read_pose_video(pose_file, 48, 80)  # fitted like the image: centre-cropped to 5:3, no black bars
    assert poses.shape == (7, 48, 80, 3)
    assert np.array_equal(poses, fit_pose(read_pose_video(pose_file, 40, 64), 48, 80))  # as decoded, then fitted
    transformer = dance21.transformers[0]
    encoder = find_pose_encoder(transformer)
    in_passes = []
    hook = transformer.register_forward_pre_hook(lambda m, a: in_passes.append(encoder._pose))
    set_poses = []
    original = pose_module.set_pose
    monkeypatch.setattr(pose_module, "set_pose", lambda t, p: (set_poses.append(p), original(t, p)))

    out = tmp_path / "dance.mp4"
    settings = GenerationSettings(**{**DANCE, "num_clips": 3})
    result = LongVideoGenerator(dance21, settings).generate(
        first_frame, ["the person is dancing"], out, progress=False, pose=pose_file, side_by_side=True
    )
    hook.remove()
    assert result.clips == 3 and result.frames == F + 2 * (F - 1)
    given = [p for p in set_poses if p is not None]
    assert len(given) == 3 and set_poses[1::2] == [None] * 3  # set before each clip, cleared after
    for k, pose in enumerate(given):
        assert np.array_equal(pose, poses[pose_frames_for_clip(7, k, F, 1)])
    assert given[1][0].tobytes() == poses[12 % 7].tobytes()  # clip 1 starts on output frame 12
    # the pose is in every pass: cond and uncond of every step (text-only guidance)
    assert len(in_passes) == 3 * settings.steps * 2 and all(p is not None for p in in_passes)
    assert encoder._pose is None

    sbs = read_video(side_by_side_path(out))
    video = read_video(out)
    assert sbs.shape == (result.frames, 48, 240, 3) and video.shape == (result.frames, 48, 80, 3)
    expected_pose = poses[np.arange(result.frames) % 7].astype(int)
    assert np.abs(sbs[:, :, 80:160].astype(int) - expected_pose).mean() < 8  # only codec loss
    assert np.abs(sbs[:, :, 160:].astype(int) - video.astype(int)).mean() < 8
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["pose"]["frames"] == 7 and sidecar["side_by_side"] == str(side_by_side_path(out))
    assert not parts_dir(out).exists()


def test_dance_errors(tiny21, dance21, first_frame, tmp_path):
    from svi_infer.model import build_model

    bare = build_model(tiny21.spec)
    with pytest.raises(ValueError, match="needs the pose encoder"):
        LongVideoGenerator(bare, GenerationSettings(**DANCE))
    dance = LongVideoGenerator(dance21, GenerationSettings(**DANCE, num_clips=1))
    with pytest.raises(ValueError, match="needs pose="):
        dance.generate(first_frame, ["x"], tmp_path / "v.mp4", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dance.generate(first_frame, ["x"], tmp_path / "v.mp4", progress=False, pose=tmp_path / "none.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match="cannot read pose video"):
        dance.generate(first_frame, ["x"], tmp_path / "v.mp4", progress=False, pose=tmp_path / "junk.mp4")
    plain = LongVideoGenerator(bare, GenerationSettings(**SMALL, num_clips=1))
    with pytest.raises(ValueError, match="side_by_side"):
        plain.generate(first_frame, ["x"], tmp_path / "v.mp4", progress=False, side_by_side=True)
    assert not parts_dir(tmp_path / "v.mp4").exists()
