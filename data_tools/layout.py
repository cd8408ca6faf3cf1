"""Where a data run keeps its files. Torch-free, so the CLI checks them before it loads anything heavy.

Layout of an output folder::

    work/manifest.json            videos, captions and planned windows (scan)
    work/samples/<key>.tar        one encoded sample (encode; a rerun skips those present)
    work/samples/<key>.skip.json  why a window, or a whole video (key without -w<n>), was skipped (kept, so
                                  reruns do not retry it)
    shards/shard-000000.tar       webdataset shards (pack; rebuilt whole, byte-identical for the same samples)
    index.json                    samples per shard, spec, resolutions, schema version
    report.json                   what was skipped and why, with counts
"""

from __future__ import annotations

from pathlib import Path


def output_paths(output: Path) -> dict[str, Path]:
    """The files and folders of an output folder, by role."""
    return {
        "manifest": output / "work" / "manifest.json",
        "samples": output / "work" / "samples",
        "shards": output / "shards",
        "index": output / "index.json",
        "report": output / "report.json",
    }
