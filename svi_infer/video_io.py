"""Reading images and videos, and writing mp4 clips that are joined without re-encoding."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from svi_infer.atomic import atomic_path


def read_image(path: str | Path) -> Image.Image:
    """An RGB image, or one clear error for a missing or unreadable file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop to the target aspect ratio, then resize (bicubic) to ``width x height``."""
    w, h = image.size
    scale = max(width / w, height / h)
    cw, ch = round(width / scale), round(height / scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)


def frames_to_tensor(frames: np.ndarray) -> Tensor:
    """``[T, H, W, 3]`` uint8 frames to a ``[3, T, H, W]`` float video in [-1, 1]."""
    video = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(3, 0, 1, 2)
    return (video.float() / 127.5 - 1.0).contiguous()


def tensor_to_frames(video: Tensor) -> np.ndarray:
    """``[3, T, H, W]`` video in [-1, 1] to ``[T, H, W, 3]`` uint8 frames."""
    video = ((video.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Encode ``[T, H, W, 3]`` uint8 frames with libx264 (yuv420p), atomically."""
    t, h, w, _ = frames.shape
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
            output_params=["-threads", "1"], ffmpeg_log_level="error",
        )  # fmt: skip
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()


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
