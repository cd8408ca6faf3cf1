"""The two strategy protocols a variant is made of, and what they exchange.

:class:`Conditioning` is also the text-only behaviour (Shot, Film, Tom & Jerry): every method is the plain case, and
Talk and Dance override what they add. Its torch-free part (names, checks, input planning) runs before torch
loads; the runtime part imports what it needs when it runs. :class:`Handoff` is what one clip carries into the next.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image
    from torch import Tensor

    from svi_infer.model import WanModel
    from svi_infer.sampler import Guidance, PassInputs
    from svi_infer.settings import GenerationSettings
    from svi_infer.spec import ModelSpec

# what a generation may be given beside image and prompts, and the variant that takes each
INPUT_OWNERS = {
    "audio": "Talk (variant.conditioning=audio, +experiment=talk)",
    "pose": "Dance (variant.conditioning=pose, +experiment=dance)",
    "side_by_side": "Dance (variant.conditioning=pose, +experiment=dance): it shows reference | pose | generated",
}


@dataclass(frozen=True)
class Dropped:
    """What one training sample loses this step: the audio (Talk), the pose, and y with the CLIP tokens (Dance)."""

    audio: bool = False
    pose: bool = False
    image: bool = False  # y (mask included) and the CLIP image tokens; no y error is injected then


@dataclass
class ClipContext:
    """One clip's place in a long video, as a conditioning needs it."""

    index: int
    frames_per_clip: int
    overlap_frames: int


@dataclass
class RunInputs:
    """The conditioning's inputs of one generation, once planned: files, and what the sidecar says about them."""

    files: dict[str, Any] = field(default_factory=dict)  # e.g. {"audio": Path}, {"pose": Path, "side_by_side": True}
    record: dict[str, Any] = field(default_factory=dict)  # the sidecar's entries about them
    identity: dict[str, Any] = field(default_factory=dict)  # what must match to resume: contents, not paths


