"""The long-video loop: clip after clip, each conditioned on the previous one, streamed to disk.

Every finished clip is written as its own mp4 under ``<output>.parts/`` together with what the next
clip needs (tail frames or latents) and the run state, so an interrupted run restarted with the same
command continues after the last finished clip and yields the same video. At the end the clips are
joined by stream copy into ``output`` and a sidecar JSON records every setting, seed and prompt.

What a clip is conditioned on and what it carries into the next are the variant's strategy objects
(:mod:`svi_infer.variants`): a :class:`~svi_infer.variants.base.Conditioning` (text, Talk's audio, Dance's pose:
per-run inputs, per-clip guidance passes, extra outputs) and a :class:`~svi_infer.variants.base.Handoff` (decoded
frames or latents). The loop here is the same for all of them.
"""

from __future__ import annotations

import hashlib
import json
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
from svi_infer.longvideo.outputs import parts_dir, sidecar_path
from svi_infer.model import WanModel
from svi_infer.prompts import prompt_for_clip
from svi_infer.sampler import sample_clip
from svi_infer.settings import DEFAULT_NUM_CLIPS, GenerationSettings
from svi_infer.variants import make_conditioning, make_handoff
from svi_infer.variants.base import ClipContext, Conditioning, RunInputs
from svi_infer.video_io import concat_mp4, fit_image, frames_to_tensor, tensor_to_frames, write_mp4


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


