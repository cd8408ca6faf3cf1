"""Training timesteps, their loss weights, and the timestep grids the error banks are keyed by.

SVI draws one index uniformly from the 1000-entry shift-5 table (reference/svi.md §1.1), so most draws are
noisy (about 83% have t > 500), and weights the loss with the "bsmntw" bell over that table, which peaks
(w ~ 2.08) at t ~ 500 and vanishes at t = 1000. Logit-normal sampling (SD3; weight 1) is offered as an option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from svi_infer.flow import inference_sigmas, timesteps_from_sigmas, training_sigmas

TIMESTEP_MODES = ("shifted_uniform", "logit_normal")


def grid_anchors(num_grids: int = 50, shift: float = 5.0) -> Tensor:
    """The timesteps of a ``num_grids``-step inference run (without the final 0): one bank grid each."""
    return timesteps_from_sigmas(inference_sigmas(num_grids, shift))[:-1]


def grid_of(timestep: Tensor | float, anchors: Tensor) -> Tensor:
    """Index of the nearest anchor, ``argmin |anchors - t|``, for each timestep (long, shape of ``timestep``).

    A timestep exactly between two anchors goes to the first (with descending anchors, the noisier one).
    """
    t = torch.as_tensor(timestep, dtype=torch.float64)
    return (anchors.to(torch.float64) - t.unsqueeze(-1)).abs().argmin(dim=-1)


def bell_loss_weights(timesteps: Tensor) -> Tensor:
    """The reference's "bsmntw" weights: ``exp(-2((t - 500) / 1000)^2)`` minus its minimum, mean 1 over the table."""
    bell = torch.exp(-2.0 * ((timesteps - 500.0) / 1000.0) ** 2)
    bell = bell - bell.min()
    return bell * (len(timesteps) / bell.sum())


@dataclass(frozen=True)
class TimestepDraw:
    """Per-sample timesteps (DiT input, ``1000 * sigma``), sigmas, loss weights and indices into the table."""

    timestep: Tensor
    sigma: Tensor
    weight: Tensor
    index: Tensor


class TimestepSampler:
    """Draws training timesteps from the shifted table, by the reference's uniform index or logit-normal."""

    def __init__(
        self,
        mode: str = "shifted_uniform",
        shift: float = 5.0,
        num_train_timesteps: int = 1000,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        if mode not in TIMESTEP_MODES:
            raise ValueError(f"mode must be one of {TIMESTEP_MODES}, got {mode!r}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.mode = mode
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.sigmas = training_sigmas(num_train_timesteps, shift)  # float64, from 1 down
        self.timesteps = timesteps_from_sigmas(self.sigmas)
        self.weights = bell_loss_weights(self.timesteps)

    def sample(self, num: int, generator: torch.Generator) -> TimestepDraw:
        """``num`` independent draws (one per sample of the batch)."""
        size = len(self.timesteps)
        if self.mode == "shifted_uniform":
            index = torch.randint(size, (num,), generator=generator)
            weight = self.weights[index]
        else:
            # logit-normal u in (0, 1) picks a table entry (as diffusers' training scripts do), so the shift
            # still applies and every timestep is one the grid lookup knows.
            normal = torch.randn(num, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * normal)
            index = (u * size).long().clamp(0, size - 1)
            weight = torch.ones(num, dtype=torch.float64)
        return TimestepDraw(
            timestep=self.timesteps[index].float(),
            sigma=self.sigmas[index].float(),
            weight=weight.float(),
            index=index,
        )

    def weight_of(self, timestep: Tensor | float) -> Tensor:
        """Loss weight of the nearest table entry (the reference's ``training_weight``)."""
        if self.mode == "logit_normal":
            return torch.ones_like(torch.as_tensor(timestep, dtype=torch.float32))
        return self.weights[grid_of(timestep, self.timesteps)].float()
