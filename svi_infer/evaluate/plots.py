"""The report's figure: one panel per metric over clip start time, seams marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_report(report: dict, path: Path) -> None:
    """The report's metrics over time as a PNG at ``path``; matplotlib is imported here, only when plotting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clips, seams = report["clips"], report["seams"]
    t = [c["start_s"] for c in clips]
    has_ref = report.get("reference") is not None
    versus = [("vs first clip", "{}_first"), ("vs reference", "{}_ref")]
    panels = [
        ("colour drift (distance of RGB mean + std)", [(lab, key.format("color_drift")) for lab, key in versus]),
        ("histogram drift (Hellinger)", [(lab, key.format("hist_drift")) for lab, key in versus]),
        ("sharpness (Laplacian variance)", [("clip", "sharpness")]),
        ("SSIM to reference (luma)", [("clip", "ssim_ref")]),
        ("motion (mean |frame step|)", [("clip", "motion")]),
    ]
    panels = [(title, [(lab, key) for lab, key in lines if key in clips[0]]) for title, lines in panels]
    panels = [p for p in panels if p[1]]
    rows = len(panels) + (1 if seams else 0)
    fig = Figure(figsize=(9, 1.9 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, lines) in zip(axes, panels, strict=False):
        for label, key in lines:
            values = [np.nan if c.get(key) is None else c[key] for c in clips]
            ax.plot(t, values, "o-", ms=3, label=label)
        if title.startswith("sharpness") and has_ref:
            ax.axhline(report["reference"]["sharpness"], color="gray", ls=":", lw=1, label="reference")
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(title, fontsize=9, loc="left")
    if seams:
        ax = axes[-1]
        ax.plot([s["time_s"] for s in seams], [np.nan if s["flicker"] is None else s["flicker"] for s in seams], "o-",
                ms=3, color="C3")  # fmt: skip
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        top = max([x["flicker"] for x in seams if x["flicker"] is not None], default=1.0)
        ax.set_ylim(0.0, max(2.0, 1.1 * top))
        ax.set_title("seam flicker (1 = an ordinary frame step)", fontsize=9, loc="left")
    for ax in axes:
        for s in seams:
            ax.axvline(s["time_s"], color="gray", alpha=0.25, lw=0.8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("clip start (s)", fontsize=8)
    name = Path(report["video"]).name if report.get("video") else "frames"
    fig.suptitle(f"{name}: {len(clips)} clips, {report['settings']['num_frames']} frames", fontsize=10)
    fig.savefig(path, format="png", dpi=100)
