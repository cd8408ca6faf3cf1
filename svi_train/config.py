"""Typed schemas for the training config groups, registered with Hydra so a typo or a wrong type fails when
the config is composed, not hours into a run. The classes are plain dataclasses; only this module knows Hydra.

Torch-free on purpose (like every schema here, the recycling and data ones included): ``python -m svi_train``
composes the config and answers ``--help``, ``--cfg job`` or a mistake before torch and Lightning load.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from svi_infer.errors import UserError

if TYPE_CHECKING:
    from svi_infer.spec import ModelSpec

SVI_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")  # SVI's q,k,v,o,ffn.0,ffn.2


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA on the DiT (SVI: r = alpha = 128 on self/cross-attention q, k, v, o and both FFN layers)."""

    rank: int = 128
    alpha: float = 128.0
    target_modules: tuple[str, ...] = SVI_TARGETS
    init: str = "kaiming"  # peft's default init (A kaiming-uniform, B zero); "gaussian" also works


OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes' AdamW8bit: 8-bit moments, ~1/4 of AdamW's state)
    timesteps: str = "shifted_uniform"  # SVI's table with its bell-shaped loss weight | logit_normal
    gradient_checkpointing: bool | None = None  # None: on for real models, off for the tiny and bundled ones
    max_nonfinite_in_row: int = 5  # non-finite losses are skipped; this many in a row stop the run

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    def checkpointing(self, spec: ModelSpec) -> bool:
        """Whether the DiT blocks recompute their activations in the backward pass: as set, else on for real
        models (a 14B step at 81x480x832 otherwise keeps ~40 blocks of 32,760-token activations) and off for the
        tiny and bundled toy models, where it would only cost time."""
        return spec.needs_path if self.gradient_checkpointing is None else self.gradient_checkpointing


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
    log_every_n_steps: int = 10  # metrics, and a progress line (step/max_steps, loss, s/step, eta)
    enable_progress_bar: bool = True  # on a terminal, redraw the progress line every step (lines: always)
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
    pose_extra_dropout: float = 0.0  # Dance: a second, independent draw that zeroes the pose (SVI: 0.1)
    image_dropout: float = 0.0  # Dance: y and the CLIP tokens zeroed, no y error; independent of the pose (SVI: 0.1)
    pose_encoder: str | None = None  # Dance: initial pose encoder weights (dwpose_embedding.*); None: random init

    def __post_init__(self) -> None:
        for name in ("audio_dropout", "pose_dropout", "pose_extra_dropout", "image_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"conditioning.{name} must be a probability in [0, 1], got {value!r}")


BASE_DTYPES = ("auto", "bf16", "fp8")
ONE_DEVICE_OFFLOAD = (
    "memory.offload=group works on one device only (DDP broadcasts, DeepSpeed and FSDP move, cast or shard the whole "
    "module, offloaded layers included): use it with trainer.strategy=auto trainer.devices=1"
)
OFFLOAD_CHOICES = ("none", "group")


@dataclass(frozen=True)
class MemorySettings:
    """How the frozen base DiT is held during training (the LoRA, its gradients and optimizer state never change
    dtype or device): its storage dtype and whether its blocks stay on the GPU; :mod:`svi_train.plan` predicts
    what each choice costs and refuses a run that will not fit."""

    base_dtype: str = "auto"  # auto: bf16 under bf16 precision, else fp32 | bf16 | fp8 (float8 storage, bf16 compute)
    offload: str = "none"  # none | group: the base's blocks live on the CPU, blocks_per_group at a time on the GPU
    blocks_per_group: int = 1  # offload=group: blocks moved to the GPU together
    gpu_gib: float | None = None  # the GPU size the plan is checked against; None: the device's own (CPU: none)
    ignore_plan: bool = False  # start even when the memory plan says the run will not fit the GPU

    def __post_init__(self) -> None:
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"memory.base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")
        if self.offload not in OFFLOAD_CHOICES:
            raise ValueError(f"memory.offload must be one of {OFFLOAD_CHOICES}, got {self.offload!r}")
        if not _is_int(self.blocks_per_group) or self.blocks_per_group < 1:
            raise ValueError(f"memory.blocks_per_group must be an integer >= 1, got {self.blocks_per_group!r}")
        if self.gpu_gib is not None and (not _is_number(self.gpu_gib) or self.gpu_gib <= 0):
            raise ValueError(f"memory.gpu_gib must be a number of GiB > 0 or null, got {self.gpu_gib!r}")

    def storage(self, trainer: TrainerSettings) -> str:
        """``base_dtype`` resolved: ``auto`` is bf16 storage under a bf16 precision (a 14B base in fp32 is 56 GB)
        and fp32 otherwise, and always fp32 under DeepSpeed and FSDP, whose own precision handling casts (DeepSpeed
        bf16) or computes in bf16 from fp32 shards (FSDP mixed precision), and which need one dtype per flattened
        block."""
        if self.base_dtype != "auto":
            return self.base_dtype
        if trainer.strategy.startswith(("deepspeed", "fsdp")) or "bf16" not in str(trainer.precision):
            return "fp32"
        return "bf16"


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


