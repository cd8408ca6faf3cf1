"""Pre-encoding windows with the svi_infer components, so training never runs the VAE or the encoders."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean
from PIL import Image

from data_tools.augment import AugmentParams, apply_params
from svi_infer.audio import features_for_frames
from svi_infer.conditioning import conditioning_video
from svi_infer.model import WanModel
from svi_infer.schema import SCHEMA_VERSION, Sample
from svi_infer.talk import AUDIO_CONTEXT
from svi_infer.video_io import frames_to_tensor

ANCHOR_MODES = ("outside", "in_clip", "first")


@dataclass(frozen=True)
class EncodeSettings:
    """What the experiment's conditioning needs pre-encoded (reference/svi.md §2.3, §3)."""

    frames_per_clip: int = 81
    fps: float = 16.0
    motion_frames: tuple[int, ...] = (1,)
    ref_pad_num: int = -1
    anchor: str = "outside"  # where the padding/anchor frame comes from when ref_pad_num != 0 (or handoff=latent)
    handoff: str = "pixel"  # pixel: cond.m<m> per motion_frames | latent: anchor + motion.n<n> per motion_latents
    motion_latents: tuple[int, ...] = (1,)
    pro_motion: str = "continuation"  # latent hand-off: see data_tools.config.PRO_MOTIONS

    @property
    def needs_anchor(self) -> bool:
        return self.handoff == "latent" or self.ref_pad_num != 0


def configure_vae(model: WanModel, tiling: bool, tile_size: int = 256, tile_stride: int = 192) -> None:
    """Switch the VAE's spatial tiling on (tiles of ``tile_size`` pixels every ``tile_stride``, blended over the
    overlap: bounds the encoder's memory at 720p) or off."""
    if tiling:
        model.vae.enable_tiling(
            tile_sample_min_height=tile_size,
            tile_sample_min_width=tile_size,
            tile_sample_stride_height=tile_stride,
            tile_sample_stride_width=tile_stride,
        )
    else:
        model.vae.disable_tiling()


def choose_anchor(num_source_frames: int, window: tuple[int, ...], mode: str, rng: random.Random) -> int:
    """Source frame index of the anchor image: outside the window when the video allows it (SVI 2.x), else a
    random frame of the window (SVI 1.0), or the window's first frame."""
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchor must be one of {ANCHOR_MODES}, got {mode!r}")
    if mode == "first":
        return window[0]
    if mode == "outside":
        inside = set(range(min(window), max(window) + 1))
        outside = [i for i in range(num_source_frames) if i not in inside]
        if outside:
            return rng.choice(outside)
    return rng.choice(window)


def text_length(model: WanModel, caption: str) -> int:
    """Real token count of a caption as the pipeline encodes it (cleaned, with ``</s>``)."""
    ids = model.pipe.tokenizer(prompt_clean(caption), truncation=True, max_length=model.spec.text_len).input_ids
    return len(ids)


