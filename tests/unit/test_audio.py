"""Talk audio: decoding errors, -23 LUFS normalisation, video-rate wav2vec2 features, per-clip slices, muxing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from svi_infer.audio import (
    AudioEncoder,
    AudioError,
    clip_audio,
    clip_frames,
    clips_for_frames,
    features_for_frames,
    frames_for_clips,
    frames_for_samples,
    is_silent,
    loudness,
    loudness_normalize,
    pad_frames,
    read_audio,
    resample_frames,
    take_frames,
)
from svi_infer.video_io import mux_audio, probe_streams, write_mp4
from tests.helpers import SR, sine, write_wav


def write_video(path: Path, frames: int = 81, fps: float = 25.0) -> Path:
    write_mp4(path, np.full((frames, 16, 16, 3), 128, dtype=np.uint8), fps)
    return path


def ramp(n: int, layers: int = 2, dim: int = 3) -> torch.Tensor:
    """Row i holds the value i everywhere, so a row's content names the frame it came from."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, layers, dim).clone()


# --------------------------------------------------------------------------------------------------- decoding


def test_read_audio_resamples_any_rate_to_16k_mono(tmp_path):
    samples = read_audio(write_wav(tmp_path / "a.wav", sine(1.5, 0.5, rate=44100), rate=44100))
    assert samples.dtype == np.float32 and abs(len(samples) - 1.5 * SR) <= 2
    assert 0.45 < np.abs(samples).max() < 0.55


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.wav", "does not exist; check the path"),
        (lambda d: write_video(d / "mute.mp4"), "has no audio track; give a video with sound or a separate audio"),
        (lambda d: _write_bytes(d / "junk.mp4", np.random.default_rng(0).bytes(4000)), "cannot decode the audio"),
        (lambda d: _write_bytes(d / "junk.wav", b"RIFF\x00\x00"), "cannot decode the audio"),
        (lambda d: write_wav(d / "empty.wav", np.zeros(0)), r"is empty \(0 samples\)"),
    ],
    ids=["missing", "no_track", "corrupt_mp4", "corrupt_wav", "empty_track"],
)
def test_bad_audio_files_raise_one_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(AudioError, match=message) as err:
        read_audio(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------------- loudness


def test_loudness_normalize_brings_a_sine_to_minus_23_lufs(tmp_path):
    quiet = sine(3.0, 0.02)
    assert loudness(quiet) < -35
    out = loudness_normalize(quiet)
    assert out.dtype == np.float32 and abs(loudness(out) - (-23.0)) < 0.5
    ratio = out[quiet != 0] / quiet[quiet != 0]
    assert np.allclose(ratio, ratio[0], rtol=1e-5)  # one static gain
    from_file = read_audio(write_wav(tmp_path / "q.wav", quiet), normalize=True)
    assert abs(loudness(from_file) - (-23.0)) < 0.5
    assert abs(loudness(loudness_normalize(quiet, target=-16.0)) - (-16.0)) < 0.5


def test_silence_is_left_unchanged_and_encodes_to_finite_features(tmp_path):
    silence = np.zeros(SR * 2, dtype=np.float32)
    assert loudness(silence) == float("-inf") and is_silent(silence) and not is_silent(sine(1.0))
    assert np.array_equal(loudness_normalize(silence), silence)
    assert np.array_equal(loudness_normalize(np.zeros(0, np.float32)), np.zeros(0, np.float32))
    read = read_audio(write_wav(tmp_path / "s.wav", silence), normalize=True)
    assert np.all(read == 0)
    feats, _ = AudioEncoder.tiny().features(read, fps=25)
    assert feats.shape[0] == 50 and torch.isfinite(feats).all()


def test_audio_shorter_than_a_loudness_block_is_normalized_too():
    short = sine(0.2, 0.02)  # pyloudnorm alone refuses < 0.4 s
    out = loudness_normalize(short)
    assert abs(loudness(out) - (-23.0)) < 0.5 and abs(loudness(short) - loudness(sine(2.0, 0.02))) < 0.5


def test_gain_past_full_scale_is_not_clipped_and_does_not_warn():
    quiet = sine(2.0, 0.01)
    quiet[SR] = 0.5  # one spike: normalising the quiet bed lifts it far above 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = loudness_normalize(quiet)
    gain = out[100] / quiet[100]
    assert out[SR] > 1.0 and np.isclose(out[SR], 0.5 * gain, rtol=1e-5)


# --------------------------------------------------------------------------------------------------- features


def test_resample_frames_is_exact_on_a_linear_ramp():
    src = ramp(49)
    assert torch.allclose(resample_frames(src, 25), ramp(25) * 2)  # 49 -> 25: position 2i
    assert torch.allclose(resample_frames(src, 97), ramp(97) / 2)  # 49 -> 97: position i/2
    assert torch.equal(resample_frames(src, 49), src)
    assert torch.equal(resample_frames(ramp(1) + 7, 3), torch.full((3, 2, 3), 7.0))


def test_frames_for_samples_has_no_float_round_off():
    assert frames_for_samples(18560) == 29  # int(18560 / 16000 * 25) == 28 in floats
    assert frames_for_samples(51840) == 81 and frames_for_samples(51839) == 80
    assert frames_for_samples(SR, fps=16) == 16 and frames_for_samples(639) == 0


def test_features_at_video_rate_are_interpolated_before_the_transformer():
    enc = AudioEncoder.tiny()
    wave_ = np.sin(np.arange(SR) / 7.0).astype(np.float32)
    raw, rate = enc.features(wave_)
    assert raw.shape == (49, 2, 16) and rate == 49.0
    same, _ = enc.features(wave_, fps=49)  # 49 video frames == 49 CNN frames: resampling is the identity
    assert torch.allclose(same, raw, atol=1e-6)

    seen = []
    hook = enc.model.feature_projection.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    video_rate, rate = enc.features(wave_, fps=25)
    hook.remove()
    assert video_rate.shape == (25, 2, 16) and rate == 25.0 and seen == [25]
    # Resampling the transformer's output afterwards is a different thing (attention ran at 50 fps there).
    assert not torch.allclose(video_rate, resample_frames(raw, 25), atol=1e-3)
    assert enc.features(wave_)[0].shape[0] == 49  # the hook is gone again


def test_audio_too_short_to_encode_raises():
    enc = AudioEncoder.tiny()
    with pytest.raises(AudioError, match="at least 25 ms"):
        enc.features(sine(0.02))
    with pytest.raises(AudioError, match="shorter than one video frame at 25"):
        enc.features(sine(0.03), fps=25)
    assert enc.features(sine(0.04), fps=25)[0].shape[0] == 1


def test_features_for_frames_interpolates_linearly():
    feats = ramp(10)  # 10 rows at 5 per second: row i at i / 5 s
    out = features_for_frames(feats, 5.0, [0.0, 0.3, 1.1, 1.8, 1.9, 2.0, 5.0, -1.0])
    expected = torch.tensor([0.0, 1.5, 5.5, 9.0, 9.0, 0.0, 0.0, 0.0])
    expected[-1] = 0.0  # before the start: the first row (value 0)
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-6) and out.shape == (8, 2, 3)
    assert out.dtype == feats.dtype
    # Frame times on the feature grid pick rows exactly (features computed at the video rate).
    real = torch.randn(30, 2, 4)
    picked = features_for_frames(real, 25.0, [(7 + j) / 25.0 for j in range(20)])
    assert torch.equal(picked, real[7:27])
    assert features_for_frames(real.bfloat16(), 25.0, [0.5]).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------- clips


