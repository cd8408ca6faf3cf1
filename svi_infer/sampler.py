"""Sampling one clip: SVI's Euler flow schedule, classifier-free guidance, Wan 2.2 expert switch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from svi_infer.flow import euler_step, inference_sigmas
from svi_infer.model import WanModel


@dataclass(frozen=True)
class PassInputs:
    """What one guidance pass feeds the DiT besides the latents: text, CLIP tokens, extra conditioning."""

    text: Tensor
    image: Tensor | None = None
    extra: Mapping[str, Tensor] = field(default_factory=dict)


class Guidance(Protocol):
    """Names the DiT passes a step needs and combines their velocities (text CFG; Talk adds audio)."""

    def passes(self) -> tuple[str, ...]: ...

    def combine(self, velocities: Mapping[str, Tensor]) -> Tensor: ...


@dataclass(frozen=True)
class TextGuidance:
    """``v = v_uncond + s * (v_cond - v_uncond)``; one pass only at ``s == 1``."""

    scale: float

    def passes(self) -> tuple[str, ...]:
        return ("cond",) if self.scale == 1.0 else ("cond", "uncond")

    def combine(self, velocities: Mapping[str, Tensor]) -> Tensor:
        if self.scale == 1.0:
            return velocities["cond"]
        return velocities["uncond"] + self.scale * (velocities["cond"] - velocities["uncond"])


@torch.no_grad()
def sample_clip(
    model: WanModel,
    y: Tensor,
    inputs: Mapping[str, PassInputs],
    guidance: Guidance,
    steps: int,
    shift: float,
    generator: torch.Generator,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Denoise one clip from noise drawn with ``generator`` (on CPU, so seeds mean the same on any device).

    Args:
        y: ``[1, 4 + C, T, h, w]`` conditioning concatenated to the latents at every step.
        inputs: per guidance pass, the text/image/extra inputs.

    Returns:
        The final ``[1, C, T, h, w]`` latents (float32).
    """
    spec = model.spec
    shape = (1, spec.latent_channels, *y.shape[-3:])
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)
    y = y.to(model.device, model.dtype)
    sigmas = inference_sigmas(steps, shift).tolist()
    for i in range(steps):
        t = sigmas[i] * 1000.0
        transformer = model.transformers[spec.expert_for_timestep(t)]
        timestep = torch.tensor([t], device=model.device, dtype=torch.float32)
        latent_in = torch.cat([x.to(model.dtype), y], dim=1)
        velocities = {
            name: transformer(
                hidden_states=latent_in,
                timestep=timestep,
                encoder_hidden_states=inputs[name].text,
                encoder_hidden_states_image=inputs[name].image,
                return_dict=False,
                **inputs[name].extra,
            )[0].float()
            for name in guidance.passes()
        }
        x = euler_step(x, guidance.combine(velocities), sigmas[i], sigmas[i + 1])
        if on_step is not None:
            on_step(i)
    return x
