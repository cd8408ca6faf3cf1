"""The report's outputs: where they go, the JSON and PNG files, the one-screen text summary."""

from __future__ import annotations

from pathlib import Path

from svi_infer.atomic import write_json, write_with
from svi_infer.evaluate.plots import plot_report

MAX_ROWS = 12  # longer tables print their first and last MAX_ROWS // 2 rows


def output_paths(video: str | Path, output_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``<video stem>.eval.json`` and ``<video stem>.eval.png`` beside the video or in ``output_dir``."""
    video = Path(video)
    folder = video.parent if output_dir is None else Path(output_dir).expanduser()
    return folder / f"{video.stem}.eval.json", folder / f"{video.stem}.eval.png"


def write_report(report: dict, json_path: Path, png_path: Path) -> None:
    """The report as JSON and its plot as PNG, each written atomically."""
    write_json(json_path, report)
    write_with(png_path, lambda tmp: plot_report(report, tmp))


def _fmt(value, spec: str, width: int) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def _elide(rows: list[str], total: int) -> list[str]:
    if total <= MAX_ROWS:
        return rows
    half = MAX_ROWS // 2
    return rows[:half] + [f"  ... {total - 2 * half} more ..."] + rows[-half:]


def format_summary(report: dict, json_path: Path | None = None, png_path: Path | None = None) -> str:
    """A one-screen text summary: clip table, seam table, headline figures (long tables are elided)."""
    s, clips, seams, summ = report["settings"], report["clips"], report["seams"], report["summary"]
    name = Path(report["video"]).name if report.get("video") else "frames"
    seg = s.get("segmentation", {})
    how = seg.get("source", "given")
    if how != "sidecar" and seg.get("clip_frames") is not None:
        how += f": {seg['clip_frames']} frames, overlap {seg['overlap']}"
    ref = report.get("reference")
    lines = [
        f"{name}: {s['num_frames']} frames, {s['height']}x{s['width']}, {s['fps']:g} fps, "
        f"{s['num_frames'] / s['fps']:.2f} s; {len(clips)} clips ({how})"
        + (f"; reference {Path(ref['path']).name}" if ref and ref.get("path") else "; reference given" if ref else ""),
        "",
        f"{'clip':>4} {'t (s)':>8} {'colour vs first':>15} {'colour vs ref':>13} {'sharpness':>10} "
        f"{'SSIM ref':>8} {'motion':>8}",
    ]
    rows = [
        f"{c['index']:>4} {c['start_s']:>8.2f} {_fmt(c['color_drift_first'], '.4f', 15)} "
        f"{_fmt(c.get('color_drift_ref'), '.4f', 13)} {_fmt(c['sharpness'], '.1f', 10)} "
        f"{_fmt(c.get('ssim_ref'), '.3f', 8)} {_fmt(c['motion'], '.4f', 8)}"
        for c in clips
    ]
    lines += _elide(rows, len(rows))
    if seams:
        lines += ["", f"{'seam':>4} {'frame':>7} {'t (s)':>8} {'flicker':>8}"]
        rows = [
            f"{x['clip']:>4} {x['frame']:>7} {x['time_s']:>8.2f} {_fmt(x['flicker'], '.2f', 8)}" for x in seams
        ]  # fmt: skip
        lines += _elide(rows, len(rows))
    lines += ["", "headline figures:"]

    def headline(label: str, text: str) -> None:
        lines.append(f"  {label + ':':<38} {text}")

    headline(
        "colour drift, last clip vs first", f"{summ['color_drift_last']:.4f} (histogram {summ['hist_drift_last']:.4f})"
    )
    if "color_drift_ref_last" in summ:
        headline(
            "colour drift vs reference, first/last",
            f"{summ['color_drift_ref_first']:.4f} / {summ['color_drift_ref_last']:.4f} "
            f"(histogram {summ['hist_drift_ref_first']:.4f} / {summ['hist_drift_ref_last']:.4f})",
        )
    if "color_drift_rate_per_min" in summ:
        headline("colour drift rate", f"{summ['color_drift_rate_per_min']:.4f} per minute")
    if "sharpness_ratio_last" in summ:
        headline(
            "sharpness, last clip / first",
            f"{summ['sharpness_ratio_last']:.3f} (lowest {summ['sharpness_ratio_min']:.3f})",
        )
    if "ssim_ref_first" in summ:
        headline(
            "SSIM to reference, first -> last",
            f"{summ['ssim_ref_first']:.3f} -> {summ['ssim_ref_last']:.3f} (lowest {summ['ssim_ref_min']:.3f})",
        )
    if "seam_flicker_max" in summ:
        worst = max((x for x in seams if x["flicker"] is not None), key=lambda x: x["flicker"])
        headline(
            "seam flicker (1 = a frame step)",
            f"max {summ['seam_flicker_max']:.2f} (clip {worst['clip']}, {worst['time_s']:.2f} s), "
            f"mean {summ['seam_flicker_mean']:.2f}",
        )
    if "motion_min" in summ:
        still = min((c for c in clips if c["motion"] is not None), key=lambda c: c["motion"])
        headline(
            "motion (mean |frame step|)",
            f"min {summ['motion_min']:.4f} (clip {still['index']}), mean {summ['motion_mean']:.4f}",
        )
    if json_path is not None:
        lines += ["", f"report: {json_path}"]
    if png_path is not None:
        lines.append(f"plot:   {png_path}")
    return "\n".join(lines)
