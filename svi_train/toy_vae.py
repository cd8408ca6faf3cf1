"""Train the toy world's Wan VAE (a real ``AutoencoderKLWan``) from scratch, on a CPU, in minutes.

A from-scratch ``AutoencoderKLWan`` learns slowly on two cores (13.5 dB after 10 minutes, reference/feasibility),
while a linear PCA codec of the same latent shape reaches 25 dB in seconds. So the recipe distils: the encoder's
latent is pulled towards the PCA codec's (a good code from the first step), while the decoder learns to
reconstruct. Stage 1 trains on single frames (the VAE's first, causal chunk: the spatial layers, 9x cheaper
than clips); stage 2 on 9-frame clips (the temporal layers). The latents' per-channel mean and std are measured
on training clips and written into the config, as Wan's own VAE carries them, so the DiT sees unit-scale latents.

    python -m svi_train.toy_vae OUTPUT_FOLDER [--frames-minutes 12] [--clips-minutes 15]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from torch import Tensor

from data_tools.toy_world import make_world, render, split_seeds

PATCH = 8  # the VAE's spatial factor
GROUP = 4  # its temporal factor
VAE_CONFIG = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
)


def to_video(frames: np.ndarray) -> Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> float ``[B, 3, T, H, W]`` in [-1, 1] (the VAE's input)."""
    return torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).contiguous()


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak 2, i.e. on the [0, 1] scale)."""
    return float(10 * torch.log10(4.0 / (a - b).pow(2).mean()))


@dataclass
class PcaCodec:
    """Linear codec with the VAE's latent shape: the first frame's 8x8 patches -> 16 numbers, then each 4-frame
    group's 8x8x4 patches -> 16. Its coefficients (scaled to unit std) are the encoder's distillation target."""

    mean1: Tensor
    basis1: Tensor
    std1: Tensor
    mean4: Tensor
    basis4: Tensor
    std4: Tensor

    @staticmethod
    def _patches(video: Tensor, frames: int) -> Tensor:
        """``[B, 3, frames, H, W]`` -> ``[B, H/8 * W/8, frames*8*8*3]``."""
        b, c, t, h, w = video.shape
        p = video.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 3, 5, 2, 4, 6, 1)
        return p.reshape(b, (h // PATCH) * (w // PATCH), t * PATCH * PATCH * c)

    @classmethod
    def fit(cls, clips: Tensor, z_dim: int) -> PcaCodec:
        def pca(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            mean = rows.mean(0)
            _, _, v = torch.pca_lowrank(rows - mean, q=z_dim, center=False, niter=4)
            basis = v[:, :z_dim]
            return mean, basis, ((rows - mean) @ basis).std(0)

        first = cls._patches(clips[:, :, :1], 1).reshape(-1, 3 * PATCH * PATCH)
        groups = torch.cat([cls._patches(clips[:, :, 1 + 4 * k : 5 + 4 * k], 4) for k in range(2)], dim=1)
        return cls(*pca(first), *pca(groups.reshape(-1, groups.shape[-1])))

    def encode(self, video: Tensor) -> Tensor:
        """``[B, 3, 1 + 4k, H, W]`` -> ``[B, z, 1 + k, H/8, W/8]``."""
        b, _, t, h, w = video.shape
        latents = [((self._patches(video[:, :, :1], 1) - self.mean1) @ self.basis1) / self.std1]
        for k in range((t - 1) // GROUP):
            group = self._patches(video[:, :, 1 + GROUP * k : 1 + GROUP * (k + 1)], GROUP)
            latents.append(((group - self.mean4) @ self.basis4) / self.std4)
        z = torch.stack(latents, dim=1)  # [B, T', h*w, z]
        return z.reshape(b, len(latents), h // PATCH, w // PATCH, -1).permute(0, 4, 1, 2, 3)


def _train_stage(
    vae: AutoencoderKLWan,
    pca: PcaCodec,
    pool: np.ndarray,
    held: Tensor,
    frames: int,
    batch: int,
    minutes: float,
    distill: float,
    lr: float,
    rng: np.random.Generator,
    name: str,
) -> None:
    """Train on random ``frames``-long windows of the pool for ``minutes`` (cosine learning rate over the time)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start, step = time.monotonic(), 0
    budget = minutes * 60.0
    while (elapsed := time.monotonic() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        video_i = rng.integers(pool.shape[0], size=batch)
        t0 = rng.integers(pool.shape[1] - frames + 1, size=batch)
        x = to_video(np.stack([pool[v, t : t + frames] for v, t in zip(video_i, t0, strict=True)]))
        if rng.random() < 0.5:
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        z = posterior.mode()
        recon = vae.decode(z).sample
        loss = (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        if distill > 0:
            loss = loss + distill * (z - pca.encode(x)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"{name} step {step} ({elapsed / 60:.1f} min): train {psnr(recon.detach(), x):.2f} dB, "
                  f"held-out clips {evaluate(vae, held):.2f} dB", flush=True)  # fmt: skip


@torch.no_grad()
def evaluate(vae: AutoencoderKLWan, held: Tensor) -> float:
    """Mean PSNR of held-out clips through encode -> decode (latent mode, output clamped as at inference)."""
    vae.eval()
    recon = vae.decode(vae.encode(held).latent_dist.mode()).sample.clamp(-1, 1)
    vae.train()
    return psnr(recon, held)


@torch.no_grad()
def latent_stats(vae: AutoencoderKLWan, clips: Tensor) -> tuple[list[float], list[float]]:
    z = torch.cat([vae.encode(c[None]).latent_dist.mode() for c in clips])
    dims = (0, 2, 3, 4)
    return z.mean(dims).tolist(), z.std(dims).clamp_min(1e-3).tolist()


def train_vae(
    output: Path, frames_minutes: float = 12.0, clips_minutes: float = 15.0, seed: int = 0, videos: int = 48
) -> float:
    """Train, measure held-out PSNR on 17-frame clips, write a diffusers ``AutoencoderKLWan`` folder to ``output``.
    Returns the held-out PSNR."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = np.stack([render(make_world(s), 160) for s in split_seeds("train", videos)])
    held = to_video(np.stack([render(make_world(s), 17) for s in split_seeds("heldout", 8)]))
    fit_clips = to_video(np.stack([pool[v, t : t + 9] for v in range(videos) for t in (0, 60, 120)]))
    pca = PcaCodec.fit(fit_clips, VAE_CONFIG["z_dim"])
    vae = AutoencoderKLWan(**VAE_CONFIG).train()
    _train_stage(vae, pca, pool, held, 1, 16, frames_minutes, 0.1, 2e-3, rng, "frames")
    _train_stage(vae, pca, pool, held, 1 + 2 * GROUP, 4, clips_minutes, 0.03, 1e-3, rng, "clips")
    quality = evaluate(vae, held)
    mean, std = latent_stats(vae.eval(), fit_clips[::3][:24])
    final = AutoencoderKLWan(**VAE_CONFIG, latents_mean=mean, latents_std=std)
    final.load_state_dict(vae.state_dict())
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return quality


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svi_train.toy_vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder to write the diffusers AutoencoderKLWan into")
    parser.add_argument("--frames-minutes", type=float, default=12.0, help="stage 1 (single frames), minutes")
    parser.add_argument("--clips-minutes", type=float, default=15.0, help="stage 2 (9-frame clips), minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quality = train_vae(args.output, args.frames_minutes, args.clips_minutes, args.seed)
    print(f"VAE written to {args.output}: held-out 17-frame clips reconstruct at {quality:.2f} dB PSNR")
    print(f"vae_psnr_db={quality:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
