"""The paper's ablation in the toy world: does error recycling stop drift? (docs/toy_world.md)

Three arms on the same shards, steps and seeds: the bundled base model alone (plain I2V chaining: the last frame
starts the next clip), a LoRA trained with ``recycling=off``, and a LoRA trained with error recycling (Shot
settings). Each arm rolls out ``--clips`` chained clips from ``--starts`` held-out first frames, once per seed
(training seed for the LoRAs, sampling seed for the base). A second table repeats the two LoRA arms with the
SVI 2.0 Pro latent hand-off. Drift per clip is measured against the world's ground truth
(svi_infer.evaluate.world) and with svi_infer.evaluate.metrics; every figure is a mean over seeds with a 95% t-interval.

    python bench/toy_drift.py [--out bench_out/toy_drift] [--reuse] [--seeds 3] [--starts 8] [--clips 20]

``--reuse`` keeps the world, shards, trained adapters and rollouts already under ``--out``. The last line is:
``drift_ratio=<recycling / off, background RMSE at the last clip> base_ratio=<recycling / base> ...``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.toy_world import FPS, make_world, render, split_seeds, truth, write_world  # noqa: E402

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
FRAMES = 17  # the toy model's clip length; one motion frame of overlap
METRICS = ("bg_rmse", "sprite_presence", "motion_ratio", "sharpness_ratio", "color_drift_first")
PRO_TRAIN = ["variant.handoff=latent", "variant.ref_pad_num=0", "data.motion_latents=[0,1]"]
PRO_INFER = ["variant.handoff=latent", "variant.ref_pad_num=0", "variant.motion_latents=1"]
ARMS = {  # name -> (shards, training overrides or None for the base, inference overrides)
    "base": (None, None, ["variant.ref_pad_num=0"]),  # plain I2V chaining: the last frame, then zeros
    "off": ("pixel", ["recycling=off"], []),
    "recycling": ("pixel", [], []),
    "pro_off": ("latent", ["recycling=off", *PRO_TRAIN], PRO_INFER),
    "pro_recycling": ("latent", PRO_TRAIN, PRO_INFER),
}
PREPARE = {
    "pixel": ["ref_pad_num=-1"],
    "latent": ["handoff=latent", "motion_latents=[1]", "ref_pad_num=0", "anchor=outside"],
}


def sh(cmd: list[str], log: Path) -> None:
    """Run a command, its output into ``log``; a failure prints the log's tail and stops the bench."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if done.returncode:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"toy_drift: {cmd[2]} failed (exit {done.returncode}); log: {log}")


def prepare(out: Path, train_videos: int, starts: int, clips: int, stride: int) -> None:
    seconds = (1 + (FRAMES - 1) * clips) / FPS + 1
    if not (out / "world" / "heldout").is_dir():
        write_world(out / "world" / "train", "train", train_videos, 40.0)
        write_world(out / "world" / "heldout", "heldout", starts, seconds)
    py = sys.executable
    for handoff, extra in PREPARE.items():
        shards = out / "shards" / handoff
        if not (shards / "index.json").is_file():
            cmd = [py, "-m", "data_tools", "prepare", f"input={out / 'world' / 'train'}", f"output={shards}"]
            sh([*cmd, "model=toy_wan21_i2v", f"stride={stride}", "progress=false", *extra], out / f"prep_{handoff}.log")


def train(out: Path, arm: str, seed: int, steps: int) -> Path | None:
    """The arm's adapter for ``seed`` (trained unless already there); None for the base."""
    shards, overrides, _ = ARMS[arm]
    if overrides is None:
        return None
    run = out / "train" / f"{arm}_s{seed}"
    adapter = run / "adapters" / "final"
    if not (adapter / "svi.json").is_file():
        cmd = [sys.executable, "-m", "svi_train", "+experiment=toy", f"data.path={out / 'shards' / shards}",
               f"seed={seed}", f"trainer.max_steps={steps}", f"trainer.checkpoint_every_n_steps={steps}",
               f"callbacks.export_every_n_steps={steps}", f"hydra.run.dir={run}", *overrides]  # fmt: skip
        run.mkdir(parents=True, exist_ok=True)
        sh(cmd, run / "train.log")
    return adapter


