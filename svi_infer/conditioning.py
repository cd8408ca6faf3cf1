"""Building the image-to-video conditioning ``y`` (mask channels + conditioning latents), as pure functions.

Tensors are channel-first video, ``[..., C, T, H, W]`` (a leading batch dimension is optional). Pixel
frames are floats in [-1, 1]. Two ways to carry a clip into the next one:

* **pixel** (SVI 1.0 / 2.0): the last ``m`` decoded frames become the first frames of a conditioning
  video whose remaining frames are padding chosen by ``ref_pad_num``; the VAE encodes it.
* **latent hand-off** (SVI 2.0 Pro): the anchor latent, then the previous clip's last latent(s), then
  literal zero latents; no VAE round trip.

In both, only latent frame 0 is marked in the mask, as SVI trains and samples (``ref_pad_cfg=False``).

Wan 2.2 TI2V-5B has no ``y`` channels: its conditioning latents (the *held* latents: anchor, then motion) replace
the first latent frames of the DiT input at every step, and their tokens get timestep 0
(:func:`replace_held`, :func:`held_timesteps`), as diffusers' TI2V pipeline does for its first frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svi_infer.spec import check_frames_per_clip

MASK_CHANNELS = 4


def conditioning_video(motion: Tensor, anchor: Tensor | None, num_frames: int, ref_pad_num: int) -> Tensor:
    """The pixel conditioning video: ``m`` motion frames, then ``num_frames - m`` padding frames.

    Args:
        motion: ``[..., 3, m, H, W]`` frames the clip must continue from (m >= 1).
        anchor: ``[..., 3, H, W]`` reference image; required when ``ref_pad_num != 0``.
        num_frames: clip length in pixel frames.
        ref_pad_num: ``0`` zero padding; ``-1`` the anchor repeated over all padding; ``N > 0`` the
            anchor ``N`` times, then zeros.
    """
    m = motion.shape[-3]
    if not 1 <= m < num_frames:
        raise ValueError(f"need 1 <= motion frames < frames per clip, got {m} and {num_frames}")
    if ref_pad_num < -1:
        raise ValueError(f"ref_pad_num must be -1, 0 or a positive count, got {ref_pad_num}")
    pad_count = num_frames - m
    n_anchor = pad_count if ref_pad_num == -1 else min(ref_pad_num, pad_count)
    pad = motion.new_zeros(*motion.shape[:-3], pad_count, *motion.shape[-2:])
    if n_anchor:
        if anchor is None:
            raise ValueError(f"ref_pad_num={ref_pad_num} pads with the anchor image, but none was given")
        pad[..., :n_anchor, :, :] = anchor.unsqueeze(-3).to(pad.dtype)
    return torch.cat([motion, pad], dim=-3)


def first_frames_mask(num_frames: int, height: int, width: int, marked: int = 1, temporal_factor: int = 4) -> Tensor:
    """The ``[4, T_latent, h, w]`` mask of Wan I2V: pixel frames ``< marked`` are 1, the rest 0.

    Pixel frame 0 is repeated ``temporal_factor`` times so that every latent frame covers 4 mask
    channels (frame 0 alone fills latent 0).
    """
    check_frames_per_clip(num_frames, temporal_factor)
    per_frame = torch.zeros(num_frames)
    per_frame[:marked] = 1.0
    per_frame = torch.cat([per_frame[:1].repeat(temporal_factor - 1), per_frame])
    per_latent = per_frame.view(-1, temporal_factor).transpose(0, 1)  # [4, T_latent]
    return per_latent[:, :, None, None].expand(-1, -1, height, width).contiguous()


def with_mask(latent: Tensor, mask: Tensor) -> Tensor:
    """``y = cat([mask, latent], channels)``; the mask is broadcast over a leading batch dimension."""
    mask = mask.to(latent.dtype).expand(*latent.shape[:-4], *mask.shape)
    return torch.cat([mask, latent], dim=-4)


def latent_handoff(anchor_latent: Tensor, motion_latents: Tensor | None, num_latent_frames: int) -> Tensor:
    """SVI 2.0 Pro conditioning: anchor latent, previous clip's last latent(s), then zero latents.

    Args:
        anchor_latent: ``[..., C, 1, h, w]`` VAE latent of the anchor image.
        motion_latents: ``[..., C, n, h, w]`` final latents of the previous clip, or None for clip 0.
        num_latent_frames: latent frames of the clip being generated.

    Returns:
        ``y`` of shape ``[..., 4 + C, T, h, w]`` with only latent 0 marked.
    """
    return held_y(held_latents(anchor_latent, motion_latents), num_latent_frames)


def held_latents(anchor_latent: Tensor, motion_latents: Tensor | None) -> Tensor:
    """``[..., C, 1 + n, h, w]``: the anchor latent, then the ``n`` motion latents a clip starts from."""
    parts = [anchor_latent[..., :1, :, :]]
    if motion_latents is not None:
        parts.append(motion_latents.to(anchor_latent.dtype))
    return torch.cat(parts, dim=-3)


def held_y(held: Tensor, num_latent_frames: int) -> Tensor:
    """``y`` of the latent hand-off: ``held`` latents, then literal zero latents; the mask marks latent 0 only."""
    used = held.shape[-3]
    if used >= num_latent_frames:
        raise ValueError(f"anchor + motion latents ({used}) must leave room in a {num_latent_frames}-latent clip")
    shape = held.shape
    latent = torch.cat([held, held.new_zeros(*shape[:-3], num_latent_frames - used, *shape[-2:])], dim=-3)
    h, w = shape[-2:]
    mask = torch.zeros(MASK_CHANNELS, num_latent_frames, h, w)
    mask[:, 0] = 1.0
    return with_mask(latent, mask)


def pro_training_pair(latents: Tensor, anchor_latent: Tensor, motion_latents: Tensor | None) -> tuple[Tensor, Tensor]:
    """The SVI 2.0 Pro training target and held latents of one window (reference/svi.md §6.3; our reading, since
    SVI released no Pro training code).

    With motion (a later clip): the target's latent 0 is the anchor (sampled outside the window) and its latents
    1.. are the window's own, so latent 1 reproduces the motion latent as at generation; held = anchor + motion.
    Without motion (``None``, what clip 0 sees): the window's first frame is the anchor, so the target is the
    window unchanged and held is its latent 0.

    Args:
        latents: ``[..., C, T, h, w]`` clean latents of the window.
        anchor_latent: ``[..., C, 1, h, w]`` latent of the anchor image.
        motion_latents: ``[..., C, n, h, w]`` (the window's latents 1..n, possibly from augmented frames), or None.

    Returns:
        ``(x0, held)``: ``[..., C, T, h, w]`` and ``[..., C, 1 + n, h, w]``.
    """
    if motion_latents is None or motion_latents.shape[-3] == 0:
        return latents, latents[..., :1, :, :]
    x0 = torch.cat([anchor_latent[..., :1, :, :].to(latents.dtype), latents[..., 1:, :, :]], dim=-3)
    return x0, held_latents(anchor_latent.to(latents.dtype), motion_latents.to(latents.dtype))


def replace_held(x: Tensor, held: Tensor) -> Tensor:
    """``x`` with its first ``k`` latent frames replaced by the ``k`` held latents (TI2V-5B conditioning)."""
    k = held.shape[-3]
    if k >= x.shape[-3]:
        raise ValueError(f"{k} held latents must leave room in a {x.shape[-3]}-latent clip")
    return torch.cat([held.to(x.dtype).expand(*x.shape[:-3], *held.shape[-3:]), x[..., k:, :, :]], dim=-3)


def held_timesteps(timestep: Tensor, shape: tuple[int, int, int], held: int, patch: tuple[int, int, int]) -> Tensor:
    """Per-token timesteps ``[B, T/pt * h/ph * w/pw]``: 0 on the tokens of the first ``held`` latent frames, else
    the sample's timestep (diffusers' TI2V ``expand_timesteps``; token order is frame, row, column).

    Args:
        timestep: ``[B]`` timesteps.
        shape: latent ``(T, h, w)``.
    """
    t, h, w = shape
    pt, ph, pw = patch
    per_frame = torch.ones(t // pt, dtype=timestep.dtype, device=timestep.device)
    per_frame[: held // pt] = 0.0
    tokens = per_frame.repeat_interleave((h // ph) * (w // pw))
    return timestep.view(-1, 1) * tokens
