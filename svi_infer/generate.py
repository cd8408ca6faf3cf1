"""The long-video loop: clip after clip, each conditioned on the previous one, streamed to disk.

Every finished clip is written as its own mp4 under ``<output>.parts/`` together with what the next
clip needs (tail frames or latents) and the run state, so an interrupted run restarted with the same
command continues after the last finished clip and yields the same video. At the end the clips are
joined by stream copy into ``output`` and a sidecar JSON records every setting, seed and prompt.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from svi_infer.atomic import write_json, write_with
from svi_infer.conditioning import (
    check_frames_per_clip,
    conditioning_video,
    first_frames_mask,
    latent_handoff,
    with_mask,
)
from svi_infer.model import WanModel
from svi_infer.prompts import prompt_for_clip
from svi_infer.sampler import PassInputs, TextGuidance, sample_clip
from svi_infer.spec import ModelSpec
from svi_infer.video_io import concat_mp4, fit_image, frames_to_tensor, tensor_to_frames, write_mp4

HANDOFFS = ("pixel", "latent")
SEED_POLICIES = ("fixed", "random")
# Wan's default negative prompt, in English (reference/svi.md §4.1).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the frames of a long video (besides model, adapters, image and prompts)."""

    num_clips: int = 3
    frames_per_clip: int = 81
    num_motion_frames: int = 1
    ref_pad_num: int = -1
    handoff: str = "pixel"
    num_motion_latents: int = 1
    steps: int = 50
    shift: float = 5.0
    cfg_scale: float = 5.0
    fps: int = 16
    height: int = 480
    width: int = 832
    seed: int = 42
    seed_policy: str = "fixed"
    prompt_repeat_times: int = 1
    use_first_prompt_only: bool = False
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT

    @property
    def overlap_frames(self) -> int:
        """Frames at the start of every clip after the first that repeat the previous clip (dropped)."""
        return self.num_motion_frames if self.handoff == "pixel" else 1 + 4 * self.num_motion_latents

    def validate(self, spec: ModelSpec) -> None:
        """Raise one ``ValueError`` naming every bad setting, before anything heavy is loaded."""
        problems = []
        try:
            check_frames_per_clip(self.frames_per_clip, spec.vae_temporal)
        except ValueError as err:
            problems.append(str(err))
        if self.handoff not in HANDOFFS:
            problems.append(f"handoff must be one of {HANDOFFS}, got {self.handoff!r}")
        if self.handoff == "pixel" and not 1 <= self.num_motion_frames < self.frames_per_clip:
            problems.append(
                f"num_motion_frames must be >= 1 and < frames_per_clip ({self.frames_per_clip}), "
                f"got {self.num_motion_frames}"
            )
        if self.handoff == "latent" and not 1 <= self.num_motion_latents < spec.latent_frames(self.frames_per_clip) - 1:
            problems.append(
                f"num_motion_latents must be >= 1 and leave room after the anchor latent in a "
                f"{spec.latent_frames(self.frames_per_clip)}-latent clip, got {self.num_motion_latents}"
            )
        if self.ref_pad_num < -1:
            problems.append(f"ref_pad_num must be -1 (anchor), 0 (zeros) or N > 0, got {self.ref_pad_num}")
        m = spec.spatial_multiple
        if self.height % m or self.width % m or self.height <= 0 or self.width <= 0:
            problems.append(f"resolution must be a positive multiple of {m}, got {self.height}x{self.width}")
        if self.seed_policy not in SEED_POLICIES:
            problems.append(f"seed_policy must be one of {SEED_POLICIES}, got {self.seed_policy!r}")
        if self.seed_policy == "fixed" and self.seed == 0 and self.num_clips > 1:
            problems.append("seed=0 with seed_policy=fixed gives every clip the same noise (seed x clip index)")
        for name in ("num_clips", "steps", "fps", "prompt_repeat_times"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg_scale <= 0 or self.shift <= 0:
            problems.append(f"cfg_scale and shift must be > 0, got {self.cfg_scale} and {self.shift}")
        if not spec.conditioning_by_concat:
            problems.append(
                f"{spec.id}: long-video generation is implemented for the Wan 2.1 / 2.2 A14B image-to-video "
                "bases; TI2V-5B (first-frame latent replacement) is not supported yet"
            )
        if problems:
            raise ValueError("invalid generation settings:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class GenerationResult:
    video: Path
    sidecar: Path
    frames: int
    clips: int


class ResumeMismatchError(ValueError):
    """A partial run exists at the output path but was made with other settings."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def sidecar_path(output: Path) -> Path:
    return output.with_suffix(".json")


class LongVideoGenerator:
    """Generates a long video clip by clip with one model (adapters already loaded)."""

    def __init__(self, model: WanModel, settings: GenerationSettings, provenance: dict | None = None) -> None:
        settings.validate(model.spec)
        self.model = model
        self.settings = settings
        self.provenance = provenance or {}

    # -- public -------------------------------------------------------------------------------------
    def generate(
        self,
        image: Image.Image,
        prompts: list[str],
        output: str | Path,
        resume: bool = True,
        progress: bool = True,
    ) -> GenerationResult:
        """Generate ``settings.num_clips`` clips from ``image`` and ``prompts`` into ``output`` (mp4)."""
        s = self.settings
        output = Path(output)
        parts = parts_dir(output)
        anchor_img = fit_image(image, s.height, s.width)
        fingerprint = self._fingerprint(anchor_img, prompts)
        state = self._load_state(parts, fingerprint) if resume else None
        if state is None:
            shutil.rmtree(parts, ignore_errors=True)
            state = {"fingerprint": fingerprint, "clips": [], "frames_written": 0, "tail": None}
        parts.mkdir(parents=True, exist_ok=True)

        anchor = frames_to_tensor(np.asarray(anchor_img)[None])  # [3, 1, H, W]
        negative = self.model.encode_text([s.negative_prompt])
        anchor_latent = self.model.encode_video(anchor[None]) if s.handoff == "latent" else None
        tail = load_file(parts / state["tail"])["tail"] if state["tail"] else None
        start = len(state["clips"])
        bar = tqdm(total=s.num_clips, initial=start, desc="clips", unit="clip", disable=not progress)
        for k in range(start, s.num_clips):
            t0 = time.perf_counter()
            prompt = prompt_for_clip(prompts, k, s.prompt_repeat_times, s.use_first_prompt_only)
            seed = self._seed(k)
            frames, latents = self._clip(k, prompt, seed, anchor, anchor_latent, tail, negative, progress)
            keep = frames if k == 0 else frames[s.overlap_frames :]
            segment = f"clip_{k:05d}.mp4"
            write_mp4(parts / segment, keep, s.fps)
            if s.handoff == "pixel":
                tail = frames_to_tensor(frames[-s.num_motion_frames :])
            else:
                tail = latents[:, :, -s.num_motion_latents :].contiguous().cpu()
            tail_name = f"tail_{k:05d}.safetensors"
            write_with(parts / tail_name, lambda p, t=tail: save_file({"tail": t}, str(p)))
            start_frame = state["frames_written"]
            state["clips"].append(
                {
                    "index": k,
                    "prompt": prompt,
                    "seed": seed,
                    "segment": segment,
                    "frames": [start_frame, start_frame + len(keep)],
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            state["frames_written"] = start_frame + len(keep)
            old_tail, state["tail"] = state["tail"], tail_name
            write_json(parts / "state.json", state)
            if old_tail:
                (parts / old_tail).unlink(missing_ok=True)
            self._write_sidecar(output, state, complete=False)
            bar.update(1)
        bar.close()
        concat_mp4([parts / c["segment"] for c in state["clips"]], output)
        sidecar = self._write_sidecar(output, state, complete=True)
        shutil.rmtree(parts, ignore_errors=True)
        return GenerationResult(
            video=output, sidecar=sidecar, frames=state["frames_written"], clips=len(state["clips"])
        )

    # -- one clip -----------------------------------------------------------------------------------
    def _clip(self, k, prompt, seed, anchor, anchor_latent, tail, negative, progress):
        s, model = self.settings, self.model
        latent_frames = model.spec.latent_frames(s.frames_per_clip)
        if s.handoff == "latent":
            y = latent_handoff(anchor_latent, tail.to(anchor_latent) if tail is not None else None, latent_frames)
            clip_frame = anchor[:, 0]
        else:
            motion = anchor if tail is None else tail  # clip 0 continues from the image itself
            video = conditioning_video(motion, anchor[:, 0], s.frames_per_clip, s.ref_pad_num)
            latent = model.encode_video(video[None])
            h, w = latent.shape[-2:]
            y = with_mask(latent, first_frames_mask(s.frames_per_clip, h, w, 1, model.spec.vae_temporal))
            clip_frame = motion[:, 0]  # SVI feeds CLIP the first conditioning frame
        image_embeds = None
        if model.spec.has_image_encoder:
            image_embeds = model.encode_image(Image.fromarray(tensor_to_frames(clip_frame[:, None])[0]))
        text = model.encode_text([prompt])
        inputs = {"cond": PassInputs(text, image_embeds), "uncond": PassInputs(negative, image_embeds)}
        generator = torch.Generator("cpu").manual_seed(seed)
        with tqdm(total=s.steps, desc=f"clip {k} steps", leave=False, disable=not progress) as steps_bar:
            latents = sample_clip(
                model,
                y,
                inputs,
                TextGuidance(s.cfg_scale),
                s.steps,
                s.shift,
                generator,
                lambda _: steps_bar.update(1),
            )
        frames = tensor_to_frames(model.decode_latents(latents)[0])
        return frames, latents

    # -- state --------------------------------------------------------------------------------------
    def _seed(self, k: int) -> int:
        if self.settings.seed_policy == "random":
            return secrets.randbits(31)
        return self.settings.seed * k  # SVI's seed_multiplier: 0, 42, 84, ...

    def _fingerprint(self, anchor_img: Image.Image, prompts: list[str]) -> str:
        s = asdict(self.settings)
        s.pop("num_clips")  # an interrupted run may be continued to a different length
        if self.settings.seed_policy == "random":
            s.pop("seed")
        record = {
            "settings": s,
            "spec": self.model.spec.id,
            "provenance": self.provenance,
            "image": _sha256(np.asarray(anchor_img).tobytes()),
            "prompts": prompts,
        }
        return _sha256(json.dumps(record, sort_keys=True, default=str).encode())

    @staticmethod
    def _load_state(parts: Path, fingerprint: str) -> dict | None:
        path = parts / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            raise ResumeMismatchError(
                f"{parts} holds an interrupted run made with other settings, image, prompts or adapters. "
                "Rerun with the same command to continue it, choose another output path, or pass resume=false "
                "to discard it and start over."
            )
        return state

    def _write_sidecar(self, output: Path, state: dict, complete: bool) -> Path:
        s = self.settings
        record = {
            "video": str(output),
            "complete": complete,
            "model": self.model.spec.id,
            **self.provenance,
            "settings": asdict(s),
            "frames": state["frames_written"],
            "duration_s": round(state["frames_written"] / s.fps, 3),
            "clips": [{k: v for k, v in c.items() if k != "segment"} for c in state["clips"]],
        }
        path = sidecar_path(output)
        write_json(path, record)
        return path