class Conditioning:
    """What a clip is conditioned on beyond image and text, in training and in generation; this base is text only.

    Subclasses set ``name`` (the ``variant.conditioning`` value), ``label`` (the variant's name in messages) and
    ``inputs`` (the generation inputs it takes, among :data:`INPUT_OWNERS`), and override what they add.
    """

    name: ClassVar[str] = "text"
    label: ClassVar[str] = "text only"
    inputs: ClassVar[tuple[str, ...]] = ()
    fps: ClassVar[float | None] = None  # a frame rate the conditioning is tied to (Talk's audio windows)
    prepare_flags: ClassVar[tuple[str, ...]] = ()  # the data_tools overrides whose shards feed it

    def __init__(self, **_settings: Any) -> None:
        """Constructors take their training dropout and runtime files by keyword, each what it uses, so one
        config builds any conditioning."""

    # -- checks (torch-free) -------------------------------------------------------------------------------------
    def check_base(self, spec: ModelSpec, training: bool) -> None:
        """Refuse a base model the conditioning cannot run on."""

    def plan_inputs(self, given: dict[str, Any], settings: GenerationSettings, spec: ModelSpec) -> RunInputs:
        """Check the generation inputs (``given``: :data:`INPUT_OWNERS`' keys as the user set them) before torch loads:
        an input of another variant is refused, one this variant needs must be there and readable."""
        for key, owner in INPUT_OWNERS.items():
            if given.get(key) and key not in self.inputs:
                raise ValueError(f"{key}= is for {owner}; this run's conditioning is {self.name}")
        return RunInputs()

    def check_adapters(self, adapters: list) -> None:
        """Refuse a generation whose adapters cannot carry this conditioning."""

    def check_training(self, spec: ModelSpec, fps: float | None, shard_fps: float, preview: bool) -> None:
        """Refuse training settings that would fail only once the model is built (``fps``: variant.fps;
        ``preview``: rollout previews asked for)."""

    def check_frame_rate(self, fps: float | None, shard_fps: float, preview: bool) -> None:
        """For conditionings that follow the video frames: the shards' rate must be the variant's, and rollout
        previews (which feed text only) cannot run."""
        if fps is not None and float(fps) != float(shard_fps):
            raise ValueError(
                f"variant.fps={fps}, but the shards were prepared at {shard_fps} fps: the {self.name} conditioning "
                f"follows the video frames, so prepare them with fps={fps} (or set variant.fps)"
            )
        if preview:
            raise ValueError(
                f"callbacks.preview_every_n_steps: rollout previews do not feed {self.name} conditioning; set it to "
                "0 and generate with svi_infer from the exported adapters instead"
            )

    # -- generation (torch) --------------------------------------------------------------------------------------
    def attach(self, model: WanModel, inputs: RunInputs) -> None:
        """Add this conditioning's modules to the model, before the adapters load (their LoRA may reach them)."""

    def check_model(self, model: WanModel) -> None:
        """Refuse a model without the modules this conditioning drives (after the adapters loaded)."""

    def prepare(self, inputs: RunInputs, settings: GenerationSettings) -> None:
        """Read the run's inputs once, before the first clip; fill ``inputs.record`` and ``inputs.identity``."""

    def num_clips(self, settings: GenerationSettings) -> int | None:
        """The clips the inputs call for when ``num_clips`` is null (None: no opinion)."""
        return None

    def passes(
        self, clip: ClipContext, settings: GenerationSettings, text: Tensor, negative: Tensor, image: Tensor | None
    ) -> tuple[dict[str, PassInputs], Guidance]:
        """The guidance passes of one clip and how their velocities combine (text CFG)."""
        from svi_infer.sampler import PassInputs, TextGuidance

        inputs = {"cond": PassInputs(text, image), "uncond": PassInputs(negative, image)}
        return inputs, TextGuidance(settings.cfg_scale)

    def during_clip(self, model: WanModel, clip: ClipContext) -> AbstractContextManager:
        """Inputs that live on the model while one clip is sampled (Dance's pose), removed after."""
        return nullcontext()

    def clip_extras(self, anchor: Image.Image, clip: ClipContext, kept: np.ndarray, parts: Path) -> dict[str, str]:
        """Extra per-clip files (Dance's side-by-side) written into ``parts`` before the clip is recorded done:
        ``{name: file name}``, kept in the run state as the clip's ``extra_segments``."""
        return {}

    def finish(self, output: Path, parts: Path, inputs: RunInputs, clips: list[dict]) -> dict[str, str]:
        """Finish the joined video (Talk muxes the audio) and join the extra per-clip files from ``parts``; returns
        the sidecar's entries about them."""
        return {}

    # -- training (torch) ----------------------------------------------------------------------------------------
    def attach_training(self, model: WanModel, transformer: torch.nn.Module, seed: int) -> None:
        """Add this conditioning's modules for training; call after ``add_adapter``."""

    def draw_dropout(self, generator: torch.Generator) -> Dropped:
        """One sample's conditioning dropout. Text only draws nothing, so its random stream stays as it was."""
        return Dropped()

    def set_batch(self, transformer: torch.nn.Module, batch: dict, dropped: list[Dropped]) -> None:
        """Put the batch's conditioning (with this step's dropout) on the transformer before its forward."""


class Handoff(Protocol):
    """What one clip carries into the next, in generation and in training."""

    name: str
    padded: bool  # whether ref_pad_num applies
    counts: str  # the setting (and VariantSpec field) saying how much is carried: motion_frames or motion_latents

    def check_base(self, spec: ModelSpec) -> None: ...

    def problems(self, settings: GenerationSettings, spec: ModelSpec) -> list[str]: ...

    def overlap_frames(self, settings: GenerationSettings) -> int: ...

    def clip_conditioning(
        self, model: WanModel, anchor: Tensor, anchor_latent: Tensor | None, tail: Tensor | None, settings
    ) -> tuple[Tensor | None, Tensor | None, Tensor]: ...

    def anchor_latent(self, model: WanModel, anchor: Tensor) -> Tensor | None: ...

    def tail(self, frames: np.ndarray, latents: Tensor, settings: GenerationSettings) -> Tensor: ...

    def training_inputs(
        self, batch: dict, counts: tuple[int, ...], p_more: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, int, int]: ...
