"""Wan 2.2 A14B's two experts in training: which one a step trains, on which timesteps and bank grids, where the
idle one waits, and one LoRA shared by both. One-expert bases (``main``) train their one transformer every step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import lightning as L
import torch
from peft import LoraConfig

from svi_infer.model import WanModel
from svi_infer.spec import HIGH_NOISE, ModelSpec
from svi_train.config import ExpertSettings
from svi_train.recycling import RecyclingConfig, TimestepSampler, expert_grid, grid_anchors, grid_of

EXPERT_ATTRIBUTES = ("transformer", "transformer_2")  # diffusers' names, by index in spec.experts


class Experts:
    """The experts a run trains (names in the spec's order) and the step's choice among them."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: ExpertSettings,
        timesteps: TimestepSampler,
        recycling: RecyclingConfig,
        seed: int,
    ) -> None:
        self.spec, self.settings, self.seed = spec, settings, seed
        self.trained = settings.trained(spec.experts)  # expert names, in the spec's order
        self.anchors, self.num_grids = grid_anchors(recycling.num_grids, recycling.shift), recycling.num_grids
        share = settings.high_noise_share  # of the steps, when both A14B experts train
        if share is None and len(self.trained) > 1:
            share = timesteps.range_share(self.timestep_range(HIGH_NOISE))
        self.high_noise_share = share

    def attribute(self, expert: str) -> str:
        """The module attribute holding ``expert``'s transformer (``transformer`` / ``transformer_2``): the
        state_dict prefix of its LoRA."""
        return EXPERT_ATTRIBUTES[self.spec.experts.index(expert)]

    def attach(
        self, module: L.LightningModule, model: WanModel, lora_config: Callable[[], LoraConfig], adapter: str
    ) -> None:
        """Register each trained transformer on ``module``, frozen, with a LoRA (shared by both experts with
        ``experts.shared_lora``)."""
        for name in self.trained:  # registered as transformer / transformer_2: their LoRA is in the checkpoints
            transformer = model.transformers[self.spec.experts.index(name)]
            setattr(module, self.attribute(name), transformer)
            transformer.requires_grad_(False)
            transformer.add_adapter(lora_config(), adapter_name=adapter)
        if self.settings.shared_lora:
            tie_lora(model.transformers[1], model.transformers[0], adapter)

    def modules(self, module: L.LightningModule) -> dict[str, torch.nn.Module]:
        """The trained transformers of ``module`` by expert name (``main`` for one-expert bases)."""
        return {name: getattr(module, self.attribute(name)) for name in self.trained}

    def targets(self) -> list[tuple[str | None, str]]:
        """``(expert, attribute)`` per adapter to export: one per trained A14B expert (expert named, so svi_infer
        loads it into that expert), else one for all (expert None: a one-expert base, or a shared LoRA)."""
        attributes = [self.attribute(name) for name in self.trained]
        if len(self.spec.experts) == 1 or self.settings.shared_lora:
            return [(None, attributes[0])]
        return list(zip(self.trained, attributes, strict=True))

    def provenance(self) -> dict:
        """What an adapter records about the experts it was trained with (nothing on one-expert bases)."""
        return {"experts": asdict(self.settings)} if len(self.spec.experts) > 1 else {}

    def loss_names(self, expert: str) -> tuple[str, ...]:
        """The loss curves a step of ``expert`` adds to: with two trained experts, each also has its own."""
        return ("train/loss", f"train/loss_{expert}") if len(self.trained) > 1 else ("train/loss",)

    def choose(self, global_step: int) -> str:
        """The expert this step trains: the same on every rank (drawn from the run seed and the step, so the
        collectives line up and a resumed run draws the same), high-noise with its share of the timesteps."""
        if len(self.trained) == 1:
            return self.trained[0]
        draw = torch.Generator().manual_seed(self.seed * 1_000_003 + int(global_step))
        return self.trained[0] if float(torch.rand((), generator=draw)) < self.high_noise_share else self.trained[1]

    def timestep_range(self, expert: str) -> tuple[float, float] | None:
        """``[low, high)`` timesteps of ``expert``: at or above ``boundary * 1000`` for the high-noise expert, as
        the sampler switches; None on one-expert bases (the whole table)."""
        if len(self.spec.experts) == 1:
            return None
        boundary = self.spec.boundary_ratio * 1000.0
        return (boundary, 1001.0) if expert == HIGH_NOISE else (0.0, boundary)

    def bank_grids(self, timestep: torch.Tensor, expert: str) -> torch.Tensor:
        """The bank grid of each timestep: the errors of the two experts are kept apart."""
        index = self.spec.experts.index(expert)
        grids = grid_of(timestep, self.anchors).view(-1)
        return torch.tensor([expert_grid(int(g), index, self.num_grids) for g in grids])

    def place(self, module: L.LightningModule, active: str) -> torch.nn.Module:
        """The step's transformer; with ``experts.offload_idle`` the other one waits on the CPU."""
        modules = self.modules(module)
        if self.settings.offload_idle:
            for name, transformer in modules.items():
                transformer.to(module.device if name == active else torch.device("cpu"))
        return modules[active]


def tie_lora(follower: torch.nn.Module, leader: torch.nn.Module, adapter_name: str) -> int:
    """Make ``follower``'s LoRA weights the very parameters of ``leader``'s (one LoRA shared by both Wan 2.2
    experts: a gradient from either expert updates it); returns the number of tied weights."""
    leader_params = dict(leader.named_parameters())
    tied = 0
    for name, module in follower.named_modules():
        for kind in ("lora_A", "lora_B"):
            layers = getattr(module, kind, None)
            if isinstance(layers, torch.nn.ModuleDict) and adapter_name in layers:
                layers[adapter_name].weight = leader_params[f"{name}.{kind}.{adapter_name}.weight"]
                tied += 1
    if not tied:
        raise ValueError(f"no LoRA weight of adapter {adapter_name!r} to tie")
    return tied
