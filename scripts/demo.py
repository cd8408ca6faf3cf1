"""``make demo``: the main job end to end on the toy world's trained base model, printing where everything went.

toy-world clips with captions and ground truth -> pre-encoded shards (data_tools prepare) -> an error-recycling
LoRA trained on them (+experiment=toy, a few hundred CPU steps) -> export (ComfyUI format) -> a multi-clip video
from a held-out first frame, with the adapter and with the base model alone -> their drift, measured with
svi_infer.evaluate and against the world's ground truth, side by side. The base model (svi_infer/toy_model) was
trained from scratch on the world (README, "The toy world"), so the video shows the scene, not noise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.toy_world import FPS, HELDOUT_SEED0, make_world, render, truth, write_world
from svi_infer.evaluate.world import rollout_metrics
from svi_infer.video_io import read_video

OUT = Path("demo_out")
CLIPS = 10
STEPS = 200


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def drift(video: Path) -> list[dict]:
    """Per-clip ground-truth metrics of a rollout from the held-out world."""
    import json

    frames = read_video(video)
    clips = [tuple(c["frames"]) for c in json.loads(video.with_suffix(".json").read_text())["clips"]]
    world = make_world(HELDOUT_SEED0)
    return rollout_metrics(frames, render(world, len(frames)), truth(world, len(frames)), clips)


def main() -> None:
    t0 = time.monotonic()
    py = sys.executable
    clips_dir, held_dir = OUT / "world" / "train", OUT / "world" / "heldout"
    write_world(clips_dir, "train", videos=8, seconds=20.0)
    write_world(held_dir, "heldout", videos=1, seconds=(1 + 16 * CLIPS) / FPS + 1)
    stem = held_dir / f"heldout_{HELDOUT_SEED0:06d}"
    image, prompts = stem.with_suffix(".png"), stem.with_suffix(".txt")
    Image.fromarray(render(make_world(HELDOUT_SEED0), 1)[0]).save(image)
    dataset = OUT / "dataset"
    run([py, "-m", "data_tools", "prepare", f"input={clips_dir}", f"output={dataset}", "model=toy_wan21_i2v"]
        + ["ref_pad_num=-1", "stride=16", "progress=false"])  # fmt: skip
    train_dir = OUT / "train"
    run([py, "-m", "svi_train", "+experiment=toy", f"data.path={dataset}", f"hydra.run.dir={train_dir}"]
        + [f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every_n_steps={STEPS}",
           f"callbacks.export_every_n_steps={STEPS}"])  # fmt: skip
    adapter = train_dir / "adapters" / "final"
    comfy = OUT / "svi_toy_comfyui.safetensors"
    run([py, "-m", "svi_train.export", str(adapter), "--format", "comfyui", "--output", str(comfy)])
    common = ["+experiment=toy", f"image={image}", f"prompts={prompts}", f"num_clips={CLIPS}", "resume=false"]
    video, base_video = OUT / "toy_recycling.mp4", OUT / "toy_base.mp4"
    run([py, "-m", "svi_infer", *common, f"adapter.path={adapter}", f"output={video}", "overwrite=true"])
    run([py, "-m", "svi_infer", *common, "variant.ref_pad_num=0", f"output={base_video}", "overwrite=true"])
    run([py, "-m", "svi_infer.evaluate", str(video), "--reference", str(image)])
    ours, base = drift(video), drift(base_video)
    print("\nground-truth drift per clip (background RMSE vs the true background, 0 = none; sprites kept, 1 = all)")
    print(f"{'clip':>4}  {'recycling LoRA':>22}  {'base model alone':>22}")
    for k in range(CLIPS):
        a, b = ours[k], base[k]
        print(f"{k + 1:>4}  {a['bg_rmse']:>10.4f} {a['sprite_presence']:>11.2f}  "
              f"{b['bg_rmse']:>10.4f} {b['sprite_presence']:>11.2f}")  # fmt: skip
    last = np.array([read_video(video)[-1], read_video(base_video)[-1]])
    Image.fromarray(np.concatenate([np.asarray(Image.open(image)), *last], axis=1)).resize((576, 192), 0).save(
        OUT / "last_frames.png"
    )
    print(f"\nworld:   training clips {clips_dir}, held-out first frame {image} (caption {prompts})")
    print(f"shards:  {dataset / 'shards'} (index {dataset / 'index.json'}, report {dataset / 'report.json'})")
    print(f"train:   {train_dir} (metrics {train_dir / 'csv'}, checkpoints {train_dir / 'checkpoints'})")
    print(f"adapter: {adapter} (ComfyUI export {comfy})")
    print(f"videos:  {video} (recycling LoRA), {base_video} (base model), sidecars beside them")
    print(f"drift:   {video.with_suffix('.eval.json')} (plot {video.with_suffix('.eval.png')})")
    print(f"look:    {OUT / 'last_frames.png'} (first frame | last frame with the LoRA | last frame, base alone)")
    print(f"done in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
