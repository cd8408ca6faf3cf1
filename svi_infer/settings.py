"""What decides the frames of a long video, checked before any model is loaded.

Torch-free on purpose: ``python -m svi_infer`` validates every setting with this module alone, so a mistake is
answered before torch and diffusers start up. :mod:`svi_infer.longvideo.generator` runs the loop.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields, replace

from svi_infer.spec import ModelSpec, check_frames_per_clip
from svi_infer.variants import make_conditioning, make_handoff

# increment: clip k draws its noise from seed + k; multiply: seed * k (SVI's seed multiplier, so clip 0 gets 0
# whatever the seed); random: fresh seeds, recorded in the sidecar.
SEED_POLICIES = ("increment", "multiply", "random")
RENAMED_SEED_POLICIES = {"fixed": "multiply"}  # old name -> the policy that gives the same seeds
TOP_LEVEL_SETTINGS = ("num_clips", "frames_per_clip", "height", "width", "seed", "seed_policy")  # not under variant.*
DEFAULT_NUM_CLIPS = 3  # what num_clips=None means without audio to measure
# reference: the size follows the image (aspect kept, width <= max_width), as SVI's Wan 2.1 scripts size it;
# crop: the model's default size (or height x width), the image centre-cropped to it.
FITS = ("reference", "crop")


def reference_size(image_width: int, image_height: int, max_width: int, multiple: int = 16) -> tuple[int, int]:
    """``(height, width)`` of a video made from an ``image_width x image_height`` image, as SVI sizes it
    (``calculate_dimensions`` in its ``utils/image_process.py``): an image wider than ``max_width`` is scaled down
    to that width (height ``int(max_width * h / w)``), a narrower one keeps its size; both sides are then floored to
    a multiple of ``multiple``. Never upscales; the aspect is kept to within one ``multiple`` step."""
    width, height = image_width, image_height
    if width > max_width:
        width, height = max_width, int(max_width * image_height / image_width)
    return height // multiple * multiple, width // multiple * multiple


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the frames of a long video (besides model, adapters, image, prompts, audio, pose).

    ``num_clips=None``: with ``conditioning="audio"`` as many clips as the audio lasts
    (:func:`svi_infer.audio.clips_for_frames`), otherwise ``DEFAULT_NUM_CLIPS``. ``conditioning``: ``"text"``
    (Shot/Film), ``"audio"`` (Talk: text guidance ``cfg_scale``, audio guidance ``cfg_scale_audio``), ``"pose"``
    (Dance: text guidance only, the pose in every pass); ``handoff``: ``"pixel"`` or ``"latent"``
    (:mod:`svi_infer.variants`). ``seed_policy``: see ``SEED_POLICIES``.

    Size: ``height``/``width`` None are resolved per image by :meth:`resolve` (``fit``: see ``FITS``;
    ``max_width`` None: the model's default width); given, the image is centre-cropped to them whatever ``fit``.
    ``negative_prompt`` None: the model's (:attr:`ModelSpec.negative_prompt`).
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
    height: int | None = None
    width: int | None = None
    seed: int = 42
    seed_policy: str = "increment"
    prompt_repeat_times: int = 1
    use_first_prompt_only: bool = False
    negative_prompt: str | None = None
    conditioning: str = "text"
    cfg_scale_audio: float = 5.0
    fit: str = "reference"
    max_width: int | None = None

    @property
    def overlap_frames(self) -> int:
        """Frames at the start of every clip after the first that repeat the previous clip (dropped)."""
        return make_handoff(self.handoff).overlap_frames(self)

    def clip_seed(self, k: int) -> int:
        """Clip ``k``'s seed under ``seed_policy`` (``random``: a fresh draw at every call; record it)."""
        if self.seed_policy == "random":
            return secrets.randbits(31)
        return self.seed * k if self.seed_policy == "multiply" else self.seed + k

    def resolve(self, spec: ModelSpec, image_size: tuple[int, int]) -> GenerationSettings:
        """These settings for one ``(width, height)`` image: the video size, ``max_width`` and the negative prompt
        filled in (what a run records). Generator and CLI both call it, so they size a video alike; resolving
        resolved settings again gives them back unchanged."""
        max_width = spec.width if self.max_width is None else self.max_width
        negative = spec.negative_prompt if self.negative_prompt is None else self.negative_prompt
        height, width = self.height, self.width
        if (height is None) != (width is None) and self.fit == "reference":
            raise ValueError(_one_side(height, width))
        if height is None or width is None:
            if self.fit == "crop":
                height = spec.height if height is None else height
                width = spec.width if width is None else width
            else:
                m = spec.spatial_multiple
                height, width = reference_size(*image_size, max_width, m)
                if not height or not width:
                    w, h = image_size
                    raise ValueError(
                        f"the image is {w}x{h} pixels: fit=reference keeps its size up to max_width={max_width}, "
                        f"and it needs at least {m} pixels each side; give a larger image, or height and width"
                    )
        return replace(self, height=height, width=width, max_width=max_width, negative_prompt=negative)

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
        sizes = {k: v for k, v in (("height", self.height), ("width", self.width)) if v is not None}
        if any(v % m or v <= 0 for v in sizes.values()):
            got = f"{self.height}x{self.width}" if len(sizes) == 2 else ", ".join(f"{k}={v}" for k, v in sizes.items())
            problems.append(f"resolution must be a positive multiple of {m}, got {got}")
        if len(sizes) == 1 and self.fit == "reference":
            problems.append(_one_side(self.height, self.width))
        if self.fit not in FITS:
            problems.append(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.max_width is not None and self.max_width < m:
            problems.append(f"max_width must be at least {m} (one {m}-pixel step), got {self.max_width}")
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


def _one_side(height: int | None, width: int | None) -> str:
    return (
        f"give both height and width or neither (got height={height}, width={width}): fit=reference takes both "
        "from the image; fit=crop takes the missing one from the model"
    )


def variant_keys() -> set[str]:
    """The keys of ``variant.*``: every setting but the top-level ones (svi_train records them as an adapter's
    generation defaults)."""
    return {f.name for f in fields(GenerationSettings)} - set(TOP_LEVEL_SETTINGS)
