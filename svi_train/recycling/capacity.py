"""How many errors the banks can really hold, and the byte cap that decides it.

The reference keeps up to 500 errors per grid per bank (svi.md §1.3): 2 x 50 x 500 x 4.2 MB = 210 GB per rank at
480p, more than most nodes have. The byte cap ``max_bytes_per_bank`` is what binds in practice, so it defaults to
``auto``: a share of the host's available memory, split between the ranks of the node and the two banks. An
integer in the config wins. At start :func:`announce_bank_capacity` prints what that gives per grid for the real
latent shape, and warns when it is below the reference's 500, so a short bank is a choice, not a surprise.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from svi_train.config import STORAGE_DTYPE_NAMES, RecyclingConfig

AUTO = "auto"
AUTO_MEMORY_FRACTION = 0.5  # of MemAvailable at start: the rest is for model loading, loaders, pinned buffers
BANKS_PER_RANK = 2  # noise-endpoint and x0-endpoint errors
REFERENCE_CAPACITY = 500  # error_buffer_k of SVI's scripts (paper: Z=500, saturates above)
SKETCH_BYTES = 4  # nearest_l2 keeps a float32 sketch row per entry
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
assert set(_ITEMSIZE) == set(STORAGE_DTYPE_NAMES)
GiB = 1024**3


@dataclass(frozen=True)
class ByteCap:
    """A bank's byte cap and where it came from (shown in the start-up line)."""

    nbytes: int
    source: str


def available_memory() -> int:
    """Bytes of host memory available now (psutil, else /proc/meminfo's MemAvailable, else sysconf)."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ranks_per_node(devices: Any = None, env: Mapping[str, str] | None = None, accelerator: str = "auto") -> int:
    """Training processes sharing this host: ``LOCAL_WORLD_SIZE`` (torchrun), else the trainer's ``devices``
    as Lightning reads it (a count, a list or ``"0,1"`` of GPU ids, ``auto``/-1 for every visible GPU)."""
    env = os.environ if env is None else env
    if env.get("LOCAL_WORLD_SIZE"):
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    if isinstance(devices, str):
        text = devices.strip().strip("[]")
        if "," in text:
            return max(1, len([part for part in text.split(",") if part.strip()]))
        devices = int(text) if text.lstrip("-").isdigit() else text
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return max(1, len(devices))
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if devices in ("auto", -1) and accelerator != "cpu":  # every visible GPU (one CPU process without any)
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def auto_max_bytes(available: int, ranks: int, fraction: float = AUTO_MEMORY_FRACTION) -> int:
    """The ``auto`` cap of one bank: ``fraction`` of ``available`` bytes, per rank on the node, per bank."""
    if available < 1 or ranks < 1:
        raise ValueError(f"need available >= 1 and ranks >= 1, got {available} and {ranks}")
    return max(1, int(available * fraction) // (ranks * BANKS_PER_RANK))


def resolve_max_bytes(value: int | str, available: int | None = None, ranks: int | None = None) -> ByteCap:
    """The byte cap of ``max_bytes_per_bank``: an integer as given, ``auto`` from the host's memory.

    ``available`` and ``ranks`` default to :func:`available_memory` and :func:`ranks_per_node`; tests pass them.
    """
    if value != AUTO:
        return ByteCap(int(value), "config")
    available = available_memory() if available is None else available
    ranks = ranks_per_node() if ranks is None else ranks
    source = (
        f"auto: {AUTO_MEMORY_FRACTION:.0%} of {available / GiB:.1f} GiB available / {ranks} rank(s) on the node "
        f"/ {BANKS_PER_RANK} banks"
    )
    return ByteCap(auto_max_bytes(available, ranks), source)


def entry_nbytes(numel: int, storage_dtype: str, replacement: str, sketch_size: int) -> int:
    """Bytes one bank entry costs: the error in the storage dtype, plus its float32 sketch under nearest_l2."""
    sketch = SKETCH_BYTES * min(numel, sketch_size) if replacement == "nearest_l2" else 0
    return numel * _ITEMSIZE[storage_dtype] + sketch


def per_grid_capacity(capacity: int, max_bytes: int, entry_bytes: int, grids: int) -> int:
    """Entries each grid can hold on average: ``capacity``, unless the byte cap runs out first.

    The cap is shared by all grids of the bank (a busy grid may hold more than this while another holds fewer);
    this is the even split, the number to compare with the reference's 500.
    """
    return min(capacity, max_bytes // entry_bytes // grids)


def latent_numel(spec: Any, index: Mapping[str, Any]) -> int:
    """Elements of one stored error, [C, F, H, W] of the shards' largest latent (index.json, ModelSpec)."""
    frames = spec.latent_frames(int(index["frames_per_clip"]))
    pixels = max(int(h) * int(w) for h, w in index["resolutions"])
    return spec.latent_channels * frames * pixels // spec.vae_spatial**2


