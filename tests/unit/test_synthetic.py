"""The synthetic dataset: layout, caption files, decodable clips, audio track, determinism, ffmpeg errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import decord
import pytest

from data_tools.synthetic import make_dataset, write_clip

FPS, SIZE, SECONDS = 16, (64, 48), 3.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, make_dataset(root, num_clips=5, fps=FPS, size=SIZE, seconds=SECONDS)


def _check_video(path: Path) -> None:
    reader = decord.VideoReader(str(path))
    assert abs(len(reader) - FPS * SECONDS) <= 1, path.name
    assert reader[0].shape == (SIZE[1], SIZE[0], 3), path.name
    assert reader[0].asnumpy().tolist() != reader[len(reader) - 1].asnumpy().tolist(), f"{path.name} does not move"


def test_layout_and_captions(dataset):
    root, videos = dataset
    clips = root / "clips"
    assert videos == sorted(videos)
    assert [p.name for p in videos] == [f"clip_{i:03d}.mp4" for i in range(5)]
    assert (clips / "clip_000.txt").read_text(encoding="utf-8").strip().endswith(".")
    assert json.loads((clips / "clip_001.json").read_text(encoding="utf-8"))["caption"].strip()
    with (clips / "captions.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["Video Title", "Video Description", "Video URL", "Download URL", "Filename"]
        rows = {row["Filename"]: row["Video Description"] for row in reader}
    assert set(rows) == {"clip_002.mp4", "clip_004.mp4"} and all(rows.values())
    lines = (clips / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["video"] for line in lines] == ["clip_003.mp4"]
    assert (clips / "clip_002.pose.mp4").is_file()
    assert sorted(p.name for p in clips.glob("*.pose.mp4")) == ["clip_002.pose.mp4"]
    assert not list(clips.glob(".*")), "temporary files left behind"


def test_clips_decode(dataset):
    root, videos = dataset
    for path in [*videos, root / "clips" / "clip_002.pose.mp4"]:
        _check_video(path)


def test_audio_track(dataset):
    root, _ = dataset
    audio = decord.AudioReader(str(root / "clips" / "clip_003.mp4"), sample_rate=16000)
    assert audio.shape[0] == 1 and abs(audio.shape[1] - 16000 * SECONDS) < 16000 * 0.1
    with pytest.raises(decord.DECORDError):
        decord.AudioReader(str(root / "clips" / "clip_000.mp4"), sample_rate=16000)


def test_deterministic(tmp_path, dataset):
    a = write_clip(tmp_path / "a.mp4", SECONDS, FPS, SIZE, "life", audio=True)
    b = write_clip(tmp_path / "b.mp4", SECONDS, FPS, SIZE, "life", audio=True)
    assert a.read_bytes() == b.read_bytes()
    root, videos = dataset
    before = {p: p.read_bytes() for p in sorted((root / "clips").iterdir())}
    assert make_dataset(root, num_clips=5, fps=FPS, size=SIZE, seconds=SECONDS) == videos
    assert {p: p.read_bytes() for p in sorted((root / "clips").iterdir())} == before


def test_ffmpeg_failure(tmp_path):
    with pytest.raises(RuntimeError, match="ffmpeg"):
        write_clip(tmp_path / "bad.mp4", 1.0, FPS, SIZE, source="no_such_lavfi_source")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError):
        write_clip(tmp_path / "odd.mp4", 1.0, FPS, (63, 48))
