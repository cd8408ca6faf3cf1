"""Sampling one clip: SVI's Euler flow schedule, classifier-free guidance (text; text + audio for Talk), Wan 2.2
expert switch, and the two ways a clip is conditioned: ``y`` concatenated to the latents (Wan 2.1, Wan 2.2 A14B) or
held latents replacing the first latent frames at timestep 0 (Wan 2.2 TI2V-5B)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from svi_infer.conditioning import held_timesteps, replace_held
from svi_infer.flow import euler_step, inference_sigmas
from svi_infer.model import WanModel
from svi_infer.talk import AudioWindows, get_talk, set_audio


@dataclass(frozen=True)
class PassInputs:
    """What one guidance pass feeds the DiT besides the latents.

    ``text`` / ``image``: UMT5 and CLIP tokens. ``audio``: Talk's audio windows of this pass (``set_audio`` is
    called with them right before the pass's forward, because the audio differs between passes and lives in the
    transformer, not in its forward arguments); None on a transformer with Talk modules switches the audio path
    off for the pass. ``extra``: further keyword arguments of the transformer's forward.
    """

    text: Tensor
    image: Tensor | None = None
    audio: AudioWindows | None = None
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


@dataclass(frozen=True)
class TalkGuidance:
    """SVI-Talk's three-pass guidance (reference/svi.md §3.4)::

        v = v_uncond + s_text * (v_cond - v_droptext) + s_audio * (v_droptext - v_uncond)

    with ``cond`` = (positive text, audio), ``droptext`` = (negative text, audio) and ``uncond`` = (negative text,
    zeroed audio): the text term pushes away from the same audio without the prompt, the audio term away from
    neither. Passes that cannot change the result are skipped: at ``s_audio == 1`` the formula is
    ``v_droptext + s_text * (v_cond - v_droptext)`` (two passes), at both scales 1 it is ``v_cond`` (one pass).
    """

    text_scale: float
    audio_scale: float

    def passes(self) -> tuple[str, ...]:
        if self.audio_scale == 1.0:
            return ("cond",) if self.text_scale == 1.0 else ("cond", "droptext")
        return ("cond", "droptext", "uncond")

    def combine(self, velocities: Mapping[str, Tensor]) -> Tensor:
        cond = velocities["cond"]
        if self.audio_scale == 1.0:
            if self.text_scale == 1.0:
                return cond
            return velocities["droptext"] + self.text_scale * (cond - velocities["droptext"])
        droptext, uncond = velocities["droptext"], velocities["uncond"]
        return uncond + self.text_scale * (cond - droptext) + self.audio_scale * (droptext - uncond)


@torch.no_grad()
def sample_clip(
    model: WanModel,
    y: Tensor | None,
    inputs: Mapping[str, PassInputs],
    guidance: Guidance,
    steps: int,
    shift: float,
    generator: torch.Generator,
    on_step: Callable[[int], None] | None = None,
    held: Tensor | None = None,
    latent_frames: int | None = None,
) -> Tensor:
    """Denoise one clip from noise drawn with ``generator`` (on CPU, so seeds mean the same on any device).

    Args:
        y: ``[1, 4 + C, T, h, w]`` conditioning concatenated to the latents at every step (bases whose DiT takes
            it, ``spec.conditioning_by_concat``); None for TI2V-5B.
        inputs: per guidance pass, the text/image/audio/extra inputs.
        held: TI2V-5B only: ``[1, C, k, h, w]`` clean latents (anchor, then motion) that replace the first ``k``
            latent frames of the DiT input at every step, with timestep 0 on their tokens; the returned latents'
            first ``k`` frames are exactly these.
        latent_frames: ``T``, needed when ``y`` is None (``y`` gives the shape otherwise).

    Returns:
        The final ``[1, C, T, h, w]`` latents (float32).
    """
    spec = model.spec
    if spec.conditioning_by_concat:
        if y is None or held is not None:
            raise ValueError(f"{spec.id} is conditioned by y concatenated to the latents: give y, not held latents")
        shape = tuple(y.shape[-3:])
        y = y.to(model.device, model.dtype)
    else:
        if y is not None:
            raise ValueError(f"{spec.id} has no y channels: condition it with held latents (held=...), y=None")
        if latent_frames is None or held is None:
            raise ValueError(f"{spec.id}: sampling needs the held latents and latent_frames")
        shape = (latent_frames, *held.shape[-2:])
        held = held.to(model.device, torch.float32)
    talking = [t for t in model.transformers if get_talk(t) is not None]
    names = guidance.passes()
    given = [name for name in names if inputs[name].audio is not None]
    if given and len(talking) != len(model.transformers):
        raise ValueError(f"passes {given} carry audio but the model's transformers have no Talk modules (attach_talk)")
    x = torch.randn((1, spec.latent_channels, *shape), generator=generator, dtype=torch.float32).to(model.device)
    sigmas = inference_sigmas(steps, shift).tolist()
    try:
        for i in range(steps):
            t = sigmas[i] * 1000.0
            transformer = model.transformers[spec.expert_for_timestep(t)]
            timestep = torch.tensor([t], device=model.device, dtype=torch.float32)
            if held is None:
                latent_in = torch.cat([x.to(model.dtype), y], dim=1)
            else:  # the held frames enter clean, at timestep 0; the rest at t
                latent_in = replace_held(x, held).to(model.dtype)
                timestep = held_timesteps(timestep, shape, held.shape[-3], spec.patch_size)
            velocities = {}
            for name in names:
                if transformer in talking:
                    set_audio(transformer, inputs[name].audio)
                velocities[name] = transformer(
                    hidden_states=latent_in,
                    timestep=timestep,
                    encoder_hidden_states=inputs[name].text,
                    encoder_hidden_states_image=inputs[name].image,
                    return_dict=False,
                    **inputs[name].extra,
                )[0].float()
            x = euler_step(x, guidance.combine(velocities), sigmas[i], sigmas[i + 1])
            if on_step is not None:
                on_step(i)
    finally:
        for transformer in talking:  # no audio left behind for whoever runs the model next
            set_audio(transformer, None)
    return x if held is None else replace_held(x, held)
