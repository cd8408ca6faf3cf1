"""How large are the deviations from the reference SVI implementation that we keep? Measured side by side.

Four of the deviations listed in the README ("Differences from the reference implementation") change numbers;
this script measures each against a copy of what the reference does, with the same model, noise and inputs:

1. **fp32 Euler integration.** Our sampler keeps the latents in float32 between steps; the reference's DiffSynth
   loop keeps them in the model dtype (bf16: bf16 noise, bf16 velocity, bf16 update). Both runs use the tiny
   Wan 2.1 I2V model *in bf16* (as the reference runs its DiT), 50 steps, shift 5, text CFG 5, one 33-frame
   48x80 clip; the reference side is a copy of ``sample_clip``'s loop with ``x`` held in bf16. Reported: the
   RMS of the final-latent difference relative to the RMS of the latents (``fp32_latent_rel``), its max
   (``fp32_latent_max``), and on the decoded uint8 frames the mean and max difference in grey levels.
2. **Rounding instead of truncation to uint8.** On the decoded frames of (1): mean signed, mean absolute and max
   difference in grey levels between ``round`` (ours, ``tensor_to_frames``) and the reference's truncating cast.
   Then the pixel hand-off: the last frame, converted both ways, is re-encoded as the next clip's conditioning
   (``ref_pad_num=-1``) and the next clip sampled from each; reported: the relative RMS difference of the two
   ``y`` and of the two next clips' final latents.
4. **Sketch-nearest replacement in full error banks.** One grid of ``ErrorBank`` (``nearest_l2``, default 4096-float
   sketch) at the real Wan 2.1 latent size [16, 21, 60, 104] bf16 (4 MiB an entry), filled with ``--entries``
   errors; then each new error is inserted both ways on identical contents: the reference's ``l2_batch`` (stack
   the grid, full L2, argmin) and ``ErrorBank.add``. Reported per error kind: how often the sketch picks the full-L2
   nearest slot (``*_agree``), the mean and max ratio of the full-L2 distance of our pick to the best one
   (``*_ratio_mean/max``, 1 = always the best), and the median insert time both ways. Two kinds of errors:
   ``random`` (i.i.d. Gaussian, log-uniform scales in [0.5, 2], as in ``recycling_overhead.py``) and
   ``smooth`` (low-rank: random mixtures of 4 smooth fields, trilinearly upsampled from a coarse grid, plus 5%
   i.i.d. noise, all at one scale, so the nearest entry is decided by the structure, not by the norm).
5. **Exact float timesteps on Wan 2.2.** We feed the DiT ``1000 * sigma`` as a float32 and switch experts on the
   exact value. The reference's DiffSynth loop decides the switch on the float32 scheduler timestep, then casts the
   timestep to the model dtype (``timestep.to(dtype=torch_dtype)``, bf16: 992 for 991.7, steps of 4 above 512)
   before the DiT sees it. Both runs use the tiny Wan 2.2 A14B model in bf16 and fp32 integration, so the
   difference is the timestep alone. Reported: the relative RMS / max difference of the final latents, the
   largest timestep change, and the expert-switch step both ways (and the one a switch on the bf16 value would
   give).

(3, the seam rule, is a frame count, not a measurement: see the README.)

The tiny models have random weights, so (1), (2) and (5) give the size of the effect on a network of Wan's
structure and dtype handling, not on the real 14B weights. Run: ``.venv/bin/python bench/reference_differences.py``
(30-70 s on a 2-core CPU shared with other work, ~0.9 GB peak RSS; ``--steps`` and ``--entries`` make it
shorter or longer). Ends with one line of ``name=value`` figures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import logging as diffusers_logging
from machine_load import busy_cpu_s  # noqa: E402  (bench/ is on sys.path when run as a script)
from PIL import Image

from svi_infer.conditioning import conditioning_video, first_frames_mask, with_mask
from svi_infer.flow import inference_sigmas
from svi_infer.model import WanModel, build_model
from svi_infer.sampler import PassInputs, TextGuidance, sample_clip
from svi_infer.spec import get_spec
from svi_infer.video_io import frames_to_tensor, tensor_to_frames
from svi_train.recycling import ErrorBank

FRAMES, HEIGHT, WIDTH = 33, 48, 80
SHIFT, CFG = 5.0, 5.0
REAL_SHAPE = (16, 21, 60, 104)  # Wan 2.1 latent of an 81 x 480 x 832 clip


# --- one clip, both ways ------------------------------------------------------------------------------------------


def clip_inputs(model: WanModel, anchor: Image.Image) -> dict[str, PassInputs]:
    text = model.encode_text(["a boat sails along a river at dusk"])
    negative = model.encode_text(["blurred, static, overexposed"])
    image = model.encode_image(anchor)
    return {"cond": PassInputs(text, image), "uncond": PassInputs(negative, image)}


def pixel_y(model: WanModel, motion: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """SVI-Shot conditioning: ``motion`` frames [3, m, H, W], then the anchor over the rest; VAE-encoded, masked."""
    video = conditioning_video(motion, anchor, FRAMES, ref_pad_num=-1)[None]
    latent = model.encode_video(video)
    return with_mask(latent, first_frames_mask(FRAMES, *latent.shape[-2:]))


@torch.no_grad()
def reference_loop(
    model: WanModel,
    y: torch.Tensor,
    inputs: dict[str, PassInputs],
    steps: int,
    seed: int,
    state_dtype: torch.dtype,
    timesteps: str = "exact",
) -> tuple[torch.Tensor, list[str]]:
    """A copy of ``sample_clip``'s loop (text CFG, concat conditioning) with the two reference choices as knobs.

    ``state_dtype``: the dtype ``x`` is held in between steps (float32 = ours; bf16 = the reference, whose update
    ``x + v * (sigma_next - sigma)`` runs on bf16 tensors). ``timesteps``: what the DiT is given: ``exact`` (ours,
    ``1000 * sigma`` as float32), ``bf16`` (the reference's cast to the model dtype) or ``int`` (rounded to an
    integer, for comparison). The expert is chosen on the exact value in all three, as the reference does.
    Returns the final latents (float32) and the expert used at each step.
    """
    spec, guidance = model.spec, TextGuidance(CFG)
    x = torch.randn((1, spec.latent_channels, *y.shape[-3:]), generator=torch.Generator().manual_seed(seed))
    x = x.to(state_dtype)
    y = y.to(model.dtype)
    sigmas = inference_sigmas(steps, SHIFT).tolist()
    experts = []
    for i in range(steps):
        t = sigmas[i] * 1000.0
        e = spec.expert_for_timestep(t)
        experts.append("high" if e == 0 and len(model.transformers) > 1 else "low" if e else "main")
        timestep = torch.tensor([t], dtype=torch.float32)
        if timesteps == "bf16":
            timestep = timestep.to(torch.bfloat16).float()
        elif timesteps == "int":
            timestep = timestep.round()
        latent_in = torch.cat([x.to(model.dtype), y], dim=1)
        velocities = {
            name: model.transformers[e](
                hidden_states=latent_in,
                timestep=timestep,
                encoder_hidden_states=inputs[name].text,
                encoder_hidden_states_image=inputs[name].image,
                return_dict=False,
            )[0]
            for name in guidance.passes()
        }
        if state_dtype == torch.float32:
            velocity = guidance.combine({k: v.float() for k, v in velocities.items()})
        else:  # the reference combines the bf16 outputs in bf16 and steps in bf16
            velocity = guidance.combine({k: v.to(state_dtype) for k, v in velocities.items()})
        x = x + velocity * (sigmas[i + 1] - sigmas[i])
    return x.float(), experts


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().mean().sqrt() / b.float().square().mean().sqrt())


def uint8_frames(video: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """Decoded ``[1, 3, T, H, W]`` video to uint8 frames: ours (``tensor_to_frames``) or the reference's cast."""
    if not truncate:
        return tensor_to_frames(video[0])
    scaled = (video[0].float().clamp(-1, 1) + 1.0) * 127.5
    return scaled.clip(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()  # .to(uint8) truncates, like astype


def anchor_image() -> Image.Image:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([xx * 255 / WIDTH, yy * 255 / HEIGHT, 128 + 60 * np.sin(xx / 7.0) * np.cos(yy / 5.0)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def integration_and_rounding_figures(steps: int) -> dict[str, float]:
    """Deviations 1 and 2 on the tiny Wan 2.1 I2V model in bf16."""
    model = build_model(get_spec("tiny-wan2.1-i2v"), dtype=torch.bfloat16)
    anchor_img = anchor_image()
    anchor = frames_to_tensor(np.asarray(anchor_img)[None])[:, 0]  # [3, H, W]
    inputs = clip_inputs(model, anchor_img)
    y = pixel_y(model, anchor[:, None], anchor)
    ours, _ = reference_loop(model, y, inputs, steps, 0, torch.float32)
    library = sample_clip(model, y, inputs, TextGuidance(CFG), steps, SHIFT, torch.Generator().manual_seed(0))
    copy_exact = bool(torch.equal(library, ours))  # the copied loop is the library's, bit for bit
    ref, _ = reference_loop(model, y, inputs, steps, 0, torch.bfloat16)
    video_ours, video_ref = model.decode_latents(ours), model.decode_latents(ref)
    grey_diff = np.abs(uint8_frames(video_ours).astype(int) - uint8_frames(video_ref).astype(int))
    print(
        f"(1) {steps}-step clip, bf16 DiT: fp32 vs bf16 integration: latents rel RMS {rel_rms(ref, ours):.2e}, "
        f"max {float((ref - ours).abs().max()):.3f}; frames mean {grey_diff.mean():.2f}, max {grey_diff.max()} grey "
        f"levels, 99th percentile {np.percentile(grey_diff, 99):.0f} (one bf16 rounding of the final latents: rel RMS "
        f"{rel_rms(ours.bfloat16(), ours):.2e}; copied loop == sample_clip: {copy_exact})"
    )

    rounded, truncated = uint8_frames(video_ours), uint8_frames(video_ours, truncate=True)
    signed = rounded.astype(int) - truncated.astype(int)
    # pixel hand-off: the last frame, as each would write and re-read it, conditions the next clip
    motion = {name: frames_to_tensor(f[-1:]) for name, f in (("round", rounded), ("trunc", truncated))}
    ys = {name: pixel_y(model, m, anchor) for name, m in motion.items()}
    nexts = {name: reference_loop(model, yv, inputs, steps, 1, torch.float32)[0] for name, yv in ys.items()}
    y_rel = rel_rms(ys["trunc"][:, 4:], ys["round"][:, 4:])  # latent channels, not the mask
    print(
        f"(2) round vs truncate: mean {signed.mean():+.3f} (abs {np.abs(signed).mean():.3f}), "
        f"max {np.abs(signed).max()} grey levels; next clip's y rel RMS {y_rel:.2e}, its latents "
        f"{rel_rms(nexts['trunc'], nexts['round']):.2e}"
    )
    return {
        "fp32_latent_rel": rel_rms(ref, ours),
        "fp32_latent_max": float((ref - ours).abs().max()),
        "fp32_grey_mean": float(grey_diff.mean()),
        "fp32_grey_max": int(grey_diff.max()),
        "fp32_grey_p99": float(np.percentile(grey_diff, 99)),
        "bf16_once_rel": rel_rms(ours.bfloat16(), ours),
        "round_grey_mean": float(signed.mean()),
        "round_grey_absmean": float(np.abs(signed).mean()),
        "round_grey_max": int(np.abs(signed).max()),
        "round_next_y_rel": y_rel,
        "round_next_latent_rel": rel_rms(nexts["trunc"], nexts["round"]),
        "copy_exact": int(copy_exact),
    }


def timestep_figures(steps: int) -> dict[str, float]:
    """Deviation 5 on the tiny Wan 2.2 A14B model in bf16."""
    model = build_model(get_spec("tiny-wan2.2-i2v-a14b"), dtype=torch.bfloat16)
    anchor_img = anchor_image()
    anchor = frames_to_tensor(np.asarray(anchor_img)[None])[:, 0]
    inputs = clip_inputs(model, anchor_img)
    y = pixel_y(model, anchor[:, None], anchor)
    ours, experts = reference_loop(model, y, inputs, steps, 0, torch.float32)
    ref, ref_experts = reference_loop(model, y, inputs, steps, 0, torch.float32, "bf16")
    as_int, _ = reference_loop(model, y, inputs, steps, 0, torch.float32, "int")
    ts = inference_sigmas(steps, SHIFT)[:-1].float() * 1000.0
    ts_bf16 = ts.to(torch.bfloat16).float()
    spec = model.spec
    switch = experts.index("low")
    switch_bf16 = [spec.expert_for_timestep(float(t)) for t in ts_bf16].index(1)
    print(
        f"(5) {steps}-step clip, A14B bf16: exact vs bf16 timesteps: latents rel RMS {rel_rms(ref, ours):.2e}, "
        f"max {float((ref - ours).abs().max()):.3f}; timesteps moved by up to {float((ts_bf16 - ts).abs().max()):.2f}; "
        f"expert switch at step {switch} (reference {ref_experts.index('low')}; on the bf16 value it would be "
        f"{switch_bf16}); integer timesteps instead: rel RMS {rel_rms(as_int, ours):.2e}"
    )
    return {
        "ts_latent_rel": rel_rms(ref, ours),
        "ts_latent_max": float((ref - ours).abs().max()),
        "ts_max_shift": float((ts_bf16 - ts).abs().max()),
        "switch_step": switch,
        "switch_step_ref": ref_experts.index("low"),
        "switch_step_bf16": switch_bf16,
        "ts_int_latent_rel": rel_rms(as_int, ours),
    }


# --- error banks ---------------------------------------------------------------------------------------------------


def random_errors(generator: torch.Generator):
    while True:
        scale = 2.0 ** (2.0 * float(torch.rand(1, generator=generator)) - 1.0)
        yield (torch.randn(REAL_SHAPE, generator=generator) * scale).to(torch.bfloat16)


def smooth_errors(generator: torch.Generator, rank: int = 4):
    coarse = torch.randn(rank, REAL_SHAPE[0], 4, 8, 13, generator=generator)
    basis = F.interpolate(coarse, size=REAL_SHAPE[1:], mode="trilinear", align_corners=False)
    basis = basis / basis.flatten(1).std(dim=1).view(rank, 1, 1, 1, 1)
    while True:
        coeffs = torch.randn(rank, generator=generator) / rank**0.5
        error = torch.einsum("k,kcthw->cthw", coeffs, basis)
        yield (error + 0.05 * torch.randn(REAL_SHAPE, generator=generator)).to(torch.bfloat16)


def bank_figures(kind: str, entries: int, inserts: int, seed: int = 0) -> dict[str, float]:
    """Fill one grid with ``entries`` errors, then insert ``inserts`` more both ways on identical contents."""
    generator = torch.Generator().manual_seed(seed)
    source = (random_errors if kind == "random" else smooth_errors)(generator)
    bank = ErrorBank("x0", num_grids=1, capacity=entries, replacement="nearest_l2", max_bytes=1 << 40)
    for _ in range(entries):
        bank.add(next(source), 0, generator)
    agree, ratios, ref_s, ours_s = [], [], [], []
    for _ in range(inserts):
        grid = list(bank.state_dict()["errors"][0])  # the bank's own tensors: same contents, no copy
        new = next(source)
        t = time.perf_counter()
        stacked = torch.stack(grid)  # the reference's l2_batch
        distances = torch.norm(stacked.flatten(1) - new.flatten()[None], p=2, dim=1)
        best = int(torch.argmin(distances))
        ref_s.append(time.perf_counter() - t)
        del stacked, grid
        t = time.perf_counter()
        ours = bank.add(new, 0, generator)
        ours_s.append(time.perf_counter() - t)
        agree.append(ours == best)
        ratios.append(float(distances[ours] / distances[best]))
    figures = {
        f"{kind}_agree": sum(agree) / len(agree),
        f"{kind}_ratio_mean": statistics.fmean(ratios),
        f"{kind}_ratio_max": max(ratios),
        f"{kind}_ref_insert_ms": statistics.median(ref_s) * 1e3,
        f"{kind}_ours_insert_ms": statistics.median(ours_s) * 1e3,
    }
    print(
        f"(4) {kind} errors, {entries} x {bank.entry_nbytes / 2**20:.1f} MiB: sketch picked the full-L2 nearest in "
        f"{figures[f'{kind}_agree']:.0%} of {inserts} inserts; distance ratio mean {figures[f'{kind}_ratio_mean']:.4f} "
        f"max {figures[f'{kind}_ratio_max']:.4f}; insert {figures[f'{kind}_ref_insert_ms']:.1f} ms (full L2) vs "
        f"{figures[f'{kind}_ours_insert_ms']:.1f} ms (sketch)"
    )
    return figures


# --- main ----------------------------------------------------------------------------------------------------------


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps per clip (default 50, as SVI)")
    parser.add_argument("--entries", type=int, default=20, help="errors in the full bank grid (default 20)")
    parser.add_argument("--inserts", type=int, default=20, help="inserts compared per error kind (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    diffusers_logging.set_verbosity_error()  # the tiny DiT is cast to bf16 whole, as the reference runs it

    t_start, busy0, own0 = time.perf_counter(), busy_cpu_s(), _own_cpu_s()
    figures: dict[str, float] = {}
    figures.update(integration_and_rounding_figures(args.steps))
    figures.update(timestep_figures(args.steps))
    for kind in ("random", "smooth"):
        figures.update(bank_figures(kind, args.entries, args.inserts))
    wall = time.perf_counter() - t_start
    figures["other_load_cpus"] = max(0.0, (busy_cpu_s() - busy0) - (_own_cpu_s() - own0)) / wall
    figures["threads"] = torch.get_num_threads()
    if figures["other_load_cpus"] > 0.25:
        print(f"WARNING: other work kept {figures['other_load_cpus']:.2f} CPUs busy; the insert times are unreliable")
    print(f"(benchmark took {wall:.0f}s)")
    print(" ".join(f"{name}={_fmt(value)}" for name, value in figures.items()))


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


if __name__ == "__main__":
    main()
