"""Peak memory of a training run per rank, predicted without loading a weight (``python -m svi_train.plan``).

The DiT is built on the meta device from the spec's real config, stored as training stores it (fp32, bf16 with
diffusers' fp32 modules, or float8 through :func:`svi_infer.memory.store_float8`), with the run's PEFT LoRA; its
parameters are counted by dtype. Activations are measured (:class:`~svi_infer.memory_plan.LiveBytes`): one
training step of the meta model at the run's sample size (the batch, the noisy input, the forward, the loss and the
backward) at 2 and 3 blocks, extrapolated to the model's depth (every block adds what it keeps for the backward).

The rest is arithmetic: LoRA weights and gradients in fp32, AdamW's two fp32 moments and the foreach step's
temporaries (bitsandbytes' 8-bit AdamW: one byte per moment plus a float scale per 256), DeepSpeed's partitions,
and ``memory.offload=group``, which keeps the base's linear layers on the host and one block's worth on the GPU
(:func:`svi_infer.memory.offload_layers`). How this was checked against measured peaks: docs/benchmarks.md,
"Memory planner".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch

from svi_infer.memory_plan import (
    RESERVE_GIB,
    Clip,
    GiB,
    LiveBytes,
    dit_inputs,
    fits,
    frozen_bytes,
    fused_attention,
    meta_transformer,
    size,
)
from svi_infer.spec import ModelSpec
from svi_train.config import LoraSettings, MemorySettings, TrainerSettings

ADAM_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256)}  # per trained parameter
MIN_8BIT_NUMEL = 4096  # bitsandbytes keeps float32 moments for smaller tensors
# the optimizer step's temporaries per trained parameter (torch's foreach AdamW: sqrt of the second moment)
ADAM_STEP_BYTES = {"adamw": 4.0, "adamw8bit": 0.0}
LORA_BYTES = 4  # LoRA weights and their gradients stay fp32 (AdamW's master copy)
GPU_SIZES_GIB = (24, 48, 80)


@dataclass(frozen=True)
class Sample:
    """One training sample's size: what the activations scale with."""

    batch: int
    frames: int
    height: int
    width: int

    @property
    def clip(self) -> Clip:
        return Clip(self.frames, self.height, self.width)


@dataclass(frozen=True)
class Choice:
    """The settings that decide memory (each a training config key)."""

    base_dtype: str  # fp32 | bf16 | fp8 (resolved: never auto)
    checkpointing: bool
    optimizer: str = "adamw"
    offload: str = "none"  # none | group (the base's linear layers on the host, one at a time on the GPU)

    def overrides(self) -> str:
        """The choice as training overrides."""
        words = [
            f"memory.base_dtype={self.base_dtype}",
            f"optim.gradient_checkpointing={str(self.checkpointing).lower()}",
            f"optim.optimizer={self.optimizer}",
        ]
        if self.offload != "none":
            words.append(f"memory.offload={self.offload}")
        return " ".join(words)


