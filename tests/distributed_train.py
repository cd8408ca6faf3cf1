"""A few tiny-model training steps under one distributed strategy; run by tests/test_distributed.py.

    python tests/distributed_train.py STRATEGY SHARDS OUT [--devices 2] [--steps 3] [--offload] [--precision P]
        [HYDRA_OVERRIDE ...]

Lightning re-executes this script for every rank but the first, so never run it in-process under pytest. The
run goes through ``svi_train.run.run`` with ``trainer=STRATEGY``; the Trainer it builds gets one more callback,
which writes ``OUT/rank{N}.json`` (and rank 0's LoRA weights) for the test to compare.

Until svi_train adopts ``svi_train.strategies`` (run.py building the strategy object; the module's optimizer,
gradient clipping and checkpoint filter; AdapterExport gathering sharded weights), this script stands in for
those changes, each only where the code still lacks it; ``OUT/rank{N}.json`` lists them under ``"stand_ins"``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for the svi_* packages

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import svi_infer.adapters as adapters_module  # noqa: E402
import svi_train.callbacks as callbacks_module  # noqa: E402
import svi_train.module as module_module  # noqa: E402
import svi_train.run as run_module  # noqa: E402
from svi_infer.adapters import save_adapter  # noqa: E402
from svi_train.config import TrainerSettings, register  # noqa: E402
from svi_train.strategies import (  # noqa: E402
    clip_gradients,
    lora_state_dict,
    make_optimizer,
    make_strategy,
    unwrapped_name,
)

STAND_INS: list[str] = []


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.float().numpy().tobytes()).hexdigest()[:16]


class Report(L.Callback):
    """Per-rank facts after training: LoRA digests (of the full weights, gathered where sharded) and banks."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.initial: dict[str, torch.Tensor] = {}

    def setup(self, trainer, module, stage) -> None:  # before the strategy wraps or shards the model
        state = get_peft_model_state_dict(module.transformer, adapter_name=module.ADAPTER)
        self.initial = {k: v.detach().clone() for k, v in state.items()}

    def on_train_end(self, trainer, module) -> None:
        final = lora_state_dict(trainer.strategy, module.transformer, module.ADAPTER)  # a collective
        rank = trainer.global_rank
        banks = {name: getattr(module, f"{name}_errors").state_dict() for name in ("noise", "x0")}
        report = {
            "rank": rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "iteration": module.iteration,
            "strategy": type(trainer.strategy).__name__,
            "optimizer": type(getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])).__name__,
            "stand_ins": STAND_INS,
            "lora": {k: digest(v) for k, v in final.items()},
            "lora_shapes": {k: list(v.shape) for k, v in final.items()},
            "initial_keys": sorted(self.initial),
            "lora_changed": {k: not torch.equal(v, self.initial[k]) for k, v in final.items()},
            "generator": digest(module.generator.get_state()),
            "bank_inserts": {name: bank["inserts"] for name, bank in banks.items()},
            "bank_norms": {name: sorted(n for norms in bank["norms"] for n in norms) for name, bank in banks.items()},
        }
        if rank == 0:
            save_file({k: v.contiguous() for k, v in final.items()}, str(self.out / "lora_rank0.safetensors"))
        (self.out / f"rank{rank}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


def stand_in_for_missing_changes(offload: bool) -> None:
    """Apply the proposed svi_train changes that the code does not have yet (each is named in STAND_INS)."""
    module_cls = module_module.SVILitModule
    if not hasattr(module_module, "make_optimizer"):
        STAND_INS.append("module.configure_optimizers")

        def configure_optimizers(self):
            params = [p for p in self.transformer.parameters() if p.requires_grad]
            o = self.optim
            return make_optimizer(params, self.trainer.strategy, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)

        module_cls.configure_optimizers = configure_optimizers
    if module_cls.configure_gradient_clipping is L.LightningModule.configure_gradient_clipping:
        STAND_INS.append("module.configure_gradient_clipping")

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

        module_cls.configure_gradient_clipping = configure_gradient_clipping
    if not hasattr(callbacks_module, "lora_state_dict"):
        STAND_INS.append("callbacks.AdapterExport")

        def export_on_all_ranks(self, trainer, module, name: str) -> None:
            weights = lora_state_dict(trainer.strategy, module.transformer, module.ADAPTER, rank0_only=True)
            if not trainer.is_global_zero:
                return
            # save_adapter reads the weights with get_peft_model_state_dict: empty shards under ZeRO-3, and under
            # FSDP a collective that hangs on rank 0 alone; it gets the gathered weights instead
            read = adapters_module.get_peft_model_state_dict
            adapters_module.get_peft_model_state_dict = lambda *args, **kwargs: weights
            try:
                self.last = save_adapter(module.transformer, self.dirpath / name, module.adapter_meta(), module.ADAPTER)
            finally:
                adapters_module.get_peft_model_state_dict = read

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
                export_on_all_ranks(self, trainer, module, f"step_{step:06d}")

        def on_train_end(self, trainer, module) -> None:
            export_on_all_ranks(self, trainer, module, "final")

        callbacks_module.AdapterExport.on_train_batch_end = on_train_batch_end
        callbacks_module.AdapterExport.on_train_end = on_train_end
    if not hasattr(module_module, "unwrapped_name"):
        STAND_INS.append("module.on_save_checkpoint")
        save_checkpoint = module_cls.on_save_checkpoint

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            state = dict(checkpoint["state_dict"])
            save_checkpoint(self, checkpoint)
            # under FSDP named_parameters() names carry wrapper segments the state dict's keys do not have
            trainable = {unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}

        module_cls.on_save_checkpoint = on_save_checkpoint
    if not hasattr(run_module, "make_strategy"):
        STAND_INS.append("run.make_strategy")
    if offload and "offload" not in TrainerSettings.__dataclass_fields__:
        STAND_INS.append("config.TrainerSettings.offload")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of conf/train.yaml")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stand_in_for_missing_changes(args.offload)

    overrides = [
        "+experiment=tiny",
        f"trainer={args.strategy}",
        f"trainer.devices={args.devices}",
        f"trainer.max_steps={args.steps}",
        f"trainer.precision={args.precision}",
        f"data.path={args.shards}",
        "data.resampled=true",  # endless on every rank: the tiny set is one shard, and no rank runs out first
        "data.shuffle_buffer=0",
        f"recycling.warmup_iters={args.steps}",  # every step shares its errors across the ranks
        "recycling.p_clean=0.0",  # so that every sample's errors enter the banks
        "logger.kind=none",
        f"output_dir={out / 'run'}",
    ]
    overrides += args.overrides
    if args.offload and "config.TrainerSettings.offload" not in STAND_INS:
        overrides.append("trainer.offload=true")
    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)

    trainer_class = L.Trainer

    def trainer(**kwargs) -> L.Trainer:
        strategy = kwargs["strategy"]
        if isinstance(strategy, str):  # run.py does not build strategy objects yet
            strategy = make_strategy(strategy, kwargs["accelerator"], offload=args.offload)
        if args.strategy == "deepspeed_z3":  # partition even the tiny weights (below 1e5 numbers they stay whole)
            strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        kwargs["strategy"] = strategy
        kwargs["callbacks"] = [*kwargs["callbacks"], Report(out)]
        return trainer_class(**kwargs)

    run_module.L.Trainer = trainer
    try:
        run_module.run(cfg)
    finally:
        run_module.L.Trainer = trainer_class


if __name__ == "__main__":
    main()
