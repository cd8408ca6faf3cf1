"""``make demo``: the main job end to end on the embedded tiny model, printing where everything went.

prepare pre-encoded shards from a bundled synthetic clip set (made with the bundled ffmpeg) -> train an
error-recycling LoRA on them (+experiment=tiny, a few hundred CPU steps) -> export it (ComfyUI format) ->
generate a multi-clip video with the trained adapter -> measure its drift (python -m svi_infer.evaluate). The
tiny model has random weights, so the pictures are noise-like: the point is the pipeline.
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
    py = sys.executable
    clips = make_dataset(OUT / "clips", num_clips=4, fps=16, size=(160, 96), seconds=6.0)
    dataset = OUT / "dataset"
    run([py, "-m", "data_tools", "prepare", f"input={OUT / 'clips'}", f"output={dataset}", "model=tiny_wan21_i2v"]
        + ["frames_per_clip=33", "motion_frames=[1]", "ref_pad_num=-1", "progress=false"])  # fmt: skip
    train_dir = OUT / "train"
    run([py, "-m", "svi_train", "+experiment=tiny", f"data.path={dataset}", f"hydra.run.dir={train_dir}"])
    adapter = train_dir / "adapters" / "final"
    comfy = OUT / "svi_tiny_comfyui.safetensors"
    run([py, "-m", "svi_train.export", str(adapter), "--format", "comfyui", "--output", str(comfy)])
    image, prompts = write_inputs()
    video = OUT / "shot_tiny.mp4"
    run([py, "-m", "svi_infer", "model=tiny_wan21_i2v", "+experiment=shot", f"image={image}", f"prompts={prompts}"]
        + [f"adapter.path={adapter}", f"output={video}", "num_clips=4", "resume=false", "overwrite=true"])  # fmt: skip
    run([py, "-m", "svi_infer.evaluate", str(video), "--reference", str(image)])
    print(f"\nclips:   {len(clips)} synthetic videos with captions under {OUT / 'clips'}")
    print(f"shards:  {dataset / 'shards'} (index {dataset / 'index.json'}, report {dataset / 'report.json'})")
    print(f"train:   {train_dir} (metrics {train_dir / 'csv'}, checkpoints {train_dir / 'checkpoints'})")
    print(f"adapter: {adapter} (ComfyUI export {comfy})")
    print(f"inputs:  {image}, {prompts}\nvideo:   {video}\nsidecar: {video.with_suffix('.json')}")
    print(f"drift:   {video.with_suffix('.eval.json')} (plot {video.with_suffix('.eval.png')})")


if __name__ == "__main__":
    main()
