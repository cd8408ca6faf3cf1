"""data_tools pieces that need no video decoding: captions, windows, crops, the shard schema."""

import json
import random

import pytest
import torch

from data_tools.report import Report
from data_tools.scan import scan
from data_tools.windows import choose_bucket, crop_box, crop_resize, plan_windows, resample_indices
from svi_infer.schema import SCHEMA_VERSION, SchemaError, from_members, padded_text, to_members, validate
from tests.helpers import changed_sample


def _touch(path, text=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")
    if text is not None:
        path.with_suffix(".txt").write_text(text, encoding="utf-8")


def test_caption_sources_in_order(tmp_path):
    root = tmp_path / "data"
    _touch(root / "a.mp4", "from txt")
    _touch(root / "b.mp4")
    (root / "b.json").write_text(json.dumps({"caption": "from json"}), encoding="utf-8")
    _touch(root / "sub" / "c.mp4")
    (root / "sub" / "list.csv").write_text(
        "Video Title,Video Description,Video URL,Download URL,Filename\nt,from csv,u,d,c.mp4\nt,csv loses,u,d,a.mp4\n",
        encoding="utf-8",
    )
    _touch(root / "d.mov")
    (root / "captions.jsonl").write_text('{"video": "d.mov", "caption": "from jsonl"}\nnot json\n', encoding="utf-8")
    _touch(root / "e.webm")
    _touch(root / "e.pose.mp4")  # a pose video is never a sample itself
    report = Report()
    entries = scan(root, report)
    assert [(e.source, e.caption, e.caption_from) for e in entries] == [
        ("a.mp4", "from txt", "txt"),
        ("b.mp4", "from json", "json"),
        ("d.mov", "from jsonl", "jsonl"),
        ("sub/c.mp4", "from csv", "csv"),
    ]
    assert report.reasons() == {"bad_caption_line": 1, "no_caption": 1}
    entries = scan(root, Report(), fallback_caption="a video")
    assert [(e.source, e.caption_from) for e in entries if e.caption_from == "fallback"] == [("e.webm", "fallback")]


def test_audio_and_pose_discovery(tmp_path):
    _touch(tmp_path / "talk.mp4", "speaking")
    (tmp_path / "talk.wav").write_bytes(b"\0")
    _touch(tmp_path / "own.mp4", "speaking")
    [own, talk] = scan(tmp_path, Report(), audio=True)
    assert talk.audio.endswith("talk.wav") and own.audio == "track"
    report = Report()
    assert scan(tmp_path, report, pose=True) == [] and report.reasons() == {"no_pose": 2}
    (tmp_path / "own.pose.mp4").write_bytes(b"\0")
    assert [e.pose for e in scan(tmp_path, Report(), pose=True)] == ["own.pose.mp4"]


def test_fps_resampling_exact():
    assert resample_indices(8, 16, 16) == list(range(8))
    assert resample_indices(6, 30, 16) == [0, 1, 3, 5]  # 0.2 s at 16 fps: frames at 0, 1/16, 2/16, 3/16 s
    assert resample_indices(4, 8, 16) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(resample_indices(180, 30, 16)) == 96  # 6 s


def test_window_counts_and_stride():
    windows = plan_windows(180, 30.0, 16.0, 33, 33)
    assert [w.start for w in windows] == [0, 33]
    assert windows[1].source_indices[0] == resample_indices(180, 30, 16)[33]
    assert [w.start for w in plan_windows(96, 16.0, 16.0, 33, 16)] == [0, 16, 32, 48]
    assert plan_windows(20, 16.0, 16.0, 33, 33) == []
    [padded] = plan_windows(20, 16.0, 16.0, 33, 33, short="pad")
    assert padded.padded and len(padded.source_indices) == 33 and padded.source_indices[-14:] == (19,) * 14


def test_buckets_and_crops():
    assert choose_bucket(1920, 1080, [(480, 832), (832, 480), (512, 512)]) == (480, 832)
    assert choose_bucket(720, 1280, [(480, 832), (832, 480)]) == (832, 480)
    assert crop_box(1920, 1080, 480, 832, "center", random.Random(0)) == (24, 0, 1872, 1080)
    assert crop_box(100, 200, 48, 80, "center", random.Random(0)) == (0, 70, 100, 60)
    for seed in range(20):
        x, y, w, h = crop_box(1920, 1080, 480, 832, "random", random.Random(seed))
        assert 1080 - 1080 / 14 - 1 <= h <= 1080 and 0 <= x <= 1920 - w and 0 <= y <= 1080 - h
        assert abs(w / h - 832 / 480) < 0.01
    assert crop_box(640, 360, 48, 80, "random", random.Random(5)) == crop_box(
        640, 360, 48, 80, "random", random.Random(5)
    )
    frames = torch.randint(0, 255, (3, 90, 160, 3), dtype=torch.uint8).numpy()
    assert crop_resize(frames, (10, 5, 150, 85), 48, 80).shape == (3, 48, 80, 3)


def _sample(**changes):
    meta = {
        "schema_version": SCHEMA_VERSION,
        "key": "clip-w0000",
        "caption": "a boat",
        "source": "clip.mp4",
        "source_fps": 30.0,
        "fps": 16.0,
        "start_frame": 0,
        "num_frames": 9,
        "window_index": 0,
        "spec": "tiny-wan2.1-i2v",
        "height": 48,
        "width": 80,
        "latent_channels": 16,
        "motion_frames": [1, 5],
        "ref_pad_num": 0,
        "text_len": 4,
    }
    tensors = {
        "latents": torch.zeros(16, 3, 6, 10, dtype=torch.bfloat16),
        "cond.m1": torch.zeros(16, 3, 6, 10, dtype=torch.bfloat16),
        "cond.m5": torch.zeros(16, 3, 6, 10, dtype=torch.bfloat16),
        "text": torch.ones(4, 32, dtype=torch.bfloat16),
        "audio": torch.zeros(9, 2, 16),
        "pose": torch.zeros(3, 9, 48, 80, dtype=torch.uint8),
    }
    return changed_sample(meta, tensors, changes)


def test_valid_sample_round_trips_through_members():
    sample = _sample()
    members = to_members(sample)
    assert sorted(members) == [
        "__key__",
        "audio.safetensors",
        "cond.safetensors",
        "json",
        "latents.safetensors",
        "pose.safetensors",
        "text.safetensors",
    ]
    back = from_members(members)
    assert back.meta == sample.meta and sorted(back.tensors) == sorted(sample.tensors)
    assert torch.equal(back.tensors["cond.m5"], sample.tensors["cond.m5"])
    assert padded_text(back.tensors["text"]).shape == (512, 32)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(schema_version=99), "schema_version 99"),
        (dict(caption=3), "'caption' has type int"),
        (dict(key="clip.w0"), "letters, digits"),
        (dict(latents=torch.zeros(16, 4, 6, 10)), r"latents shape \(16, 4, 6, 10\)"),
        (dict(**{"cond.m5": None}), "no conditioning latents 'cond.m5'"),
        (dict(text=torch.ones(5, 32)), "text must be"),
        (dict(latents=torch.full((16, 3, 6, 10), float("nan"))), "latents has non-finite values"),
        (dict(pose=torch.zeros(3, 9, 48, 80)), "pose must be uint8"),
        (dict(audio=torch.zeros(8, 2, 16)), "audio must be"),
        (dict(extra=torch.zeros(1)), "unknown tensors"),
    ],
)
def test_invalid_samples_are_refused(changes, message):
    with pytest.raises(SchemaError, match=message):
        validate(_sample(**changes))
    with pytest.raises(SchemaError):
        to_members(_sample(**changes))