def rollout(out: Path, arm: str, seed: int, start: int, clips: int, adapter: Path | None) -> Path:
    """Generate (unless done) one rollout in-process, as ``python -m svi_infer`` would; return the video."""
    from hydra import compose, initialize_config_module

    from svi_infer.longvideo.config import register
    from svi_infer.longvideo.plan import run

    video = out / "rollouts" / arm / f"s{seed}_{start:06d}.mp4"
    if video.with_suffix(".json").is_file() and video.is_file():
        return video
    heldout = out / "world" / "heldout" / f"heldout_{start:06d}"
    first = heldout.with_suffix(".png")
    if not first.is_file():
        from PIL import Image

        Image.fromarray(render(make_world(start), 1)[0]).save(first)
    overrides = ["+experiment=toy", f"image={first}", f"prompts={heldout.with_suffix('.txt')}", f"output={video}",
                 f"num_clips={clips}", f"seed={seed}", "resume=false", "overwrite=true", "progress=false",
                 *ARMS[arm][2]]  # fmt: skip
    if adapter is not None:
        overrides.append(f"adapter.path={adapter}")
    register()
    with initialize_config_module("conf", version_base="1.3"):
        run(compose("infer", overrides=overrides))
    return video


def measure(video: Path, start: int) -> list[dict]:
    """Per-clip world and evaluate metrics of one rollout against its held-out video's ground truth."""
    from svi_infer.evaluate.metrics import evaluate_frames
    from svi_infer.evaluate.world import rollout_metrics
    from svi_infer.video_io import read_video

    frames = read_video(video)
    sidecar = json.loads(video.with_suffix(".json").read_text())
    ranges = [tuple(c["frames"]) for c in sidecar["clips"]]
    world = make_world(start)
    true_frames = render(world, len(frames))
    world_rows = rollout_metrics(frames, true_frames, truth(world, len(frames)), ranges)
    report = evaluate_frames(frames, FPS, ranges, reference=true_frames[0])
    return [w | {"color_drift_first": e["color_drift_first"]} for w, e in zip(world_rows, report["clips"], strict=True)]


def summarise(per_seed: dict[int, list[list[dict]]]) -> dict[str, list[dict]]:
    """Per metric and clip: mean over seeds (each the mean over starts) and the 95% t-interval half-width."""
    seeds = sorted(per_seed)
    num_clips = len(per_seed[seeds[0]][0])
    out: dict[str, list[dict]] = {}
    for metric in METRICS:
        rows = []
        for k in range(num_clips):
            per = np.array([np.mean([r[k][metric] for r in per_seed[s] if r[k][metric] is not None]) for s in seeds])
            half = T_975.get(len(per) - 1, 1.96) * per.std(ddof=1) / np.sqrt(len(per)) if len(per) > 1 else 0.0
            rows.append({"mean": float(per.mean()), "ci95": float(half)})
        out[metric] = rows
    return out


