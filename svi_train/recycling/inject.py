"""Steps 1-2 of an ERFT step (reference/svi.md §1.4): draw which errors to inject, then add banked errors.

The model is trained on inputs corrupted by its own past errors, so that at inference it learns to pull
error-laden inputs back to the clean path. Everything here is per sample and takes an explicit generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from svi_infer.conditioning import MASK_CHANNELS  # y = concat(4-channel mask, conditioning latent)
from svi_infer.flow import add_noise, velocity_target
from svi_train.recycling.bank import ErrorBank
from svi_train.recycling.config import RecyclingConfig


@dataclass(frozen=True)
class Flags:
    """Which errors a sample gets; ``clean`` marks a sample forced error-free (it rarely updates the banks)."""

    noise: bool
    latent: bool
    cond: bool
    clean: bool


@dataclass(frozen=True)
class Injected:
    """The error-corrupted inputs of one sample; ``flags`` says which errors were actually added."""

    x0: Tensor
    noise: Tensor
    y: Tensor
    flags: Flags


def draw_flags(cfg: RecyclingConfig, generator: torch.Generator) -> Flags:
    """One uniform draw per flag, in the reference's order (noise, cond, latent, clean); clean clears the rest.

    The four draws are taken even when recycling is disabled, so a baseline run consumes the generator the same
    way as a recycling run with the same seed.
    """
    u_noise, u_cond, u_latent, u_clean = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    if not cfg.enabled:
        return Flags(noise=False, latent=False, cond=False, clean=False)
    if u_clean < cfg.p_clean:
        return Flags(noise=False, latent=False, cond=False, clean=True)
    return Flags(noise=u_noise < cfg.p_noise, latent=u_latent < cfg.p_latent, cond=u_cond < cfg.p_cond, clean=False)


def inject(
    x0: Tensor,
    noise: Tensor,
    y: Tensor,
    grid: int,
    noise_bank: ErrorBank,
    x0_bank: ErrorBank,
    cfg: RecyclingConfig,
    generator: torch.Generator,
    flags: Flags,
    cond_frames: int | None = None,
) -> Injected:
    """Add banked errors to one sample: ``x0``/``noise`` are [C, T, h, w], ``y`` is [4 + C, T, h, w].

    - noise: ``noise + E`` with E from the noise-endpoint bank of ``grid``;
    - conditioning: E from the x0-endpoint bank (any grid when ``cfg.cond_from_all_grids``, else ``grid``); its
      frames ``j .. j+k`` (j uniform over all full windows) go onto the latent channels of the first
      k = ``cfg.cond_error_frames`` latent frames of y, at most ``cond_frames`` (the latent hand-off's held
      latents: the zero latents after them stay zero, as at generation); the mask channels are never touched;
    - latent: ``x0 + E`` with E from the x0-endpoint bank of ``grid``.

    Each error is gated on the bank it comes from being non-empty. (The reference gates the latent error on the
    noise bank and then samples the x0 bank; that quirk is not reproduced.) Inputs are never modified in place.
    """
    if y.shape[0] != MASK_CHANNELS + x0.shape[0] or y.shape[1:] != x0.shape[1:] or noise.shape != x0.shape:
        raise ValueError(f"expected x0/noise [C,T,h,w] and y [4+C,T,h,w], got {list(x0.shape)}, {list(y.shape)}")
    applied_noise = applied_cond = applied_latent = False

    if flags.noise and (error := noise_bank.sample(grid, generator)) is not None:
        noise = noise + _modulated(error, noise, cfg, generator)
        applied_noise = True

    if flags.cond:
        error = x0_bank.sample_any(generator) if cfg.cond_from_all_grids else x0_bank.sample(grid, generator)
        if error is not None:
            frames = min(cfg.cond_error_frames, cond_frames or cfg.cond_error_frames, error.shape[1])
            start = int(torch.randint(error.shape[1] - frames + 1, (1,), generator=generator))
            window = _modulated(error[:, start : start + frames], y, cfg, generator)
            y = y.clone()
            y[MASK_CHANNELS:, :frames] += window
            applied_cond = True

    if flags.latent and (error := x0_bank.sample(grid, generator)) is not None:
        x0 = x0 + _modulated(error, x0, cfg, generator)
        applied_latent = True

    applied = Flags(noise=applied_noise, latent=applied_latent, cond=applied_cond, clean=flags.clean)
    return Injected(x0=x0, noise=noise, y=y, flags=applied)


def recycled_input_and_target(x0: Tensor, injected: Injected, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """The DiT input and its velocity target: ``x_t`` from the corrupted x0 and noise, target to the CLEAN x0.

    ``v = noise_t - x0`` points from the error-corrupted noise back to the clean latent (paper Eq. 6), which is
    what teaches the model to correct its own errors.
    """
    return add_noise(injected.x0, injected.noise, sigma), velocity_target(x0, injected.noise)


def _modulated(error: Tensor, like: Tensor, cfg: RecyclingConfig, generator: torch.Generator) -> Tensor:
    """The error on ``like``'s device and dtype, scaled by U(1 - f, 1 + f) when ``cfg.modulation`` f > 0."""
    error = error.to(device=like.device, dtype=like.dtype)
    if cfg.modulation == 0.0:
        return error  # no draw: the generator stream matches the reference's default runs
    scale = 1.0 + cfg.modulation * (2.0 * float(torch.rand(1, generator=generator, dtype=torch.float64)) - 1.0)
    return error * scale
