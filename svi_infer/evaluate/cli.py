"""Drift metrics over a long video, clip by clip: does minute 10 still look like minute 1?

``python -m svi_infer.evaluate video.mp4 [--reference first_frame.png] [--clip-frames F --overlap m]
[--output-dir D]`` writes ``<video stem>.eval.json`` (the report) and ``<video stem>.eval.png`` (one plot per
metric over time, seams marked) beside the video, or in ``--output-dir``, and prints a one-screen summary.

Clips: :mod:`svi_infer.evaluate.reading`; metrics: :mod:`svi_infer.evaluate.metrics`.
"""

from __future__ import annotations

import argparse
import sys

from svi_infer.evaluate.reading import _open
from svi_infer.evaluate.report import format_summary, output_paths, write_report


def _error(message: str) -> None:
    print(f"svi_infer.evaluate: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m svi_infer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("video", help="the long video (mp4); its sidecar <stem>.json, when present, gives the clips")
    parser.add_argument("--reference", help="image to compare every clip with (e.g. the first frame / anchor)")
    parser.add_argument("--clip-frames", type=int, help="frames per generated clip (overrides the sidecar)")
    parser.add_argument("--overlap", type=int, help="frames each later clip repeats and drops (overrides the sidecar)")
    parser.add_argument(
        "--output-dir", help="where <stem>.eval.json and <stem>.eval.png go (default: beside the video)"
    )
    args = parser.parse_args(argv)
    try:
        job = _open(args.video, args.reference, args.clip_frames, args.overlap)
        json_path, png_path = output_paths(job.video, args.output_dir)
        if json_path.parent.exists() and not json_path.parent.is_dir():
            raise ValueError(f"--output-dir {json_path.parent} is not a directory")
    except (FileNotFoundError, ValueError) as err:
        _error(str(err))
    report = job.run()
    write_report(report, json_path, png_path)
    print(format_summary(report, json_path, png_path))