def table(results: dict, clips: int) -> str:
    """Markdown: per arm and clip (1, 5, 10, ..., last), each metric's mean ± 95% half-interval over seeds."""
    shown = sorted({1, *range(5, clips + 1, 5), clips})
    lines = ["| arm | clip | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for arm, summary in results.items():
        for k in shown:
            cells = [f"{summary[m][k - 1]['mean']:.4f} ± {summary[m][k - 1]['ci95']:.4f}" for m in METRICS]
            lines.append(f"| {arm} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, title in zip(axes, ("bg_rmse", "sprite_presence", "motion_ratio"),
                                 ("background RMSE vs truth (lower = less drift)", "sprites kept (1 = all)",
                                  "motion / true motion"), strict=True):  # fmt: skip
        for arm, summary in results.items():
            mean = np.array([r["mean"] for r in summary[metric]])
            half = np.array([r["ci95"] for r in summary[metric]])
            x = np.arange(1, len(mean) + 1)
            line = ax.plot(x, mean, label=arm, linestyle="--" if arm.startswith("pro") else "-")[0]
            ax.fill_between(x, mean - half, mean + half, alpha=0.15, color=line.get_color())
        ax.set_xlabel("clip")
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def contact_sheet(out: Path, arms: list[str], seed: int, starts: list[int], path: Path) -> None:
    """Rows: the true first frame, then each arm's last frame, per held-out start (columns)."""
    from PIL import Image, ImageDraw

    from svi_infer.video_io import read_video

    size, label = 64, 110
    sheet = Image.new("RGB", (label + size * len(starts), size * (1 + len(arms))), "white")
    draw = ImageDraw.Draw(sheet)
    for row, arm in enumerate(["first frame", *arms]):
        draw.text((4, row * size + size // 2 - 5), arm, fill="black")
        for col, start in enumerate(starts):
            video = out / "rollouts" / arm / f"s{seed}_{start:06d}.mp4"
            if row == 0:
                frame = render(make_world(start), 1)[0]
            elif video.is_file():  # the latent hand-off arms may roll out from fewer starts
                frame = read_video(video)[-1]
            else:
                continue
            sheet.paste(Image.fromarray(frame), (label + col * size, row * size))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "toy_drift")
    parser.add_argument("--reuse", action="store_true", help="keep what is already under --out")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument("--pro-starts", type=int, help="starts of the latent hand-off arms (default: --starts)")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400, help="LoRA training steps per arm")
    parser.add_argument("--train-videos", type=int, default=24)
    parser.add_argument("--stride", type=int, default=16, help="frames between training windows")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    args = parser.parse_args()
    if args.out.exists() and not args.reuse:
        raise SystemExit(f"toy_drift: {args.out} exists: pass --reuse to keep its results, or remove it")
    t0 = time.monotonic()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    prepare(out, args.train_videos, args.starts, args.clips, args.stride)
    starts = split_seeds("heldout", args.starts)
    seeds = list(range(args.seeds))
    results: dict[str, dict] = {}
    for arm in arms:
        per_seed: dict[int, list[list[dict]]] = {}
        arm_starts = starts[: args.pro_starts] if arm.startswith("pro") and args.pro_starts else starts
        for seed in seeds:
            adapter = train(out, arm, seed, args.steps)
            rows = []
            for start in arm_starts:
                video = rollout(out, arm, seed, start, args.clips, adapter)
                rows.append(measure(video, start))
            per_seed[seed] = rows
            print(f"{arm} seed {seed}: last-clip background RMSE "
                  f"{np.mean([r[-1]['bg_rmse'] for r in rows]):.4f}", flush=True)  # fmt: skip
        results[arm] = summarise(per_seed)
    (out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "arms": results}, indent=1))
    (out / "table.md").write_text(table(results, args.clips))
    plot(results, out / "drift.png")
    contact_sheet(out, arms, seeds[0], starts, out / "last_frames.png")
    last = {arm: {m: results[arm][m][-1] for m in METRICS} for arm in arms}
    first = {arm: {m: results[arm][m][0] for m in METRICS} for arm in arms}
    for arm in arms:
        cells = "  ".join(f"{m} {last[arm][m]['mean']:.4f}±{last[arm][m]['ci95']:.4f}" for m in METRICS)
        print(f"{arm:>14} clip 1 bg_rmse {first[arm]['bg_rmse']['mean']:.4f} | clip {args.clips}: {cells}")
    figures = {}
    if {"recycling", "off"} <= set(arms):
        figures["drift_ratio"] = last["recycling"]["bg_rmse"]["mean"] / last["off"]["bg_rmse"]["mean"]
    if {"recycling", "base"} <= set(arms):
        figures["base_ratio"] = last["recycling"]["bg_rmse"]["mean"] / last["base"]["bg_rmse"]["mean"]
    if {"pro_recycling", "pro_off"} <= set(arms):
        figures["pro_drift_ratio"] = last["pro_recycling"]["bg_rmse"]["mean"] / last["pro_off"]["bg_rmse"]["mean"]
    for arm in arms:
        figures[f"{arm}_sprites_last"] = last[arm]["sprite_presence"]["mean"]
    if "base" in arms:
        figures["base_clip1_bg_rmse"] = first["base"]["bg_rmse"]["mean"]
    figures["wall_s"] = time.monotonic() - t0
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
