"""data_tools end to end on synthetic clips and the tiny model: prepare, resume, skips, CLI."""

import json
import subprocess
import sys

import imageio_ffmpeg
import pytest

import data_tools.stages as stages
from data_tools.app import DataRunError, run
from data_tools.synthetic import make_dataset, write_clip
from svi_infer.schema import from_members
from tests.helpers import compose_data

SMALL = ["frames_per_clip=17", "buckets=[[48,80]]", "progress=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    make_dataset(root, num_clips=4, fps=16, size=(96, 64), seconds=2.5)
    return root


def _samples(output):
    index = json.loads((output / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        import webdataset as wds

        out += [from_members(raw) for raw in wds.WebDataset(str(output / "shards" / shard["name"]), shardshuffle=False)]
    return index, out


def test_prepare_film_style(dataset, tmp_path):
    out = tmp_path / "out"
    run(compose_data([f"input={dataset}", f"output={out}", *SMALL, "motion_frames=[1,5]", "ref_pad_num=0"]))
    index, samples = _samples(out)
    assert index["samples"] == len(samples) > 0 and index["variant"]["motion_frames"] == [1, 5]
    assert index["resolutions"] == [[48, 80]] and index["spec"] == "tiny-wan2.1-i2v"
    by_source = {}
    for s in samples:
        assert sorted(s.tensors) == ["cond.m1", "cond.m5", "image", "latents", "text"]
        assert s.tensors["latents"].shape == (16, 5, 6, 10) and s.meta["anchor_frame"] is None
        by_source.setdefault(s.meta["source"], []).append(s)
    # 2.5 s at 16 fps = 40 frames: two consecutive 17-frame windows per clip, linked both ways
    for windows in by_source.values():
        assert [w.meta["start_frame"] for w in windows] == [0, 17]
        assert windows[0].meta["next_key"] == windows[1].key and windows[1].meta["prev_key"] == windows[0].key
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["samples"] == len(samples) and report["skipped"] == []
    assert len(by_source) == 4 and len({s.meta["caption"] for s in samples}) == 4  # txt, json, csv, jsonl


def test_resumed_prepare_gives_byte_identical_shards(dataset, tmp_path, monkeypatch):
    shot = [f"input={dataset}", *SMALL, "ref_pad_num=-1", "crop=random", "anchor=outside"]
    run(compose_data([*shot, f"output={tmp_path / 'full'}"]))
    original, calls = stages.encode_window, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(stages, "encode_window", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(compose_data([*shot, f"output={tmp_path / 'resumed'}"]))
    assert len(list((tmp_path / "resumed" / "work" / "samples").glob("*.tar"))) == 2
    run(compose_data([*shot, f"output={tmp_path / 'resumed'}"]))
    full = sorted((tmp_path / "full" / "shards").iterdir())
    resumed = sorted((tmp_path / "resumed" / "shards").iterdir())
    assert [p.name for p in full] == [p.name for p in resumed]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(full, resumed, strict=True))
    assert (tmp_path / "full" / "index.json").read_text() == (tmp_path / "resumed" / "index.json").read_text()
    _, samples = _samples(tmp_path / "full")
    assert all(s.meta["anchor_frame"] is not None for s in samples)


def _ffmpeg(*args):
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True)


def test_bad_inputs_are_skipped_with_reasons(tmp_path, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    for name, seconds in (("good", 1.2), ("nan", 1.2), ("short", 0.5), ("nocap", 1.2), ("long", 4.0)):
        write_clip(root / f"{name}.mp4", seconds=seconds, fps=16, size=(96, 64))
        if name != "nocap":
            (root / f"{name}.txt").write_text(f"{name} clip", encoding="utf-8")
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(bytes(range(256)) * 40)
    _ffmpeg("-i", root / "long.mp4", "-c", "copy", "-movflags", "+faststart", root / "fs.mp4")
    data = (root / "fs.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    for name in ("empty", "garbage", "truncated"):
        (root / f"{name}.txt").write_text("caption", encoding="utf-8")
    (root / "fs.mp4").unlink()
    (root / "long.mp4").unlink()
    original = stages.encode_window

    def poisoned(model, settings, key, meta, *args, **kwargs):
        sample = original(model, settings, key, meta, *args, **kwargs)
        if meta["source"] == "nan.mp4":
            sample.tensors["latents"][0, 0, 0, 0] = float("nan")
        return sample

    monkeypatch.setattr(stages, "encode_window", poisoned)
    out = tmp_path / "out"
    with pytest.raises(DataRunError, match="skipped"):  # 6 of 7 inputs skipped: over max_skip_ratio
        run(compose_data([f"input={root}", f"output={out}", *SMALL]))
    report = json.loads((out / "report.json").read_text())
    reasons = dict(report["skipped_by_reason"])
    # a truncated file is caught at scan (fewer frames than its header declares) or, failing that, when decoding
    assert reasons.pop("truncated", 0) + reasons.pop("truncated_or_corrupt", 0) == 1
    assert reasons == {"empty_file": 1, "no_caption": 1, "non_finite": 1, "too_short": 1, "unreadable": 1}
    assert report["counts"]["samples"] == 1
    _, samples = _samples(out)
    assert [s.meta["source"] for s in samples] == ["good.mp4"]
    run(compose_data([f"input={root}", f"output={out}", *SMALL, "max_skip_ratio=0.9"]))  # the rest lands: exit 0


def test_nothing_usable_fails(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.mp4").write_bytes(b"")
    with pytest.raises(DataRunError, match="no usable sample"):
        run(compose_data([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", *SMALL, "fallback_caption=x"]))


def test_talk_audio_and_dance_pose(dataset, tmp_path):
    out = tmp_path / "talk"
    run(compose_data([f"input={dataset}", f"output={out}", *SMALL, "audio=true", "max_skip_ratio=1.0"]))
    _, samples = _samples(out)
    # the clip's 17 frames and 2 of the track either side, as the Talk modules read them at generation
    assert samples and all(s.tensors["audio"].shape == (17 + 4, 2, 16) for s in samples)
    assert all(s.meta["audio_context"] == 2 for s in samples)
    report = json.loads((out / "report.json").read_text())
    assert set(report["skipped_by_reason"]) <= {"no_audio"}
    out = tmp_path / "dance"
    run(compose_data([f"input={dataset}", f"output={out}", *SMALL, "pose=true", "max_skip_ratio=1.0"]))
    _, samples = _samples(out)
    assert samples and all(s.tensors["pose"].shape == (3, 17, 48, 80) for s in samples)


@pytest.mark.slow
def test_cli_prepare_verify_inspect(dataset, tmp_path):
    out = tmp_path / "out"
    base = [sys.executable, "-m", "data_tools"]
    done = subprocess.run(
        [*base, "prepare", f"input={dataset}", f"output={out}", *SMALL], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "samples in 1 shards" in done.stdout and "report:" in done.stdout
    done = subprocess.run([*base, "verify", f"output={out}"], capture_output=True, text=True)
    assert done.returncode == 0 and "0 problems" in done.stdout
    done = subprocess.run([*base, "inspect", f"output={out}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "inspect_shard-000000.png").is_file() and "latents [16, 5, 6, 10] bfloat16" in done.stdout
    done = subprocess.run([*base, "prepare", f"output={out}"], capture_output=True, text=True)
    assert done.returncode == 2 and "give input=" in done.stderr


def test_every_command_composes():
    for command in ("prepare", "scan", "encode", "pack", "verify", "inspect"):
        cfg = compose_data([f"command={command}", "input=x", "output=y", "model=wan21_i2v_14b_480p"])
        assert cfg.command == command
