"""The toy world: procedural videos whose identity must persist, small enough for a CPU to learn.

Every video is a static background (a two-colour gradient with soft stripes, the palette drawn per video) with
one to three sprites (discs or squares in saturated colours) that move in straight lines and bounce off the
borders. Everything is a pure function of the video's seed, so the ground truth of every frame (background,
sprite positions, colours) is known exactly: :func:`render` draws any frame, and :func:`write_world` writes,
for each video, ``<name>.mp4``, its caption ``<name>.txt`` and its ground truth ``<name>.truth.npz`` (the
background, and per sprite its shape, colour, radius and per-frame centre).

Train and held-out videos never share a seed: the train split uses seeds ``0 .. n-1``, the held-out split
``HELDOUT_SEED0 + k``. Rollouts start from held-out first frames.

    python -m data_tools.toy_world OUTPUT [--split train|heldout] [--videos N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 64  # frames are SIZE x SIZE
FPS = 8
HELDOUT_SEED0 = 100_000
SPLITS = ("train", "heldout")

# Background palette (muted) and sprite colours (saturated), by name, so captions can say them.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "navy": (30, 40, 90),
    "teal": (30, 100, 100),
    "olive": (100, 100, 40),
    "maroon": (100, 35, 45),
    "grey": (110, 110, 110),
    "brown": (110, 75, 45),
    "purple": (80, 45, 110),
    "forest green": (35, 85, 45),
}
SPRITE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 50, 40),
    "yellow": (245, 220, 50),
    "white": (245, 245, 245),
    "cyan": (60, 220, 240),
    "magenta": (230, 60, 220),
    "orange": (250, 140, 30),
    "lime": (140, 240, 60),
}
SHAPES = ("disc", "square")
NUMBERS = ("one", "two", "three")


@dataclass(frozen=True)
class World:
    """One video's scene: its background and sprites (start, velocity), all drawn from the seed."""

    seed: int
    background: np.ndarray  # [H, W, 3] float32 in [0, 1]
    colour_names: tuple[str, str]
    stripe_axis: str
    shapes: tuple[str, ...]
    sprite_names: tuple[str, ...]
    sprite_colours: np.ndarray  # [n, 3] float32 in [0, 1]
    radii: np.ndarray  # [n] float32, pixels
    start: np.ndarray  # [n, 2] float32 centre (x, y)
    velocity: np.ndarray  # [n, 2] float32 pixels per frame

    @property
    def caption(self) -> str:
        names = zip(self.sprite_names, self.shapes, strict=True)
        parts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in names]
        things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        verb = "bounces" if len(parts) == 1 else "bounce"
        a, b = self.colour_names
        scene = f"over a {a} and {b} background with {self.stripe_axis} stripes"
        return f"{NUMBERS[len(parts) - 1]} sprites: {things} {verb} {scene}"

    def positions(self, num_frames: int) -> np.ndarray:
        """Sprite centres ``[num_frames, n, 2]`` (x, y): straight lines folded at the borders (elastic bounces)."""
        t = np.arange(num_frames, dtype=np.float64)[:, None, None]
        lo = self.radii.astype(np.float64)[None, :, None]
        span = SIZE - 2 * lo
        raw = self.start[None].astype(np.float64) - lo + t * self.velocity[None].astype(np.float64)
        folded = np.mod(raw, 2 * span)
        return (lo + np.where(folded > span, 2 * span - folded, folded)).astype(np.float32)


def make_world(seed: int) -> World:
    """The scene of video ``seed`` (deterministic on every machine: numpy's PCG64 and float64 drawing)."""
    rng = np.random.default_rng(seed)
    names = list(BACKGROUND_COLOURS)
    a, b = rng.choice(len(names), size=2, replace=False)
    ca, cb = (np.array(BACKGROUND_COLOURS[names[i]], np.float64) / 255 for i in (a, b))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / SIZE
    angle = rng.uniform(0, 2 * np.pi)
    ramp = 0.5 + 0.5 * np.cos(angle) * (xx - 0.5) + 0.5 * np.sin(angle) * (yy - 0.5)
    axis = ("vertical", "horizontal", "diagonal")[rng.integers(3)]
    coord = {"vertical": xx, "horizontal": yy, "diagonal": (xx + yy) / 2}[axis]
    stripes = 0.18 * np.sin(2 * np.pi * (rng.uniform(2, 4) * coord + rng.uniform()))
    mix = np.clip(ramp + stripes, 0, 1)[..., None]
    background = ((1 - mix) * ca + mix * cb).astype(np.float32)

    n = int(rng.integers(1, 4))
    colour_ids = rng.choice(len(SPRITE_COLOURS), size=n, replace=False)
    sprite_names = tuple(list(SPRITE_COLOURS)[i] for i in colour_ids)
    colours = np.array([SPRITE_COLOURS[c] for c in sprite_names], np.float32) / 255
    shapes = tuple(SHAPES[i] for i in rng.integers(2, size=n))
    radii = rng.uniform(6.0, 8.0, size=n)
    start = rng.uniform(radii[:, None], SIZE - radii[:, None], size=(n, 2))
    speed = rng.uniform(0.6, 1.2, size=n)
    heading = rng.uniform(0, 2 * np.pi, size=n)
    velocity = speed[:, None] * np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return World(
        seed=seed,
        background=background,
        colour_names=(names[a], names[b]),
        stripe_axis=axis,
        shapes=shapes,
        sprite_names=sprite_names,
        sprite_colours=colours,
        radii=radii.astype(np.float32),
        start=start.astype(np.float32),
        velocity=velocity.astype(np.float32),
    )


