"""What decides the frames of a long video, and where it goes, checked before any model is loaded.

Torch-free on purpose: ``python -m svi_infer`` validates every setting and the output path with this module
alone, so a mistake is answered before torch and diffusers start up. :mod:`svi_infer.generate` runs the loop.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from svi_infer.audio_file import TALK_FPS, AudioError
from svi_infer.spec import WAN21_I2V, ModelSpec

HANDOFFS = ("pixel", "latent")  # how a clip is carried into the next: decoded frames, or latents
# increment: clip k draws its noise from seed + k; multiply: seed * k (SVI's seed multiplier, so clip 0 gets 0
# whatever the seed); random: fresh seeds, recorded in the sidecar.
SEED_POLICIES = ("increment", "multiply", "random")
RENAMED_SEED_POLICIES = {"fixed": "multiply"}  # old name -> the policy that gives the same seeds
CONDITIONINGS = ("text", "audio", "pose")
DEFAULT_NUM_CLIPS = 3  # what num_clips=None means without audio to measure
# Wan's default negative prompt, in English (reference/svi.md §4.1).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


def check_frames_per_clip(num_frames: int, temporal_factor: int = 4) -> None:
    """Wan clips are ``temporal_factor * k + 1`` frames long (the VAE keeps frame 0 on its own)."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"frames_per_clip must be {temporal_factor}k+1 (e.g. 81, 49, 17), got {num_frames}")


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the frames of a long video (besides model, adapters, image, prompts, audio, pose).

    ``num_clips=None``: with ``conditioning="audio"`` as many clips as the audio lasts
    (:func:`svi_infer.audio.clips_for_frames`), otherwise ``DEFAULT_NUM_CLIPS``. ``conditioning``: None or
    ``"text"`` (Shot/Film), ``"audio"`` (Talk: text guidance ``cfg_scale``, audio guidance ``cfg_scale_audio``),
    ``"pose"`` (Dance: text guidance only, the pose in every pass). ``seed_policy``: see ``SEED_POLICIES``.
    """

    num_clips: int | None = None
    frames_per_clip: int = 81
    num_motion_frames: int = 1
    ref_pad_num: int = -1
    handoff: str = "pixel"
    num_motion_latents: int = 1
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
    conditioning: str | None = None
    cfg_scale_audio: float = 5.0

    @property
    def mode(self) -> str:
        """``text``, ``audio`` or ``pose`` (None counts as ``text``)."""
        return self.conditioning or "text"

    @property
    def overlap_frames(self) -> int:
        """Frames at the start of every clip after the first that repeat the previous clip (dropped)."""
        return self.num_motion_frames if self.handoff == "pixel" else 1 + 4 * self.num_motion_latents

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
        if self.handoff not in HANDOFFS:
            problems.append(f"handoff must be one of {HANDOFFS}, got {self.handoff!r}")
        if self.handoff == "pixel" and not 1 <= self.num_motion_frames < self.frames_per_clip:
            problems.append(
                f"num_motion_frames must be >= 1 and < frames_per_clip ({self.frames_per_clip}), "
                f"got {self.num_motion_frames}"
            )
        if self.handoff == "latent" and not 1 <= self.num_motion_latents < spec.latent_frames(self.frames_per_clip) - 1:
            problems.append(
                f"num_motion_latents must be >= 1 and leave room after the anchor latent in a "
                f"{spec.latent_frames(self.frames_per_clip)}-latent clip, got {self.num_motion_latents}"
            )
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
        if self.conditioning is not None and self.conditioning not in CONDITIONINGS:
            problems.append(f"conditioning must be one of {CONDITIONINGS} (or null), got {self.conditioning!r}")
        if self.mode == "audio":
            if spec.family != WAN21_I2V:
                problems.append(
                    f"conditioning=audio (SVI-Talk) uses MultiTalk's audio modules, made for Wan 2.1 I2V; {spec.id} "
                    "has none"
                )
            if self.fps != TALK_FPS:
                problems.append(
                    f"conditioning=audio needs fps={TALK_FPS:g} (the rate of the Talk audio windows), got {self.fps}"
                )
        if not spec.conditioning_by_concat and self.handoff == "pixel":
            problems.append(
                f"{spec.id} (Wan 2.2 TI2V-5B) is conditioned by replacing its first latent frames with the anchor "
                "and motion latents, which needs the latent hand-off: use handoff=latent (+experiment=wan22_5b)"
            )
        if problems:
            raise ValueError("invalid generation settings: " + "; ".join(problems))


def check_talk_audio(audio_frames: int, settings: GenerationSettings, source: str | Path) -> None:
    """Refuse audio shorter than one clip: a Talk clip is driven by its audio, and silence padded over most of
    the only clip would hide the user's mistake (a wrong file, or frames_per_clip too long for a short line)."""
    frames = settings.frames_per_clip
    if audio_frames < frames:
        raise AudioError(
            f"the audio of {source} lasts {audio_frames / settings.fps:.2f} s ({audio_frames} frames at "
            f"{settings.fps} fps), shorter than one clip ({frames} frames, {frames / settings.fps:.2f} s); give a "
            "longer audio or lower frames_per_clip (4k+1)"
        )


# -- where a video goes ------------------------------------------------------------------------------------------
def parts_dir(output: Path) -> Path:
    """``<output>.parts/``: the finished clips and the state of a run in progress."""
    return output.with_name(output.name + ".parts")


def sidecar_path(output: Path) -> Path:
    return output.with_suffix(".json")


def side_by_side_path(output: Path) -> Path:
    """``<output stem>.sbs.mp4``: Dance's reference | pose | generated video."""
    return output.with_name(output.stem + ".sbs.mp4")


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a finished video unless asked to: ``output`` exists and no interrupted run of it
    (``<output>.parts/state.json``) is being resumed."""
    resuming = resume and (parts_dir(output) / "state.json").is_file()
    if output.exists() and not overwrite and not resuming:
        raise FileExistsError(
            f"{output} already exists; pass overwrite=true to replace it, or choose another output=<path>"
        )