@dataclass(frozen=True)
class Strategy:
    """What the Lightning strategy does to memory: ranks sharing the trained state, and what ZeRO offloads."""

    name: str = "auto"
    ranks: int = 1
    offload: bool = False  # trainer.offload (DeepSpeed: optimizer state, ZeRO-3: + parameters, to the host)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank: on the GPU by part, and on the host (offloaded base, banks)."""

    choice: Choice
    sample: Sample
    base: dict[str, int]  # the frozen DiT(s) kept on the GPU, by storage dtype
    lora: int
    gradients: int
    optimizer: int
    activations: int  # peak of the step beyond the weights (activations, temporaries), with the choice's checkpointing
    activations_other: int  # the same with checkpointing the other way, for comparison
    optimizer_step: int  # the optimizer step's temporaries (after the backward: the activations are gone)
    host: int  # on the host: the offloaded base, ZeRO-offloaded state and the error banks
    banks: int

    @property
    def gpu(self) -> int:
        resident = sum(self.base.values()) + self.lora + self.gradients + self.optimizer
        return resident + max(self.activations, self.optimizer_step)

    def fits(self, gpu_gib: float) -> bool:
        return fits(self.gpu, gpu_gib)

    def line(self) -> str:
        """The one-line summary training prints at start."""
        base = " + ".join(f"{size(n)} {dtype}" for dtype, n in self.base.items() if n)
        return (
            f"memory plan: {size(self.gpu)} per device (base {base}, LoRA {size(self.lora)}, gradients "
            f"{size(self.gradients)}, optimizer {size(self.optimizer)}, activations {size(self.activations)}), host "
            f"{size(self.host)}; {self.choice.overrides()}"
        )

    def table(self) -> str:
        ckpt = "on" if self.choice.checkpointing else "off"
        other = "off" if self.choice.checkpointing else "on"
        rows = [(f"base weights ({dtype})", n, "") for dtype, n in self.base.items() if n]
        rows += [
            ("LoRA (fp32)", self.lora, ""),
            ("gradients (fp32)", self.gradients, ""),
            ("optimizer state", self.optimizer, f"({self.choice.optimizer})"),
            (f"activations, ckpt {ckpt}", self.activations, f"(ckpt {other}: {size(self.activations_other)})"),
            ("peak per GPU", self.gpu, f"(+ {RESERVE_GIB} GiB for CUDA itself)"),
            ("host: offloaded + banks", self.host, f"(error banks {size(self.banks)})"),
        ]
        rows = [f"  {label:<24}{size(n):>12}  {note}".rstrip() for label, n, note in rows]
        return "\n".join(rows)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the DiT computes in under a Lightning ``precision``."""
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def trainable_numel(transformer: torch.nn.Module) -> int:
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def step_peak(
    spec: ModelSpec,
    lora: LoraSettings,
    base_dtype: str,
    checkpointing: bool,
    compute: torch.dtype,
    sample: Sample,
    layers: int,
) -> int:
    """Bytes a forward + backward of a ``layers``-block meta DiT allocates at its peak beyond its weights and the
    LoRA gradients (a gradient leaves the count once it is accumulated)."""
    transformer = meta_transformer(spec, base_dtype, compute, layers, lora)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    latent = (sample.batch, *sample.clip.latent(spec)[1:])
    live = LiveBytes(existing=transformer)
    for parameter in transformer.parameters():  # the gradients are counted apart, whole
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(lambda p: live.exclude(p.grad))
    # the step's own tensors count too: the batch (x0 and y, in the shards' bf16), the noise, the float32 target and
    # the DiT's inputs in the compute dtype
    with fused_attention(), live, torch.device("meta"):
        batch = [torch.empty(latent, dtype=torch.bfloat16) for _ in range(2)]
        x0, noise = (torch.empty(latent, dtype=torch.float32) for _ in range(2))
        target = noise - x0
        inputs = dit_inputs(spec, sample.clip, compute, sample.batch)
        out = transformer(**inputs, return_dict=False)[0]
        (out.float() - target).pow(2).mean().backward()
        del out, batch, x0, noise, target, inputs
    return live.peak


@cache
def activation_bytes(
    spec: ModelSpec, lora: LoraSettings, base_dtype: str, checkpointing: bool, compute: torch.dtype, sample: Sample
) -> int:
    """The step's peak beyond the weights and the LoRA gradients (counted apart, as if all were there all along)
    at the spec's depth: measured at 2 and 3 blocks and extrapolated (every block adds what it keeps for the
    backward; from 2 blocks on the peak sits in the same place)."""
    peaks = {layers: step_peak(spec, lora, base_dtype, checkpointing, compute, sample, layers) for layers in (2, 3)}
    return max(0, peaks[2] + (peaks[3] - peaks[2]) * (spec.num_layers - 2))


def plan_memory(
    spec: ModelSpec,
    lora: LoraSettings,
    choice: Choice,
    sample: Sample,
    precision: str = "bf16-mixed",
    strategy: Strategy | None = None,
    trained_experts: int = 1,
    resident_experts: int | None = None,
    banks: int = 0,
) -> MemoryPlan:
    """Predict one rank's memory for ``choice`` (a resolved base dtype: fp32, bf16 or fp8).

    ``trained_experts``: LoRAs trained (Wan 2.2 A14B: 2, one per expert, unless shared); ``resident_experts``: base
    transformers on the GPU (default: all of the spec's; 1 with ``experts.offload_idle``); ``banks``: the error
    banks' bytes on the host.
    """
    strategy = strategy or Strategy()
    # the module casts the DiT's inputs to its base's dtype, and float8 layers compute in bf16: a bf16 or float8
    # base computes in bf16 whatever the precision
    compute = compute_dtype(precision) if choice.base_dtype == "fp32" else torch.bfloat16
    base_items, linear_items, lora_numel, small_numel = _model_counts(spec, lora, choice.base_dtype, compute)
    per_expert = dict(base_items)
    resident = len(spec.experts) if resident_experts is None else resident_experts
    base = {dtype: n * resident for dtype, n in per_expert.items()}
    host = sum(per_expert.values()) * (len(spec.experts) - resident)
    if choice.offload == "group":  # one block's linear layers on the GPU at a time (during its recompute + backward)
        for dtype, n in linear_items:
            offloaded = n * (spec.num_layers - 1) // spec.num_layers * resident
            base[dtype] -= offloaded
            host += offloaded
    trained = lora_numel * trained_experts
    shard = strategy.ranks if strategy.name.startswith("deepspeed") else 1
    small = small_numel * trained_experts if choice.optimizer == "adamw8bit" else 0
    optimizer = int((trained - small) * ADAM_STATE_BYTES[choice.optimizer] + small * 8.0) // shard
    if strategy.name.startswith("deepspeed"):
        optimizer += trained * LORA_BYTES // shard  # ZeRO's fp32 master copy of the trained weights
    gradients = lora_numel * LORA_BYTES // shard  # one expert's LoRA takes the gradients of a step
    if strategy.offload:
        host += optimizer
        optimizer = 0
    lora_gpu = trained * LORA_BYTES // (shard if strategy.name == "deepspeed_z3" else 1)
    activations = activation_bytes(spec, lora, choice.base_dtype, choice.checkpointing, compute, sample)
    other = activation_bytes(spec, lora, choice.base_dtype, not choice.checkpointing, compute, sample)
    return MemoryPlan(
        choice=choice,
        sample=sample,
        base={k: v for k, v in base.items() if v},
        lora=lora_gpu,
        gradients=gradients,
        optimizer=optimizer,
        optimizer_step=0 if strategy.offload else int(trained * ADAM_STEP_BYTES[choice.optimizer]) // shard,
        activations=activations,
        activations_other=other,
        host=host + banks,
        banks=banks,
    )


def ladder(spec: ModelSpec, precision: str) -> list[Choice]:
    """Settings from the fastest to the most frugal: what :func:`cheapest` tries in turn."""
    base = MemorySettings().storage(TrainerSettings(precision=precision))
    choices = [
        Choice(base, False),
        Choice(base, True),
        Choice("fp8", True),
        Choice("fp8", True, "adamw8bit"),
    ]
    return [*choices, Choice("fp8", True, "adamw8bit", "group")]


def cheapest(plans: list[MemoryPlan], gib_size: float) -> MemoryPlan | None:
    """The first plan of the ladder that fits a GPU of ``gib_size`` GiB."""
    return next((p for p in plans if p.fits(gib_size)), None)


def describe(run: RunMemory, plan: MemoryPlan, ladder_plans: list[MemoryPlan]) -> str:
    """The planner's printout: this run's plan, whether it fits, and the cheapest settings per GPU size (where none
    fits, the longest clip the most frugal settings fit)."""
    sample = plan.sample
    lines = [
        f"sample: {sample.batch} x {sample.frames} frames x {sample.height}x{sample.width}",
        plan.table(),
    ]
    if run.gpu_gib is not None:
        verdict = "fits" if plan.fits(run.gpu_gib) else "does NOT fit"
        lines.append(f"this run {verdict} a {run.gpu_gib:g} GiB GPU")
    lines.append("cheapest settings that fit:")
    for gpu in GPU_SIZES_GIB:
        lines.append(f"  {gpu:>3} GB: {what_fits(run, ladder_plans, gpu)}")
    return "\n".join(lines)


def what_fits(run: RunMemory, ladder_plans: list[MemoryPlan], gpu_gib: float) -> str:
    """The cheapest settings that fit a ``gpu_gib`` GPU, or else the longest clip the most frugal ones fit."""
    best = cheapest(ladder_plans, gpu_gib)
    if best:
        return f"{size(best.gpu)}: {best.choice.overrides()}"
    text = f"none at {run.sample.frames} frames"
    shorter = longest_clip(run, ladder_plans[-1].choice, gpu_gib)
    if shorter:
        text += f"; {shorter.choice.overrides()} fits {shorter.sample.frames} frames ({size(shorter.gpu)})"
    return text


def longest_clip(run: RunMemory, choice: Choice, gpu_gib: float) -> MemoryPlan | None:
    """The plan of the longest clip (4k+1 frames, shorter than the run's) that ``choice`` fits on a ``gpu_gib``
    GPU, or None: a bisection, activations growing with the frames."""
    step = run.spec.vae_temporal
    low, high = 0, (run.sample.frames - 1) // step  # clip lengths 4k+1 for k in (low, high)
    best = None
    while high - low > 1:
        middle = (low + high) // 2
        plan = replace(run, sample=replace(run.sample, frames=middle * step + 1)).plan(choice)
        if plan.fits(gpu_gib):
            low, best = middle, plan
        else:
            high = middle
    return best


def sample_of(spec: ModelSpec, index: dict[str, Any] | None, batch: int) -> Sample:
    """The shards' largest size (index.json), else the model's default size."""
    if index is None:
        return Sample(batch, spec.frames_per_clip, spec.height, spec.width)
    height, width = max((tuple(r) for r in index["resolutions"]), key=lambda hw: hw[0] * hw[1])
    return Sample(batch, int(index["frames_per_clip"]), int(height), int(width))


@cache
def _model_counts(spec: ModelSpec, lora: LoraSettings, base_dtype: str, compute: torch.dtype) -> tuple:
    """The frozen base's bytes by dtype, those of its blocks' linear layers (what ``memory.offload=group`` keeps
    on the host), the LoRA's parameter count and how many of them are in tensors too small for 8-bit moments."""
    from svi_infer.memory import base_linears
    from svi_infer.memory_plan import bytes_by_dtype

    full = meta_transformer(spec, base_dtype, compute, lora=lora)
    linears = bytes_by_dtype([p for layer in base_linears(full) for p in layer.parameters() if not p.requires_grad])
    small = sum(p.numel() for p in full.parameters() if p.requires_grad and p.numel() < MIN_8BIT_NUMEL)
    return tuple(frozen_bytes(full).items()), tuple(linears.items()), trainable_numel(full), small


@dataclass(frozen=True)
class RunMemory:
    """A run's settings that the plan reads, typed: from a composed ``conf/train.yaml``."""

    spec: ModelSpec
    lora: LoraSettings
    choice: Choice
    sample: Sample
    precision: str
    strategy: Strategy
    trained_experts: int
    resident_experts: int
    banks: int
    gpu_gib: float | None
    ignore_plan: bool

    def plan(self, choice: Choice | None = None) -> MemoryPlan:
        return plan_memory(
            self.spec,
            self.lora,
            choice or self.choice,
            self.sample,
            self.precision,
            self.strategy,
            self.trained_experts,
            self.resident_experts,
            self.banks,
        )

    def ladder_plans(self) -> list[MemoryPlan]:
        return [self.plan(choice) for choice in ladder(self.spec, self.precision)]


def run_memory(cfg: Any, index: dict[str, Any] | None = None) -> RunMemory:
    """The memory-relevant settings of a composed training config; ``index``: the shards' index.json (their
    sample size), else the model's default size."""
    from svi_infer.spec import get_spec
    from svi_train.config import typed
    from svi_train.recycling.capacity import bank_capacity, latent_numel, ranks_per_node, resolve_max_bytes

    spec = get_spec(cfg.model.spec)
    lora, optim, memory, trainer, experts, recycling, data = (
        typed(cfg, group) for group in ("lora", "optim", "memory", "trainer", "experts", "recycling", "data")
    )
    trained = experts.trained(spec.experts)
    choice = Choice(
        memory.storage(trainer),
        optim.checkpointing(spec),
        optim.optimizer,
        memory.offload,
    )
    sample = sample_of(spec, index, data.batch_size)
    ranks = ranks_per_node(trainer.devices, accelerator=trainer.accelerator) * trainer.num_nodes
    banks = 0
    if recycling.enabled:
        shape = {"frames_per_clip": sample.frames, "resolutions": [[sample.height, sample.width]]}
        capacity = bank_capacity(
            recycling, latent_numel(spec, shape), len(spec.experts), resolve_max_bytes(recycling.max_bytes_per_bank)
        )
        banks = 2 * capacity.per_grid * capacity.grids * capacity.entry_bytes
    return RunMemory(
        spec=spec,
        lora=lora,
        choice=choice,
        sample=sample,
        precision=trainer.precision,
        strategy=Strategy(trainer.strategy, ranks, trainer.offload),
        trained_experts=1 if experts.shared_lora else len(trained),
        resident_experts=1 if experts.offload_idle else len(spec.experts),
        banks=banks,
        gpu_gib=memory.gpu_gib,
        ignore_plan=memory.ignore_plan,
    )


def device_gib(accelerator: str) -> float | None:
    """The GPU this process trains on, in GiB; None on the CPU."""
    if accelerator == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB


def check_fits(run: RunMemory, accelerator: str) -> MemoryPlan:
    """Print the run's plan line; refuse a plan that cannot fit the GPU (``memory.gpu_gib``, else the device's
    own size) unless ``memory.ignore_plan``."""
    from svi_infer.errors import UserError

    plan = run.plan()
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(plan.line(), flush=True)
    gpu = run.gpu_gib or device_gib(accelerator)
    if gpu is None or plan.fits(gpu) or run.ignore_plan:
        return plan
    raise UserError(
        f"the memory plan needs {size(plan.gpu)} per GPU (+ {RESERVE_GIB} GiB for CUDA itself), more than this "
        f"{gpu:g} GiB GPU; what fits it: {what_fits(run, run.ladder_plans(), gpu)}; "
        "python -m svi_train.plan <the same overrides> shows the plan, memory.ignore_plan=true starts anyway"
    )


USAGE = """python -m svi_train.plan [overrides, as for python -m svi_train]: the peak memory per GPU of that training
run, predicted without loading weights, and the cheapest settings that fit 24, 48 and 80 GB GPUs.
  e.g. python -m svi_train.plan +experiment=shot trainer=gpu memory.base_dtype=fp8 memory.gpu_gib=24
The sample size is the shards' (data.path, when it holds an index.json), else the model's default size."""


def main(argv: list[str]) -> None:
    """Compose ``conf/train.yaml`` with ``argv``, print the plan; a mistake exits with one line."""
    import sys

    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from svi_infer.errors import USER_ERRORS, config_error, exit_with
    from svi_train.config import register
    from svi_train.shards import read_index

    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return
    prog = "svi_train.plan"
    register()
    try:
        with initialize_config_module("conf", version_base="1.3"):
            cfg = compose("train", overrides=argv)
    except HydraException as err:
        exit_with(prog, config_error(err, prog, "conf/train.yaml"))
    try:
        path = cfg.data.path
        index = read_index(path) if path not in (None, "???") else None
        run = run_memory(cfg, index)
        plan = run.plan()
        print(f"memory plan for {run.spec.id}, LoRA r={run.lora.rank}, precision {run.precision}", file=sys.stdout)
        print(describe(run, plan, run.ladder_plans()))
    except USER_ERRORS as err:
        exit_with(prog, err)
