"""What a data run skipped and why: ``report.json`` plus a one-line summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from svi_infer.atomic import write_json


class Report:
    """Collects skipped inputs with a reason code; counts what landed."""

    def __init__(self) -> None:
        self.skipped: list[dict[str, str]] = []
        self.counts: Counter[str] = Counter()

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"item": item, "reason": reason, "detail": detail})

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def summary(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in self.reasons().items()) or "none"
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"{counts}; skipped {len(self.skipped)} ({reasons})"

    def write(self, path: str | Path) -> None:
        write_json(
            path,
            {"counts": dict(sorted(self.counts.items())), "skipped_by_reason": self.reasons(), "skipped": self.skipped},
        )
