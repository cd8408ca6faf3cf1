"""Flow-matching math in the code convention of SVI (sigma=1 is pure noise), as pure functions.

``x_t = (1 - sigma) * x0 + sigma * noise``, velocity ``v = noise - x0``, DiT timestep ``t = 1000 * sigma``.
The inference schedule is the one SVI samples with (reference/svi.md §1.1): ``linspace(1, 0, steps + 1)[:-1]``
shifted, then a final step to sigma 0. It is not diffusers' default Wan scheduler (UniPC, shift 3).
"""

from __future__ import annotations

import torch
from torch import Tensor


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Time-shift sigmas towards noise: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def inference_sigmas(steps: int, shift: float = 5.0) -> Tensor:
    """The ``steps + 1`` sigmas of a sampling run, from 1 down to a final 0 (float64 for exact schedules)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1], shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def training_sigmas(num_train_timesteps: int = 1000, shift: float = 5.0) -> Tensor:
    """The training table SVI draws one entry from uniformly: the same shift over 1000 entries."""
    return shift_sigmas(torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1], shift)


def timesteps_from_sigmas(sigmas: Tensor) -> Tensor:
    """DiT timestep for each sigma: ``1000 * sigma``."""
    return sigmas * 1000.0


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Noisy latent on the straight path between data (sigma 0) and noise (sigma 1)."""
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """What the DiT is trained to predict."""
    return noise - x0


def euler_step(x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the flow ODE from ``sigma`` to ``sigma_next``."""
    return x + velocity * (sigma_next - sigma)


def x0_from_velocity(x_t: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """Jump to the data endpoint (sigma 0) in one step."""
    return x_t - sigma * velocity


def noise_from_velocity(x_t: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """Jump to the noise endpoint (sigma 1) in one step."""
    return x_t + (1.0 - sigma) * velocity
