"""From a composed ``conf/train.yaml`` (checked by :mod:`svi_train.plan`) to a trained, exported adapter."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from svi_infer.atomic import write_with
from svi_infer.settings import GenerationSettings
from svi_train.callbacks import AdapterExport, RolloutPreview, StepProgress
from svi_train.checkpoints import CHECKPOINT_DIR
from svi_train.config import LoggerSettings
from svi_train.data import WdsDataModule
from svi_train.memory_plan import check_fits, run_memory
from svi_train.module import SVILitModule
from svi_train.plan import TrainPlan, plan
from svi_train.recycling.capacity import announce_bank_capacity
from svi_train.strategies import make_strategy


def make_logger(settings: LoggerSettings, run_dir: Path, name: str):
    if settings.kind == "none":
        return False
    if settings.kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv")
    if settings.kind != "wandb":
        raise ValueError(f"logger.kind must be wandb, csv or none, got {settings.kind!r}")
    offline = settings.offline if settings.offline is not None else not os.environ.get("WANDB_API_KEY")
    return WandbLogger(project=settings.project, name=name, save_dir=str(run_dir), offline=offline)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename: a kill or a full disk leaves the previous one intact."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save = super().save_checkpoint
        write_with(path, lambda tmp: save(checkpoint, tmp, storage_options))


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] | None = None) -> Path:
    """Check, then train; returns the final adapter directory. ``callbacks``: see :func:`train`."""
    return train(plan(cfg), callbacks)


def train(checked: TrainPlan, callbacks: Sequence[L.Callback] | None = None) -> Path:
    """Train from a checked plan; returns the final adapter directory.

    ``callbacks``: extra Lightning callbacks, appended after the run's own (export, checkpoints, logging, previews).
    """
    extra = list(callbacks or [])
    cfg, spec, data, index, run_dir = checked.cfg, checked.spec, checked.data, checked.index, checked.run_dir
    trainer_cfg, callbacks_cfg = checked.trainer, checked.callbacks
    # the memory plan's line, and a refusal when it cannot fit the GPU (memory.gpu_gib or the device's size)
    check_fits(run_memory(cfg, index), trainer_cfg.accelerator)
    L.seed_everything(cfg.seed, workers=True)
    # the byte cap resolved once (auto: from this host's memory), printed per bank, warned below 500 per grid
    recycling = announce_bank_capacity(checked.recycling, spec, index, trainer_cfg.devices, trainer_cfg.accelerator)
    module = SVILitModule(
        spec,
        cfg.model.path,
        checked.lora,
        recycling,
        checked.optim,
        variant=checked.variant,
        conditioning=checked.conditioning,
        defaults=checked.defaults,
        p_more_motion=data.p_more_motion,
        seed=cfg.seed,
        save_banks=callbacks_cfg.save_banks,
        experts=checked.experts,
        memory=checked.memory,
        trainer=trainer_cfg,
    )
    export = AdapterExport(run_dir / "adapters", callbacks_cfg.export_every_n_steps)
    callbacks = [
        export,
        ModelCheckpoint(
            dirpath=run_dir / CHECKPOINT_DIR,
            filename="step{step:09d}",  # no '=' in the name: it can be passed as a Hydra override unquoted
            auto_insert_metric_name=False,
            every_n_train_steps=trainer_cfg.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=-1,
        ),
    ]
    logger = make_logger(checked.logger, run_dir, cfg.run_name)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))  # logged as lr-AdamW
    live = trainer_cfg.enable_progress_bar and sys.stdout.isatty()
    callbacks.append(StepProgress(trainer_cfg.log_every_n_steps, live=live))
    if callbacks_cfg.preview_every_n_steps:
        frames = callbacks_cfg.preview_frames or index["frames_per_clip"]
        settings = GenerationSettings(
            num_clips=callbacks_cfg.preview_clips,
            frames_per_clip=frames,
            steps=callbacks_cfg.preview_steps or spec.steps,
            height=index["resolutions"][0][0],
            width=index["resolutions"][0][1],
            fps=int(index["fps"]),
            **checked.defaults,
        )
        settings.validate(spec)
        callbacks.append(
            RolloutPreview(
                run_dir / "previews",
                callbacks_cfg.preview_every_n_steps,
                settings,
                list(callbacks_cfg.preview_prompts),
                callbacks_cfg.preview_image,
            )
        )
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=make_strategy(
            trainer_cfg.strategy,
            trainer_cfg.accelerator,
            offload=trainer_cfg.offload,
            # one expert's LoRA idles each step
            unused_parameters=len(checked.trained) > 1 and not checked.experts.shared_lora,
        ),
        precision=trainer_cfg.precision,
        max_steps=trainer_cfg.max_steps,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        enable_progress_bar=False,  # StepProgress: Lightning's bars count epochs of an endless stream
        callbacks=[*callbacks, *extra],
        logger=logger,
        plugins=[] if trainer_cfg.strategy.startswith("deepspeed") else [AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
    )
    trainer.fit(
        module,
        datamodule=WdsDataModule(data, checked.shards, seed=cfg.seed, text_len=spec.text_len),
        ckpt_path=checked.resume,
    )
    return run_dir / "adapters" / "final"
