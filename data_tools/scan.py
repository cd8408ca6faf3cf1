"""Finding videos and their captions (and, for Talk / Dance, their audio and pose videos)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from data_tools.report import Report

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm")
AUDIO_EXTS = (".wav", ".mp3", ".m4a", ".flac", ".aac", ".ogg")
POSE_SUFFIX = ".pose.mp4"


@dataclass(frozen=True)
class VideoEntry:
    """One source video with its caption; ``audio`` is a file, ``"track"`` (the video's own), or None."""

    source: str  # path relative to the dataset root, the video's identity
    caption: str
    caption_from: str  # txt | json | csv | jsonl | fallback
    audio: str | None = None
    pose: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sidecar_caption(video: Path) -> tuple[str, str] | None:
    txt, js = video.with_suffix(".txt"), video.with_suffix(".json")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8").strip()
        if text:
            return text, "txt"
    if js.is_file():
        data = json.loads(js.read_text(encoding="utf-8"))
        text = (data.get("caption") or data.get("text") or "").strip() if isinstance(data, dict) else ""
        if text:
            return text, "json"
    return None


def _table_captions(root: Path, report: Report) -> dict[str, tuple[str, str]]:
    """Captions by file name from SVI-layout CSVs (Filename, Video Description) and JSONL files."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted(root.rglob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = csv.DictReader(handle)
            if not {"Filename", "Video Description"} <= set(rows.fieldnames or ()):
                continue
            for row in rows:
                if row["Filename"] and row["Video Description"].strip():
                    found.setdefault(Path(row["Filename"]).name, (row["Video Description"].strip(), "csv"))
    for path in sorted(root.rglob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                found.setdefault(Path(row["video"]).name, (str(row["caption"]).strip(), "jsonl"))
            except (json.JSONDecodeError, KeyError, TypeError):
                report.skip(f"{path.name}:{n}", "bad_caption_line", "not a JSON object with video and caption")
    return found


def _audio_for(video: Path) -> str | None:
    for ext in AUDIO_EXTS:
        if video.with_suffix(ext).is_file():
            return str(video.with_suffix(ext))
    return "track"


def scan(
    root: str | Path, report: Report, fallback_caption: str | None = None, audio: bool = False, pose: bool = False
):
    """Every video under ``root`` with a caption, in sorted order; the rest go to the report.

    Caption sources, first found wins: a sidecar ``.txt`` / ``.json`` next to the video, an SVI-layout CSV,
    a JSONL file, then ``fallback_caption``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    tables = _table_captions(root, report)
    entries = []
    for video in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file()):
        if video.name.endswith(POSE_SUFFIX):
            continue
        rel = str(video.relative_to(root))
        try:
            caption = _sidecar_caption(video) or tables.get(video.name)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            report.skip(rel, "bad_caption_file", str(err))
            continue
        if caption is None and fallback_caption:
            caption = (fallback_caption, "fallback")
        if caption is None:
            report.skip(rel, "no_caption", "no sidecar, CSV or JSONL caption and no fallback_caption")
            continue
        pose_file = video.with_name(video.name[: -len(video.suffix)] + POSE_SUFFIX)
        if pose and not pose_file.is_file():
            report.skip(rel, "no_pose", f"expected {pose_file.name} next to the video")
            continue
        entries.append(
            VideoEntry(
                source=rel,
                caption=caption[0],
                caption_from=caption[1],
                audio=_audio_for(video) if audio else None,
                pose=str(pose_file.relative_to(root)) if pose else None,
            )
        )
    return entries
