"""Lightning strategy objects for the ``trainer.strategy`` names, on GPUs and on the CPU.

On GPUs these are Lightning's stock strategies. Lightning refuses DeepSpeed and FSDP on the CPU accelerator,
although both libraries run there over gloo; the two subclasses below lift only those checks, so the sharded
code paths (ZeRO partitioning, FSDP flat parameters, their checkpoints) can be exercised by CPU tests.

The subclasses override private Lightning methods (checked against lightning 2.6.6);
tests/distributed/test_distributed.py covers them.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning import LightningModule
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import Tensor, nn

from svi_infer.pose import POSE_KEY


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes (DeepSpeed picks its CPU accelerator by itself when no GPU is visible).

    ``DS_SKIP_SHM=1`` skips DeepSpeed's shared-memory all-reduce op, which is otherwise JIT-compiled (~25 s) on
    first use; gloo does the collectives instead. The patch lives here, not in a launcher, because Lightning
    re-executes the script for every rank but the first.
    """

    def setup_environment(self) -> None:
        # skip DeepSpeedStrategy's "CUDA only" check; DDPStrategy's body sets up the device and process group
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        # the stock method validates device indices, which are None for CPU devices
        if os.environ.get("DS_SKIP_SHM"):
            # `import deepspeed.comm.torch` would bind torch itself: the name is shadowed in deepspeed.comm
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # the stock method passes device_rank=root_device.index, None on CPU, which DeepSpeedEngine compares to 0
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP on CPU processes. Being a subclass also escapes the accelerator connector's GPU check, which tests
    ``type(strategy) is FSDPStrategy``."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # the stock method passes device_id=root_device.index (None on CPU), and torch's FSDP then looks for an
        # accelerator device and fails; naming the CPU device explicitly works
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    # Full-state-dict checkpoints: Lightning asks FSDP to offload the gathered weights to the CPU, which on the
    # CPU is a no-op copy whose storage FSDP then frees (FlatParamHandle.to_cpu), and reading it segfaults.
    def _full_state_dict(self):
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_state_dict():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._full_state_dict():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # Lightning's layout: keyed by parameter index
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning will train on the CPU with this ``accelerator`` setting."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def make_strategy(
    name: str, accelerator: str, offload: bool = False, unused_parameters: bool = False
) -> Strategy | str:
    """The strategy for a ``trainer.strategy`` config name.

    Args:
        name: ``auto | ddp | deepspeed_z2 | deepspeed_z3 | fsdp``; any other string is one of Lightning's own
            names and is returned unchanged for Lightning to resolve.
        accelerator: the Trainer's ``accelerator``; on the CPU the gloo backend and the CPU subclasses are used.
        offload: ZeRO-Offload / FSDP CPU offload. ZeRO-2 offloads the optimizer state, ZeRO-3 the optimizer
            state and the parameters (the optimizer must then be DeepSpeed's CPU Adam: see ``make_optimizer``),
            FSDP the parameters.
        unused_parameters: some trainable parameters get no gradient in a step (Wan 2.2 A14B: the LoRA of the
            expert not trained in it); DDP must then look for them (``find_unused_parameters``).

    Checkpoints of the DeepSpeed strategies leave out the frozen base (``exclude_frozen_parameters``): it is
    rebuilt from the model folder, and writing 14B frozen weights per checkpoint would dwarf the LoRA.
    """
    cpu = on_cpu(accelerator)
    backend = "gloo" if cpu else None
    if offload and name not in ("deepspeed_z2", "deepspeed_z3", "fsdp"):
        raise ValueError(f"trainer.offload needs a deepspeed_z2, deepspeed_z3 or fsdp strategy, not {name!r}")
    if name == "ddp":
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=unused_parameters)
    if name in ("deepspeed_z2", "deepspeed_z3"):
        stage = int(name[-1])
        cls = CPUDeepSpeedStrategy if cpu else DeepSpeedStrategy
        return cls(
            stage=stage,
            offload_optimizer=offload,
            offload_parameters=offload and stage == 3,
            process_group_backend=backend,
            exclude_frozen_parameters=True,
        )
    if name == "fsdp":
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        cls = CPUFSDPStrategy if cpu else FSDPStrategy
        # one FSDP unit per transformer block: each is gathered only while it runs
        return cls(auto_wrap_policy={WanTransformerBlock}, cpu_offload=offload, process_group_backend=backend)
    return name


