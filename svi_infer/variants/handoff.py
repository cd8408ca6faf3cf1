"""What one clip carries into the next (reference/svi.md §2, §6).

* :class:`PixelHandoff` (SVI 1.0 / 2.0): the last ``motion_frames`` decoded frames start the next clip's
  conditioning video, padded as ``ref_pad_num`` says, and the VAE encodes it into ``y``.
* :class:`LatentHandoff` (SVI 2.0 Pro; the only one Wan 2.2 TI2V-5B takes): the anchor latent, then the previous
  clip's last ``motion_latents`` latents, with no VAE round trip. On bases with ``y`` channels they go into ``y``;
  on TI2V-5B they are *held*: they replace the first latent frames at every step, at timestep 0.

Either way a later clip's first :meth:`overlap_frames` frames repeat the seam and are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

    from svi_infer.model import WanModel
    from svi_infer.settings import GenerationSettings
    from svi_infer.spec import ModelSpec


class PixelHandoff:
    """Decoded frames, re-encoded with the VAE into the next clip's ``y``."""

    name = "pixel"
    counts = "motion_frames"  # the setting that says how much is carried
    padded = True  # the conditioning video is padded as ref_pad_num says

    def check_base(self, spec: ModelSpec) -> None:
        """TI2V-5B has no ``y`` channels: only the latent hand-off fits it."""
        if not spec.conditioning_by_concat:
            raise ValueError(
                f"{spec.id} (Wan 2.2 TI2V-5B) is conditioned by replacing its first latent frames with the anchor "
                "and motion latents (no y channels), which needs the latent hand-off: use variant.handoff=latent "
                "(+experiment=wan22_5b) on shards prepared with handoff=latent"
            )

    def problems(self, settings: GenerationSettings, spec: ModelSpec) -> list[str]:
        if not 1 <= settings.motion_frames < settings.frames_per_clip:
            return [
                f"motion_frames must be >= 1 and < frames_per_clip ({settings.frames_per_clip}), "
                f"got {settings.motion_frames}"
            ]
        return []

    def overlap_frames(self, settings: GenerationSettings) -> int:
        return settings.motion_frames

    def anchor_latent(self, model: WanModel, anchor: Tensor) -> Tensor | None:
        return None

    def clip_conditioning(
        self, model: WanModel, anchor: Tensor, anchor_latent: Tensor | None, tail: Tensor | None, settings
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """``(y, held, clip_frame)``: the motion frames (clip 0: the image itself) then padding, encoded, with the
        mask; SVI feeds CLIP the first conditioning frame."""
        from svi_infer.conditioning import conditioning_video, first_frames_mask, with_mask

        motion = anchor if tail is None else tail
        video = conditioning_video(motion, anchor[:, 0], settings.frames_per_clip, settings.ref_pad_num)
        latent = model.encode_video(video[None])
        h, w = latent.shape[-2:]
        y = with_mask(latent, first_frames_mask(settings.frames_per_clip, h, w, 1, model.spec.vae_temporal))
        return y, None, motion[:, 0]

    def tail(self, frames: np.ndarray, latents: Tensor, settings: GenerationSettings) -> Tensor:
        from svi_infer.video_io import frames_to_tensor

        return frames_to_tensor(frames[-settings.motion_frames :])

    def training_inputs(
        self, batch: dict, counts: tuple[int, ...], p_more: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, int, int]:
        """``(x0, y, held, m)``: the clean latents and y = mask + the conditioning latents of ``m`` motion frames,
        ``m`` drawn among ``counts``; nothing held."""
        from svi_infer.conditioning import first_frames_mask, with_mask

        x0 = batch["latents"].float().cpu()  # [B, C, T, h, w]
        m, cond = draw_count(batch["cond"], counts, p_more, generator)
        h, w = x0.shape[-2:]
        return x0, with_mask(cond.float().cpu(), first_frames_mask(batch["num_frames"], h, w, marked=1)), 0, m


class LatentHandoff:
    """SVI 2.0 Pro: the anchor latent and the previous clip's last latents, carried as they are."""

    name = "latent"
    counts = "motion_latents"
    padded = False

    def check_base(self, spec: ModelSpec) -> None:
        """Every base takes it."""

    def problems(self, settings: GenerationSettings, spec: ModelSpec) -> list[str]:
        latent_frames = spec.latent_frames(settings.frames_per_clip)
        if not 1 <= settings.motion_latents < latent_frames - 1:
            return [
                f"motion_latents must be >= 1 and leave room after the anchor latent in a {latent_frames}-latent "
                f"clip, got {settings.motion_latents}"
            ]
        return []

    def overlap_frames(self, settings: GenerationSettings) -> int:
        return 1 + 4 * settings.motion_latents

    def anchor_latent(self, model: WanModel, anchor: Tensor) -> Tensor | None:
        return model.encode_video(anchor[None])

    def clip_conditioning(
        self, model: WanModel, anchor: Tensor, anchor_latent: Tensor | None, tail: Tensor | None, settings
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """``(y, held, clip_frame)``: the anchor latent, then the previous clip's last latent(s), in ``y`` (bases
        with y channels) or held (TI2V-5B); CLIP sees the anchor."""
        from svi_infer.conditioning import held_latents, held_y

        held = held_latents(anchor_latent, tail.to(anchor_latent) if tail is not None else None)
        if model.spec.conditioning_by_concat:
            return held_y(held, model.spec.latent_frames(settings.frames_per_clip)), None, anchor[:, 0]
        return None, held, anchor[:, 0]

    def tail(self, frames: np.ndarray, latents: Tensor, settings: GenerationSettings) -> Tensor:
        return latents[:, :, -settings.motion_latents :].contiguous().cpu()

    def training_inputs(
        self, batch: dict, counts: tuple[int, ...], p_more: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, int, int]:
        """``(x0, y, held, n)``: ``n`` motion latents drawn among ``counts`` (0 = a clip-0 sample: the window's
        latent 0 is its own anchor), then the target and the held latents (``held`` of them); y carries them (on
        TI2V-5B only so that the conditioning error lands on them: they then replace the first frames of the DiT
        input).

        Samples made with ``pro_motion=continuation`` (the authors' recipe) continue a previous clip whose last
        latents are the motion: the target is the window as it is, held = anchor + motion. Those made with
        ``pro_motion=window`` follow :func:`~svi_infer.conditioning.pro_training_pair`."""
        from svi_infer.conditioning import held_latents, held_y, pro_training_pair

        if batch.get("anchor") is None or batch.get("pro_motion") is None:
            raise ValueError(
                f"variant.handoff=latent but the samples {batch['key']} hold no anchor latent or were made before "
                "SVI 2.0 Pro's authors' recipe: prepare the shards again with "
                "`python -m data_tools prepare handoff=latent ...`"
            )
        x0 = batch["latents"].float().cpu()
        n, motion = draw_count({0: None} | batch["motion"], counts, p_more, generator)
        anchor = batch["anchor"].float().cpu()
        if motion is not None and batch["pro_motion"] == "continuation":
            held = held_latents(anchor, motion.float().cpu())
        else:
            x0, held = pro_training_pair(x0, anchor, None if motion is None else motion.float().cpu())
        return x0, held_y(held, x0.shape[-3]), held.shape[-3], n


def draw_count(options: dict, counts: tuple[int, ...], p_more: float, generator: torch.Generator) -> tuple[int, object]:
    """The motion count of a training step and its conditioning, among ``counts`` the batch holds: with several,
    the largest with probability ``p_more``, else the smallest (Film: 5 motion frames with p=0.9, else 1)."""
    import torch

    held = sorted(m for m in counts if m in options)
    if not held:
        raise ValueError(f"batch has conditioning for {sorted(options)}, training asks for {list(counts)}")
    m = held[-1] if len(held) == 1 or torch.rand((), generator=generator).item() < p_more else held[0]
    return m, options[m]
