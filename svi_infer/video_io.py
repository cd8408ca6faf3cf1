"""Reading images and videos, writing mp4 clips that are joined without re-encoding, and muxing a soundtrack.

torch is imported only by the two functions that make or read tensors, so the CLI reads its inputs before torch
starts up.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import imageio_ffmpeg
import numpy as np
from PIL import Image, UnidentifiedImageError

from svi_infer.atomic import atomic_path
from svi_infer.audio_file import AudioError

if TYPE_CHECKING:
    from torch import Tensor


def read_image(path: str | Path) -> Image.Image:
    """An RGB image, or one clear error for a missing or unreadable file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; check the path")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def crop_box(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)``: the centred box of a ``(w, h)`` frame with the aspect of ``width x height``,
    the part :func:`fit_image` keeps. The pose video is cut by the same rule, so both line up pixel for pixel."""
    w, h = size
    scale = max(width / w, height / h)
    cw, ch = round(width / scale), round(height / scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop to the target aspect ratio (:func:`crop_box`), then resize (bicubic) to ``width x height``.

    At a size derived from the image (``fit=reference``) the crop only trims what rounding the sides to a multiple
    of 16 leaves over (less than 16 output pixels), where SVI stretches the image by as much instead.
    """
    return image.crop(crop_box(image.size, height, width)).resize((width, height), Image.BICUBIC)


def frames_to_tensor(frames: np.ndarray) -> Tensor:
    """``[T, H, W, 3]`` uint8 frames to a ``[3, T, H, W]`` float video in [-1, 1]."""
    import torch

    video = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(3, 0, 1, 2)
    return (video.float() / 127.5 - 1.0).contiguous()


def tensor_to_frames(video: Tensor) -> np.ndarray:
    """``[3, T, H, W]`` video in [-1, 1] to ``[T, H, W, 3]`` uint8 frames."""
    import torch

    video = ((video.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).numpy()


def write_mp4(path: str | Path, frames: np.ndarray | Iterable[np.ndarray], fps: float) -> int:
    """Encode uint8 ``[H, W, 3]`` frames (a ``[T, H, W, 3]`` array, or any iterable, streamed) with libx264
    (yuv420p), atomically; returns the number of frames written."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"no frames to write to {path}")
    h, w = first.shape[:2]
    count = 0
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
            output_params=["-threads", "1"], ffmpeg_log_level="error",
        )  # fmt: skip
        writer.send(None)
        try:
            for frame in itertools.chain([first], frames):
                writer.send(np.ascontiguousarray(frame))
                count += 1
        finally:
            writer.close()
    return count


def concat_mp4(parts: list[Path], output: str | Path) -> None:
    """Join same-format mp4 clips into one file by stream copy (no re-encode), atomically."""
    with atomic_path(output) as tmp:
        listing = tmp.with_suffix(".txt")
        listing.write_text("".join(f"file '{p.resolve()}'\n" for p in parts), encoding="utf-8")
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "concat", "-safe", "0"]
        cmd += ["-i", str(listing), "-c", "copy", "-f", "mp4", str(tmp)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"ffmpeg could not join {len(parts)} clips into {output}: {err.stderr}") from None
        finally:
            listing.unlink(missing_ok=True)


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video as ``[T, H, W, 3]`` uint8 (decord)."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _duration_line(text: str) -> float | None:
    match = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    return None if match is None else int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])


def probe_streams(path: str | Path) -> dict:
    """Durations (seconds) of a file's container, first video stream and first audio stream, read with the bundled
    ffmpeg (there is no ffprobe): the video by counting its packets at its frame rate, the audio by decoding it and
    counting samples. Keys: ``container``, ``video``, ``frames``, ``fps``, ``video_codec``, ``audio``,
    ``sample_rate``, ``audio_codec``; a missing stream gives ``None`` values."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    head = subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True, text=True)
    if "Stream #" not in head.stderr:
        last = (head.stderr.strip().splitlines() or ["ffmpeg failed"])[-1]
        raise ValueError(f"cannot read {path} ({last})")
    info = dict.fromkeys(("video", "frames", "fps", "video_codec", "audio", "sample_rate", "audio_codec"))
    info["container"] = _duration_line(head.stderr)
    video = re.search(r"Stream #0:\d+.*?: Video: (\w+).*?(\d+(?:\.\d+)?) fps", head.stderr)
    audio = re.search(r"Stream #0:\d+.*?: Audio: (\w+).*?(\d+) Hz", head.stderr)
    if video is not None:
        cmd = [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        counts = re.findall(r"frame=\s*(\d+)", done.stderr)
        info["video_codec"], info["fps"] = video[1], float(video[2])
        if counts:
            info["frames"] = int(counts[-1])
            info["video"] = info["frames"] / info["fps"]
    if audio is not None:
        rate = int(audio[2])
        cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-f", "s16le", "-"]
        done = subprocess.run(cmd, capture_output=True)
        info["audio_codec"], info["sample_rate"] = audio[1], rate
        info["audio"] = len(done.stdout) // 2 / rate
    return info


def mux_audio(
    video: str | Path, audio: str | Path, output: str | Path, start_s: float = 0.0, duration_s: float | None = None
) -> None:
    """Write ``video``'s frames (stream copy, no re-encode) with ``audio``'s first track as AAC, atomically.

    ``audio`` is any file ffmpeg reads (wav, mp3, m4a, a video with sound). Its track is cut to
    ``[start_s, start_s + duration_s)``, ``duration_s`` defaulting to the video's duration (frames / fps), and
    padded with silence when it ends sooner, so both streams last as long as the video. AAC at 48 kHz keeps the
    duration within one AAC frame (21 ms). ``output`` may be ``video`` itself.
    """
    video, audio = Path(video).expanduser(), Path(audio).expanduser()
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    for name, file in (("video", video), ("audio", audio)):
        if not file.is_file():
            raise FileNotFoundError(f"{name} {file} does not exist")
    streams = probe_streams(video)
    if streams["video"] is None:
        raise ValueError(f"{video} has no video stream to put the audio under")
    try:
        source = probe_streams(audio)
    except ValueError as err:
        raise AudioError(f"cannot read {audio} ({err}); give a file that plays, e.g. wav, mp3 or m4a") from None
    if source["audio"] is None:
        raise AudioError(f"{audio} has no audio track; give a video with sound or a separate audio file")
    if start_s >= source["audio"]:
        raise AudioError(f"start_s={start_s} s is past the end of {audio} ({source['audio']:.2f} s of audio)")
    duration = streams["video"] if duration_s is None else float(duration_s)
    if duration <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    with atomic_path(output) as tmp:
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error", "-i", str(video)]
        cmd += ["-ss", f"{start_s:.6f}", "-t", f"{duration:.6f}", "-i", str(audio)]
        cmd += ["-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-af", f"apad=whole_dur={duration:.6f}"]
        cmd += ["-c:a", "aac", "-b:a", "192k", "-ar", "48000", "-movflags", "+faststart", "-f", "mp4", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ffmpeg could not mux {audio} into {video}: {done.stderr.strip()}")
