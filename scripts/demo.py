"""``make demo``: the main job end to end on the embedded tiny model, printing where everything went.

Steps so far: prepare pre-encoded shards from a bundled synthetic clip set (made with the bundled ffmpeg),
then generate a multi-clip video with svi_infer (random tiny weights, so the pictures are noise-like: the
point is the pipeline). Training and export join as they land.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from data_tools.synthetic import make_dataset

OUT = Path("demo_out")


def write_inputs() -> tuple[Path, Path]:
    """A synthetic first frame and a three-prompt stream."""
    OUT.mkdir(exist_ok=True)
    image = Image.new("RGB", (160, 96), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 64, 160, 96), fill=(30, 120, 60))
    draw.ellipse((60, 20, 100, 60), fill=(240, 200, 60))
    image_path = OUT / "first_frame.png"
    image.save(image_path)
    prompts_path = OUT / "prompts.txt"
    prompts_path.write_text(
        "# one prompt per clip; the stream loops\n"
        "a boat sails on the sea under the sun\n"
        "the camera pans across the sky\n"
        "a cat walks along the shore\n",
        encoding="utf-8",
    )
    return image_path, prompts_path


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    clips = make_dataset(OUT / "clips", num_clips=4, fps=16, size=(160, 96), seconds=6.0)
    shards = OUT / "dataset"
    prepare = [sys.executable, "-m", "data_tools", "prepare", f"input={OUT / 'clips'}", f"output={shards}"]
    run(
        [
            *prepare,
            "model=tiny_wan21_i2v",
            "frames_per_clip=33",
            "motion_frames=[1,5]",
            "ref_pad_num=0",
            "progress=false",
        ]
    )
    image, prompts = write_inputs()
    video = OUT / "film_tiny.mp4"
    cmd = [sys.executable, "-m", "svi_infer", "model=tiny_wan21_i2v", "+experiment=film", f"image={image}"]
    cmd += [f"prompts={prompts}", f"output={video}", "num_clips=4", "resume=false"]
    run(cmd)
    print(f"\nclips:   {len(clips)} synthetic videos with captions under {OUT / 'clips'}")
    print(f"shards:  {shards / 'shards'} (index {shards / 'index.json'}, report {shards / 'report.json'})")
    print(f"inputs:  {image}, {prompts}\nvideo:   {video}\nsidecar: {video.with_suffix('.json')}")


if __name__ == "__main__":
    main()
