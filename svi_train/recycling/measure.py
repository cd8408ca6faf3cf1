"""Steps 4-5 of an ERFT step (reference/svi.md §1.4): the model's errors, and whether they enter the banks.

The errors come from the forward pass already done for the loss (one-step bidirectional integration): jumping
from ``x_t`` to the noise endpoint (sigma 1) and to the data endpoint (sigma 0) with the predicted velocity
instead of the target one. With ``d = v_pred - v_target``:

- noise-endpoint error ``noise_from_velocity(x_t, v_pred) - noise_from_velocity(x_t, v_target) = (1 - sigma) d``
- x0-endpoint error ``x0_from_velocity(x_t, v_pred) - x0_from_velocity(x_t, v_target) = -sigma d``

computed here in closed form (no ``x_t`` needed, no cancellation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from svi_train.recycling.bank import ErrorBank
from svi_train.recycling.config import RecyclingConfig
from svi_train.recycling.inject import Flags


@dataclass(frozen=True)
class Errors:
    """Detached float32 errors at the two endpoints, shaped like the velocity."""

    noise: Tensor
    x0: Tensor


@torch.no_grad()
def measure(v_pred: Tensor, v_target: Tensor, sigma: Tensor | float) -> Errors:
    """Errors of one prediction; ``sigma`` is a scalar or one value per sample along dim 0."""
    diff = v_pred.detach().float() - v_target.detach().float()
    if isinstance(sigma, Tensor):
        sigma = sigma.detach().to(device=diff.device, dtype=torch.float32)
        if sigma.ndim == 1 and diff.ndim > 1:
            sigma = sigma.reshape(-1, *([1] * (diff.ndim - 1)))
    return Errors(noise=(1.0 - sigma) * diff, x0=-sigma * diff)


def should_update(flags: Flags, cfg: RecyclingConfig, generator: torch.Generator) -> bool:
    """Whether this sample's errors enter the banks: always unless clean, then with ``p_clean_update``.

    Errors of clean inputs are smaller than those met at inference and would dilute the banks (the reference's
    2025-10-21 "Opt" change). The generator is drawn only for clean samples, as in the reference.
    """
    if not cfg.enabled:
        return False
    if not flags.clean:
        return True
    return float(torch.rand(1, generator=generator, dtype=torch.float64)) < cfg.p_clean_update


def in_warmup(step: int, cfg: RecyclingConfig) -> bool:
    """Whether ``step`` (0-based) is in the warm-up, when every rank's errors go into every rank's banks.

    The reference counts iterations from 1 and shares while ``iteration <= warmup``: the first ``warmup_iters``
    steps. The caller gathers across ranks unconditionally (a collective must not sit in a random branch) and
    then decides, per rank, which gathered errors to ``record``.
    """
    return step < cfg.warmup_iters


def record(errors: Errors, grid: int, noise_bank: ErrorBank, x0_bank: ErrorBank, generator: torch.Generator) -> None:
    """Put one sample's errors into the two banks under its grid."""
    noise_bank.add(errors.noise, grid, generator)
    x0_bank.add(errors.x0, grid, generator)