def uses_cpu_adam(strategy: Strategy) -> bool:
    """Whether ``strategy`` offloads the optimizer with DeepSpeed, which then requires DeepSpeed's CPU Adam
    (a client torch optimizer is refused with ``ZeRORuntimeException: You are using ZeRO-Offload with a client
    provided optimizer``)."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    return bool((strategy.config or {}).get("zero_optimization", {}).get("offload_optimizer"))


def make_optimizer(
    params: Iterable[nn.Parameter],
    strategy: Strategy,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    kind: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU AdamW when the strategy offloads the optimizer state (JIT-compiled on first use);
    ``kind="adamw8bit"``: bitsandbytes' AdamW8bit, whose two moments take a byte per value (plus a float scale per
    256) instead of four (tensors under 4096 values keep float32 moments)."""
    if uses_cpu_adam(strategy):
        if kind != "adamw":  # svi_train.plan refuses this before the run starts
            raise ValueError(f"optim.optimizer={kind}: DeepSpeed's ZeRO-Offload brings its own CPU AdamW")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(list(params), lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True)
    if kind == "adamw8bit":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def clip_gradients(module: LightningModule, optimizer: torch.optim.Optimizer, clip_val, algorithm) -> None:
    """Lightning's gradient clipping, except clipping by norm under FSDP, which Lightning's FSDP precision plugin
    refuses (``gradient_clip_algorithm='norm' is currently not supported for FSDPPrecision``): the root FSDP
    module's ``clip_grad_norm_`` computes the norm over every rank's shard (a collective)."""
    strategy = module.trainer.strategy
    if isinstance(strategy, FSDPStrategy) and clip_val and (algorithm or "norm") == "norm":
        strategy.model.clip_grad_norm_(clip_val)
    else:
        module.clip_gradients(optimizer, clip_val, algorithm)


@contextmanager
def _full_weights(strategy: Strategy, module: nn.Module, rank0_only: bool) -> Iterator[None]:
    """Inside the block ``module``'s trainable parameters hold their full values; a collective."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in module.parameters() if p.requires_grad]):
            yield
    elif isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        # FSDP's flat parameters mix the LoRA with the frozen weights of a block: the whole model is unsharded
        # (on GPUs for rank 0 only, into CPU memory, when rank0_only)
        offload = rank0_only and strategy.root_device.type != "cpu"
        with FullyShardedDataParallel.summon_full_params(
            strategy.model, writeback=False, rank0_only=rank0_only, offload_to_cpu=offload
        ):
            yield
    else:
        yield


_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter name without FSDP's and activation checkpointing's wrapper segments: the name the module has
    in state dicts and checkpoints (``named_parameters()`` under FSDP includes the wrappers)."""
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def lora_state_dict(
    strategy: Strategy, transformer: nn.Module, adapter_name: str = "default", rank0_only: bool = False
) -> dict[str, Tensor]:
    """The adapter's full weights on the CPU, keyed like peft's ``get_peft_model_state_dict``
    (``blocks.0.attn1.to_q.lora_A.weight``), under any strategy; with a pose encoder attached (Dance), its
    trained weights too, as ``dwpose_embedding.<i>.weight`` / ``.bias`` (gathered in the same collective; the
    writers, ``svi_infer.adapters.save_adapter`` and ``svi_train.export``, put them in a file of their own).

    A collective: every rank must call it. ZeRO-3 and FSDP keep only a shard of each weight per rank, so they
    are gathered first; the parameters are read directly because ``state_dict()`` under FSDP is itself a
    collective (called on rank 0 alone it hangs the job).

    Args:
        rank0_only: the other ranks get ``{}`` (with FSDP they then skip materialising the full model).
    """
    rank = strategy.global_rank
    with _full_weights(strategy, transformer, rank0_only):
        if rank0_only and rank != 0:
            return {}
        weights = {}
        for name, param in transformer.named_parameters():
            name = unwrapped_name(name)
            if name.startswith(POSE_KEY + "."):
                weights[name] = param.detach().to("cpu", copy=True)
            elif ".lora_" in name and f".{adapter_name}." in name:
                weights[name.replace(f".{adapter_name}.", ".")] = param.detach().to("cpu", copy=True)
        return weights
