"""SVILitModule: one error-recycling training step, orchestrated. The algorithm lives in svi_train.recycling."""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig

from svi_infer.adapters import AdapterMeta
from svi_infer.atomic import write_with
from svi_infer.conditioning import (
    MASK_CHANNELS,
    first_frames_mask,
    held_timesteps,
    held_y,
    pro_training_pair,
    replace_held,
    with_mask,
)
from svi_infer.flow import add_noise, velocity_target
from svi_infer.model import build_model
from svi_infer.pose import set_pose
from svi_infer.spec import HIGH_NOISE, WAN21_I2V, ModelSpec
from svi_infer.talk import set_audio
from svi_train.config import ConditioningSettings, ExpertSettings, LoraSettings, OptimSettings
from svi_train.data import choose_cond
from svi_train.export import CHECKPOINT_KEY
from svi_train.plan import check_spec_handoff
from svi_train.recycling import (
    Errors,
    RecyclingConfig,
    TimestepSampler,
    draw_flags,
    expert_grid,
    grid_anchors,
    grid_of,
    in_warmup,
    inject,
    make_banks,
    measure,
    record,
    recycled_input_and_target,
    should_update,
)
from svi_train.strategies import clip_gradients, make_optimizer, unwrapped_name
from svi_train.variants import (
    AUDIO,
    POSE,
    Dropped,
    PoseKeep,
    build_pose,
    build_talk,
    check_kind,
    draw_dropout,
    talk_windows,
)

EXPERT_ATTRIBUTES = ("transformer", "transformer_2")  # diffusers' names, by index in spec.experts


