"""SVILitModule: one error-recycling training step, orchestrated. The algorithm lives in svi_train.recycling."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace

import lightning as L
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from svi_infer.adapters import AdapterMeta
from svi_infer.conditioning import MASK_CHANNELS, held_timesteps, replace_held
from svi_infer.errors import UserError
from svi_infer.flow import add_noise, velocity_target
from svi_infer.memory import lora_to_float32, offload_layers, parked, store_float8
from svi_infer.model import build_model
from svi_infer.spec import ModelSpec
from svi_infer.variants import VariantSpec, make_conditioning, make_handoff
from svi_infer.variants.base import Conditioning
from svi_train.config import (
    ONE_DEVICE_OFFLOAD,
    ExpertSettings,
    LoraSettings,
    MemorySettings,
    OptimSettings,
    TrainerSettings,
)
from svi_train.experts import Experts
from svi_train.export import CHECKPOINT_KEY
from svi_train.faults import NonFiniteGuard
from svi_train.recycling import (
    Errors,
    RecyclingConfig,
    TimestepSampler,
    draw_flags,
    in_warmup,
    inject,
    make_banks,
    measure,
    record,
    recycled_input_and_target,
    should_update,
)
from svi_train.resume import RankState
from svi_train.strategies import clip_gradients, make_optimizer, unwrapped_name


def json_safe(data: dict) -> dict:
    """Plain types only (peft's enums and sets), so checkpoints load with ``weights_only=True``."""
    return json.loads(json.dumps(data, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def cast_lora_inputs_outside_autocast(module: torch.nn.Module) -> None:
    """peft casts each adapted layer's input to the LoRA's float32; under autocast (bf16-mixed) the LoRA's matmul
    then runs in bf16 anyway, and the cast only keeps another bf16 copy of the input for the backward (a block's
    worth of extra activations). The cast is turned off while autocast is on, in the forward and in gradient
    checkpointing's recompute alike, and kept outside it (previews, evaluation)."""

    def follow_autocast(layer: torch.nn.Module, args: tuple) -> None:
        device = args[0].device.type if args and isinstance(args[0], torch.Tensor) else "cpu"
        layer.cast_input_dtype_enabled = not torch.is_autocast_enabled(device)

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.register_forward_pre_hook(follow_autocast)


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
        variant: VariantSpec | None = None,
        conditioning: Conditioning | None = None,
        defaults: dict | None = None,
        p_more_motion: float = 0.9,
        seed: int = 0,
        save_banks: bool = True,
        experts: ExpertSettings | None = None,
        memory: MemorySettings | None = None,
        trainer: TrainerSettings | None = None,
    ) -> None:
        """``variant``: what is trained (conditioning, hand-off, the motion counts drawn, with ``p_more_motion`` for
        the largest); ``conditioning``: its strategy with the training dropout (default: the variant's, dropping
        nothing); ``defaults``: the generation defaults the exported adapters record; ``memory``: the frozen base's
        storage dtype and offload, with ``trainer`` (its precision and strategy) deciding what ``auto`` means."""
        super().__init__()
        self.spec, self.model_path, self.lora, self.recycling, self.optim = spec, model_path, lora, recycling, optim
        self.variant = variant or VariantSpec()
        self.conditioning = conditioning or make_conditioning(self.variant.conditioning)
        self.conditioning.check_base(spec, training=True)
        self.handoff = make_handoff(self.variant.handoff)
        self.handoff.check_base(spec)
        self.motion_counts, self.p_more_motion = getattr(self.variant, self.handoff.counts), p_more_motion
        self.defaults = dict(defaults or {})
        self.timesteps = TimestepSampler(mode=optim.timesteps, shift=recycling.shift)
        self.experts = Experts(spec, experts or ExpertSettings(), self.timesteps, recycling, seed)
        self.memory = memory or MemorySettings()
        self.base_dtype = self.memory.storage(trainer or TrainerSettings())
        # bf16 storage comes from the loader (diffusers keeps its float32 modules: norms, time embedder, rope);
        # float8 storage is applied to the bf16 base before peft injects the LoRA, so only base layers get the cast
        self.model = build_model(spec, model_path, dtype=torch.float32 if self.base_dtype == "fp32" else torch.bfloat16)
        if self.base_dtype == "fp8":
            for transformer in self.model.transformers:
                store_float8(transformer, compute_dtype=torch.bfloat16)
        self.experts.attach(self, self.model, self.lora_config, self.ADAPTER)
        if self.base_dtype != "fp32":  # peft gave the LoRA its base layer's dtype: trained weights stay float32
            for transformer in self.model.transformers:
                lora_to_float32(transformer)
        self.step_expert = self.experts.trained[0]  # the expert of the current step
        # after add_adapter: Talk's audio modules stay out of peft's reach (frozen, no LoRA); Dance's pose encoder
        # stays trainable (add_adapter freezes whatever is not a LoRA), reachable as transformer.dwpose_embedding
        # only (a second attribute here would put its weights into state_dict() twice)
        self.conditioning.attach_training(self.model, self.conditioned(), seed)
        for transformer in self.expert_modules().values():
            transformer.train()
            cast_lora_inputs_outside_autocast(transformer)
            if optim.checkpointing(spec):
                transformer.enable_gradient_checkpointing()
        # errors at the noise endpoint (paper B_noi) and at the data endpoint (paper B_vid), keyed by expert + grid
        self.noise_errors, self.x0_errors = make_banks(recycling, len(spec.experts))
        self.generator = torch.Generator()
        self.rank_state = RankState(seed, self.generator, self.noise_errors, self.x0_errors, save_banks)
        self._last_step_end: float | None = None
        self.nonfinite = NonFiniteGuard(optim.max_nonfinite_in_row)
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
        provenance |= self.experts.provenance()
        return AdapterMeta.for_spec(
            self.spec, expert=expert, defaults=self.defaults, provenance=provenance, variant=self.variant
        )

    def expert_modules(self) -> dict[str, torch.nn.Module]:
        """The trained transformers by expert name (``main`` for one-expert bases)."""
        return self.experts.modules(self)

    def conditioned(self) -> torch.nn.Module:
        """The transformer Talk's and Dance's inputs go to (Wan 2.1's only one); not an attribute, which would put
        its weights into state_dict() twice."""
        return next(iter(self.expert_modules().values()))

    def adapter_targets(self) -> list[tuple[str | None, str]]:
        """``(expert, attribute)`` per adapter to export (:meth:`Experts.targets`)."""
        return self.experts.targets()

    def setup(self, stage: str) -> None:
        self.rank_state.seed_rank(self.global_rank)
        if self.memory.offload == "group":
            if self.trainer.world_size > 1:  # trainer.devices=auto found several GPUs
                raise UserError(f"{ONE_DEVICE_OFFLOAD} (got {self.trainer.world_size} devices)")
            # before Lightning's strategy setup moves the module to its device (which _apply below keeps off the
            # offloaded layers); the layers are on the CPU already, and go to the GPU for their forward only
            for transformer in self.expert_modules().values():
                offload_layers(transformer, self.trainer.strategy.root_device)

    def _apply(self, fn, recurse: bool = True):
        """Whole-module moves and casts (Lightning's ``to(device)`` in strategy setup, ``cpu()`` at teardown) leave
        the group-offloaded base layers where diffusers' hooks keep them (:func:`svi_infer.memory.parked`)."""
        with parked(self):
            return super()._apply(fn, recurse)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # shared (tied) LoRA weights once
        o = self.optim  # AdamW (bitsandbytes' 8-bit one with optim.optimizer=adamw8bit), DeepSpeed's under ZeRO-Offload
        return make_optimizer(
            params, self.trainer.strategy, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, kind=o.optimizer
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # norm clipping under FSDP too

    # -- the step ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        t_start = time.perf_counter()
        data_wait = t_start - self._last_step_end if self._last_step_end is not None else 0.0
        g, cfg, device = self.generator, self.recycling, self.device
        expert = self.step_expert = self.experts.choose(self.global_step)
        transformer = self.experts.place(self, expert)
        # held: the latent hand-off's held latents (else 0); motion: the count drawn
        x0, y, held, motion = self.handoff.training_inputs(batch, self.motion_counts, self.p_more_motion, g)
        replaced = 0 if self.spec.conditioning_by_concat else held  # TI2V-5B: frames the DiT gets clean
        # draws and injection per sample, on CPU with this rank's generator
        draw = self.timesteps.sample(x0.shape[0], g, self.experts.timestep_range(expert))
        grids = self.experts.bank_grids(draw.timestep, expert)
        dropped = [self.conditioning.draw_dropout(g) for _ in range(x0.shape[0])]
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
        self.conditioning.set_batch(self.conditioned(), batch, dropped)
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
        if self.nonfinite.any_rank(self, loss):
            return self.nonfinite.skip(self, loss)
        t_bank = time.perf_counter()
        if cfg.enabled:
            self._update_banks(measure(v_pred, v_target, sigma), t, flags)
        self._log_step(loss, motion, batch, time.perf_counter() - t_bank, time.perf_counter() - t_start, data_wait)
        self._last_step_end = time.perf_counter()  # the step's backward and optimizer run after this; close enough
        return loss

    # -- conditioning, the DiT and the banks ----------------------------------------------------------
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
        rank can skip a collective); afterwards each rank keeps its own. As in the reference, the receiving rank's
        own update decision (its sample clean or not, and its draw) decides for the gathered errors too: sample
        ``j`` of every rank is kept when this rank keeps its own sample ``j``."""
        update = torch.tensor([should_update(f, self.recycling, self.generator) for f in flags], device=t.device)
        noise, x0 = errors.noise, errors.x0
        if in_warmup(self.rank_state.iteration, self.recycling) and self.trainer.world_size > 1:
            noise, x0, t = (self.all_gather(v).flatten(0, 1) for v in (noise, x0, t))
            update = update.repeat(self.trainer.world_size)  # gathered rank-major: rank r's sample j at r*B + j
        self.rank_state.iteration += 1
        grids = self.experts.bank_grids(t.cpu(), self.step_expert)  # every rank trains the same expert in a step
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
        for name in self.experts.loss_names(self.step_expert):  # per expert: only the steps of its expert
            self.log(name, loss, prog_bar=name == "train/loss")
        self.log("perf/data_wait_s", data_wait_s)
        self.log(f"train/{self.handoff.counts}", float(motion))
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
        self.rank_state.save(checkpoint, self.trainer)
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
        self.rank_state.restore(checkpoint, self.trainer)
        if "state_dict" in checkpoint:  # absent from DeepSpeed checkpoints: the engine has loaded the weights
            full = self.state_dict()
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full

    def on_train_start(self) -> None:
        self.rank_state.start(self.trainer)  # the random streams, after Lightning's own start-up seeding
