"""Strong first-frame augmentation of the motion frames (SVI 2.x, reference/svi.md §6.1).

SVI 2.x trains the model to *restore* a degraded hand-off guided by the clean anchor: the frames a clip continues
from (pixel hand-off: the ``m`` motion frames of the conditioning video; latent hand-off: the ``1 + 4n`` frames
whose latents 1..n become the motion latents) are degraded before encoding, while the clean target latents and
the anchor are not.

The parameters are drawn once per sample from the sample's own ``random.Random`` (derived from ``(seed, key)``,
so reruns and resumed runs draw the same) and applied identically to every frame; only the additive noise
differs per frame (it is drawn frame by frame, so augmenting the first ``k`` frames gives exactly the first ``k``
frames of augmenting more). Order: down-then-up-scale, Gaussian blur, brightness, contrast, saturation, noise.
Pure torch (torchvision is not a dependency).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from data_tools.config import AugmentSettings

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentParams:
    """One sample's drawn augmentation (recorded in the sample's metadata)."""

    applied: bool
    downscale: float = 1.0
    blur_sigma: float = 0.0
    brightness: float = 0.0
    contrast: float = 1.0
    saturation: float = 1.0
    noise: float = 0.0
    noise_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def draw_params(settings: AugmentSettings, rng: random.Random) -> AugmentParams | None:
    """Draw one sample's parameters; ``None`` (and nothing drawn from ``rng``) when augmentation is off.

    Every value is drawn whether or not the sample is augmented, so ``rng`` advances the same way either way."""
    if not settings.enabled:
        return None
    s = settings.strength
    applied = rng.random() < settings.p
    params = AugmentParams(
        applied=applied,
        downscale=rng.uniform(1.0, 1.0 + (settings.downscale - 1.0) * s),
        blur_sigma=rng.uniform(0.0, settings.blur_sigma * s),
        brightness=rng.uniform(-settings.brightness * s, settings.brightness * s),
        contrast=max(0.0, 1.0 + rng.uniform(-settings.contrast * s, settings.contrast * s)),
        saturation=max(0.0, 1.0 + rng.uniform(-settings.saturation * s, settings.saturation * s)),
        noise=rng.uniform(0.0, settings.noise * s),
        noise_seed=rng.getrandbits(63),
    )
    return params if applied else AugmentParams(applied=False)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` (edges replicated)."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _gray(x: Tensor) -> Tensor:
    """Luma ``[N, 1, H, W]`` of ``[N, 3, H, W]`` frames (weights sum to 1, so it commutes with the [-1, 1] scaling)."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def apply_params(frames: Tensor, params: AugmentParams | None) -> Tensor:
    """``frames`` ``[3, k, H, W]`` in [-1, 1] -> a new augmented tensor in [-1, 1] (the same parameters on every
    frame; a neutral parameter skips its step). ``None`` or a not-applied draw returns an unchanged copy."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames must be [3, k, H, W], got {list(frames.shape)}")
    if params is None or not params.applied:
        return frames.clone()
    dtype = frames.dtype
    x = frames.float().permute(1, 0, 2, 3)  # [k, 3, H, W]
    k, _, h, w = x.shape
    if params.downscale > 1.0 + 1e-6:
        small = (max(1, round(h / params.downscale)), max(1, round(w / params.downscale)))
        x = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    if params.blur_sigma > 1e-3:
        x = _gaussian_blur(x, params.blur_sigma)
    if params.brightness:
        x = (x + 2.0 * params.brightness).clamp(-1.0, 1.0)  # a share of the [-1, 1] range
    if params.contrast != 1.0:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # each frame's mean luma, as torchvision
        x = ((x - mean) * params.contrast + mean).clamp(-1.0, 1.0)
    if params.saturation != 1.0:
        gray = _gray(x)
        x = ((x - gray) * params.saturation + gray).clamp(-1.0, 1.0)
    if params.noise > 0:
        gen = torch.Generator().manual_seed(params.noise_seed)
        noise = torch.stack([torch.randn(3, h, w, generator=gen) for _ in range(k)])  # frame by frame
        x = (x + params.noise * noise).clamp(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous().to(dtype)


def augment_frames(
    frames: Tensor, settings: AugmentSettings, rng: random.Random
) -> tuple[Tensor, AugmentParams | None]:
    """Draw parameters from ``rng`` and apply them to ``[3, k, H, W]`` frames in [-1, 1]; returns the new frames
    and the drawn parameters (``None`` when augmentation is off: the frames come back unchanged)."""
    params = draw_params(settings, rng)
    return apply_params(frames, params), params