def json_safe(data: dict) -> dict:
    """Plain types only (peft's enums and sets), so checkpoints load with ``weights_only=True``."""
    return json.loads(json.dumps(data, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


class SVILitModule(L.LightningModule):
    """Trains a LoRA on the Wan DiT with SVI's error recycling; the VAE and encoders never run in the step."""

    ADAPTER = "default"

    def __init__(
        self,
        spec: ModelSpec,
        model_path: str | None,
        lora: LoraSettings,
        recycling: RecyclingConfig,
        optim: OptimSettings,
        motion_frames: tuple[int, ...] = (1,),
        p_more_motion: float = 0.9,
        variant_defaults: dict | None = None,
        seed: int = 0,
        save_banks: bool = True,
        conditioning: ConditioningSettings | None = None,
        multitalk: str | None = None,
        experts: ExpertSettings | None = None,
        motion_latents: tuple[int, ...] = (0, 1),
    ) -> None:
        super().__init__()
        self.spec, self.model_path, self.lora, self.recycling, self.optim = spec, model_path, lora, recycling, optim
        self.motion_frames, self.p_more_motion = tuple(motion_frames), p_more_motion
        self.motion_latents = tuple(motion_latents)
        self.variant_defaults = dict(variant_defaults or {})
        self.seed, self.save_banks = seed, save_banks
        # Talk (audio) / Dance (pose), from variant.conditioning; None: text only
        self.kind = check_kind(self.variant_defaults.get("conditioning"))
        if self.kind is not None and spec.family != WAN21_I2V:
            raise ValueError(
                f"variant.conditioning={self.kind} (Talk, Dance) trains on Wan 2.1 I2V only, not {spec.id}"
            )
        self.handoff = check_spec_handoff(spec, self.variant_defaults.get("handoff", "pixel"))
        self.conditioning = conditioning or ConditioningSettings()
        self.experts = experts or ExpertSettings()
        self.trained = self.experts.trained(spec.experts)  # expert names, in the spec's order
        self.model = build_model(spec, model_path)
        for name in self.trained:  # registered as transformer / transformer_2: their LoRA is in the checkpoints
            transformer = self.model.transformers[spec.experts.index(name)]
            setattr(self, EXPERT_ATTRIBUTES[spec.experts.index(name)], transformer)
            transformer.requires_grad_(False)
            transformer.add_adapter(self.lora_config(), adapter_name=self.ADAPTER)
        if self.experts.shared_lora:
            tie_lora(self.model.transformers[1], self.model.transformers[0], self.ADAPTER)
        self.step_expert = self.trained[0]  # the expert of the current step
        # after add_adapter: the audio modules stay out of peft's reach (frozen, no LoRA); the pose encoder
        # stays trainable (add_adapter freezes whatever is not a LoRA)
        self.talk = build_talk(self.model, multitalk) if self.kind == AUDIO else None
        # the encoder is reachable as transformer.dwpose_embedding only: a second attribute here would put its
        # weights into state_dict() twice
        pose = build_pose(self.transformer, self.conditioning.pose_encoder, seed) if self.kind == POSE else None
        self._pose_keep = PoseKeep(pose) if pose is not None else None
        for transformer in self.expert_modules().values():
            transformer.train()
            if optim.gradient_checkpointing:
                transformer.enable_gradient_checkpointing()
        self.timesteps = TimestepSampler(mode=optim.timesteps, shift=recycling.shift)
        share = self.experts.high_noise_share  # of the steps, when both A14B experts train
        if share is None and len(self.trained) > 1:
            share = self.timesteps.range_share(self._expert_range(HIGH_NOISE))
        self.high_noise_share = share
        self.anchors = grid_anchors(recycling.num_grids, recycling.shift)
        # errors at the noise endpoint (paper B_noi) and at the data endpoint (paper B_vid), keyed by expert + grid
        self.noise_errors, self.x0_errors = make_banks(recycling, len(spec.experts))
        self.generator = torch.Generator()
        self.iteration = 0  # recycling steps taken (gates the warm-up); checkpointed
        self._last_step_end: float | None = None
        self.nonfinite_in_row = self.nonfinite_total = 0
        # checkpoints hold only the LoRA (see on_save_checkpoint; DeepSpeed's exclude_frozen_parameters): the
        # frozen base comes from the model folder, so strategies that load weights themselves must not be strict
        self.strict_loading = False

    def lora_config(self) -> LoraConfig:
        init = True if self.lora.init == "kaiming" else self.lora.init
        return LoraConfig(
            r=self.lora.rank,
            lora_alpha=self.lora.alpha,
            target_modules=list(self.lora.target_modules),
            init_lora_weights=init,
        )

    def adapter_meta(self, expert: str | None = None) -> AdapterMeta:
        provenance = {"step": int(self.global_step), "lora": asdict(self.lora), "recycling": asdict(self.recycling)}
        if len(self.spec.experts) > 1:
            provenance["experts"] = asdict(self.experts)
        return AdapterMeta.for_spec(self.spec, expert=expert, defaults=self.variant_defaults, provenance=provenance)

    def expert_modules(self) -> dict[str, torch.nn.Module]:
        """The trained transformers by expert name (``main`` for one-expert bases)."""
        return {name: getattr(self, EXPERT_ATTRIBUTES[self.spec.experts.index(name)]) for name in self.trained}

    def adapter_targets(self) -> list[tuple[str | None, str]]:
        """``(expert, attribute)`` per adapter to export: one per trained A14B expert (expert named, so svi_infer
        loads it into that expert), else one for all (expert None: a one-expert base, or a shared LoRA). The
        attribute (``transformer`` / ``transformer_2``) is the module holding it and its state_dict prefix."""
        attributes = [EXPERT_ATTRIBUTES[self.spec.experts.index(name)] for name in self.trained]
        if len(self.spec.experts) == 1 or self.experts.shared_lora:
            return [(None, attributes[0])]
        return list(zip(self.trained, attributes, strict=True))

    def setup(self, stage: str) -> None:
        # one random stream per rank (torchtitan's reasoning: ranks must not draw the same noise / timesteps)
        self.generator.manual_seed(self.seed * 100_003 + self.global_rank)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # shared (tied) LoRA weights once
        o = self.optim  # AdamW, or DeepSpeed's CPU AdamW under ZeRO-Offload
        return make_optimizer(params, self.trainer.strategy, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # norm clipping under FSDP too

    # -- the step ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        t_start = time.perf_counter()
        data_wait = t_start - self._last_step_end if self._last_step_end is not None else 0.0
        g, cfg, device = self.generator, self.recycling, self.device
        expert = self.step_expert = self._choose_expert()
        transformer = self._place_experts(expert)
        x0, y, held, motion = self._conditioning(batch)  # held: the latent hand-off's held latents (else 0)
        replaced = 0 if self.spec.conditioning_by_concat else held  # TI2V-5B: frames the DiT gets clean
        # draws and injection per sample, on CPU with this rank's generator
        draw = self.timesteps.sample(x0.shape[0], g, self._expert_range(expert))
        grids = self._bank_grids(draw.timestep, expert)
        dropped = [draw_dropout(self.kind, self.conditioning, g) for _ in range(x0.shape[0])]
        samples = [
            self._recycled_inputs(x0[i], y[i], draw.sigma[i], int(grids[i]), dropped[i].image, held)
            for i in range(x0.shape[0])
        ]
        x_t, y_t, v_target = (torch.stack([s[j] for s in samples]).to(device) for j in range(3))
        flags = [s[3] for s in samples]
        sigma = draw.sigma.to(device).view(-1, 1, 1, 1, 1)
        t = draw.timestep.to(device)
        weight = draw.weight.to(device)
        image = batch["image"].to(device) if batch["image"] is not None else None
        if image is not None and any(d.image for d in dropped):  # Dance: the CLIP tokens go with y
            keep = torch.tensor([not d.image for d in dropped], device=device, dtype=image.dtype)
            image = image * keep.view(-1, 1, 1)
        self._set_conditioning(batch, dropped)
        if self.spec.conditioning_by_concat:
            latent_in, t_in = torch.cat([x_t, y_t], dim=1), t
        else:  # the held latents (with their conditioning error) replace the first frames, at timestep 0
            latent_in = replace_held(x_t, y_t[:, MASK_CHANNELS:, :replaced])
            t_in = held_timesteps(t, tuple(x_t.shape[-3:]), replaced, self.spec.patch_size)
        v_pred = self._predict(transformer, latent_in, t_in, batch["text"].to(device), image)
        if replaced:  # no loss and no error on frames the model was given: their velocity is meaningless
            v_pred = torch.cat([v_target[:, :, :replaced].to(v_pred.dtype), v_pred[:, :, replaced:]], dim=2)
        squared = F.mse_loss(v_pred.float(), v_target.float(), reduction="none")[:, :, replaced:]
        per_sample = squared.mean(dim=(1, 2, 3, 4))
        loss = (per_sample * weight).mean()
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
        if self.trainer.world_size > 1:
            bad = self.all_gather(bad).max()  # every rank skips together, or DDP would wait forever
        if bool(bad.max()):
            return self._skip_nonfinite(loss)
        self.nonfinite_in_row = 0
        t_bank = time.perf_counter()
        if cfg.enabled:
            self._update_banks(measure(v_pred, v_target, sigma), t, flags)
        self._log_step(loss, motion, batch, time.perf_counter() - t_bank, time.perf_counter() - t_start, data_wait)
        self._last_step_end = time.perf_counter()  # the step's backward and optimizer run after this; close enough
        return loss

    # -- experts and conditioning ---------------------------------------------------------------------
    def _choose_expert(self) -> str:
        """The expert this step trains: the same on every rank (drawn from the run seed and the step, so the
        collectives line up and a resumed run draws the same), high-noise with its share of the timesteps."""
        if len(self.trained) == 1:
            return self.trained[0]
        draw = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.global_step))
        return self.trained[0] if float(torch.rand((), generator=draw)) < self.high_noise_share else self.trained[1]

    def _expert_range(self, expert: str) -> tuple[float, float] | None:
        """``[low, high)`` timesteps of ``expert``: at or above ``boundary * 1000`` for the high-noise expert, as
        the sampler switches; None on one-expert bases (the whole table)."""
        if len(self.spec.experts) == 1:
            return None
        boundary = self.spec.boundary_ratio * 1000.0
        return (boundary, 1001.0) if expert == HIGH_NOISE else (0.0, boundary)

    def _bank_grids(self, timestep: torch.Tensor, expert: str) -> torch.Tensor:
        index = self.spec.experts.index(expert)
        grids = grid_of(timestep, self.anchors).view(-1)
        return torch.tensor([expert_grid(int(g), index, self.recycling.num_grids) for g in grids])

    def _place_experts(self, active: str) -> torch.nn.Module:
        """The step's transformer; with ``experts.offload_idle`` the other one waits on the CPU."""
        modules = self.expert_modules()
        if self.experts.offload_idle:
            for name, module in modules.items():
                module.to(self.device if name == active else torch.device("cpu"))
        return modules[active]

    def _conditioning(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(x0, y, held, motion)`` on the CPU for the batch.

        Pixel hand-off: the clean latents, y = mask + the conditioning latents of m motion frames (m drawn).
        Latent hand-off (SVI 2.0 Pro, TI2V-5B): n motion latents drawn (0 = a clip-0 sample), then the target
        and held latents of :func:`pro_training_pair` (``held`` of them); y carries them (on TI2V-5B only so that
        the conditioning error lands on them: they then replace the first frames of the DiT input).
        """
        g = self.generator
        x0 = batch["latents"].float().cpu()  # [B, C, T, h, w]
        if self.handoff == "pixel":
            m, cond = choose_cond(batch["cond"], self.motion_frames, self.p_more_motion, g)
            h, w = x0.shape[-2:]
            return x0, with_mask(cond.float().cpu(), first_frames_mask(batch["num_frames"], h, w, marked=1)), 0, m
        if batch.get("anchor") is None:
            raise ValueError(
                f"variant.handoff=latent but the batch of samples {batch['key']} holds no anchor latent: prepare the "
                "shards with `python -m data_tools prepare handoff=latent ...`"
            )
        options = {0: None} | batch["motion"]
        n, motion = choose_cond(options, self.motion_latents, self.p_more_motion, g)
        anchor = batch["anchor"].float().cpu()
        x0, held = pro_training_pair(x0, anchor, None if motion is None else motion.float().cpu())
        y = held_y(held, x0.shape[-3])
        return x0, y, held.shape[-3], n

    def _set_conditioning(self, batch: dict, dropped: list[Dropped]) -> None:
        """The step's audio windows (Talk) or pose video (Dance) on the DiT, with this step's dropout."""
        if self.kind == AUDIO:
            if batch.get("audio") is None:
                raise ValueError(
                    f"variant.conditioning=audio (Talk) but the batch of samples {batch['key']} holds no audio "
                    "features: prepare the shards with `python -m data_tools prepare audio=true fps=25 ...`"
                )
            set_audio(self.transformer, talk_windows(batch["audio"], dropped, self.talk.config))
        elif self.kind == POSE:
            if batch.get("pose") is None:
                raise ValueError(
                    f"variant.conditioning=pose (Dance) but the batch of samples {batch['key']} holds no pose "
                    "video: prepare the shards with `python -m data_tools prepare pose=true fps=25 ...` "
                    "(<name>.pose.mp4 beside each video)"
                )
            self._pose_keep.set(dropped)  # dropped samples: the encoded pose times 0 (exactly the plain tokens)
            set_pose(self.transformer, batch["pose"].to(self.device))

    def _predict(
        self, transformer, latent_in: torch.Tensor, t: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> torch.Tensor:
        # the DiT's compute dtype: bf16 weights under DeepSpeed bf16 and FSDP mixed precision, where self.dtype
        # still says float32
        dtype = transformer.patch_embedding.weight.dtype
        return transformer(
            hidden_states=latent_in.to(dtype),
            timestep=t,
            encoder_hidden_states=text.to(dtype),
            encoder_hidden_states_image=None if image is None else image.to(dtype),
            return_dict=False,
        )[0]

    def _skip_nonfinite(self, loss: torch.Tensor) -> torch.Tensor | None:
        """No backward, no optimizer step, no bank update; too many in a row stop the run."""
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total))
        if self.nonfinite_in_row >= self.optim.max_nonfinite_in_row:
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise FloatingPointError(
                f"{self.nonfinite_in_row} non-finite losses in a row (last {float(loss)}) at step {self.global_step}; "
                f"the last good checkpoint is {last}: resume from it with a lower optim.lr, or check the data"
            )
        if self.trainer.world_size > 1:  # Lightning cannot skip a step on several ranks: make it a no-op
            self._hold_optimizer()
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        return None

    def _hold_optimizer(self) -> None:
        """Every rank must still run the step (its collectives), so it must change nothing: lr 0 leaves the
        weights as they are (AdamW scales its weight decay by lr too), and right after the update the moments,
        step counts and lr are put back. Works under DeepSpeed's and Lightning's optimizer wrappers."""
        base = self.optimizers()
        while hasattr(base, "optimizer"):
            base = base.optimizer
        saved = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in base.state.items()}
        lrs = [group["lr"] for group in base.param_groups]
        for group in base.param_groups:
            group["lr"] = 0.0

        def put_back(optimizer, args, kwargs) -> None:
            handle.remove()
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            for param in list(optimizer.state):
                if param not in saved:  # state the held step created (on the first step)
                    del optimizer.state[param]
            for param, state in saved.items():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        optimizer.state[param][key].copy_(value)
                    else:
                        optimizer.state[param][key] = value

        handle = base.register_step_post_hook(put_back)

    def _recycled_inputs(self, x0, y, sigma, grid: int, drop_y: bool = False, held: int = 0):
        """One sample's DiT input, conditioning and target, with errors from the banks injected (on CPU).

        ``drop_y`` (Dance's pose-and-image dropout): y is zeroed, mask included, and gets no error. ``held``: the
        latent hand-off's held latents, the only frames of y the conditioning error may reach.
        """
        cfg, g = self.recycling, self.generator
        noise = torch.randn(x0.shape, generator=g)
        if drop_y:
            y = torch.zeros_like(y)
        if not cfg.enabled:  # the plain-LoRA baseline
            return add_noise(x0, noise, sigma), y, velocity_target(x0, noise), None
        flags = draw_flags(cfg, g)
        if drop_y:
            flags = replace(flags, cond=False)
        injected = inject(x0, noise, y, grid, self.noise_errors, self.x0_errors, cfg, g, flags, held or None)
        x_t, v_target = recycled_input_and_target(x0, injected, sigma)  # the target points to the CLEAN x0
        return x_t, injected.y, v_target, flags

    @torch.no_grad()
    def _update_banks(self, errors, t: torch.Tensor, flags) -> None:
        """Warm-up: every rank inserts every rank's errors (the all_gather runs on all ranks, always, so no
        rank can skip a collective); afterwards each rank keeps its own."""
        update = torch.tensor([should_update(f, self.recycling, self.generator) for f in flags], device=t.device)
        noise, x0 = errors.noise, errors.x0
        if in_warmup(self.iteration, self.recycling) and self.trainer.world_size > 1:
            noise, x0, t, update = (self.all_gather(v).flatten(0, 1) for v in (noise, x0, t, update))
        self.iteration += 1
        grids = self._bank_grids(t.cpu(), self.step_expert)  # every rank trains the same expert in a step
        for i in range(t.shape[0]):
            if update[i]:
                record(
                    Errors(noise=noise[i].cpu(), x0=x0[i].cpu()),
                    int(grids[i]),
                    self.noise_errors,
                    self.x0_errors,
                    self.generator,
                )

    def _log_step(self, loss, motion, batch, bank_s: float, step_s: float, data_wait_s: float) -> None:
        self.log("train/loss", loss, prog_bar=True)
        if len(self.trained) > 1:  # per expert: each curve only has the steps of its expert
            self.log(f"train/loss_{self.step_expert}", loss)
        self.log("perf/data_wait_s", data_wait_s)
        self.log("train/motion_latents" if self.handoff == "latent" else "train/motion_frames", float(motion))
        self.log("perf/step_s", step_s)
        self.log("perf/bank_s", bank_s)
        self.log("perf/samples_per_s", batch["latents"].shape[0] / max(step_s, 1e-9))
        self.log("data/skipped", float(batch["data_skipped"]))
        if self.recycling.enabled and (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            for name, bank in (("noise", self.noise_errors), ("x0", self.x0_errors)):
                for key, value in bank.stats().items():
                    self.log(f"recycling/{name}/{key}", float(value))

    # -- checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        modules = self.expert_modules()
        checkpoint[CHECKPOINT_KEY] = {
            "adapter_name": self.ADAPTER,
            "lora_config": json_safe(next(iter(modules.values())).peft_config[self.ADAPTER].to_dict()),
            "meta": {"format": 1, **asdict(self.adapter_meta())},
            # per adapter: the expert it is for (None: all) and the state_dict prefix of its weights
            "adapters": [{"expert": expert, "prefix": attribute} for expert, attribute in self.adapter_targets()],
        }
        state = self._rank_state()
        checkpoint["svi_rng"], checkpoint["svi_recycling"] = state["svi_rng"], state["svi_recycling"]
        checkpoint["svi_recycling"]["world_size"] = self.trainer.world_size
        if self.trainer.world_size > 1 and self.global_rank > 0:  # rank 0's state is the checkpoint's own
            target = rank_state_path(self._checkpoint_dir(), checkpoint["global_step"], self.global_rank)
            write_with(target, lambda tmp: torch.save(state, tmp))
        # only the trainable (LoRA) weights: the frozen base is rebuilt from the model folder
        trainable = {unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}  # FSDP: no wrappers
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("lora_config") or {}
        for key, ours in (("r", self.lora.rank), ("lora_alpha", self.lora.alpha)):
            if key in saved and saved[key] != ours:
                name = "lora.rank" if key == "r" else "lora.alpha"
                raise ValueError(
                    f"{name}={ours}, but the checkpoint was trained with {saved[key]}: resume with the same LoRA"
                )
        state = {"svi_rng": checkpoint.get("svi_rng"), "svi_recycling": checkpoint.get("svi_recycling") or {}}
        self.iteration = state["svi_recycling"].get("iteration", 0)
        if self.trainer.world_size > 1 and self.global_rank > 0:
            state = self._load_rank_state(checkpoint)
        self._restored_rng, recycling = state["svi_rng"], state["svi_recycling"]
        self._restored_generator = recycling.get("generator")
        if recycling.get("banks"):
            self.noise_errors.load_state_dict(recycling["banks"]["noise"])
            self.x0_errors.load_state_dict(recycling["banks"]["x0"])
        if "state_dict" in checkpoint:  # absent from DeepSpeed checkpoints: the engine has loaded the weights
            full = self.state_dict()
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full

    def on_train_start(self) -> None:
        """Restore every random stream last, after Lightning's own start-up seeding."""
        restored = getattr(self, "_restored_generator", None)
        if restored is not None:
            self.generator.set_state(restored)
        elif getattr(self, "_restored_rng", None) is None and self.global_step > 0:  # this rank's state was lost
            self.generator.manual_seed(self.seed * 100_003 + self.global_rank + 7_919 * (self.global_step + 1))
        if getattr(self, "_restored_rng", None):
            set_random_state(self._restored_rng)

    def _rank_state(self) -> dict:
        """This rank's random streams, banks and warm-up counter (rank 0's go into the checkpoint itself)."""
        banks = {"noise": self.noise_errors.state_dict(), "x0": self.x0_errors.state_dict()}
        return {
            "svi_rng": random_state(),
            "svi_recycling": {
                "iteration": self.iteration,
                "generator": self.generator.get_state(),
                "banks": banks if self.save_banks else None,
            },
        }

    def _checkpoint_dir(self) -> Path:
        callback = self.trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        return Path(dirpath) if dirpath else Path(self.trainer.default_root_dir) / "checkpoints"

    def _load_rank_state(self, checkpoint: dict) -> dict:
        """Ranks > 0 read their own state file; without it (lost, or another world size) they start fresh
        streams and rank 0's banks, and the resume is no longer bit-identical: said once, on every such rank."""
        saved_world = (checkpoint.get("svi_recycling") or {}).get("world_size")
        path = rank_state_path(Path(self.trainer.ckpt_path).parent, checkpoint["global_step"], self.global_rank)
        if saved_world == self.trainer.world_size and path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        why = f"{path} is missing" if saved_world == self.trainer.world_size else f"it ran on {saved_world} ranks"
        warnings.warn(
            f"rank {self.global_rank}: resuming without this rank's own random streams and banks ({why}); "
            "training continues, but not bit-identically to an uninterrupted run",
            stacklevel=2,
        )
        recycling = dict(checkpoint.get("svi_recycling") or {}, generator=None)
        return {"svi_rng": None, "svi_recycling": recycling}


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


def rank_state_path(checkpoint_dir: Path, global_step: int, rank: int) -> Path:
    """Where rank ``rank`` keeps its state for the checkpoint of ``global_step`` (beside the checkpoints)."""
    return checkpoint_dir / "rank_states" / f"step{global_step:09d}-rank{rank}.pt"


def random_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as plain data, loadable with ``weights_only=True``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(np.random.get_state(legacy=False), default=lambda a: a.tolist()),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_random_state(state: dict) -> None:
    python = json.loads(state["python"])
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = json.loads(state["numpy"])
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