@torch.no_grad()
def encode_window(
    model: WanModel,
    settings: EncodeSettings,
    key: str,
    meta: dict,
    frames: np.ndarray,
    anchor: np.ndarray | None,
    audio: tuple[torch.Tensor, float] | None = None,
    pose: np.ndarray | None = None,
    augment: AugmentParams | None = None,
    previous: dict[int, np.ndarray] | None = None,
) -> Sample:
    """One window ``[F, H, W, 3]`` uint8 -> a schema sample: clean latents; the hand-off conditioning (pixel:
    conditioning latents per motion count; latent: the anchor latent and the motion latents per count, SVI 2.0
    Pro), its motion frames degraded by ``augment`` when given; text at its real length, CLIP for Wan 2.1, audio
    features and pose frames when given. The clean latents and the anchor are never augmented. ``previous``
    (latent hand-off, ``pro_motion=continuation``): per motion count ``n`` the ``[F, H, W, 3]`` frames of the
    clip this window continues, whose last ``n`` latents are the motion latents."""
    video = frames_to_tensor(frames)  # [3, F, H, W]
    anchor_t = frames_to_tensor(anchor[None])[:, 0] if anchor is not None else None
    if settings.handoff == "latent":
        tensors = _latent_handoff(model, settings, video, anchor_t, augment, previous)
        meta = {**meta, "pro_motion": settings.pro_motion}
    else:
        motion = apply_params(video[:, : max(settings.motion_frames)], augment) if augment else video
        videos = [video] + [
            conditioning_video(motion[:, :m], anchor_t, settings.frames_per_clip, settings.ref_pad_num)
            for m in settings.motion_frames
        ]
        latents = model.encode_video(torch.stack(videos)).to(torch.bfloat16).cpu()
        tensors = {"latents": latents[0]}
        tensors |= {f"cond.m{m}": latents[i + 1] for i, m in enumerate(settings.motion_frames)}
    n = text_length(model, meta["caption"])
    tensors["text"] = model.encode_text([meta["caption"]])[0, :n].to(torch.bfloat16).cpu()
    if model.spec.has_image_encoder:
        tensors["image"] = model.encode_image(Image.fromarray(frames[0]))[0].to(torch.bfloat16).cpu()
    if audio is not None:  # with AUDIO_CONTEXT frames either side, from the whole track (as generation reads it)
        feats, rate = audio
        frames_read = range(-AUDIO_CONTEXT, settings.frames_per_clip + AUDIO_CONTEXT)
        times = [(meta["start_frame"] + j) / settings.fps for j in frames_read]
        tensors["audio"] = features_for_frames(feats, rate, times).to(torch.bfloat16)
        meta = {**meta, "audio_context": AUDIO_CONTEXT}
    if pose is not None:
        tensors["pose"] = torch.from_numpy(np.ascontiguousarray(pose)).permute(3, 0, 1, 2).contiguous()
    h, w = frames.shape[1:3]
    full_meta = {
        **meta,
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "spec": model.spec.id,
        "height": h,
        "width": w,
        "num_frames": settings.frames_per_clip,
        "fps": settings.fps,
        "latent_channels": model.spec.latent_channels,
        "motion_frames": list(settings.motion_frames) if settings.handoff == "pixel" else [],
        "ref_pad_num": settings.ref_pad_num,
        "handoff": settings.handoff,
        "motion_latents": list(settings.motion_latents) if settings.handoff == "latent" else [],
        "augment": augment.to_dict() if augment else None,
        "text_len": n,
    }
    return Sample(key, full_meta, tensors)


def _latent_handoff(
    model: WanModel,
    settings: EncodeSettings,
    video: torch.Tensor,
    anchor: torch.Tensor | None,
    augment: AugmentParams | None,
    previous: dict[int, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Clean latents, ``anchor`` = the anchor image's latent ``[C, 1, h, w]`` and ``motion.n<n>`` ``[C, n, h, w]``.

    ``pro_motion=continuation`` (SVI 2.0 Pro's authors' recipe): the last ``n`` latents of the previous clip, the
    ``F`` frames this window continues (augmented when asked), encoded as one clip: exactly what generation hands
    on, the last latents of a generated clip. ``window`` (the layout before): latents 1..n of the window's own
    first ``1 + 4n`` frames; the VAE is causal in time, so those frames are encoded once, for the largest ``n``."""
    if anchor is None:
        raise ValueError("handoff=latent needs an anchor frame")
    latents = model.encode_video(video[None])[0]
    anchor_latent = model.encode_video(anchor[:, None][None])[0]
    tensors = {"latents": latents, "anchor": anchor_latent}
    if settings.pro_motion == "continuation":
        if previous is None or set(previous) != set(settings.motion_latents):
            raise ValueError("pro_motion=continuation needs the previous clip's frames for every motion count")
        for n, frames in previous.items():
            clip = frames_to_tensor(frames)
            clip = apply_params(clip, augment) if augment else clip
            tensors[f"motion.n{n}"] = model.encode_video(clip[None])[0][:, -n:]
        return {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in tensors.items()}
    count = max(settings.motion_latents)
    head = video[:, : 1 + model.spec.vae_temporal * count]
    if augment:
        head = apply_params(head, augment)
    motion = model.encode_video(head[None])[0]
    tensors |= {f"motion.n{n}": motion[:, 1 : 1 + n] for n in settings.motion_latents}
    return {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in tensors.items()}
