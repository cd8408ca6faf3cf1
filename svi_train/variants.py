"""Talk (audio) and Dance (pose) conditioning for training (reference/svi.md §3.4, §3.5).

Talk adds MultiTalk's audio modules to the DiT, frozen (no LoRA, not in the optimizer, not in checkpoints: they
are rebuilt from ``model.multitalk``). Dance adds UniAnimate's pose encoder, trained beside the LoRA (in the
optimizer, the checkpoints and the exported adapters). The per-sample conditioning dropout is drawn here from the
module's per-rank generator, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from svi_infer.generate import attach_talk_modules
from svi_infer.model import WanModel
from svi_infer.pose import PoseEncoder, attach_pose, load_pose_encoder
from svi_infer.talk import AudioWindows, TalkConfig, TalkModules, audio_windows, get_talk
from svi_train.config import ConditioningSettings

AUDIO, POSE = "audio", "pose"
KINDS = (None, AUDIO, POSE)
POSE_INIT_SEED = 7_877  # offset from the run seed for a freshly initialised pose encoder


def check_kind(kind: str | None) -> str | None:
    """``variant.conditioning``: audio (Talk), pose (Dance) or None (text only)."""
    if kind not in KINDS:
        raise ValueError(f"variant.conditioning must be audio, pose or null (text only), got {kind!r}")
    return kind


def build_talk(model: WanModel, multitalk: str | Path | None) -> TalkModules:
    """Attach MultiTalk's frozen audio modules to the DiT exactly as svi_infer does for generation: loaded from
    ``multitalk`` (``multitalk.safetensors``), or for a tiny model without a file the random tiny modules every
    process builds alike, so an adapter trained on them generates with the same ones.

    Call after ``add_adapter``: peft then never sees the audio layers, whatever ``lora.target_modules`` says.
    """
    attach_talk_modules(model, multitalk)
    return get_talk(model.transformers[0])


def build_pose(transformer: nn.Module, init: str | Path | None, seed: int) -> PoseEncoder:
    """Attach a trainable pose encoder (float32, like the reference), from ``init`` weights or PyTorch's default
    init drawn from ``seed`` (in a forked RNG, so the global random stream is left as it was).

    Call after ``add_adapter``: peft freezes every parameter that is not a LoRA's, the encoder included.
    """
    dim = transformer.patch_embedding.out_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + POSE_INIT_SEED)
        encoder = PoseEncoder(dim)
    if init is not None:
        load_pose_encoder(encoder, init)
    attach_pose(transformer, encoder.requires_grad_(True))
    return encoder


@dataclass(frozen=True)
class Dropped:
    """What one sample loses this step: the audio (Talk), the pose, and y with the CLIP tokens (Dance)."""

    audio: bool = False
    pose: bool = False
    image: bool = False  # y (mask included) and the CLIP image tokens; no y error is injected then


def draw_dropout(kind: str | None, settings: ConditioningSettings, generator: torch.Generator) -> Dropped:
    """The conditioning dropout of one sample.

    - audio: one draw; below ``audio_dropout`` both audio windows are zeroed (svi.md §3.4).
    - pose: two independent draws (svi.md §3.5): below ``pose_dropout`` the pose is zeroed; below
      ``pose_and_image_dropout`` the pose, y and the CLIP tokens are.
    - text only: nothing is drawn, so text-only runs keep their random stream.

    The draws are taken whatever the probabilities (0 included), so changing them never shifts later draws.
    """
    if kind is None:
        return Dropped()
    if kind == AUDIO:
        (u,) = torch.rand(1, generator=generator, dtype=torch.float64).tolist()
        return Dropped(audio=u < settings.audio_dropout)
    u_pose, u_image = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    image = u_image < settings.pose_and_image_dropout
    return Dropped(pose=image or u_pose < settings.pose_dropout, image=image)


def talk_windows(audio: Tensor, dropped: list[Dropped], config: TalkConfig) -> AudioWindows:
    """Per-sample audio windows of a batch of shard features ``[B, F, layers, dim]`` (one row per video frame of
    the clip); a dropped sample's windows are zeros (as MultiTalk's audio-free input).

    Each frame's ±2 window is clamped inside the clip: the shard holds only the clip's frames.
    """
    windows = []
    for features, drop in zip(audio.float(), dropped, strict=True):
        w = audio_windows(features, window=config.window, vae_scale=config.vae_scale)
        windows.append(w.zeros_like() if drop.audio else w)
    return AudioWindows.stack(windows)


class PoseKeep:
    """Zeroes the encoded pose of the dropped samples of a batch (a forward hook on the encoder), as SVI's pose
    dropout multiplies the pose embedding by 0. The encoder runs even when every sample drops its pose, so its
    parameters take part in every step (DDP requires that of every trainable parameter); their gradient is then 0.
    """

    def __init__(self, encoder: PoseEncoder) -> None:
        self.keep: Tensor | None = None  # [B] of 0/1, None: keep every sample
        self.handle = encoder.register_forward_hook(self._apply)

    def _apply(self, _module: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        if self.keep is None:
            return None
        return out * self.keep.to(device=out.device, dtype=out.dtype).view(-1, *([1] * (out.ndim - 1)))

    def set(self, dropped: list[Dropped]) -> None:
        """Mask this batch's dropped samples (None when every sample keeps its pose)."""
        kept = [not d.pose for d in dropped]
        self.keep = None if all(kept) else torch.tensor(kept, dtype=torch.float32)
