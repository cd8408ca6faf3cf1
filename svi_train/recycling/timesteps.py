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

    def in_range(self, t_range: tuple[float, float]) -> Tensor:
        """Indices of the table entries with ``low <= t < high`` (an expert's range; ``high`` above 1000 takes
        the noisiest entry too)."""
        low, high = t_range
        index = ((self.timesteps >= low) & (self.timesteps < high)).nonzero().view(-1)
        if index.numel() == 0:
            raise ValueError(f"no training timestep lies in [{low}, {high})")
        return index

    def _table_probabilities(self) -> Tensor:
        """Probability of each table entry under this sampler's mode (uniform, or logit-normal mass per entry)."""
        size = len(self.timesteps)
        if self.mode == "shifted_uniform":
            return torch.full((size,), 1.0 / size, dtype=torch.float64)
        edges = torch.linspace(0.0, 1.0, size + 1, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        normal = torch.distributions.Normal(self.logit_mean, self.logit_std)
        cdf = normal.cdf(torch.log(edges / (1 - edges)))
        mass = cdf[1:] - cdf[:-1]
        return mass / mass.sum()

    def range_share(self, t_range: tuple[float, float]) -> float:
        """The share of draws over the whole table that land in ``t_range`` (how often a one-model run would
        have trained there): the default share of steps the high-noise expert gets."""
        return float(self._table_probabilities()[self.in_range(t_range)].sum())

    def sample(self, num: int, generator: torch.Generator, t_range: tuple[float, float] | None = None) -> TimestepDraw:
        """``num`` independent draws (one per sample of the batch).

        ``t_range``: draw only from the table entries in ``[low, high)`` (one Wan 2.2 expert's range), with the
        mode's probabilities restricted to them; the loss weights are rescaled to mean 1 over the range, so each
        expert's loss has the scale of a one-model run.
        """
        if t_range is not None:
            return self._sample_in_range(num, generator, t_range)
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
        return self._draw(index, weight)

    def _draw(self, index: Tensor, weight: Tensor) -> TimestepDraw:
        return TimestepDraw(
            timestep=self.timesteps[index].float(), sigma=self.sigmas[index].float(), weight=weight.float(), index=index
        )

    def _sample_in_range(self, num: int, generator: torch.Generator, t_range: tuple[float, float]) -> TimestepDraw:
        allowed = self.in_range(t_range)
        if self.mode == "shifted_uniform":
            index = allowed[torch.randint(len(allowed), (num,), generator=generator)]
            weight = self.weights[index] / self.weights[allowed].mean()
        else:
            probs = self._table_probabilities()[allowed]
            index = allowed[torch.multinomial(probs, num, replacement=True, generator=generator)]
            weight = torch.ones(num, dtype=torch.float64)
        return self._draw(index, weight)

    def weight_of(self, timestep: Tensor | float) -> Tensor:
        """Loss weight of the nearest table entry (the reference's ``training_weight``)."""
        if self.mode == "logit_normal":
            return torch.ones_like(torch.as_tensor(timestep, dtype=torch.float32))
        return self.weights[grid_of(timestep, self.timesteps)].float()
