"""The long-video loop: clip after clip, each conditioned on the previous one, streamed to disk.

Every finished clip is written as its own mp4 under ``<output>.parts/`` together with what the next
clip needs (tail frames or latents) and the run state, so an interrupted run restarted with the same
command continues after the last finished clip and yields the same video. At the end the clips are
joined by stream copy into ``output`` and a sidecar JSON records every setting, seed and prompt.

Bases: Wan 2.1 I2V and Wan 2.2 I2V-A14B (two experts, switched in the sampler) take ``y`` (mask + conditioning
latents) beside the latents, built from pixels (``handoff=pixel``) or latents (``handoff=latent``, SVI 2.0 Pro).
Wan 2.2 TI2V-5B has no ``y`` channels: with ``handoff=latent`` (the only one it takes) the held latents (clip 0:
the anchor's; later clips: the anchor's, then the previous clip's last ``num_motion_latents``) replace the first
latent frames at every step, at timestep 0. Either way a later clip's first ``overlap_frames`` frames repeat the
seam and are dropped.

Variants beyond text (``GenerationSettings.conditioning``):

* ``audio`` (SVI-Talk): the audio file is encoded once (wav2vec2 at the video fps) and clip ``k`` gets the
  features of exactly the output frames it covers, ``k * (F - overlap) .. + F - 1`` (:func:`talk_windows`);
  sampling uses three-pass text + audio guidance and the soundtrack is muxed into the joined video. Frames past
  the end of the audio get zero features (no audio) and the soundtrack is padded with silence; audio shorter
  than one clip is refused; silent audio is generated (the features of silence: a still mouth) with a warning.
* ``pose`` (SVI-Dance): the pose video is read once at the generation size and looped; clip ``k`` gets the
  poses of its output frames, present in every guidance pass. ``side_by_side`` also writes
  ``<output stem>.sbs.mp4`` (reference | pose | generated), clip by clip like the video itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from svi_infer.atomic import write_json, write_with
from svi_infer.audio import AudioEncoder, clip_audio, clips_for_frames, is_silent, read_audio
from svi_infer.conditioning import (
    conditioning_video,
    first_frames_mask,
    held_latents,
    held_y,
    with_mask,
)
from svi_infer.model import WanModel
from svi_infer.pose import find_pose_encoder, pose_frames_for_clip, read_pose_video, set_pose
from svi_infer.pose import side_by_side as side_by_side_frames
from svi_infer.prompts import prompt_for_clip
from svi_infer.sampler import PassInputs, TalkGuidance, TextGuidance, sample_clip
from svi_infer.settings import (  # the settings and output paths are checked torch-free; callers import them here too
    DEFAULT_NUM_CLIPS,
    GenerationSettings,
    check_talk_audio,
    parts_dir,
    side_by_side_path,
    sidecar_path,
)
from svi_infer.talk import AudioWindows, TalkConfig, attach_talk, get_talk, latent_windows, load_multitalk
from svi_infer.video_io import concat_mp4, fit_image, frames_to_tensor, mux_audio, tensor_to_frames, write_mp4

TINY_TALK_SEED = 20251011  # random MultiTalk modules of tiny models: the same in every process


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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (audio and pose inputs can be long)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def talk_windows(
    features: Tensor, clip_index: int, frames_per_clip: int, overlap: int, window: int = 5, vae_scale: int = 4
) -> AudioWindows:
    """Talk's audio windows for clip ``clip_index``: the output frames it covers,
    ``clip_index * (frames_per_clip - overlap) + (0 .. frames_per_clip - 1)`` (the generator keeps clip 0 whole
    and drops the first ``overlap`` frames of later clips), each with its ``window // 2`` neighbours on each side
    from the whole track, grouped per latent frame.

    Convention (that of :func:`svi_infer.audio.clip_audio`): a neighbour before the start of the track is its
    first feature frame (MultiTalk's clamp), a frame at or past the end is zeros, the "no audio" input the model
    saw in training (audio dropout) and in the unconditional pass.
    """
    per_frame = clip_audio(features, clip_index, frames_per_clip, overlap, radius=window // 2)
    return latent_windows(per_frame, vae_scale)


def attach_talk_modules(model: WanModel, multitalk: str | Path | None = None) -> list[TalkConfig]:
    """Add MultiTalk's audio modules to every transformer of ``model``, with weights from ``multitalk``.

    ``multitalk=None`` is for tiny models only: their modules (``TalkConfig.tiny``, sized for
    ``AudioEncoder.tiny``) are initialised randomly under a fixed seed, so every process builds the same ones.
    """
    configs = []
    for transformer in model.transformers:
        config = TalkConfig.tiny(transformer) if model.spec.tiny else TalkConfig.for_transformer(transformer)
        if multitalk is None:
            if not model.spec.tiny:
                raise ValueError(f"{model.spec.id}: give MultiTalk's weights (model.multitalk=multitalk.safetensors)")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_TALK_SEED)
                attach_talk(transformer, config)
        else:
            attach_talk(transformer, config)
            load_multitalk(transformer, multitalk)
        configs.append(config)
    return configs


def check_audio_encoder(encoder: AudioEncoder, model: WanModel) -> None:
    """The encoder's hidden states must be what the Talk modules read (layers x width), else one clear error
    before the first clip instead of a shape error inside the first DiT pass."""
    layers, width = encoder.model.config.num_hidden_layers, encoder.model.config.hidden_size
    for transformer in model.transformers:
        talk = get_talk(transformer)
        if talk is not None and (talk.config.audio_layers, talk.config.audio_dim) != (layers, width):
            raise ValueError(
                f"the audio encoder gives {layers} layers x {width} features but the Talk modules read "
                f"{talk.config.audio_layers} x {talk.config.audio_dim}; use the wav2vec2 model they were trained "
                "with (chinese-wav2vec2-base: 12 x 768)"
            )


@dataclass
class _RunInputs:
    """Per-run conditioning beyond image and prompts, prepared once at the start of ``generate``."""

    features: Tensor | None = None  # Talk: [audio frames, layers, dim] at the video fps
    poses: np.ndarray | None = None  # Dance: [pose frames, H, W, 3] uint8 at the generation size
    record: dict = field(default_factory=dict)  # what the sidecar says about them


class LongVideoGenerator:
    """Generates a long video clip by clip with one model (adapters, Talk modules or pose encoder already on it)."""

    def __init__(
        self,
        model: WanModel,
        settings: GenerationSettings,
        provenance: dict | None = None,
        audio_encoder: AudioEncoder | None = None,
    ) -> None:
        settings.validate(model.spec)
        mode = settings.mode
        if mode == "audio":
            if any(get_talk(t) is None for t in model.transformers):
                raise ValueError(
                    "conditioning=audio needs MultiTalk's audio modules on the model (attach_talk_modules), "
                    "e.g. model.multitalk=multitalk.safetensors"
                )
            if audio_encoder is None:
                raise ValueError("conditioning=audio needs a wav2vec2 audio encoder (model.audio_encoder=<folder>)")
            check_audio_encoder(audio_encoder, model)
        if mode == "pose" and any(find_pose_encoder(t) is None for t in model.transformers):
            raise ValueError(
                "conditioning=pose (SVI-Dance) needs the pose encoder (dwpose_embedding.* weights) on the model; "
                "it comes with the Dance adapter: load one that has it, e.g. adapter.path=svi-dance.safetensors"
            )
        self.model = model
        self.settings = settings
        self.provenance = provenance or {}
        self.audio_encoder = audio_encoder
        self._inputs = _RunInputs()

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
        video, looped. ``side_by_side`` (Dance) also writes ``<output stem>.sbs.mp4``.
        """
        s = self.settings
        output = Path(output)
        parts = parts_dir(output)
        anchor_img = fit_image(image, s.height, s.width)
        self._inputs = self._prepare_inputs(audio, pose, side_by_side)
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
        anchor_latent = self.model.encode_video(anchor[None]) if s.handoff == "latent" else None
        tail = load_file(parts / state["tail"])["tail"] if state["tail"] else None
        start = len(state["clips"])
        bar = tqdm(total=num_clips, initial=start, desc="clips", unit="clip", disable=not progress)
        for k in range(start, num_clips):
            t0 = time.perf_counter()
            prompt = prompt_for_clip(prompts, k, s.prompt_repeat_times, s.use_first_prompt_only)
            seed = s.clip_seed(k)
            frames, latents = self._clip(k, prompt, seed, anchor, anchor_latent, tail, negative, progress)
            keep = frames if k == 0 else frames[s.overlap_frames :]
            segment = f"clip_{k:05d}.mp4"
            write_mp4(parts / segment, keep, s.fps)
            record = {}
            if side_by_side:  # written before the state names the clip done, like the clip itself
                record["sbs_segment"] = f"sbs_{k:05d}.mp4"
                poses = self._clip_poses(k)[len(frames) - len(keep) :]
                write_mp4(parts / record["sbs_segment"], side_by_side_frames(anchor_img, poses, keep), s.fps)
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
                    **record,
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
        if audio is not None:  # the parts stay silent, so a resumed run joins and muxes the same bytes
            mux_audio(output, audio, output, start_s=0.0)
        if side_by_side:
            concat_mp4([parts / c["sbs_segment"] for c in state["clips"]], side_by_side_path(output))
        sidecar = self._write_sidecar(output, state, complete=True)
        shutil.rmtree(parts, ignore_errors=True)
        return GenerationResult(
            video=output, sidecar=sidecar, frames=state["frames_written"], clips=len(state["clips"])
        )

    # -- one clip -----------------------------------------------------------------------------------
    def _clip(self, k, prompt, seed, anchor, anchor_latent, tail, negative, progress):
        s, model = self.settings, self.model
        latent_frames = model.spec.latent_frames(s.frames_per_clip)
        held = None
        if s.handoff == "latent":  # anchor latent, then the previous clip's last latent(s) (SVI 2.0 Pro)
            held = held_latents(anchor_latent, tail.to(anchor_latent) if tail is not None else None)
            y = None  # TI2V-5B: the held latents themselves replace the first latent frames
            if model.spec.conditioning_by_concat:  # A14B / 2.1: they go into y, after the mask
                y, held = held_y(held, latent_frames), None
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
        if s.mode == "audio":
            windows = self._clip_audio(k)
            inputs = {
                "cond": PassInputs(text, image_embeds, audio=windows),
                "droptext": PassInputs(negative, image_embeds, audio=windows),
                "uncond": PassInputs(negative, image_embeds, audio=windows.zeros_like()),
            }
            guidance = TalkGuidance(s.cfg_scale, s.cfg_scale_audio)
        else:
            inputs = {"cond": PassInputs(text, image_embeds), "uncond": PassInputs(negative, image_embeds)}
            guidance = TextGuidance(s.cfg_scale)
        posed = self._posed_transformers()
        for transformer in posed:  # the pose is the same in every pass (text-only guidance)
            set_pose(transformer, self._clip_poses(k))
        generator = torch.Generator("cpu").manual_seed(seed)
        try:
            with tqdm(total=s.steps, desc=f"clip {k} steps", leave=False, disable=not progress) as steps_bar:
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
                    latent_frames=latent_frames,
                )
        finally:
            for transformer in posed:
                set_pose(transformer, None)
        frames = tensor_to_frames(model.decode_latents(latents)[0])
        return frames, latents

    # -- audio and pose -----------------------------------------------------------------------------
    def _prepare_inputs(self, audio: str | Path | None, pose: str | Path | None, sbs: bool) -> _RunInputs:
        """Read audio / pose once; refuse inputs that do not fit the conditioning before any clip is made."""
        s, mode = self.settings, self.settings.mode
        if (audio is not None) != (mode == "audio"):
            raise ValueError(
                "conditioning=audio needs an audio file (audio=...)"
                if audio is None
                else f"audio is for Talk (conditioning=audio); this run's conditioning is {mode}"
            )
        if (pose is not None) != (mode == "pose"):
            raise ValueError(
                "conditioning=pose needs a pose video (pose=...)"
                if pose is None
                else f"pose is for Dance (conditioning=pose); this run's conditioning is {mode}"
            )
        if sbs and mode != "pose":
            raise ValueError("side_by_side shows reference | pose | generated: it needs conditioning=pose")
        inputs = _RunInputs()
        if audio is not None:
            samples = read_audio(audio, normalize=True)
            silent = is_silent(samples)
            if silent:
                warnings.warn(
                    f"the audio of {audio} is silent: the clips get the features of silence (a closed, still mouth)",
                    stacklevel=3,
                )
            features, _ = self.audio_encoder.features(samples, fps=s.fps)
            del samples
            check_talk_audio(features.shape[0], s, audio)
            inputs.features = features
            inputs.record["audio"] = {
                "path": str(audio),
                "sha256": file_sha256(audio),
                "frames": features.shape[0],
                "seconds": round(features.shape[0] / s.fps, 3),
                "silent": silent,
            }
        if pose is not None:
            inputs.poses = read_pose_video(pose, s.height, s.width)
            inputs.record["pose"] = {"path": str(pose), "sha256": file_sha256(pose), "frames": len(inputs.poses)}
        if sbs:
            inputs.record["side_by_side"] = True
        return inputs

    def _num_clips(self) -> int:
        s = self.settings
        if s.num_clips is not None:
            return s.num_clips
        if self._inputs.features is not None:
            return clips_for_frames(self._inputs.features.shape[0], s.frames_per_clip, s.overlap_frames)
        return DEFAULT_NUM_CLIPS

    def _clip_audio(self, k: int) -> AudioWindows:
        config = get_talk(self.model.transformers[0]).config
        s = self.settings
        return talk_windows(
            self._inputs.features, k, s.frames_per_clip, s.overlap_frames, config.window, config.vae_scale
        )

    def _clip_poses(self, k: int) -> np.ndarray:
        """``[F, H, W, 3]``: the poses of the output frames clip ``k`` covers (the pose video looped)."""
        poses = self._inputs.poses
        s = self.settings
        return poses[pose_frames_for_clip(len(poses), k, s.frames_per_clip, s.overlap_frames)]

    def _posed_transformers(self) -> list[torch.nn.Module]:
        """The transformers whose pose encoder gets the clip's pose (none without a pose input)."""
        return [] if self._inputs.poses is None else list(self.model.transformers)

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
        extra = self._inputs.record  # the files' contents, not their paths: a moved file may resume
        for name in ("audio", "pose"):
            if name in extra:
                record[name] = extra[name]["sha256"]
        if extra.get("side_by_side"):
            record["side_by_side"] = True
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

    def _write_sidecar(self, output: Path, state: dict, complete: bool) -> Path:
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
            "clips": [{k: v for k, v in c.items() if k not in ("segment", "sbs_segment")} for c in state["clips"]],
        }
        inputs = self._inputs.record
        for name in ("audio", "pose"):
            if name in inputs:
                record[name] = inputs[name]
        if inputs.get("side_by_side"):
            record["side_by_side"] = str(side_by_side_path(output))
        path = sidecar_path(output)
        write_json(path, record)
        return path