@dataclass(frozen=True)
class BankCapacity:
    """What the banks of a run can hold, per bank: the numbers behind the start-up line and the warning."""

    per_grid: int
    grids: int
    entry_bytes: int
    cap: ByteCap
    capacity: int

    def lines(self) -> list[str]:
        """One line per bank, as printed at start."""
        return [
            f"recycling: {name} bank holds {self.per_grid} errors per grid (capacity {self.capacity}) x "
            f"{self.grids} grids, {self.entry_bytes / 1024**2:.2f} MiB per error, cap "
            f"{self.cap.nbytes / GiB:.2f} GiB ({self.cap.source})"
            for name in ("noise", "x0")
        ]

    def warning(self) -> str | None:
        """The warning when a grid holds fewer errors than the reference's 500, else None."""
        if self.per_grid >= REFERENCE_CAPACITY or self.capacity < REFERENCE_CAPACITY:
            return None  # at the reference, or a capacity the user chose below it
        return (
            f"the error banks hold {self.per_grid} errors per grid, below the reference's {REFERENCE_CAPACITY}: "
            f"{self.cap.nbytes / GiB:.2f} GiB per bank ({self.cap.source}) / {self.entry_bytes / 1024**2:.2f} "
            f"MiB per error / {self.grids} grids. Raise recycling.max_bytes_per_bank if the host has the memory "
            "(bytes per bank, per rank)."
        )


def bank_capacity(cfg: RecyclingConfig, numel: int, num_experts: int, cap: ByteCap) -> BankCapacity:
    """The effective layout of each bank of ``cfg`` for errors of ``numel`` elements under ``cap``."""
    grids = cfg.num_grids * num_experts
    entry = entry_nbytes(numel, cfg.storage_dtype, cfg.replacement, cfg.sketch_size)
    per_grid = per_grid_capacity(cfg.capacity, cap.nbytes, entry, grids)
    return BankCapacity(per_grid=per_grid, grids=grids, entry_bytes=entry, cap=cap, capacity=cfg.capacity)


def announce_bank_capacity(
    cfg: RecyclingConfig,
    spec: Any,
    index: Mapping[str, Any],
    devices: Any = None,
    accelerator: str = "auto",
    available: int | None = None,
) -> RecyclingConfig:
    """Resolve the byte cap once at start, print one line per bank and warn below 500 errors per grid.

    Returns ``cfg`` with the cap as an integer, so every bank of the run uses the number printed. Only local
    rank 0 prints (every rank resolves for itself: the cap is per rank).
    """
    if not cfg.enabled:
        return cfg
    ranks = ranks_per_node(devices, accelerator=accelerator)
    cap = resolve_max_bytes(cfg.max_bytes_per_bank, available=available, ranks=ranks)
    resolved = replace(cfg, max_bytes_per_bank=cap.nbytes)
    report = bank_capacity(resolved, latent_numel(spec, index), len(spec.experts), cap)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for line in report.lines():
            print(line, flush=True)
        message = report.warning()
        if message:
            warnings.warn(message, stacklevel=2)
    return resolved
