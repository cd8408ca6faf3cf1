"""One generation clip of the full-size Wan 2.1 I2V 14B DiT on a GPU with its weights offloaded: time and peak memory
next to the memory planner's prediction.

The DiT is ``WanTransformer3DModel(**get_spec("wan2.1-i2v-14b-480p").transformer_config())`` with random weights
(no download), built on the GPU in bf16 (fast init), then placed as ``python -m svi_infer memory.offload=...
memory.weights_dtype=...`` places it: :func:`svi_infer.memory.store_float8` and
:func:`svi_infer.memory.offload_blocks` (diffusers' layerwise casting and block-level group offload, the blocks on
the CPU). The VAE is diffusers' ``AutoencoderKLWan()`` (the Wan 2.1 VAE's config), random, fp32, offloaded to the
CPU between calls. One clip of 81 x 480 x 832: ``--steps`` Euler steps of SVI's schedule (default 4, cfg 1: one DiT
pass per step, the few-step preset ``+preset=lightx2v_4step``) on random text and image embeddings (the encoders
run before the DiT and are left out: the plan lists them apart), then the VAE decode. CUDA's peak memory
(``max_memory_allocated``) is read after the DiT passes and after the decode; ``planned_gb`` is
:func:`svi_infer.memory_plan.plan_generation`'s peak of the same two parts.

``--tiny`` runs the same code on the CPU with ``tiny-wan2.1-i2v`` (peak memory ``nan``; the placement hooks run
but move nothing). Ends with one line of ``name=value`` figures.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

FULL_SPEC, TINY_SPEC = "wan2.1-i2v-14b-480p", "tiny-wan2.1-i2v"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny spec on the CPU (CI)")
    parser.add_argument("--offload", default="group", choices=("none", "model", "group"), help="default group")
    parser.add_argument("--fp8", action="store_true", help="the DiT's weights stored in float8 (weights_dtype=fp8)")
    parser.add_argument("--blocks-per-group", type=int, default=1, help="group offload: blocks moved together")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4, cfg 1)")
    parser.add_argument("--frames", type=int, default=None, help="default 81 (9 with --tiny)")
    parser.add_argument("--height", type=int, default=None, help="default 480 (48 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="default 832 (80 with --tiny)")
    args = parser.parse_args(argv)
    args.frames = args.frames or (9 if args.tiny else 81)
    args.height = args.height or (48 if args.tiny else 480)
    args.width = args.width or (80 if args.tiny else 832)
    return args


def build(spec, device: torch.device, dtype: torch.dtype, args: argparse.Namespace):
    """The DiT and VAE, placed as svi_infer places them for ``args.offload`` / ``args.fp8``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from svi_infer.memory import offload_blocks, offload_components, store_float8
    from svi_infer.tiny import tiny_vae

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialised where it is fastest, then placed
            transformer = WanTransformer3DModel(**spec.transformer_config()).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    vae = (tiny_vae(spec) if spec.tiny else AutoencoderKLWan()).eval().requires_grad_(False)
    if args.fp8:
        store_float8(transformer, compute_dtype=dtype)
    if args.offload == "group":
        transformer.to("cpu")
        offload_blocks(transformer, device, args.blocks_per_group)
        offload_components([vae], device)
    elif args.offload == "model":
        transformer.to("cpu")
        offload_components([transformer, vae], device)
    else:
        vae.to(device)
    return transformer, vae


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_generate: no CUDA device here; run it on a GPU, or pass --tiny for the CPU run", file=sys.stderr)
        return 2
    from svi_infer.flow import euler_step, inference_sigmas
    from svi_infer.memory_plan import Clip, dit_inputs, plan_generation
    from svi_infer.spec import get_spec

    spec = get_spec(TINY_SPEC if args.tiny else FULL_SPEC)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    transformer, vae = build(spec, device, dtype, args)
    built = time.perf_counter() - t0
    clip = Clip(args.frames, args.height, args.width)
    inputs = {k: None if v is None else torch.randn(v.shape, dtype=v.dtype, device=device)
              for k, v in dit_inputs(spec, clip, dtype).items()}  # fmt: skip
    x = torch.randn(clip.latent(spec), device=device, dtype=torch.float32)
    y = inputs.pop("hidden_states")[:, spec.latent_channels :]
    inputs.pop("timestep")
    sigmas = inference_sigmas(args.steps, spec.shift).tolist()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            timestep = torch.full((1,), sigma * 1000.0, device=device)
            latent_in = torch.cat([x.to(dtype), y], dim=1)
            velocity = transformer(hidden_states=latent_in, timestep=timestep, **inputs, return_dict=False)[0]
            x = euler_step(x, velocity.float(), sigma, sigma_next)
        if cuda:
            torch.cuda.synchronize()
        dit_s = time.perf_counter() - t1
        dit_peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else math.nan
        t2 = time.perf_counter()
        frames = vae.decode(x.to(next(vae.parameters()).dtype)).sample
        if cuda:
            torch.cuda.synchronize()
        decode_s = time.perf_counter() - t2
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else math.nan
    weights = "fp8" if args.fp8 else "auto"
    plan = plan_generation(spec, clip, weights, args.offload, args.blocks_per_group, dtype, stream=cuda)
    vae_part = next((c.weights + c.peak for c in plan.components if c.name == "VAE"), 0)
    planned = max(sum(plan.dit.values()) + plan.dit_forward, vae_part) / 2**30
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device: {name}; {spec.id} built in {built:.1f}s, offload={args.offload}, fp8={args.fp8}")
    print(f"clip {args.frames}x{args.height}x{args.width}, {args.steps} steps: frames {tuple(frames.shape)}")
    figures = {
        "gen_dit_s_per_step": dit_s / args.steps,
        "gen_decode_s": decode_s,
        "gen_peak_gb_dit": dit_peak,
        "gen_peak_gb": peak,
        "gen_planned_gb": planned,
    }
    print(" ".join(f"{key}={value:.4g}" for key, value in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
