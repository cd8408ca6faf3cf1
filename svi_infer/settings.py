"""What decides the frames of a long video, checked before any model is loaded.

Torch-free on purpose: ``python -m svi_infer`` validates every setting with this module alone, so a mistake is
answered before torch and diffusers start up. :mod:`svi_infer.longvideo.generator` runs the loop.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields

from svi_infer.spec import ModelSpec, check_frames_per_clip
from svi_infer.variants import make_conditioning, make_handoff

# increment: clip k draws its noise from seed + k; multiply: seed * k (SVI's seed multiplier, so clip 0 gets 0
# whatever the seed); random: fresh seeds, recorded in the sidecar.
SEED_POLICIES = ("increment", "multiply", "random")
RENAMED_SEED_POLICIES = {"fixed": "multiply"}  # old name -> the policy that gives the same seeds
TOP_LEVEL_SETTINGS = ("num_clips", "frames_per_clip", "height", "width", "seed", "seed_policy")  # not under variant.*
DEFAULT_NUM_CLIPS = 3  # what num_clips=None means without audio to measure
# Wan's default negative prompt, in English (reference/svi.md §4.1).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the frames of a long video (besides model, adapters, image, prompts, audio, pose).

    ``num_clips=None``: with ``conditioning="audio"`` as many clips as the audio lasts
    (:func:`svi_infer.audio.clips_for_frames`), otherwise ``DEFAULT_NUM_CLIPS``. ``conditioning``: ``"text"``
    (Shot/Film), ``"audio"`` (Talk: text guidance ``cfg_scale``, audio guidance ``cfg_scale_audio``), ``"pose"``
    (Dance: text guidance only, the pose in every pass); ``handoff``: ``"pixel"`` or ``"latent"``
    (:mod:`svi_infer.variants`). ``seed_policy``: see ``SEED_POLICIES``.
    """

    num_clips: int | None = None
    frames_per_clip: int = 81
    motion_frames: int = 1
    ref_pad_num: int = -1
    handoff: str = "pixel"
    motion_latents: int = 1
    steps: int = 50
    shift: float = 5.0
    cfg_scale: float = 5.0
    fps: int = 16
    height: int = 480
    width: int = 832
    seed: int = 42
    seed_policy: str = "increment"
    prompt_repeat_times: int = 1
    use_first_prompt_only: bool = False
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    conditioning: str = "text"
    cfg_scale_audio: float = 5.0

    @property
    def overlap_frames(self) -> int:
        """Frames at the start of every clip after the first that repeat the previous clip (dropped)."""
        return make_handoff(self.handoff).overlap_frames(self)

    def clip_seed(self, k: int) -> int:
        """Clip ``k``'s seed under ``seed_policy`` (``random``: a fresh draw at every call; record it)."""
        if self.seed_policy == "random":
            return secrets.randbits(31)
        return self.seed * k if self.seed_policy == "multiply" else self.seed + k

    def validate(self, spec: ModelSpec) -> None:
        """Raise one ``ValueError`` naming every bad setting, on one line, before anything heavy is loaded."""
        problems = []
        try:
            check_frames_per_clip(self.frames_per_clip, spec.vae_temporal)
        except ValueError as err:
            problems.append(str(err))
        try:
            handoff = make_handoff(self.handoff)
            handoff.check_base(spec)
            problems += handoff.problems(self, spec)
        except ValueError as err:
            problems.append(str(err))
        if self.ref_pad_num < -1:
            problems.append(f"ref_pad_num must be -1 (anchor), 0 (zeros) or N > 0, got {self.ref_pad_num}")
        m = spec.spatial_multiple
        if self.height % m or self.width % m or self.height <= 0 or self.width <= 0:
            problems.append(f"resolution must be a positive multiple of {m}, got {self.height}x{self.width}")
        if self.seed_policy in RENAMED_SEED_POLICIES:
            new = RENAMED_SEED_POLICIES[self.seed_policy]
            problems.append(
                f"seed_policy={self.seed_policy} is now called seed_policy={new} (clip k uses seed x k, SVI's "
                f"seeds); the default, seed_policy=increment, gives clip k seed + k"
            )
        elif self.seed_policy not in SEED_POLICIES:
            problems.append(f"seed_policy must be one of {SEED_POLICIES}, got {self.seed_policy!r}")
        if self.seed_policy == "multiply" and self.seed == 0 and (self.num_clips is None or self.num_clips > 1):
            problems.append("seed=0 with seed_policy=multiply gives every clip the same noise (seed x clip index)")
        for name in ("num_clips", "steps", "fps", "prompt_repeat_times"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.cfg_scale <= 0 or self.shift <= 0 or self.cfg_scale_audio <= 0:
            problems.append(
                f"cfg_scale, cfg_scale_audio and shift must be > 0, got {self.cfg_scale}, {self.cfg_scale_audio} "
                f"and {self.shift}"
            )
        try:
            conditioning = make_conditioning(self.conditioning)
            conditioning.check_base(spec, training=False)
            if conditioning.fps is not None and self.fps != conditioning.fps:
                problems.append(
                    f"conditioning={self.conditioning} needs fps={conditioning.fps:g} (the rate its inputs follow), "
                    f"got {self.fps}"
                )
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("invalid generation settings: " + "; ".join(problems))


def variant_keys() -> set[str]:
    """The keys of ``variant.*``: every setting but the top-level ones (svi_train records them as an adapter's
    generation defaults)."""
    return {f.name for f in fields(GenerationSettings)} - set(TOP_LEVEL_SETTINGS)
