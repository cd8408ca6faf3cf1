"""What a training run can check before torch and Lightning load (seconds, far more on a busy machine): every
config group's settings, the model's spec, the shards and the checkpoint to resume from. ``python -m svi_train``
answers a mistake in these at once; :func:`svi_train.run.train` then trains from the plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from svi_infer.errors import UserError
from svi_infer.settings import GenerationSettings, variant_keys
from svi_infer.spec import ModelSpec, get_spec
from svi_infer.variants import VariantSpec, make_conditioning, make_handoff, renamed_key_message
from svi_infer.variants.base import Conditioning, Handoff
from svi_train.checkpoints import resume_checkpoint
from svi_train.config import (
    ONE_DEVICE_OFFLOAD,
    SCHEMAS,
    CallbackSettings,
    DataConfig,
    ExpertSettings,
    LoggerSettings,
    LoraSettings,
    MemorySettings,
    OptimSettings,
    RecyclingConfig,
    TrainerSettings,
    typed,
)
from svi_train.remote import shown
from svi_train.shards import check_trained_variant, read_index, shard_files, shards_variant


@dataclass(frozen=True)
class TrainPlan:
    """The composed config, its settings typed and checked, and the files the run reads."""

    cfg: DictConfig  # model.*, seed, run_name: read where they are used
    spec: ModelSpec
    variant: VariantSpec  # what this run trains: checked against the shards, written into svi.json
    defaults: dict[str, Any]  # variant.*: the generation defaults the adapters record
    conditioning: Conditioning  # the variant's strategies, with their training settings
    handoff: Handoff
    run_dir: Path
    lora: LoraSettings
    recycling: RecyclingConfig
    data: DataConfig
    trainer: TrainerSettings
    logger: LoggerSettings
    callbacks: CallbackSettings
    optim: OptimSettings
    experts: ExpertSettings
    memory: MemorySettings
    trained: tuple[str, ...]  # the experts this run trains, in the spec's order
    index: dict  # the shards' index.json
    shards: list[str]  # the shard files, every one present
    resume: str | None  # a readable checkpoint file or DeepSpeed directory


def plan(cfg: DictConfig) -> TrainPlan:
    """Type and check ``cfg`` (a composed ``conf/train.yaml``) and the files it names; raises a user error."""
    spec = get_spec(cfg.model.spec)
    if cfg.model.path is None and spec.needs_path:
        raise ValueError(f"model.path is required for {spec.id} (or train the tiny model: +experiment=tiny)")
    settings = {group: typed(cfg, group) for group in SCHEMAS}
    experts, trainer = settings["experts"], settings["trainer"]
    trained = experts.trained(spec.experts)
    if experts.offload_idle and (trainer.strategy != "auto" or str(trainer.devices) != "1"):
        raise ValueError(
            "experts.offload_idle moves the idle expert between devices, which works on one device only: use it "
            f"with trainer.strategy=auto trainer.devices=1 (got {trainer.strategy}, devices={trainer.devices})"
        )
    if settings["callbacks"].preview_every_n_steps and trainer.strategy in ("deepspeed_z3", "fsdp"):
        raise ValueError(
            f"callbacks.preview_every_n_steps: previews run the DiT on rank 0 alone, which trainer.strategy="
            f"{trainer.strategy} shards across ranks (it hangs or fails); set callbacks.preview_every_n_steps=0"
        )
    memory, optim, sharded = settings["memory"], settings["optim"], trainer.strategy.startswith(("deepspeed", "fsdp"))
    if memory.base_dtype != "auto" and sharded:
        raise ValueError(
            f"memory.base_dtype={memory.base_dtype}: trainer.strategy={trainer.strategy} sets the base's dtype itself "
            "(DeepSpeed casts the whole module, FSDP flattens each block into one dtype); use memory.base_dtype=auto"
        )
    precision = str(trainer.precision)
    if memory.base_dtype == "fp8" and precision.endswith("-true") and not precision.startswith(("32", "64")):
        raise ValueError(
            f"memory.base_dtype=fp8: trainer.precision={precision} makes Lightning cast the whole module, the float8 "
            "base and the LoRA, to 16 bits; use trainer.precision=bf16-mixed"
        )
    if memory.offload == "group":
        # devices=auto (trainer=gpu) is one device on a one-GPU machine: SVILitModule.setup checks the count it gets
        if trainer.strategy != "auto" or str(trainer.devices) not in ("1", "auto") or trainer.num_nodes != 1:
            raise UserError(ONE_DEVICE_OFFLOAD + f" (got {trainer.strategy}, devices={trainer.devices})")
        if experts.offload_idle:
            raise ValueError(
                "memory.offload=group already keeps both experts' base layers on the CPU; leave experts.offload_idle "
                "off (it would move whole experts under the offload hooks)"
            )
        if not optim.checkpointing(spec):
            raise ValueError(
                "memory.offload=group needs gradient checkpointing: without it the backward keeps the GPU copy of "
                "every offloaded layer until the step ends, so nothing is saved; set optim.gradient_checkpointing=true"
            )
        if memory.blocks_per_group != 1:
            raise ValueError(
                f"memory.blocks_per_group={memory.blocks_per_group}: training moves each linear layer of the base on "
                "its own (a group of blocks would take the blocks' LoRA and gradients to the CPU with it); leave it at "
                "1 (it groups blocks in inference)"
            )
    if optim.optimizer == "adamw8bit" and trainer.strategy.startswith("deepspeed"):
        raise ValueError(
            f"optim.optimizer=adamw8bit: trainer.strategy={trainer.strategy} wraps the optimizer in DeepSpeed's own, "
            "which partitions its state itself; use optim.optimizer=adamw"
        )
    if optim.optimizer == "adamw8bit" and trainer.offload:
        raise ValueError(
            "optim.optimizer=adamw8bit and trainer.offload both shrink the optimizer state on the GPU (8-bit moments, "
            "or the state on the CPU): choose one"
        )
    defaults = variant_defaults(cfg)
    handoff = make_handoff(defaults["handoff"])
    handoff.check_base(spec)
    dropout = settings.pop("conditioning")
    multitalk = OmegaConf.select(cfg, "model.multitalk", default=None)
    conditioning = make_conditioning(defaults["conditioning"], **asdict(dropout), multitalk=multitalk)
    conditioning.check_base(spec, training=True)
    data: DataConfig = settings["data"]
    counts = handoff.counts  # motion_frames (pixel) or motion_latents (latent): the only ones this run draws
    ref_pad_num = defaults["ref_pad_num"]
    variant = VariantSpec(conditioning.name, handoff.name, ref_pad_num, data.motion_frames, data.motion_latents)
    variant = variant.carried_only()
    if defaults[counts] not in getattr(variant, counts):
        raise UserError(
            f"variant.{counts}={defaults[counts]} (what generation carries by default) is not among the counts "
            f"this run trains, data.{counts}={list(getattr(variant, counts))}: add it there, or change variant"
        )
    index = read_index(data.path)
    if index["spec"] != spec.id and get_spec(index["spec"]).family != spec.family:
        raise UserError(f"the shards in {shown(data.path)} were encoded for {index['spec']}, not {spec.id}")
    check_trained_variant(shards_variant(index, data.path, conditioning.name), variant, data.path, index)
    conditioning.check_training(
        spec, defaults.get("fps"), index["fps"], settings["callbacks"].preview_every_n_steps > 0
    )
    run_dir = Path(cfg.output_dir)
    return TrainPlan(
        cfg=cfg,
        spec=spec,
        variant=variant,
        defaults=defaults,
        conditioning=conditioning,
        handoff=handoff,
        run_dir=run_dir,
        **settings,
        trained=trained,
        index=index,
        shards=shard_files(data.path, index),
        resume=resume_checkpoint(cfg.resume, run_dir),
    )


def variant_defaults(cfg: DictConfig) -> dict[str, Any]:
    """``variant.*``: svi_infer's generation settings (their defaults in the adapters this run writes), each key
    checked against them, and the variant's own choices filled in (text conditioning, pixel hand-off)."""
    values = OmegaConf.to_container(cfg.variant, resolve=True)
    known = variant_keys()
    for key in values:
        if key not in known:
            raise UserError(
                renamed_key_message(f"variant.{key}")
                or f"unknown key variant.{key}: variant takes {', '.join(sorted(known))} (svi_infer's settings)"
            )
    builtin = {f.name: f.default for f in fields(GenerationSettings)}
    chosen = {k: builtin[k] for k in ("conditioning", "handoff", "ref_pad_num", "motion_frames", "motion_latents")}
    return chosen | {k: v for k, v in values.items() if v is not None}


if __name__ == "__main__":  # python -m svi_train.plan <overrides>: the memory plan (svi_train.memory_plan)
    import sys

    from svi_train.memory_plan import main

    main(sys.argv[1:])
