"""A tiny synthetic video dataset, made with the ffmpeg that ``imageio-ffmpeg`` bundles.

It exists so the demo and the tests can run the whole data pipeline (scan, caption sources, audio and
pose videos, encoding) without downloading anything: every clip is drawn by an ffmpeg lavfi source,
so it moves, is a few kilobytes, and the same call always writes the same bytes.

Layout written by :func:`make_dataset` (``root/clips``)::

    clip_000.mp4  clip_000.txt          caption in a sidecar text file
    clip_001.mp4  clip_001.json         caption in a sidecar JSON file ({"caption": ...})
    clip_002.mp4  clip_002.pose.mp4     caption in captions.csv (SVI layout); has a pose video
    clip_003.mp4                        has an audio track (Talk-style); caption in captions.jsonl
    clip_004.mp4 ...                    any further clips: captions in captions.csv
    captions.csv  captions.jsonl
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import imageio_ffmpeg

# Named moving lavfi graphs; ``{w}``, ``{h}`` and ``{fps}`` are filled in. Random sources get a fixed seed.
SOURCES: dict[str, str] = {
    "testsrc2": "testsrc2=size={w}x{h}:rate={fps}",
    "mandelbrot": "mandelbrot=size={w}x{h}:rate={fps}:maxiter=256:start_scale=3:end_scale=0.1",
    "life": "life=size={w}x{h}:rate={fps}:seed=7:ratio=0.3:mold=8:life_color=#40c0ff:death_color=#202060",
    "cellauto": "cellauto=size={w}x{h}:rate={fps}:rule=110:seed=11:scroll=1",
    "smptebars": (
        "smptebars=size={w}x{h}:rate={fps}[bg];color=c=white:size={bw}x{bh}:rate={fps}[fg];"
        "[bg][fg]overlay=x='mod(t*{w}/2,W)':y='(H-h)/2+(H-h)/2*sin(t*2)':eval=frame:shortest=1"
    ),
    "box": (
        "color=c=black:size={w}x{h}:rate={fps}[bg];color=c=#ff8000:size={bw}x{bh}:rate={fps}[fg];"
        "[bg][fg]overlay=x='(W-w)/2+(W-w)/2*sin(t*3)':y='(H-h)/2+(H-h)/2*cos(t*2)':eval=frame:shortest=1"
    ),
}

CAPTIONS: dict[str, str] = {
    "testsrc2": "A colorful test pattern with a moving ball and a running counter.",
    "mandelbrot": "A slow zoom into a glowing Mandelbrot fractal.",
    "life": "Blue cells grow and die in a game of life.",
    "cellauto": "A cellular automaton scrolls down the screen in black and white.",
    "smptebars": "A white square slides across colored television test bars.",
    "box": "An orange square bounces around a black background.",
}

# Source per clip index (cycled); the pose video uses POSE_SOURCE, which no clip uses.
CLIP_SOURCES = ("testsrc2", "mandelbrot", "smptebars", "life", "cellauto")
POSE_SOURCE = "box"

TXT_CLIP, JSON_CLIP, CSV_CLIP, AUDIO_CLIP = 0, 1, 2, 3
POSE_CLIP = CSV_CLIP
CSV_COLUMNS = ("Video Title", "Video Description", "Video URL", "Download URL", "Filename")


def _video_graph(source: str, fps: int, size: tuple[int, int]) -> str:
    """The lavfi graph for a named source, or ``<source>=size=WxH:rate=FPS`` for any other lavfi source."""
    w, h = size
    template = SOURCES.get(source, source + "=size={w}x{h}:rate={fps}")
    return template.format(w=w, h=h, fps=fps, bw=max(2, w // 6), bh=max(2, h // 4))


def write_clip(
    path: Path,
    seconds: float,
    fps: int,
    size: tuple[int, int],
    source: str = "testsrc2",
    audio: bool = False,
) -> Path:
    """Write one deterministic H.264 mp4 of ``seconds`` at ``fps`` and ``size`` (width, height) to ``path``.

    ``source`` is a name in :data:`SOURCES` or any lavfi video source taking ``size`` and ``rate``.
    With ``audio`` a 440 Hz sine tone (AAC, mono, 16 kHz) is muxed in. The file is written to a temporary
    file in the same folder and moved into place; ffmpeg's stderr is in the ``RuntimeError`` if it fails.
    """
    path = Path(path)
    w, h = size
    if w <= 0 or h <= 0 or w % 2 or h % 2:
        raise ValueError(f"size must be positive and even for yuv420p, got {size}")
    if fps <= 0 or seconds <= 0:
        raise ValueError(f"fps and seconds must be positive, got fps={fps} seconds={seconds}")
    frames = max(1, round(seconds * fps))
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", _video_graph(source, fps, size)]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:beep_factor=2:sample_rate=16000:duration={seconds}"]
    cmd += ["-map", "0:v:0", "-frames:v", str(frames), "-r", str(fps)]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "28", "-g", "16", "-pix_fmt", "yuv420p"]
    cmd += ["-threads", "1", "-x264-params", "threads=1:lookahead-threads=1:sliced-threads=0"]
    if audio:
        cmd += ["-map", "1:a:0", "-c:a", "aac", "-ac", "1", "-ar", "16000", "-b:a", "32k", "-t", str(seconds)]
    cmd += ["-map_metadata", "-1", "-map_chapters", "-1", "-fflags", "+bitexact", "-flags", "+bitexact"]
    cmd += ["-movflags", "+faststart", "-f", "mp4"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        result = subprocess.run([*cmd, str(tmp)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg failed ({result.returncode}) writing {path}:\n{result.stderr.strip()}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file in the same folder, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def make_dataset(
    root: Path,
    num_clips: int = 4,
    fps: int = 16,
    size: tuple[int, int] = (160, 96),
    seconds: float = 6.0,
) -> list[Path]:
    """Write the synthetic dataset under ``root/clips`` (layout in the module docstring); return the clips.

    Every caption source the pipeline reads is used once (txt, json, csv, jsonl), one clip has an audio
    track and one a ``<stem>.pose.mp4``. Needs ``num_clips >= 4``. Re-running writes identical bytes.
    Returns the main video paths (not pose videos), sorted.
    """
    if num_clips < 4:
        raise ValueError(f"num_clips must be at least 4 to cover every caption source, got {num_clips}")
    clips_dir = Path(root) / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    csv_rows: list[list[str]] = []
    jsonl_rows: list[dict[str, str]] = []
    videos: list[Path] = []
    for i in range(num_clips):
        source = CLIP_SOURCES[i % len(CLIP_SOURCES)]
        caption = CAPTIONS[source]
        video = write_clip(clips_dir / f"clip_{i:03d}.mp4", seconds, fps, size, source, audio=i == AUDIO_CLIP)
        videos.append(video)
        if i == TXT_CLIP:
            _write_text(video.with_suffix(".txt"), caption + "\n")
        elif i == JSON_CLIP:
            _write_text(video.with_suffix(".json"), json.dumps({"caption": caption}) + "\n")
        elif i == AUDIO_CLIP:
            jsonl_rows.append({"video": video.name, "caption": caption[:-1] + " to a steady beeping tone."})
        else:
            title = f"Synthetic clip {i}"
            csv_rows.append([title, caption, "", "", video.name])
        if i == POSE_CLIP:
            write_clip(video.with_name(f"{video.stem}.pose.mp4"), seconds, fps, size, POSE_SOURCE)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([list(CSV_COLUMNS), *csv_rows])
    _write_text(clips_dir / "captions.csv", buf.getvalue())
    _write_text(clips_dir / "captions.jsonl", "".join(json.dumps(row) + "\n" for row in jsonl_rows))
    return sorted(videos)