REPLACEMENT_POLICIES = ("random", "fifo", "nearest_l2")
STORAGE_DTYPE_NAMES = ("bfloat16", "float16", "float32")  # torch dtypes of these names: recycling.config


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RecyclingConfig:
    """Error-Recycling Fine-Tuning (reference/svi.md §1): what to inject, how often, and how the error banks are
    kept; validated once, so a bad value fails at start. Defaults are the shipped SVI-Shot script values (svi.md
    §2.6), which produced the released LoRAs; where the paper differs (``p_clean`` 0.5, warm-up 20) the scripts win.

    ``p_noise``/``p_latent``/``p_cond`` are the per-sample probabilities of adding a banked error to the noise,
    the clean latent and the conditioning latent; ``p_clean`` forces an error-free sample, whose errors enter
    the banks only with probability ``p_clean_update``. ``enabled=False`` is the plain-LoRA baseline: nothing is
    injected and the banks are never updated.
    """

    p_noise: float = 0.01
    p_latent: float = 0.9
    p_cond: float = 0.9
    p_clean: float = 0.2
    p_clean_update: float = 0.1
    num_grids: int = 50  # grid anchors = the inference timesteps of a num_grids-step run
    shift: float = 5.0
    capacity: int = 500  # entries per grid per bank
    replacement: str = "nearest_l2"  # random | fifo | nearest_l2
    warmup_iters: int = 50  # steps during which every rank's errors enter every rank's banks
    cond_error_frames: int = 3  # latent frames of y that receive the conditioning error
    cond_from_all_grids: bool = True
    modulation: float = 0.0  # each sampled error is scaled by U(1 - modulation, 1 + modulation)
    storage_dtype: str = "bfloat16"
    # bytes per bank per rank; auto: half the host's available memory / ranks on the node / 2 banks (recycling.capacity)
    max_bytes_per_bank: int | str = "auto"
    sketch_size: int = 4096  # coordinates per entry sketch used by nearest_l2
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("p_noise", "p_latent", "p_cond", "p_clean", "p_clean_update"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("num_grids", "capacity", "cond_error_frames", "sketch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_bytes_per_bank != "auto" and (not _is_int(self.max_bytes_per_bank) or self.max_bytes_per_bank < 1):
            raise ValueError(f"max_bytes_per_bank must be auto or an integer >= 1, got {self.max_bytes_per_bank!r}")
        if not _is_int(self.warmup_iters) or self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be an integer >= 0, got {self.warmup_iters!r}")
        if not _is_number(self.shift) or self.shift <= 0:
            raise ValueError(f"shift must be a number > 0, got {self.shift!r}")
        if not _is_number(self.modulation) or not 0.0 <= self.modulation <= 1.0:
            raise ValueError(f"modulation must be in [0, 1] (scale U(1-f, 1+f)), got {self.modulation!r}")
        if self.replacement not in REPLACEMENT_POLICIES:
            raise ValueError(f"replacement must be one of {REPLACEMENT_POLICIES}, got {self.replacement!r}")
        if self.storage_dtype not in STORAGE_DTYPE_NAMES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPE_NAMES}, got {self.storage_dtype!r}")
        for name in ("cond_from_all_grids", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they stream."""

    path: str = "???"  # a data_tools output folder, or a URL (https://, s3://, gs://) or pipe: command with {name}
    batch_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 64
    resampled: bool = False  # endless sampling with replacement (multi-node); else epochs over the shards
    motion_frames: tuple[int, ...] = (1,)  # conditioning variants to draw from (must be in the shards)
    p_more_motion: float = 0.9  # with several: the largest count with this probability, else the smallest
    motion_latents: tuple[int, ...] = (0, 1)  # latent hand-off: motion latents to draw (0 = a clip-0 sample)
    max_skip_ratio: float = 0.1  # stop when more than this share of samples/shards cannot be used
    retries: int = 3  # a remote shard or index.json whose connection drops is reopened this often (0.5 s, 1 s, 2 s)


SCHEMAS: dict[str, type] = {
    "lora": LoraSettings,
    "recycling": RecyclingConfig,
    "data": DataConfig,
    "trainer": TrainerSettings,
    "logger": LoggerSettings,
    "callbacks": CallbackSettings,
    "optim": OptimSettings,
    "conditioning": ConditioningSettings,
    "experts": ExpertSettings,
    "memory": MemorySettings,
}


def typed(cfg: DictConfig, group: str) -> Any:
    """The settings of ``group`` as its frozen dataclass (lists become tuples).

    Hydra's struct mode refuses a misspelt key, but one added with ``+`` (``+optim.lrr=1e-4``) gets past it; it is
    refused here, with the keys the group takes.
    """
    schema = SCHEMAS[group]
    values = OmegaConf.to_container(cfg[group], resolve=True)
    known = [f.name for f in fields(schema)]
    unknown = [key for key in values if key not in known]
    if unknown:
        raise UserError(
            f"unknown key {', '.join(f'{group}.{key}' for key in unknown)}: {group} takes {', '.join(known)} "
            "(python -m svi_train --cfg job prints every key)"
        )
    return schema(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def register() -> None:
    """Make the schemas available as ``<group>/schema`` for the YAML files to extend."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        schema = OmegaConf.structured(node)
        OmegaConf.set_readonly(schema, False)  # frozen in code, but YAML files and overrides must set fields
        cs.store(group=group, name="schema", node=schema)
