"""A few tiny-model training steps under one distributed strategy; run by tests/distributed/test_distributed.py.

    python tests/distributed/distributed_train.py STRATEGY SHARDS OUT [--devices 2] [--steps 3] [--offload]
        [--precision P] [--kill-at K] [HYDRA_OVERRIDE ...]

Lightning re-executes this script for every rank but the first, so never run it in-process under pytest. The
run goes through ``svi_train.run.run`` with ``trainer=STRATEGY``; the Trainer it builds gets one more callback,
which writes ``OUT/rank{N}.json`` (and rank 0's LoRA weights) for the test to compare. ``--kill-at K`` kills
every rank with SIGKILL once the step-K checkpoint is written (the resume test); ``--nan-at K`` makes rank 1's
loss non-finite at step K and records the LoRA and optimizer state after every step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for the svi_* packages

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import svi_train.run as run_module  # noqa: E402
from svi_train.config import register  # noqa: E402
from svi_train.strategies import lora_state_dict  # noqa: E402


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.float().numpy().tobytes()).hexdigest()[:16]


def _tensors(state) -> list[torch.Tensor]:
    """Every tensor in a (nested) bank state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return [torch.tensor([float(state)])] if isinstance(state, (int, float)) and state is not None else []


class KillAt(L.Callback):
    """Die at once, every rank (the launcher's whole process group), after the step-K checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class NanAt(L.Callback):
    """Make one rank's prediction non-finite at one step, so that every rank must skip that step together."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank:
            return
        predict = type(module)._predict
        hit = trainer.global_step + 1 == self.step
        module._predict = (lambda *a: predict(module, *a) * float("nan")) if hit else (lambda *a: predict(module, *a))


def optimizer_digest(trainer) -> str:
    base = trainer.optimizers[0]
    while hasattr(base, "optimizer"):
        base = base.optimizer
    tensors = [v.flatten().float() for state in base.state.values() for v in state.values() if torch.is_tensor(v)]
    steps = [float(v) for state in base.state.values() for k, v in state.items() if k == "step"]
    return digest(torch.cat([*tensors, torch.tensor(steps)])) if tensors else "empty"


class Report(L.Callback):
    """Per-rank facts after training: LoRA digests (of the full weights, gathered where sharded) and banks."""

    def __init__(self, out: Path, per_step: bool = False) -> None:
        self.out, self.per_step, self.steps = out, per_step, {}
        self.initial: dict[str, torch.Tensor] = {}
        self.losses: dict[int, float] = {}  # global step after the update -> this rank's loss

    def setup(self, trainer, module, stage) -> None:  # before the strategy wraps or shards the model
        state = get_peft_model_state_dict(module.transformer, adapter_name=module.ADAPTER)
        self.initial = {k: v.detach().clone() for k, v in state.items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        print(f"rank {trainer.global_rank} step {trainer.global_step}", flush=True)  # the test's sign of progress
        if self.per_step:  # after the module's own hook (it puts back a held optimizer first)
            lora = lora_state_dict(trainer.strategy, module.transformer, module.ADAPTER)  # a collective
            self.steps[trainer.global_step] = {
                "lora": digest(torch.cat([v.flatten().float() for _, v in sorted(lora.items())])),
                "optimizer": optimizer_digest(trainer),
            }

    def on_train_end(self, trainer, module) -> None:
        final = lora_state_dict(trainer.strategy, module.transformer, module.ADAPTER)  # a collective
        rank = trainer.global_rank
        banks = {name: getattr(module, f"{name}_errors").state_dict() for name in ("noise", "x0")}
        report = {
            "rank": rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "iteration": module.rank_state.iteration,
            "strategy": type(trainer.strategy).__name__,
            "optimizer": type(getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])).__name__,
            "losses": self.losses,
            "steps": self.steps,
            "lora": {k: digest(v) for k, v in final.items()},
            "lora_shapes": {k: list(v.shape) for k, v in final.items()},
            "initial_keys": sorted(self.initial),
            "lora_changed": {k: not torch.equal(v, self.initial[k]) for k, v in final.items()},
            "generator": digest(module.generator.get_state()),
            "bank_inserts": {name: bank["inserts"] for name, bank in banks.items()},
            "bank_norms": {name: sorted(n for norms in bank["norms"] for n in norms) for name, bank in banks.items()},
            "banks": {name: digest(torch.cat([t.flatten().float() for t in _tensors(b)])) for name, b in banks.items()},
        }
        if rank == 0:
            save_file({k: v.contiguous() for k, v in final.items()}, str(self.out / "lora_rank0.safetensors"))
        (self.out / f"rank{rank}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL every rank after this step's checkpoint")
    parser.add_argument("--nan-at", type=int, default=None, help="a non-finite loss on rank 1 at this step")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of conf/train.yaml")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

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
    overrides += ["trainer.offload=true"] if args.offload else []
    overrides += args.overrides
    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)

    trainer_class = L.Trainer

    def trainer(**kwargs) -> L.Trainer:
        strategy = kwargs["strategy"]
        if args.strategy == "deepspeed_z3":  # partition even the tiny weights (below 1e5 numbers they stay whole)
            strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        kwargs["strategy"] = strategy
        kwargs["callbacks"] = [*kwargs["callbacks"], Report(out, per_step=args.nan_at is not None)]
        kwargs["callbacks"] += [NanAt(args.nan_at, rank=1)] if args.nan_at is not None else []
        kwargs["callbacks"] += [KillAt(args.kill_at)] if args.kill_at is not None else []
        return trainer_class(**kwargs)

    run_module.L.Trainer = trainer
    try:
        run_module.run(cfg)
    finally:
        run_module.L.Trainer = trainer_class


if __name__ == "__main__":
    main()
