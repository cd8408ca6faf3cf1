"""Finding videos and their captions (and, for Talk / Dance, their audio and pose videos)."""

from __future__ import annotations

import csv
import io
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


def _read_utf8(path: Path, root: Path) -> str:
    """The file's text, as written (no newline translation); one that is not UTF-8 raises ValueError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{err.reason} at byte {err.start}"
        raise ValueError(f"{path.relative_to(root)} is not UTF-8 text ({where}): save it as UTF-8") from None


def _sidecar_caption(video: Path, root: Path) -> tuple[str, str] | None:
    """The caption in ``<video>.txt`` or ``<video>.json``; one that cannot be read raises ValueError naming it."""
    txt, js = video.with_suffix(".txt"), video.with_suffix(".json")
    if txt.is_file():
        text = _read_utf8(txt, root).strip()
        if text:
            return text, "txt"
    if js.is_file():
        try:
            data = json.loads(_read_utf8(js, root))
        except json.JSONDecodeError as err:
            where = f"{err.msg} at line {err.lineno}, column {err.colno}"
            raise ValueError(f"{js.relative_to(root)} is not valid JSON ({where}): fix or delete it") from None
        text = (data.get("caption") or data.get("text") or "").strip() if isinstance(data, dict) else ""
        if text:
            return text, "json"
    return None


def _table_captions(root: Path, report: Report) -> dict[str, tuple[str, str]]:
    """Captions by file name from SVI-layout CSVs (Filename, Video Description) and JSONL files; a table that is
    not UTF-8 is skipped as a ``bad_caption_file``."""
    found: dict[str, tuple[str, str]] = {}
    texts: dict[Path, str] = {}
    for path in [*sorted(root.rglob("*.csv")), *sorted(root.rglob("*.jsonl"))]:
        try:
            texts[path] = _read_utf8(path, root)
        except ValueError as err:
            report.skip(str(path.relative_to(root)), "bad_caption_file", str(err))
    for path, text in texts.items():
        if path.suffix == ".csv":
            rows = csv.DictReader(io.StringIO(text, newline=""))
            if not {"Filename", "Video Description"} <= set(rows.fieldnames or ()):
                continue
            for row in rows:
                caption = (row["Video Description"] or "").strip()  # None: a short row
                if row["Filename"] and caption:
                    found.setdefault(Path(row["Filename"]).name, (caption, "csv"))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                found.setdefault(Path(row["video"]).name, (str(row["caption"]).strip(), "jsonl"))
            except (json.JSONDecodeError, KeyError, TypeError):
                where = f"{path.relative_to(root)}:{n}"
                report.skip(where, "bad_caption_line", f"{where} is not a JSON object with video and caption")
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
            caption = _sidecar_caption(video, root) or tables.get(video.name)
        except ValueError as err:
            report.skip(rel, "bad_caption_file", str(err))
            continue
        if caption is None and fallback_caption:
            caption = (fallback_caption, "fallback")
        if caption is None:
            report.skip(rel, "no_caption", f"{rel}: no sidecar, CSV or JSONL caption and no fallback_caption")
            continue
        pose_file = video.with_name(video.name[: -len(video.suffix)] + POSE_SUFFIX)
        if pose and not pose_file.is_file():
            report.skip(rel, "no_pose", f"{rel} has no pose video: expected {pose_file.relative_to(root)} next to it")
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
