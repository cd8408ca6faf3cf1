"""How busy the machine was while a benchmark ran, so disturbed timings can be recognised (shared by bench/)."""

from __future__ import annotations

import os
from pathlib import Path


def busy_cpu_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (from /proc/stat; 0 where unavailable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user/nice
