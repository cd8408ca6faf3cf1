"""One SVI LoRA training step of the full-size Wan 2.1 I2V 14B DiT on a GPU: time, peak memory, MFU, recycling on/off.

The transformer is ``WanTransformer3DModel(**get_spec("wan2.1-i2v-14b-480p").transformer_config())`` with random
weights (no download), built directly on the device in the base dtype (torch's own init, run on the GPU; the
modules diffusers keeps in fp32 when loading bf16 weights are cast back to fp32). It gets a PEFT LoRA r = alpha =
128 on SVI's targets (``svi_train.config.SVI_TARGETS``, ``transformer.add_adapter`` as ``svi_train/module.py``
does; the LoRA weights are kept in fp32 as AdamW's master copy) and gradient checkpointing, and is trained on one
81 x 480 x 832 sample: latent [1, 16, 21, 60, 104] with y concatenated (36 input channels), text [1, 512, 4096],
CLIP image tokens [1, 257, 1280]. The forward runs under ``torch.autocast`` in the base dtype (as Lightning's
``bf16-mixed``). One timed step, in ``SVILitModule.training_step``'s order:

- draw a timestep (``TimestepSampler``, SVI's shifted table and bell loss weight) and its bank grid, noise on the
  CPU with the run's generator;
- recycling ON: ``draw_flags``, ``inject`` errors from the two banks, ``recycled_input_and_target``; OFF (the
  plain-LoRA baseline): ``add_noise`` + ``velocity_target``;
- the DiT forward, the weighted MSE loss; ON: ``measure`` + ``should_update`` + ``record`` into the banks (on the
  CPU, as the module does before Lightning runs the backward);
- backward, AdamW step (``OptimSettings`` defaults) over the LoRA parameters, ``zero_grad``.

The banks (``make_banks`` of the shipped ``RecyclingConfig`` but ``capacity=--bank-fill``) are pre-filled with
``--bank-fill`` random errors of the latent's shape per grid in every grid, so injection really happens and every
``record`` replaces an entry (``nearest_l2``). Each mode runs ``--warmup`` untimed steps, then ``--steps`` timed
ones (``torch.cuda.synchronize`` around each; the median is reported); CUDA peak memory
(``torch.cuda.max_memory_allocated``) is reset after the warm-up of each mode, so it is the steady-state peak of
the timed steps (weights, LoRA, its gradients and AdamW state included).

FLOPs are counted by formula (:func:`forward_flops`), matmuls only (norms, RoPE, modulation, softmax and the loss
are left out), 2 FLOPs per multiply-add. With S = T·(h/2)·(w/2) video tokens (patch 1x2x2; 21·30·52 = 32760 at
81x480x832), D the width (5120), F the FFN width (13824), L the layers (40), Lt = 512 text and Li = 257 image
tokens, r the LoRA rank, per block:

- self-attention q, k, v, o projections ``2·S·D²·4``; scores and values ``2·2·S²·D``;
- cross-attention q, o on the video tokens ``2·S·D²·2``; k, v on the text and image tokens ``2·(Lt+Li)·D²·2``;
  scores and values ``2·2·S·(Lt+Li)·D``;
- FFN ``2·2·S·D·F``;
- LoRA (``2·n·r·(in+out)`` per adapted linear over its n input tokens): self-attention q, k, v, o and cross q, o
  on S tokens, cross k, v on the Lt text tokens (the image tokens go through ``add_k_proj``/``add_v_proj``, not
  LoRA targets), both FFN linears on S tokens: ``2·r·(S·6·2D + Lt·2·2D + S·2·(D+F))``;

and once: patch embedding ``2·S·(36·4)·D``, head ``2·S·D·(16·4)``, text embedder ``2·Lt·(4096·D + D²)``, image
embedder ``2·Li·(1280² + 1280·D)``, time embedding ``2·(256·D + D² + D·6D)``.

**Convention.** A training step counts **3 x the forward FLOPs** (forward + backward, as if every weight were
trained: the usual "6·N·tokens" model-FLOPs count), so MFU = 3·forward / (step time x peak FLOPS) is comparable
with full fine-tuning figures. The recompute of gradient checkpointing (one more forward of every block) is
**excluded**, as in the usual MFU definition. With the base frozen the hardware skips the weight-gradient matmuls
of the frozen weights: for reference the script also prints ``hw_tflops_step``, the work actually needed without
recompute (frozen linears 2 x forward — forward and input gradient —, attention scores/values and LoRA 3 x, the
embedders 1 x: nothing upstream of them needs a gradient). For the full-size step (S = 32760, 40 blocks, r = 128):
1719.8 TFLOPs forward, of which self-attention scores/values 51%, FFN 22%, self-attention projections 16%,
cross-attention 9%, LoRA 1.9%; **5159.4 TFLOPs per step** by the 3 x convention, 4372.8 by the hardware count.

Peak FLOPS: dense bf16 by device name (H100 SXM 989 TFLOPS, H100 PCIe 756, H200 989, A100 312), only for bf16 on
CUDA; ``--peak-tflops`` overrides. Unknown device or dtype, and the CPU (``--tiny``: no meaningful CPU peak), give
``mfu=nan`` unless ``--peak-tflops`` is passed. Peak memory is CUDA-only: ``nan`` on the CPU.

``--layers N`` builds only N blocks (a smaller GPU; FLOPs scale). ``--tiny`` runs the same code path on the CPU in
a few seconds with ``tiny-wan2.1-i2v``, latent [1, 16, 3, 6, 10] (9 frames, 48x80), fp32, LoRA r=4.

Run: ``.venv/bin/python bench/gpu_step.py`` on one H100 (expected, not yet measured: 32.8 GB of bf16 weights for
16.39 B parameters, 9.8 GB for the 613 M fp32 LoRA parameters with their gradients and AdamW state, 13.4 GB of
checkpointed block inputs, plus one block's activations while it is recomputed) or ``--tiny`` anywhere. Without a
GPU and without ``--tiny`` it refuses (exit 2). The CPU-side work (draws, injection, bank records) is timed too, so
the script reports how busy the rest of the machine was (``other_load_cpus``, from ``/proc/stat``) and warns above
0.25 CPUs; on a shared CPU, ``--threads 1`` keeps OpenMP waits out of the ``--tiny`` timings. Ends with one line of
``name=value`` figures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from machine_load import busy_cpu_s  # noqa: E402  (bench/ is on sys.path when run as a script)

FULL_SPEC = "wan2.1-i2v-14b-480p"
TINY_SPEC = "tiny-wan2.1-i2v"
IMAGE_TOKENS = 257  # CLIP ViT-H/14 tokens of one 224x224 image (256 patches + class token)

# dense bf16 tensor-core peak, TFLOPS, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 80GB HBM3", 989.0),  # the SXM part's name
    ("H100 SXM", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


# -- FLOPs ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepShape:
    """What the FLOPs count depends on: one sample of the DiT's input, its width and the LoRA rank."""

    tokens: int  # S, video tokens after patching
    dim: int  # D
    ffn_dim: int  # F
    layers: int  # L
    text_tokens: int  # Lt
    image_tokens: int  # Li (0: no image encoder)
    in_channels: int  # DiT input channels (latent + y)
    out_channels: int  # latent channels
    patch_volume: int  # pt·ph·pw
    text_dim: int
    image_dim: int
    freq_dim: int
    lora_rank: int  # 0: no LoRA

    @classmethod
    def of(cls, spec, latent: tuple[int, ...], layers: int, lora_rank: int) -> StepShape:
        """The shape of a step of ``spec`` on ``latent`` = [B, C, T, h, w] (B = 1 counted) with ``layers`` blocks."""
        pt, ph, pw = spec.patch_size
        _, _, t, h, w = latent
        return cls(
            tokens=(t // pt) * (h // ph) * (w // pw),
            dim=spec.dim,
            ffn_dim=spec.ffn_dim,
            layers=layers,
            text_tokens=spec.text_len,
            image_tokens=IMAGE_TOKENS if spec.has_image_encoder else 0,
            in_channels=spec.in_channels,
            out_channels=spec.latent_channels,
            patch_volume=pt * ph * pw,
            text_dim=spec.text_dim,
            image_dim=spec.image_dim or 0,
            freq_dim=spec.freq_dim,
            lora_rank=lora_rank,
        )


def forward_flops(s: StepShape) -> dict[str, int]:
    """Forward matmul FLOPs of one sample by part (module docstring); ints, exact."""
    S, D, F_, L, Lt, Li, r = s.tokens, s.dim, s.ffn_dim, s.layers, s.text_tokens, s.image_tokens, s.lora_rank
    ctx = Lt + Li
    return {
        "self_attn_proj": L * 2 * S * D * D * 4,
        "self_attn_scores": L * 2 * 2 * S * S * D,
        "cross_attn_proj": L * (2 * S * D * D * 2 + 2 * ctx * D * D * 2),
        "cross_attn_scores": L * 2 * 2 * S * ctx * D,
        "ffn": L * 2 * 2 * S * D * F_,
        "lora": L * 2 * r * (S * 6 * 2 * D + Lt * 2 * 2 * D + S * 2 * (D + F_)),
        "head": 2 * S * D * s.out_channels * s.patch_volume,
        "embed": (
            2 * S * s.in_channels * s.patch_volume * D
            + 2 * Lt * (s.text_dim * D + D * D)
            + 2 * Li * (s.image_dim * s.image_dim + s.image_dim * D)
            + 2 * (s.freq_dim * D + D * D + D * 6 * D)
        ),
    }


def train_step_flops(s: StepShape) -> int:
    """Model FLOPs of one training step: 3 x forward (forward + backward as if all weights trained; no recompute)."""
    return 3 * sum(forward_flops(s).values())


def hardware_step_flops(s: StepShape) -> int:
    """FLOPs the step needs with the base frozen (no recompute): frozen linears 2x forward (output + input
    gradient), attention scores/values and LoRA 3x, the embedders 1x (no gradient flows into them)."""
    f = forward_flops(s)
    frozen_linear = f["self_attn_proj"] + f["cross_attn_proj"] + f["ffn"] + f["head"]
    return 2 * frozen_linear + 3 * (f["self_attn_scores"] + f["cross_attn_scores"] + f["lora"]) + f["embed"]


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """Peak TFLOPS for MFU and where it came from; ``nan`` when unknown (the CPU, another dtype, another GPU)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return math.nan, "unknown for the CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    return peak_for_name(name, dtype)


def peak_for_name(name: str, dtype: torch.dtype) -> tuple[float, str]:
    """Dense bf16 peak of a GPU by its CUDA name (the table above), or ``nan`` and why."""
    if dtype != torch.bfloat16:
        return math.nan, f"no table for {dtype} (pass --peak-tflops)"
    if "NVL" in name:  # H100 NVL / H200 NVL: other clocks and power, not in the table
        return math.nan, f"{name!r} is not in the table (pass --peak-tflops)"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"table, {key} dense bf16"
    return math.nan, f"{name!r} is not in the table (pass --peak-tflops)"


# -- model ----------------------------------------------------------------------------------------------------------
def build_transformer(
    spec, layers: int, device: torch.device, dtype: torch.dtype, rank: int, fp8: bool = False
) -> torch.nn.Module:
    """Random-weight DiT with ``layers`` blocks, built on ``device`` in ``dtype``; LoRA on SVI's targets (fp32).
    ``fp8``: the base stored in float8, computed in ``dtype`` (``memory.base_dtype=fp8``, before the LoRA)."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from svi_train.config import SVI_TARGETS, LoraSettings
    from svi_train.module import cast_lora_inputs_outside_autocast

    config = dict(spec.transformer_config(), num_layers=layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate and init straight in the base dtype: no fp32 copy of 14B weights
    try:
        with torch.device(device):
            transformer = WanTransformer3DModel(**config)
            keep = WanTransformer3DModel._keep_in_fp32_modules or []
            for name, param in transformer.named_parameters():  # as from_pretrained(torch_dtype=bf16) keeps them
                if any(k in name.split(".") for k in keep):
                    param.data = param.data.float()
            transformer.requires_grad_(False)
            if fp8:
                from svi_infer.memory import store_float8

                store_float8(transformer, compute_dtype=dtype)
            init = True if LoraSettings().init == "kaiming" else LoraSettings().init
            lora = LoraConfig(r=rank, lora_alpha=float(rank), target_modules=list(SVI_TARGETS), init_lora_weights=init)
            transformer.add_adapter(lora, adapter_name="default")
    finally:
        torch.set_default_dtype(previous)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # the LoRA is AdamW's fp32 master copy
    transformer.train()
    cast_lora_inputs_outside_autocast(transformer)  # as SVILitModule: no float32 copies of the LoRA's inputs
    transformer.enable_gradient_checkpointing()
    return transformer


# -- the step -------------------------------------------------------------------------------------------------------
class Bench:
    """One sample, the banks, the optimizer; :meth:`step` runs one training step in either mode."""

    def __init__(self, spec, transformer, latent: tuple[int, ...], device, dtype, bank_fill: int, seed: int = 0):
        from svi_infer.conditioning import first_frames_mask, with_mask
        from svi_train.config import OptimSettings
        from svi_train.recycling import RecyclingConfig, TimestepSampler, grid_anchors, make_banks

        self.spec, self.transformer, self.device, self.dtype = spec, transformer, device, dtype
        self.generator = torch.Generator().manual_seed(seed)
        g = self.generator
        b, c, t, h, w = latent
        frames = (t - 1) * spec.vae_temporal + 1
        self.x0 = torch.randn(latent, generator=g)  # on the CPU, float32, as the module's batch
        cond = torch.randn(latent, generator=g)
        self.y = with_mask(cond, first_frames_mask(frames, h, w, marked=1))
        self.text = torch.randn(b, spec.text_len, spec.text_dim, generator=g).to(device, dtype)
        self.image = torch.randn(b, IMAGE_TOKENS, spec.image_dim, generator=g).to(device, dtype)
        self.cfg = RecyclingConfig(capacity=bank_fill)
        self.timesteps = TimestepSampler(mode=OptimSettings().timesteps, shift=self.cfg.shift)
        self.anchors = grid_anchors(self.cfg.num_grids, self.cfg.shift)
        self.noise_errors, self.x0_errors = make_banks(self.cfg, 1)
        pool = [torch.randn(latent[1:], generator=g) for _ in range(4)]
        for grid in range(self.cfg.num_grids):
            for i in range(bank_fill):
                for bank in (self.noise_errors, self.x0_errors):
                    scale = 0.05 * (1.0 + float(torch.rand(1, generator=g)))
                    bank.add(pool[(grid + i) % len(pool)] * scale, grid, g)
        params = [p for p in transformer.parameters() if p.requires_grad]
        o = OptimSettings()
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.injected = {"noise": 0, "latent": 0, "cond": 0, "recorded": 0, "samples": 0}
        self.last_loss = math.nan

    def _inputs(self, recycling: bool):
        """As ``SVILitModule._recycled_inputs``, one sample on the CPU: x_t, y, v_target, flags, the draw, its grid."""
        from svi_infer.flow import add_noise, velocity_target
        from svi_train.recycling import draw_flags, expert_grid, grid_of, inject, recycled_input_and_target

        g, cfg = self.generator, self.cfg
        draw = self.timesteps.sample(1, g)
        grid = expert_grid(int(grid_of(draw.timestep, self.anchors).view(-1)[0]), 0, cfg.num_grids)
        x0, y, sigma = self.x0[0], self.y[0], draw.sigma[0]
        noise = torch.randn(x0.shape, generator=g)
        if not recycling:
            return add_noise(x0, noise, sigma), y, velocity_target(x0, noise), None, draw, grid
        flags = draw_flags(cfg, g)
        injected = inject(x0, noise, y, grid, self.noise_errors, self.x0_errors, cfg, g, flags)
        x_t, v_target = recycled_input_and_target(x0, injected, sigma)
        for kind in ("noise", "latent", "cond"):
            self.injected[kind] += int(getattr(injected.flags, kind))
        return x_t, injected.y, v_target, flags, draw, grid

    def step(self, recycling: bool) -> float:
        """One training step; returns its wall seconds (device synchronized at both ends)."""
        from svi_train.recycling import Errors, measure, record, should_update

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        x_t, y_t, v_target, flags, draw, grid = self._inputs(recycling)
        device = self.device
        x_t, y_t, v_target = (v.unsqueeze(0).to(device) for v in (x_t, y_t, v_target))
        sigma = draw.sigma.to(device).view(-1, 1, 1, 1, 1)
        t, weight = draw.timestep.to(device), draw.weight.to(device)
        latent_in = torch.cat([x_t, y_t], dim=1).to(self.dtype)
        autocast = self.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(device.type, dtype=self.dtype, enabled=autocast):
            v_pred = self.transformer(
                hidden_states=latent_in,
                timestep=t,
                encoder_hidden_states=self.text,
                encoder_hidden_states_image=self.image,
                return_dict=False,
            )[0]
        per_sample = F.mse_loss(v_pred.float(), v_target.float(), reduction="none").mean(dim=(1, 2, 3, 4))
        loss = (per_sample * weight).mean()
        if recycling:  # the module's _update_banks, one rank, before Lightning's backward
            errors = measure(v_pred, v_target, sigma)
            if should_update(flags, self.cfg, self.generator):
                cpu = Errors(noise=errors.noise[0].cpu(), x0=errors.x0[0].cpu())
                record(cpu, grid, self.noise_errors, self.x0_errors, self.generator)
                self.injected["recorded"] += 1
            self.injected["samples"] += 1
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())
        sync()
        return time.perf_counter() - start


def run_mode(bench: Bench, recycling: bool, warmup: int, steps: int) -> dict[str, float]:
    """Warm-up steps, then reset the CUDA peak and time ``steps`` steps; median seconds and peak GiB."""
    for _ in range(warmup):
        bench.step(recycling)
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    times = [bench.step(recycling) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated(bench.device) / 2**30 if cuda else math.nan
    return {"step_s": statistics.median(times), "peak_gb": peak, "times": times, "loss": bench.last_loss}


# -- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before timing (default 2)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks to build (default: all, 40)")
    parser.add_argument("--tiny", action="store_true", help="the tiny spec on the CPU, fp32, LoRA r=4 (CI)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    parser.add_argument(
        "--dtype", default=None, choices=("bfloat16", "float16", "float32"), help="base weights (default bfloat16; "
        "float32 with --tiny); the forward autocasts to it"
    )  # fmt: skip
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank = alpha (default 128; 4 with --tiny)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default 81; 9 with --tiny)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default 480; 48 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 832; 80 with --tiny)")
    parser.add_argument("--bank-fill", type=int, default=2, help="errors pre-filled per grid = capacity (default 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOPS for MFU (default: by device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--fp8", action="store_true", help="base weights stored in float8 (memory.base_dtype=fp8)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.rank = args.rank or (4 if tiny else 128)
    args.frames = args.frames or (9 if tiny else 81)
    args.height = args.height or (48 if tiny else 480)
    args.width = args.width or (80 if tiny else 832)
    if args.steps < 1 or args.warmup < 0 or args.bank_fill < 1 or args.rank < 1:
        parser.error("--steps, --bank-fill and --rank must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_step: no CUDA device here; run it on a GPU, or pass --tiny for the CPU smoke run", file=sys.stderr
        )  # fmt: skip
        return 2

    from svi_infer.spec import get_spec

    spec = get_spec(TINY_SPEC if args.tiny else FULL_SPEC)
    layers = args.layers or spec.num_layers
    if not 1 <= layers <= spec.num_layers:
        print(f"gpu_step: --layers must be in 1..{spec.num_layers}, got {layers}", file=sys.stderr)
        return 2
    multiple = spec.spatial_multiple
    if (args.frames - 1) % spec.vae_temporal or args.height % multiple or args.width % multiple:
        print(
            f"gpu_step: --frames must be {spec.vae_temporal}k+1 and --height/--width multiples of {multiple}, got "
            f"{args.frames} x {args.height} x {args.width}",
            file=sys.stderr,
        )
        return 2
    dtype = getattr(torch, args.dtype)
    t_frames = spec.latent_frames(args.frames)
    latent = (1, spec.latent_channels, t_frames, args.height // spec.vae_spatial, args.width // spec.vae_spatial)
    shape = StepShape.of(spec, latent, layers, args.rank)
    flops, hw_flops = train_step_flops(shape), hardware_step_flops(shape)
    parts = forward_flops(shape)
    peak, peak_source = peak_tflops(device, dtype, args.peak_tflops)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    transformer = build_transformer(spec, layers, device, dtype, args.rank, args.fp8)
    lora_params = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in transformer.parameters())
    bench = Bench(spec, transformer, latent, device, dtype, args.bank_fill)
    built = time.perf_counter() - t0

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} ({device}), torch {torch.__version__}, peak {peak:g} TFLOPS ({peak_source})")
    print(
        f"config: {spec.id}, {layers}/{spec.num_layers} blocks, latent {list(latent)} + y = {spec.in_channels} "
        f"channels in, S={shape.tokens} tokens, text {spec.text_len}, image {IMAGE_TOKENS}; {all_params:,} params, "
        f"LoRA r=alpha={args.rank} ({lora_params:,} of them, fp32), base {args.dtype}, gradient "
        f"checkpointing, AdamW; built with banks of {args.bank_fill} errors x {bench.cfg.num_grids} grids in "
        f"{built:.1f}s"
    )
    print(
        f"FLOPs/step: {flops / 1e12:.4g} TFLOPs (3 x forward, LoRA {parts['lora'] / sum(parts.values()):.1%}, "
        f"checkpoint recompute excluded); with frozen base weights {hw_flops / 1e12:.4g} TFLOPs"
    )
    results = {}
    t_start, busy0, own0 = time.perf_counter(), busy_cpu_s(), time.process_time()
    for recycling in (False, True):
        r = results[recycling] = run_mode(bench, recycling, args.warmup, args.steps)
        r["mfu"] = flops / (r["step_s"] * peak * 1e12)
        times = ", ".join(f"{s:.4g}" for s in r["times"])
        print(
            f"recycling {'on ' if recycling else 'off'}: {r['step_s']:.4g} s/step (median of [{times}]), peak "
            f"{r['peak_gb']:.4g} GiB, MFU {r['mfu']:.3g}, last loss {r['loss']:.4g}"
        )
    other_load = max(0.0, (busy_cpu_s() - busy0) - (time.process_time() - own0)) / (time.perf_counter() - t_start)
    inj = bench.injected
    print(
        f"recycling: {inj['samples']} samples, errors injected into noise {inj['noise']}, latent {inj['latent']}, "
        f"conditioning {inj['cond']}; {inj['recorded']} recorded into the banks"
    )
    if other_load > 0.25:
        print(f"WARNING: other work kept {other_load:.2f} CPUs busy while timing; the step times are unreliable")
    off, on = results[False], results[True]
    figures = {
        "step_s_off": off["step_s"],
        "step_s_on": on["step_s"],
        "time_ratio": on["step_s"] / off["step_s"],
        "peak_gb_off": off["peak_gb"],
        "peak_gb_on": on["peak_gb"],
        "memory_ratio": on["peak_gb"] / off["peak_gb"],
        "mfu_off": off["mfu"],
        "mfu_on": on["mfu"],
        "tflops_step": flops / 1e12,
        "hw_tflops_step": hw_flops / 1e12,
        "planned_gb": planned_gib(spec, layers, args, dtype),
        "layers": layers,
        "other_load_cpus": other_load,
        "threads": torch.get_num_threads(),
    }
    print(" ".join(f"{key}={_fmt(value)}" for key, value in figures.items()))
    return 0


def planned_gib(spec, layers: int, args: argparse.Namespace, dtype: torch.dtype) -> float:
    """The memory planner's prediction of this step's peak (``python -m svi_train.plan``), in GiB."""
    from dataclasses import replace

    from svi_train.config import LoraSettings
    from svi_train.memory_plan import Choice, Sample, plan_memory

    base = "fp8" if args.fp8 else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    precision = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(dtype, "32-true")
    plan = plan_memory(
        replace(spec, num_layers=layers),
        LoraSettings(rank=args.rank, alpha=float(args.rank)),
        Choice(base, checkpointing=True),
        Sample(1, args.frames, args.height, args.width),
        precision,
    )
    return plan.gpu / 2**30


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


if __name__ == "__main__":
    sys.exit(main())
