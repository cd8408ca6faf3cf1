"""The knobs of Error-Recycling Fine-Tuning (reference/svi.md §1), validated once so a typo fails at compose time.

Defaults are the shipped SVI-Shot script values (svi.md §2.6), which produced the released LoRAs; where the
paper differs (``p_clean`` 0.5, warm-up 20) the scripts win.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REPLACEMENT_POLICIES = ("random", "fifo", "nearest_l2")
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RecyclingConfig:
    """What to inject, how often, and how the error banks are kept.

    ``p_noise``/``p_latent``/``p_cond`` are the per-sample probabilities of adding a banked error to the noise,
    the clean latent and the conditioning latent; ``p_clean`` forces an error-free sample, whose errors enter
    the banks only with probability ``p_clean_update``. ``enabled=False`` is the plain-LoRA baseline: nothing is
    injected and the banks are never updated.
    """

    p_noise: float = 0.01
    p_latent: float = 0.9
    p_cond: float = 0.9
    p_clean: float = 0.2
    p_clean_update: float = 0.1
    num_grids: int = 50  # grid anchors = the inference timesteps of a num_grids-step run
    shift: float = 5.0
    capacity: int = 500  # entries per grid per bank
    replacement: str = "nearest_l2"  # random | fifo | nearest_l2
    warmup_iters: int = 50  # steps during which every rank's errors enter every rank's banks
    cond_error_frames: int = 3  # latent frames of y that receive the conditioning error
    cond_from_all_grids: bool = True
    modulation: float = 0.0  # each sampled error is scaled by U(1 - modulation, 1 + modulation)
    storage_dtype: str = "bfloat16"
    max_bytes_per_bank: int = 8 * 1024**3
    sketch_size: int = 4096  # coordinates per entry sketch used by nearest_l2
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("p_noise", "p_latent", "p_cond", "p_clean", "p_clean_update"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("num_grids", "capacity", "cond_error_frames", "max_bytes_per_bank", "sketch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.warmup_iters) or self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be an integer >= 0, got {self.warmup_iters!r}")
        if not _is_number(self.shift) or self.shift <= 0:
            raise ValueError(f"shift must be a number > 0, got {self.shift!r}")
        if not _is_number(self.modulation) or not 0.0 <= self.modulation <= 1.0:
            raise ValueError(f"modulation must be in [0, 1] (scale U(1-f, 1+f)), got {self.modulation!r}")
        if self.replacement not in REPLACEMENT_POLICIES:
            raise ValueError(f"replacement must be one of {REPLACEMENT_POLICIES}, got {self.replacement!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {tuple(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        for name in ("cond_from_all_grids", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