def sprite_coverage(shape: str, radius: float, centre: np.ndarray) -> np.ndarray:
    """``[H, W]`` share of each pixel the sprite covers (edges anti-aliased over one pixel)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = np.abs(xx - centre[0]), np.abs(yy - centre[1])
    dist = np.sqrt(dx * dx + dy * dy) if shape == "disc" else np.maximum(dx, dy)
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def render(world: World, num_frames: int) -> np.ndarray:
    """Frames ``[num_frames, H, W, 3]`` uint8; later sprites are drawn over earlier ones."""
    pos = world.positions(num_frames)
    frames = np.empty((num_frames, SIZE, SIZE, 3), np.uint8)
    for t in range(num_frames):
        img = world.background.copy()
        for k, shape in enumerate(world.shapes):
            cover = sprite_coverage(shape, float(world.radii[k]), pos[t, k])[..., None]
            img = (1 - cover) * img + cover * world.sprite_colours[k]
        frames[t] = np.round(img * 255)
    return frames


def split_seeds(split: str, count: int) -> list[int]:
    """Seeds of a split: train ``0..count-1``, held-out ``HELDOUT_SEED0 + k`` (the splits never meet)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [(0 if split == "train" else HELDOUT_SEED0) + k for k in range(count)]


def truth(world: World, num_frames: int) -> dict[str, np.ndarray]:
    """The ground truth of every frame, as written to ``<name>.truth.npz``."""
    return {
        "seed": np.int64(world.seed),
        "background": np.round(world.background * 255).astype(np.uint8),
        "shapes": np.array(world.shapes),
        "colours": np.round(world.sprite_colours * 255).astype(np.uint8),
        "radii": world.radii,
        "positions": world.positions(num_frames),
    }


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    """Near-lossless H.264 (yuv444p, crf 4) so the file is the ground truth to within a grey level or two."""
    import imageio_ffmpeg

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    writer = imageio_ffmpeg.write_frames(
        str(tmp),
        (SIZE, SIZE),
        fps=FPS,
        codec="libx264",
        pix_fmt_out="yuv444p",
        output_params=["-crf", "4", "-preset", "veryfast", "-threads", "1", "-fflags", "+bitexact"],
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    os.replace(tmp, path)


def _atomic_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def write_world(output: Path, split: str = "train", videos: int = 32, seconds: float = 40.0) -> list[Path]:
    """Write ``videos`` videos of the split under ``output`` (mp4, caption, truth); return the mp4 paths.

    Files already there are rewritten identically (the same seed draws the same bytes of truth and caption).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    num_frames = max(1, round(seconds * FPS))
    paths = []
    for seed in split_seeds(split, videos):
        world = make_world(seed)
        stem = output / f"{split}_{seed:06d}"
        _write_mp4(stem.with_suffix(".mp4"), render(world, num_frames))
        _atomic_bytes(stem.with_suffix(".txt"), lambda f, w=world: f.write((w.caption + "\n").encode()))
        _atomic_bytes(stem.with_suffix(".truth.npz"), lambda f, w=world: np.savez_compressed(f, **truth(w, num_frames)))
        paths.append(stem.with_suffix(".mp4"))
    return paths


def load_truth(path: str | Path) -> dict[str, np.ndarray]:
    """A ``<name>.truth.npz`` (or the video beside it) as written by :func:`write_world`."""
    path = Path(path)
    if path.suffix == ".mp4":
        path = path.with_suffix(".truth.npz")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.toy_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder to write <split>_<seed>.mp4/.txt/.truth.npz into")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--videos", type=int, default=32, help="number of videos (default 32)")
    parser.add_argument("--seconds", type=float, default=40.0, help=f"length of each video at {FPS} fps (default 40)")
    args = parser.parse_args(argv)
    if args.videos < 1 or args.seconds <= 0:
        parser.error("--videos must be >= 1 and --seconds > 0")
    try:
        paths = write_world(args.output, args.split, args.videos, args.seconds)
    except OSError as err:
        print(f"{parser.prog}: error: cannot write {args.output}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"{len(paths)} {args.split} videos ({args.seconds:g} s at {FPS} fps, {SIZE}x{SIZE}) in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