class LongVideoGenerator:
    """Generates a long video clip by clip with one model (adapters, Talk modules or pose encoder already on it).

    ``conditioning``: the variant's conditioning object, with its runtime resources (Talk's audio encoder); by
    default the one ``settings.conditioning`` names, built bare. ``requested`` keeps the settings as given;
    each :meth:`generate` resolves them for its image (size, negative prompt) into ``settings``, what it records.
    """

    def __init__(
        self,
        model: WanModel,
        settings: GenerationSettings,
        provenance: dict | None = None,
        conditioning: Conditioning | None = None,
    ) -> None:
        settings.validate(model.spec)
        self.conditioning = conditioning or make_conditioning(settings.conditioning)
        if self.conditioning.name != settings.conditioning:
            raise ValueError(
                f"the generator was given {self.conditioning.name} conditioning but the settings say "
                f"conditioning={settings.conditioning}"
            )
        self.conditioning.check_model(model)
        self.handoff = make_handoff(settings.handoff)
        self.model = model
        self.requested = settings
        self.settings = settings
        self.provenance = provenance or {}
        self._inputs = RunInputs()

    # -- public -------------------------------------------------------------------------------------
    def generate(
        self,
        image: Image.Image,
        prompts: list[str],
        output: str | Path,
        resume: bool = True,
        progress: bool = True,
        audio: str | Path | None = None,
        pose: str | Path | None = None,
        side_by_side: bool = False,
    ) -> GenerationResult:
        """Generate ``settings.num_clips`` clips from ``image`` and ``prompts`` into ``output`` (mp4).

        ``audio`` (Talk; required with ``conditioning="audio"``): any file with an audio track; it drives the
        clips and is muxed into ``output``. ``pose`` (Dance; required with ``conditioning="pose"``): the pose
        video, looped. ``side_by_side`` (Dance) also writes ``<output stem>.sbs.mp4``. Inputs of another variant
        are refused. The video's size follows ``image`` unless the settings fix it
        (:meth:`GenerationSettings.resolve`); the sidecar records the resolved settings.
        """
        self.settings = self.requested.resolve(self.model.spec, image.size)
        self.settings.validate(self.model.spec)
        s, conditioning = self.settings, self.conditioning
        output = Path(output)
        parts = parts_dir(output)
        anchor_img = fit_image(image, s.height, s.width)
        given = {"audio": audio, "pose": pose, "side_by_side": side_by_side}
        self._inputs = conditioning.plan_inputs(given, s, self.model.spec)
        conditioning.prepare(self._inputs, s)
        num_clips = self._num_clips()
        fingerprint = self._fingerprint(anchor_img, prompts)
        state = self._load_state(parts, fingerprint) if resume else None
        if state is None:
            shutil.rmtree(parts, ignore_errors=True)
            state = {"fingerprint": fingerprint, "clips": [], "frames_written": 0, "tail": None}
        elif state["clips"]:
            done = len(state["clips"])
            print(f"resuming {output} after clip {done} of {num_clips}: {max(num_clips - done, 0)} to go", flush=True)
        state["num_clips"] = num_clips
        parts.mkdir(parents=True, exist_ok=True)

        anchor = frames_to_tensor(np.asarray(anchor_img)[None])  # [3, 1, H, W]
        negative = self.model.encode_text([s.negative_prompt])
        anchor_latent = self.handoff.anchor_latent(self.model, anchor)
        tail = load_file(parts / state["tail"])["tail"] if state["tail"] else None
        start = len(state["clips"])
        bar = tqdm(total=num_clips, initial=start, desc="clips", unit="clip", disable=not progress)
        for k in range(start, num_clips):
            t0 = time.perf_counter()
            prompt = prompt_for_clip(prompts, k, s.prompt_repeat_times, s.use_first_prompt_only)
            seed = s.clip_seed(k)
            clip = ClipContext(k, s.frames_per_clip, s.overlap_frames)
            frames, latents = self._clip(clip, prompt, seed, anchor, anchor_latent, tail, negative, progress)
            keep = frames if k == 0 else frames[s.overlap_frames :]
            segment = f"clip_{k:05d}.mp4"
            write_mp4(parts / segment, keep, s.fps)
            extras = conditioning.clip_extras(anchor_img, clip, keep, parts)  # written before the state names the clip
            tail = self.handoff.tail(frames, latents, s)
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
                    "extra_segments": extras,
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
        outputs = conditioning.finish(output, parts, self._inputs, state["clips"])
        sidecar = self._write_sidecar(output, state, complete=True, outputs=outputs)
        shutil.rmtree(parts, ignore_errors=True)
        return GenerationResult(
            video=output, sidecar=sidecar, frames=state["frames_written"], clips=len(state["clips"])
        )

    # -- one clip -----------------------------------------------------------------------------------
    def _clip(self, clip: ClipContext, prompt, seed, anchor, anchor_latent, tail, negative, progress):
        s, model = self.settings, self.model
        y, held, clip_frame = self.handoff.clip_conditioning(model, anchor, anchor_latent, tail, s)
        image_embeds = None
        if model.spec.has_image_encoder:
            image_embeds = model.encode_image(Image.fromarray(tensor_to_frames(clip_frame[:, None])[0]))
        text = model.encode_text([prompt])
        inputs, guidance = self.conditioning.passes(clip, s, text, negative, image_embeds)
        generator = torch.Generator("cpu").manual_seed(seed)
        with (
            self.conditioning.during_clip(model, clip),
            tqdm(total=s.steps, desc=f"clip {clip.index} steps", leave=False, disable=not progress) as steps_bar,
        ):
            latents = sample_clip(
                model,
                y,
                inputs,
                guidance,
                s.steps,
                s.shift,
                generator,
                lambda _: steps_bar.update(1),
                held=held,
                latent_frames=model.spec.latent_frames(s.frames_per_clip),
            )
        frames = tensor_to_frames(model.decode_latents(latents)[0])
        return frames, latents

    def _num_clips(self) -> int:
        s = self.settings
        if s.num_clips is not None:
            return s.num_clips
        return self.conditioning.num_clips(s) or DEFAULT_NUM_CLIPS

    # -- state --------------------------------------------------------------------------------------
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
        record |= self._inputs.identity  # the files' contents, not their paths: a moved file resumes
        return _sha256(json.dumps(record, sort_keys=True, default=str).encode())

    @staticmethod
    def _load_state(parts: Path, fingerprint: str) -> dict | None:
        path = parts / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            raise ResumeMismatchError(
                f"{parts} holds an interrupted run made with other settings, image, prompts, adapters, audio or "
                "pose. "
                "Rerun with the same command to continue it, choose another output path, or pass resume=false "
                "to discard it and start over."
            )
        return state

    def _write_sidecar(self, output: Path, state: dict, complete: bool, outputs: dict | None = None) -> Path:
        s = self.settings
        record = {
            "video": str(output),
            "complete": complete,
            "model": self.model.spec.id,
            **self.provenance,
            "settings": asdict(s),
            "num_clips": state["num_clips"],
            "frames": state["frames_written"],
            "duration_s": round(state["frames_written"] / s.fps, 3),
            "clips": [{k: v for k, v in c.items() if k not in ("segment", "extra_segments")} for c in state["clips"]],
        }
        record |= self._inputs.record | (outputs or {})  # the variant's inputs and extra outputs
        path = sidecar_path(output)
        write_json(path, record)
        return path
