"""The typed schema of ``conf/data_tools.yaml``, registered with Hydra so that a wrong type or an unknown key fails when
the config is composed, before any model loads. Torch-free: ``python -m data_tools`` imports it before anything
heavy, so ``--help``, ``--cfg job`` and config errors answer at once.

The schema holds the types; the values and their documentation stay in ``conf/data_tools.yaml``. :class:`DataSettings`
is what they become once checked (``data_tools.app.settings_from``), also before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from svi_infer.variants import VariantSpec

if TYPE_CHECKING:
    from data_tools.encode import EncodeSettings

SCHEMA_NAME = "data_tools_schema"  # conf/data_tools.yaml's first default
COMMANDS = ("prepare", "scan", "encode", "pack", "verify", "inspect")
# where the latent hand-off's motion latents come from: the previous clip's last latents (SVI 2.0 Pro's authors'
# recipe), or the window's own first frames (this project's layout before)
PRO_MOTIONS = ("continuation", "window")


@dataclass(frozen=True)
class AugmentSettings:
    """The ``augment:`` node of ``conf/data_tools.yaml``. Each knob is its maximum at ``strength: 1``; the effective
    maximum is ``knob * strength`` (the downscale factor: ``1 + (downscale - 1) * strength``); each sample draws
    its value uniformly up to that maximum (symmetrically around no change for the colour knobs)."""

    strength: float = 0.0  # 0 = off
    p: float = 1.0  # share of samples augmented when strength > 0
    blur_sigma: float = 2.0  # Gaussian blur sigma, pixels
    downscale: float = 4.0  # down-then-up-scale factor (1 = none)
    brightness: float = 0.2  # brightness shift, share of the value range
    contrast: float = 0.3  # contrast factor 1 +- this
    saturation: float = 0.3  # saturation factor 1 +- this
    noise: float = 0.05  # std of additive Gaussian noise, in [-1, 1] units

    @property
    def enabled(self) -> bool:
        return self.strength > 0 and self.p > 0

    def check(self) -> None:
        problems = [f"{f.name}={getattr(self, f.name)} must be >= 0" for f in fields(self) if getattr(self, f.name) < 0]
        if not 0 <= self.p <= 1:
            problems.append(f"p={self.p} must be in [0, 1]")
        if self.downscale < 1:
            problems.append(f"downscale={self.downscale} must be >= 1 (1 = no rescaling)")
        if problems:
            raise ValueError("augment: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, node: dict | None) -> AugmentSettings:
        """Settings from a config node (``None``: off); an unknown key fails with the known ones."""
        node = dict(node or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(node) - set(known))
        if unknown:
            raise ValueError(f"augment: unknown keys {unknown}; known keys: {', '.join(known)}")
        settings = cls(**{k: float(v) for k, v in node.items()})
        settings.check()
        return settings


@dataclass(frozen=True)
class DataSettings:
    """Everything that decides which samples a run produces (beyond the model)."""

    frames_per_clip: int = 81
    fps: float = 16.0
    stride: int = 81
    short_videos: str = "skip"  # skip | pad
    buckets: tuple[tuple[int, int], ...] = ((480, 832),)
    crop: str = "center"  # center | random
    motion_frames: tuple[int, ...] = (1,)
    ref_pad_num: int = -1
    anchor: str = "outside"
    fallback_caption: str | None = None
    audio: bool = False
    pose: bool = False
    seed: int = 0
    handoff: str = "pixel"  # pixel | latent (SVI 2.0 Pro)
    motion_latents: tuple[int, ...] = (1,)
    pro_motion: str = "continuation"  # latent: the previous clip's last latents | window: the window's own first
    augment: AugmentSettings = AugmentSettings()
    vae_tiling: bool = False
    vae_tile_size: int = 256
    vae_tile_stride: int = 192

    def encode_settings(self) -> EncodeSettings:
        from data_tools.encode import EncodeSettings

        return EncodeSettings(
            frames_per_clip=self.frames_per_clip,
            fps=self.fps,
            motion_frames=self.motion_frames,
            ref_pad_num=self.ref_pad_num,
            anchor=self.anchor,
            handoff=self.handoff,
            motion_latents=self.motion_latents,
            pro_motion=self.pro_motion,
        )

    def variant(self) -> VariantSpec:
        """The variant these settings prepare shards for (index.json's ``variant``, which training checks its
        config against): the conditioning the extra inputs feed, the hand-off and the motion counts encoded, the
        padding of the conditioning video."""
        if self.audio and self.pose:
            raise ValueError(
                "audio=true and pose=true: a shard folder feeds one conditioning, Talk's audio or Dance's pose; "
                "prepare one folder per variant"
            )
        conditioning = "audio" if self.audio else "pose" if self.pose else "text"
        variant = VariantSpec(conditioning, self.handoff, self.ref_pad_num, self.motion_frames, self.motion_latents)
        return variant.carried_only()


@dataclass
class DataToolsConfig:
    """Types of ``conf/data_tools.yaml``'s keys (each documented there). ``model`` is the shared ``model/`` group, typed
    loosely: svi_infer checks its keys when it builds the model."""

    command: str = MISSING
    input: str = MISSING
    output: str = MISSING
    frames_per_clip: int | None = MISSING
    fps: float | None = MISSING
    stride: int | None = MISSING
    short_videos: str = MISSING
    buckets: Any = MISSING  # null | a preset name | [[h, w], ...]
    crop: str = MISSING
    motion_frames: list[int] = MISSING
    ref_pad_num: int = MISSING
    anchor: str = MISSING
    handoff: str = MISSING
    motion_latents: list[int] = MISSING
    pro_motion: str = MISSING
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    vae_tiling: bool = MISSING
    vae_tile_size: int = MISSING
    vae_tile_stride: int = MISSING
    fallback_caption: str | None = MISSING
    audio: bool = MISSING
    audio_encoder: str | None = MISSING
    pose: bool = MISSING
    shard_max_bytes: float = MISSING
    max_skip_ratio: float = MISSING
    seed: int = MISSING
    shard: str = MISSING  # an index into index.json or a file name
    progress: bool = MISSING
    model: dict[str, Any] = field(default_factory=dict)


def model_names() -> str:
    """The ``model=`` choices (``conf/model/*.yaml``), for ``--help``."""
    return ", ".join(sorted(p.name.removesuffix(".yaml") for p in (files("conf") / "model").iterdir()))


def register() -> None:
    """Store the schema as ``data_tools_schema`` for ``conf/data_tools.yaml`` to extend (idempotent)."""
    schema = OmegaConf.structured(DataToolsConfig)
    for node in (schema, schema.augment):  # frozen in code, but the YAML file and overrides must set the fields
        OmegaConf.set_readonly(node, False)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema)
    if not OmegaConf.has_resolver("data_tools_models"):
        OmegaConf.register_new_resolver("data_tools_models", model_names)


register()