@pytest.mark.parametrize(("frames", "overlap"), [(81, 1), (33, 5), (9, 0)])
def test_clip_windows_are_exact_at_the_seams(frames, overlap):
    step = frames - overlap
    for k in range(5):
        assert clip_frames(k, frames, overlap) == range(k * step, k * step + frames)
    # The generator keeps clip 0 whole and drops the first `overlap` frames of later clips: the kept frames are
    # 0..total-1, each exactly once.
    kept = list(clip_frames(0, frames, overlap))
    for k in range(1, 5):
        later = clip_frames(k, frames, overlap)
        assert later[:overlap] == range(kept[-1] - overlap + 1, kept[-1] + 1)  # repeats the previous tail
        kept += list(later[overlap:])
    assert kept == list(range(frames_for_clips(5, frames, overlap)))
    assert frames_for_clips(5, frames, overlap) == frames + 4 * step and frames_for_clips(0, frames, overlap) == 0


def test_clip_audio_takes_exactly_the_clip_frames_and_zeros_past_the_end():
    feats = ramp(100)
    assert torch.equal(clip_audio(feats, 0, 33, 5)[:, 0, 0], torch.arange(33.0))
    assert torch.equal(clip_audio(feats, 1, 33, 5)[:, 0, 0], torch.arange(28.0, 61.0))
    last = clip_audio(feats, 3, 33, 5)[:, 0, 0]  # frames 84..116, audio ends at 99
    assert torch.equal(last[:16], torch.arange(84.0, 100.0)) and torch.all(last[16:] == 0)
    assert torch.all(clip_audio(feats, 9, 33, 5) == 0)
    # Kept audio of all clips == the track, zero-padded: no off-by-one, no duplicated boundary frame.
    kept = [clip_audio(feats, 0, 33, 5)] + [clip_audio(feats, k, 33, 5)[5:] for k in range(1, 4)]
    total = torch.cat(kept)[:, 0, 0]
    assert torch.equal(total, torch.cat([torch.arange(100.0), torch.zeros(frames_for_clips(4, 33, 5) - 100)]))


