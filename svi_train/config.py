"""Typed schemas for the training config groups, registered with Hydra so a typo or a wrong type fails when
the config is composed, not hours into a run. The classes are plain dataclasses; only this module knows Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from svi_train.data import DataConfig
from svi_train.recycling import RecyclingConfig

SVI_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")  # SVI's q,k,v,o,ffn.0,ffn.2


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA on the DiT (SVI: r = alpha = 128 on self/cross-attention q, k, v, o and both FFN layers)."""

    rank: int = 128
    alpha: float = 128.0
    target_modules: tuple[str, ...] = SVI_TARGETS
    init: str = "kaiming"  # peft's default init (A kaiming-uniform, B zero); "gaussian" also works


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    timesteps: str = "shifted_uniform"  # SVI's table with its bell-shaped loss weight | logit_normal
    gradient_checkpointing: bool = False
    max_nonfinite_in_row: int = 5  # non-finite losses are skipped; this many in a row stop the run


@dataclass(frozen=True)
class TrainerSettings:
    """The Lightning Trainer arguments this project sets (anything else keeps Lightning's default)."""

    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | deepspeed_z2 | deepspeed_z3 | fsdp (svi_train.strategies) | a Lightning name
    precision: str = "32-true"  # "bf16-mixed" on GPUs
    max_steps: int = 1000
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    checkpoint_every_n_steps: int = 100
    offload: bool = False  # deepspeed_z2: optimizer state to CPU; deepspeed_z3: + parameters; fsdp: parameters


@dataclass(frozen=True)
class LoggerSettings:
    kind: str = "wandb"  # wandb | csv | none
    project: str = "svi"
    offline: bool | None = None  # None: offline unless WANDB_API_KEY is set


@dataclass(frozen=True)
class CallbackSettings:
    export_every_n_steps: int = 100
    preview_every_n_steps: int = 0  # 0 = no rollout preview
    preview_image: str | None = None  # None: the first frame of the first training sample
    preview_prompts: tuple[str, ...] = ("a video",)
    preview_clips: int = 3
    preview_frames: int | None = None  # None: the training clip length
    preview_steps: int | None = None  # None: the model's default
    save_banks: bool = True  # error banks in checkpoints: exact resume, at the cost of their size


@dataclass(frozen=True)
class ConditioningSettings:
    """Training-only settings of the Talk / Dance conditioning (reference/svi.md §3.4, §3.5); the variant itself
    is ``variant.conditioning`` (audio | pose | null). The defaults drop nothing, and text-only experiments never
    draw for it, so their random streams are those of a run without this node."""

    audio_dropout: float = 0.0  # Talk: both audio windows zeroed for the sample (SVI: 0.1)
    pose_dropout: float = 0.0  # Dance: the encoded pose zeroed (SVI: 0.05)
    pose_and_image_dropout: float = 0.0  # Dance: pose, y and the CLIP tokens zeroed, no y error (SVI: 0.1)
    pose_encoder: str | None = None  # Dance: initial pose encoder weights (dwpose_embedding.*); None: random init

    def __post_init__(self) -> None:
        for name in ("audio_dropout", "pose_dropout", "pose_and_image_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"conditioning.{name} must be a probability in [0, 1], got {value!r}")


EXPERT_CHOICES = ("all", "high_noise", "low_noise")


@dataclass(frozen=True)
class ExpertSettings:
    """Which Wan 2.2 A14B experts a run trains (reference/svi.md §6.1). Each trained expert gets its own LoRA and
    only the timesteps of its range (high-noise: ``t >= boundary * 1000``; low-noise: below), one expert per step
    on every rank; one-expert bases (Wan 2.1, TI2V-5B) take the defaults only."""

    train: str = "all"  # all | high_noise | low_noise
    shared_lora: bool = False  # one LoRA shared by both experts (train=all only)
    offload_idle: bool = False  # keep the expert not in use on the CPU (one device; ~33 GB of bf16 per switch)
    high_noise_share: float | None = None  # share of steps for the high-noise expert; None: its share of timesteps

    def __post_init__(self) -> None:
        if self.train not in EXPERT_CHOICES:
            raise ValueError(f"experts.train must be one of {EXPERT_CHOICES}, got {self.train!r}")
        if self.shared_lora and self.train != "all":
            raise ValueError(
                f"experts.shared_lora trains one LoRA on both experts: it needs experts.train=all, not {self.train!r}"
            )
        share = self.high_noise_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1):
            raise ValueError(f"experts.high_noise_share must be in (0, 1) or null, got {share!r}")

    def trained(self, experts: tuple[str, ...]) -> tuple[str, ...]:
        """The experts of ``experts`` (a spec's) this run trains, in the spec's order."""
        if len(experts) == 1:
            if self.train != "all" or self.shared_lora or self.offload_idle:
                raise ValueError(
                    "experts.train / shared_lora / offload_idle choose among Wan 2.2 A14B's two experts; this base "
                    "has one transformer: leave them at their defaults"
                )
            return experts
        return experts if self.train == "all" else (self.train,)


def register() -> None:
    """Make the schemas available as ``<group>/schema`` for the YAML files to extend."""
    cs = ConfigStore.instance()
    for group, node in (
        ("lora", LoraSettings),
        ("recycling", RecyclingConfig),
        ("data", DataConfig),
        ("trainer", TrainerSettings),
        ("logger", LoggerSettings),
        ("callbacks", CallbackSettings),
        ("optim", OptimSettings),
        ("conditioning", ConditioningSettings),
        ("experts", ExpertSettings),
    ):
        schema = OmegaConf.structured(node)
        OmegaConf.set_readonly(schema, False)  # frozen in code, but YAML files and overrides must set fields
        cs.store(group=group, name="schema", node=schema)