def test_reading_checks_too():
    members = to_members(_sample())
    members["json"] = members["json"].replace(b'"text_len": 4', b'"text_len": 3')
    with pytest.raises(SchemaError, match="text must be"):
        from_members(members)
    with pytest.raises(SchemaError, match="unreadable"):
        from_members({"__key__": "x", "json": b"{"})
    with pytest.raises(SchemaError, match=r"\['latents.pth'\] are neither JSON nor safetensors"):
        from_members({**to_members(_sample()), "latents.pth": b"\x80\x04K\x01."})


def test_audio_encoder_from_a_local_folder_matches(tmp_path):
    import numpy as np

    from svi_infer.audio import AudioEncoder, features_for_frames

    tiny = AudioEncoder.tiny()
    tiny.model.save_pretrained(tmp_path / "w2v")
    tiny.extractor.save_pretrained(tmp_path / "w2v")
    loaded = AudioEncoder.from_pretrained(tmp_path / "w2v")
    wave = np.sin(np.arange(16000) / 7.0).astype(np.float32)
    (a, rate), (b, _) = tiny.features(wave), loaded.features(wave)
    assert torch.equal(a, b) and a.shape == (49, 2, 16) and rate == 49.0
    picked = features_for_frames(a, rate, [0.0, 0.5, 10.0])
    assert torch.equal(picked[0], a[0]) and torch.allclose(picked[1], (a[24] + a[25]) / 2) and torch.all(picked[2] == 0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        AudioEncoder.from_pretrained(tmp_path)


def test_text_is_padded_or_cut_to_the_model_text_length():
    text = torch.arange(70 * 4, dtype=torch.float32).view(70, 4)
    assert torch.equal(padded_text(text, 64), text[:64])  # cut, as the prompt encoder cuts at max length
    padded = padded_text(text[:10], 64)
    assert padded.shape == (64, 4) and torch.equal(padded[:10], text[:10]) and not padded[10:].any()


def test_settings_name_the_variant_their_shards_feed():
    from data_tools.config import DataSettings
    from svi_infer.variants import VariantSpec

    film = DataSettings(motion_frames=(1, 5), ref_pad_num=0, motion_latents=(1,))
    assert film.variant() == VariantSpec("text", "pixel", 0, (1, 5), ())
    talk = DataSettings(audio=True, handoff="latent", motion_latents=(1, 2))
    assert talk.variant() == VariantSpec("audio", "latent", -1, (), (1, 2))
    assert DataSettings(pose=True).variant().conditioning == "pose"
    with pytest.raises(ValueError, match="a shard folder feeds one conditioning"):
        DataSettings(audio=True, pose=True).variant()


def test_continuation_sources_follow_the_authors_recipe_frame_by_frame():
    """SVI 2.0 Pro (upstream issue #75), frames counted from 1: anchor from 1..k, previous clip k+1..k+81 (its last
    latent hands over), target from k+77. Here 0-based: a window at 81 continues the clip at 5..85."""
    from data_tools.windows import continuation_sources

    indices = list(range(300))
    previous, anchors = continuation_sources(indices, 81, 81, (1,))
    assert previous == {1: tuple(range(5, 86))} and anchors == tuple(range(5))
    assert previous[1][-5:] == tuple(range(81, 86))  # the window's first 5 frames are the previous clip's last 5
    # n = 2 latents: the clip ends 8 frames into the window; the anchor comes before every previous clip
    previous, anchors = continuation_sources(indices, 81, 81, (1, 2))
    assert previous[2] == tuple(range(9, 90)) and anchors == tuple(range(5))
    # resampled source frames are carried through; a window with no frame before its previous clip has none
    previous, _ = continuation_sources([2 * i for i in range(300)], 100, 81, (1,))
    assert previous[1][:2] == (48, 50)
    assert continuation_sources(indices, 76, 81, (1,)) is None  # its previous clip would start at frame 0
    assert continuation_sources(indices, 77, 81, (1,)) == ({1: tuple(range(1, 82))}, (0,))
    assert continuation_sources(indices, 81, 81, (0,)) is None  # no motion: nothing to continue
