"""Error-Recycling Fine-Tuning (reference/svi.md §1) as pure torch: banks, draws, injection, error measurement.

No Lightning and no collectives here: the training step decides which ranks' errors reach :func:`record`.
One step, per sample::

    flags = draw_flags(cfg, gen)
    inj = inject(x0, noise, y, grid, noise_bank, x0_bank, cfg, gen, flags)
    x_t, v_target = recycled_input_and_target(x0, inj, sigma)
    v_pred = dit(x_t, t, ..., y=inj.y)                   # loss = mse(v_pred, v_target) * weight
    if should_update(flags, cfg, gen):
        record(measure(v_pred, v_target, sigma), grid, noise_bank, x0_bank, gen)
"""

from svi_train.recycling.bank import ErrorBank, expert_grid, make_banks
from svi_train.recycling.capacity import (
    REFERENCE_CAPACITY,
    BankCapacity,
    ByteCap,
    announce_bank_capacity,
    auto_max_bytes,
    bank_capacity,
    resolve_max_bytes,
)
from svi_train.recycling.config import REPLACEMENT_POLICIES, STORAGE_DTYPES, RecyclingConfig
from svi_train.recycling.inject import Flags, Injected, draw_flags, inject, recycled_input_and_target
from svi_train.recycling.measure import Errors, in_warmup, measure, record, should_update
from svi_train.recycling.timesteps import (
    TIMESTEP_MODES,
    TimestepDraw,
    TimestepSampler,
    bell_loss_weights,
    grid_anchors,
    grid_of,
)

__all__ = [
    "REFERENCE_CAPACITY",
    "REPLACEMENT_POLICIES",
    "STORAGE_DTYPES",
    "TIMESTEP_MODES",
    "BankCapacity",
    "ByteCap",
    "ErrorBank",
    "Errors",
    "Flags",
    "Injected",
    "RecyclingConfig",
    "TimestepDraw",
    "TimestepSampler",
    "announce_bank_capacity",
    "auto_max_bytes",
    "bank_capacity",
    "bell_loss_weights",
    "draw_flags",
    "expert_grid",
    "grid_anchors",
    "grid_of",
    "in_warmup",
    "inject",
    "make_banks",
    "measure",
    "record",
    "recycled_input_and_target",
    "resolve_max_bytes",
    "should_update",
]