def test_clip_audio_context_windows_come_from_the_whole_track():
    feats = ramp(100)
    win = clip_audio(feats, 1, 33, 5, radius=2)[:, :, 0, 0]  # clip 1 starts at frame 28
    assert win.shape == (33, 5)
    assert torch.equal(win[0], torch.tensor([26.0, 27, 28, 29, 30]))  # context from clip 0's audio
    first = clip_audio(feats, 0, 33, 5, radius=2)[:, :, 0, 0]
    assert torch.equal(first[0], torch.tensor([0.0, 0, 0, 1, 2]))  # before the start: the first frame
    end = clip_audio(feats, 3, 33, 5, radius=2)[:, :, 0, 0]  # frame 99 is row 15
    assert torch.equal(end[15], torch.tensor([97.0, 98, 99, 0, 0]))
    assert torch.equal(take_frames(feats, [-3, 0, 99, 100])[:, 0, 0], torch.tensor([0.0, 0, 99, 0]))
    padded = pad_frames(feats, frames_for_clips(4, 33, 5))  # 117 rows: the track, then silence
    assert padded.shape == (117, 2, 3) and torch.equal(padded[:100], feats) and torch.all(padded[100:] == 0)
    assert all(torch.equal(clip_audio(padded, k, 33, 5), clip_audio(feats, k, 33, 5)) for k in range(4))
    assert torch.equal(pad_frames(feats, 40), feats[:40])


def test_clips_for_frames_covers_the_audio():
    assert clips_for_frames(0, 81, 1) == 1 and clips_for_frames(30, 81, 1) == 1 and clips_for_frames(81, 81, 1) == 1
    assert clips_for_frames(82, 81, 1) == 2
    for k in range(1, 6):
        total = frames_for_clips(k, 33, 5)
        assert clips_for_frames(total, 33, 5) == k and clips_for_frames(total + 1, 33, 5) == k + 1
    assert clips_for_frames(frames_for_samples(SR * 10), 81, 1) == 4  # 250 frames: 81 + 80 + 80 = 241 < 250
    with pytest.raises(ValueError, match="overlap"):
        clips_for_frames(100, 81, 81)
    with pytest.raises(ValueError, match="clip_index"):
        clip_frames(-1, 81, 1)


# --------------------------------------------------------------------------------------------------- muxing


def test_mux_cuts_the_audio_to_the_video(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=81, fps=25.0)
    quiet_then_loud = np.concatenate([np.zeros(SR, np.float32), sine(4.0, 0.5)])
    audio = write_wav(tmp_path / "a.wav", quiet_then_loud)
    out = tmp_path / "out" / "talk.mp4"
    mux_audio(video, audio, out, start_s=1.0)
    info = probe_streams(out)
    assert info["frames"] == 81 and info["video"] == pytest.approx(3.24)
    assert info["audio_codec"] == "aac" and abs(info["audio"] - 3.24) < 0.023
    assert [p.name for p in out.parent.iterdir()] == ["talk.mp4"]  # no temp file left behind
    head = read_audio(out)[: SR // 5]
    assert np.sqrt(np.mean(head**2)) > 0.2  # started at 1 s: the sine, not the leading silence

    short = write_wav(tmp_path / "short.wav", sine(1.0))  # ends before the video: padded with silence
    mux_audio(video, short, video)  # in place
    info = probe_streams(video)
    assert info["frames"] == 81 and abs(info["audio"] - 3.24) < 0.023
    mux_audio(video, out, tmp_path / "cut.mp4", duration_s=2.0)  # a video's track as the source
    assert abs(probe_streams(tmp_path / "cut.mp4")["audio"] - 2.0) < 0.023


def test_mux_rejects_bad_sources(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=10)
    with pytest.raises(AudioError, match="has no audio track"):
        mux_audio(video, video, tmp_path / "o.mp4")
    with pytest.raises(AudioError, match="past the end"):
        mux_audio(video, write_wav(tmp_path / "a.wav", sine(1.0)), tmp_path / "o.mp4", start_s=2.0)
    with pytest.raises(AudioError, match="cannot read"):
        mux_audio(video, _write_bytes(tmp_path / "junk.wav", b"nonsense"), tmp_path / "o.mp4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mux_audio(video, tmp_path / "missing.wav", tmp_path / "o.mp4")
    assert not (tmp_path / "o.mp4").exists()
    assert probe_streams(video)["audio"] is None
