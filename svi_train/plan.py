"""What a training run can check before torch and Lightning load (seconds, far more on a busy machine): every
config group's settings, the model's spec, the shards and the checkpoint to resume from. ``python -m svi_train``
answers a mistake in these at once; :func:`svi_train.run.train` then trains from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from svi_infer.errors import UserError
from svi_infer.settings import HANDOFFS
from svi_infer.spec import ModelSpec, get_spec
from svi_train.checkpoints import resume_checkpoint
from svi_train.config import (
    SCHEMAS,
    CallbackSettings,
    ConditioningSettings,
    DataConfig,
    ExpertSettings,
    LoggerSettings,
    LoraSettings,
    OptimSettings,
    RecyclingConfig,
    TrainerSettings,
    typed,
)
from svi_train.shards import check_shards_handoff, read_index, shard_files


@dataclass(frozen=True)
class TrainPlan:
    """The composed config, its settings typed and checked, and the files the run reads."""

    cfg: DictConfig  # model.*, variant.*, seed, run_name: read where they are used
    spec: ModelSpec
    run_dir: Path
    lora: LoraSettings
    recycling: RecyclingConfig
    data: DataConfig
    trainer: TrainerSettings
    logger: LoggerSettings
    callbacks: CallbackSettings
    optim: OptimSettings
    conditioning: ConditioningSettings
    experts: ExpertSettings
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
    handoff = check_spec_handoff(spec, cfg.variant.get("handoff", "pixel"))
    data: DataConfig = settings["data"]
    index = read_index(data.path)
    if index["spec"] != spec.id and get_spec(index["spec"]).family != spec.family:
        raise UserError(f"the shards in {data.path} were encoded for {index['spec']}, not {spec.id}")
    check_shards_handoff(index, data, handoff)
    run_dir = Path(cfg.output_dir)
    return TrainPlan(
        cfg=cfg,
        spec=spec,
        run_dir=run_dir,
        **settings,
        trained=trained,
        index=index,
        shards=shard_files(data.path, index),
        resume=resume_checkpoint(cfg.resume, run_dir),
    )


def check_spec_handoff(spec: ModelSpec, handoff: str) -> str:
    """``variant.handoff`` for training; TI2V-5B has no y channels, so only the latent hand-off fits it."""
    if handoff not in HANDOFFS:
        raise ValueError(f"variant.handoff must be one of {HANDOFFS}, got {handoff!r}")
    if handoff == "pixel" and not spec.conditioning_by_concat:
        raise ValueError(
            f"{spec.id} conditions by replacing its first latent frames (no y channels): train it with "
            "variant.handoff=latent (+experiment=wan22_5b) on shards prepared with handoff=latent"
        )
    return handoff
