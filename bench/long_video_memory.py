"""Does a long video cost more per clip than a short one? Peak RSS and per-clip time, 3 clips vs 30 clips.

The long-video loop streams every finished clip to disk, so generating 30 clips should need no more memory
and no more time per clip than generating 3. This benchmark checks that on the tiny random-weight model
(CPU, no downloads): each measurement runs in its own fresh subprocess (``--child N``) so that peak RSS
(``ru_maxrss``) belongs to that run alone. A child builds the model, does a 1-clip warm-up, then times N
clips and prints one JSON line. The parent prints both runs side by side, whether the targets are met,
and ends with one line of ``name=value`` figures.

``--variant talk`` measures the same for SVI-Talk (tiny MultiTalk modules and wav2vec2 twin, three guidance
passes, 25 fps, the audio muxed at the end): both runs read the same 40 s track, as a long talk would.

Run: ``.venv/bin/python bench/long_video_memory.py [--variant talk]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_load import busy_cpu_s  # noqa: E402  (bench/ is on sys.path when run as a script)

SHORT, LONG = 3, 30
MEMORY_TARGET = 1.05  # peak RSS(30 clips) / peak RSS(3 clips)
TIME_TARGET = 1.10  # per-clip time(30 clips) / per-clip time(3 clips)
SPEC_ID = "tiny-wan2.1-i2v"
PROMPTS = ["a boat sails"]
IMAGE_SEED = 1234
HEIGHT, WIDTH = 48, 80


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    """Current resident set size in MiB (from /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run_child(num_clips: int, variant: str = "shot") -> dict:
    """Build the tiny model, warm up with 1 clip, then time ``num_clips`` clips; return the figures."""
    import subprocess

    import imageio_ffmpeg
    import numpy as np
    from PIL import Image

    from svi_infer.audio import AudioEncoder
    from svi_infer.longvideo.generator import LongVideoGenerator
    from svi_infer.model import build_model
    from svi_infer.settings import GenerationSettings
    from svi_infer.spec import get_spec
    from svi_infer.variants import make_conditioning
    from svi_infer.variants.talk import attach_talk_modules

    model = build_model(get_spec(SPEC_ID))
    talk = variant == "talk"
    conditioning = make_conditioning("text")
    if talk:
        attach_talk_modules(model)
        conditioning = make_conditioning("audio", audio_encoder=AudioEncoder.tiny())
    pixels = np.random.default_rng(IMAGE_SEED).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)  # uint8 [H, W, 3] -> RGB

    def settings(n: int) -> GenerationSettings:
        return GenerationSettings(
            num_clips=n,
            frames_per_clip=33,
            steps=4,
            height=HEIGHT,
            width=WIDTH,
            handoff="pixel",
            motion_frames=1,
            ref_pad_num=-1,
            **({"conditioning": "audio", "fps": 25, "cfg_scale": 2.0, "cfg_scale_audio": 5.0} if talk else {}),
        )

    with tempfile.TemporaryDirectory() as tmp:
        audio = None
        if talk:  # 40 s of a tone: enough for 30 clips of 33 frames at 25 fps
            audio = Path(tmp) / "speech.wav"
            tone = ["-f", "lavfi", "-i", "sine=frequency=220:duration=40", "-ar", "16000", str(audio)]
            subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *tone], check=True)
        kwargs = {"audio": audio} if talk else {}
        warm = LongVideoGenerator(model, settings(1), conditioning=conditioning)
        warm.generate(image, PROMPTS, Path(tmp) / "warmup.mp4", resume=False, progress=False, **kwargs)
        rss_after_warmup = _peak_rss_mb()

        generator = LongVideoGenerator(model, settings(num_clips), conditioning=conditioning)
        t0, c0 = time.perf_counter(), time.process_time()
        result = generator.generate(image, PROMPTS, Path(tmp) / "long.mp4", resume=False, progress=False, **kwargs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        clips = json.loads(result.sidecar.read_text(encoding="utf-8"))["clips"]

    seconds = [float(c["seconds"]) for c in clips]
    return {
        "clips": num_clips,
        "frames": result.frames,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_after_warmup_mb": round(rss_after_warmup, 1),
        "rss_end_mb": round(_current_rss_mb(), 1),
        "clip_median_s": round(statistics.median(seconds), 4),
        "clip_first_s": seconds[0],
        "clip_last_s": seconds[-1],
        "wall_s": round(wall, 3),
        "wall_per_clip_s": round(wall / num_clips, 4),
        "cpu_per_clip_s": round(cpu / num_clips, 4),
    }


def measure(num_clips: int, variant: str = "shot") -> dict:
    """Run one child process for ``num_clips`` clips and parse its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(num_clips), "--variant", variant]
    busy0, kids0, t0 = busy_cpu_s(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    busy1, kids1, wall = busy_cpu_s(), _children_cpu_s(), time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child run for {num_clips} clips failed (exit {proc.returncode})")
    figures = json.loads(lines[-1])
    # CPUs kept busy by anything but this child (and its ffmpeg processes) while it ran.
    figures["other_load_cpus"] = round(max(0.0, (busy1 - busy0) - (kids1 - kids0)) / wall, 2)
    return figures


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def combine(runs: list[dict]) -> dict:
    """One figure set per clip count over repeats: the highest peak RSS, the lowest timings.

    Other load on the machine only ever adds time, so the fastest repeat is the least disturbed one.
    """
    out = dict(runs[0])
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["peak_rss_after_warmup_mb"] = max(r["peak_rss_after_warmup_mb"] for r in runs)
    for key in ("clip_median_s", "wall_per_clip_s", "wall_s", "cpu_per_clip_s"):
        out[key] = min(r[key] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, metavar="N", help="internal: measure N clips in this process")
    parser.add_argument("--repeats", type=int, default=2, help="child runs per clip count, interleaved (default 2)")
    parser.add_argument("--variant", choices=("shot", "talk"), default="shot", help="talk: audio-driven clips")
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(run_child(args.child, args.variant)), flush=True)
        return

    t_start = time.perf_counter()
    runs: dict[int, list[dict]] = {SHORT: [], LONG: []}
    for rep in range(args.repeats):
        for n in (SHORT, LONG):  # interleaved, so drift on the machine hits both alike
            r = measure(n, args.variant)
            runs[n].append(r)
            print(
                f"run {rep + 1}/{args.repeats} clips={n:>2}: peak_rss={r['peak_rss_mb']:.1f} MiB "
                f"(after warm-up {r['peak_rss_after_warmup_mb']:.1f}) median_clip={r['clip_median_s']:.3f}s "
                f"wall/clip={r['wall_per_clip_s']:.3f}s other_load={r['other_load_cpus']:.2f} CPUs",
                flush=True,
            )
    short, long = combine(runs[SHORT]), combine(runs[LONG])

    print(f"\n{'':28}{SHORT:>10} clips{LONG:>10} clips{'ratio':>10}")
    rows = [
        ("peak RSS (MiB)", "peak_rss_mb"),
        ("peak RSS after warm-up (MiB)", "peak_rss_after_warmup_mb"),
        ("median per-clip time (s)", "clip_median_s"),
        ("wall time / clip (s)", "wall_per_clip_s"),
        ("CPU time / clip (s)", "cpu_per_clip_s"),
    ]
    for label, key in rows:
        ratio = long[key] / short[key]
        print(f"{label:<28}{short[key]:>16.3f}{long[key]:>16.3f}{ratio:>10.3f}")

    memory_ratio = long["peak_rss_mb"] / short["peak_rss_mb"]
    time_ratio = long["clip_median_s"] / short["clip_median_s"]
    wall_ratio = long["wall_per_clip_s"] / short["wall_per_clip_s"]
    cpu_ratio = long["cpu_per_clip_s"] / short["cpu_per_clip_s"]
    growth = long["peak_rss_mb"] - long["peak_rss_after_warmup_mb"]
    print(f"\npeak RSS growth during the {LONG}-clip generation (beyond warm-up): {growth:.1f} MiB")
    ok_mem, ok_time = memory_ratio <= MEMORY_TARGET, time_ratio <= TIME_TARGET
    # The timings above are the fastest repeat of each clip count; they are only trustworthy if for each
    # count at least one repeat ran on an otherwise idle machine.
    other = max(min(r["other_load_cpus"] for r in rs) for rs in runs.values())
    print(f"other load on the machine in the least disturbed repeat: {other:.2f} of {os.cpu_count()} CPUs")
    if other > 0.25:
        print("WARNING: other work competed for the CPUs; the timing ratios are unreliable, rerun when idle")
    print(f"memory target  ratio <= {MEMORY_TARGET:.2f}: {memory_ratio:.3f} -> {'MET' if ok_mem else 'NOT MET'}")
    print(f"time target    ratio <= {TIME_TARGET:.2f}: {time_ratio:.3f} -> {'MET' if ok_time else 'NOT MET'}")
    print(
        f"(for reference: wall-based per-clip ratio {wall_ratio:.3f}, CPU-time ratio {cpu_ratio:.3f}; benchmark took "
        f"{time.perf_counter() - t_start:.0f}s)"
    )
    print(
        f"memory_ratio={memory_ratio:.3f} time_ratio={time_ratio:.3f} wall_ratio={wall_ratio:.3f} "
        f"cpu_ratio={cpu_ratio:.3f} "
        f"rss3_mb={short['peak_rss_mb']:.1f} rss30_mb={long['peak_rss_mb']:.1f} "
        f"clip_s3={short['clip_median_s']:.3f} clip_s30={long['clip_median_s']:.3f}"
    )


if __name__ == "__main__":
    main()
