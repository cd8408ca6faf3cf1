"""SVI-Talk: a talking head driven by speech, through MultiTalk's frozen audio modules on Wan 2.1 I2V
(reference/svi.md §3.4).

Generation encodes the audio file once (wav2vec2 at the video fps) and gives clip ``k`` the features of exactly the
output frames it covers (:func:`clip_audio_windows`); sampling uses three-pass text + audio guidance and the
soundtrack is muxed into the joined video. Frames past the end of the audio get zero features (no audio); audio
shorter than one clip is refused; silent audio is generated (a still mouth) with a warning. Training reads each
clip's features from the shards (:func:`batch_audio_windows`) and drops the audio of a sample with
``audio_dropout``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svi_infer.atomic import file_sha256
from svi_infer.audio_file import TALK_FPS, AudioError, frames_for_samples, read_audio
from svi_infer.spec import WAN21_I2V
from svi_infer.variants.base import ClipContext, Conditioning, Dropped, RunInputs

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from svi_infer.audio import AudioEncoder
    from svi_infer.model import WanModel
    from svi_infer.sampler import Guidance, PassInputs
    from svi_infer.settings import GenerationSettings
    from svi_infer.spec import ModelSpec
    from svi_infer.talk import AudioWindows, TalkConfig

TINY_TALK_SEED = 20251011  # random MultiTalk modules of tiny models: the same in every process


class TalkConditioning(Conditioning):
    """Audio windows on MultiTalk's modules; text + audio guidance.

    Args:
        audio_dropout: training: the share of samples whose audio windows are zeroed (svi.md §3.4).
        multitalk: MultiTalk's ``multitalk.safetensors`` (None: the random tiny modules of a tiny model).
        audio_encoder: generation: the wav2vec2 encoder (else built by :meth:`attach` from the run's inputs).
    """

    name = "audio"
    label = "Talk"
    prepare_flags = ("audio=true", "fps=25")
    inputs = ("audio",)
    fps = TALK_FPS

    def __init__(
        self,
        audio_dropout: float = 0.0,
        multitalk: str | Path | None = None,
        audio_encoder: AudioEncoder | None = None,
        **_other: Any,
    ) -> None:
        self.audio_dropout, self.multitalk, self.encoder = audio_dropout, multitalk, audio_encoder
        self.features: Tensor | None = None  # the run's [audio frames, layers, dim] at the video fps
        self.config: TalkConfig | None = None  # the modules' window and VAE scale

    # -- checks ----------------------------------------------------------------------------------------------
    def check_base(self, spec: ModelSpec, training: bool) -> None:
        if spec.family != WAN21_I2V:
            raise ValueError(
                f"variant.conditioning=audio (SVI-Talk) uses MultiTalk's audio modules, made for Wan 2.1 I2V; "
                f"{spec.id} has none"
            )

    def plan_inputs(self, given: dict[str, Any], settings: GenerationSettings, spec: ModelSpec) -> RunInputs:
        """The audio is decoded here (cheap next to the models), so a bad or too short file fails before loading."""
        super().plan_inputs(given, settings, spec)
        if given.get("audio") is None:
            raise ValueError("conditioning=audio (Talk) needs audio=<wav, mp3 or any file with an audio track>")
        path = Path(given["audio"]).expanduser()
        check_talk_audio(frames_for_samples(len(read_audio(path)), settings.fps), settings, path)
        return RunInputs(files={"audio": path, **self.model_files(given, spec)})

    @staticmethod
    def model_files(given: dict[str, Any], spec: ModelSpec) -> dict[str, Path | None]:
        """MultiTalk's weights and the wav2vec2 folder: required for real models, optional (random twins) for tiny
        ones."""
        multitalk, encoder = given.get("multitalk"), given.get("audio_encoder")
        if not spec.tiny:
            missing = [name for name, value in (("multitalk", multitalk), ("audio_encoder", encoder)) if value is None]
            if missing:
                raise ValueError(
                    f"conditioning=audio with {spec.id} needs model.{' and model.'.join(missing)}: MultiTalk's "
                    "multitalk.safetensors (MeiGen-AI/MeiGen-MultiTalk) and the wav2vec2 folder "
                    "(TencentGameMate/chinese-wav2vec2-base)"
                )
        multitalk = _multitalk_file(multitalk)
        encoder = Path(encoder).expanduser() if encoder is not None else None
        if encoder is not None and not (encoder / "config.json").is_file():
            raise FileNotFoundError(
                f"model.audio_encoder {encoder} is not a wav2vec2 folder (no config.json; e.g. chinese-wav2vec2-base)"
            )
        return {"multitalk": multitalk, "audio_encoder": encoder}

    def check_training(self, spec: ModelSpec, fps: float | None, shard_fps: float, preview: bool) -> None:
        self.check_frame_rate(fps, shard_fps, preview)
        if self.multitalk is None and not spec.tiny:
            raise ValueError(f"Talk training on {spec.id} needs model.multitalk=<path to multitalk.safetensors>")
        self.multitalk = _multitalk_file(self.multitalk)

    # -- generation ------------------------------------------------------------------------------------------
    def attach(self, model: WanModel, inputs: RunInputs) -> None:
        from svi_infer.audio import AudioEncoder

        self.multitalk = inputs.files.get("multitalk")
        attach_talk_modules(model, self.multitalk)
        folder = inputs.files.get("audio_encoder")
        if self.encoder is None and folder is None:
            self.encoder = AudioEncoder.tiny(model.device)
        elif self.encoder is None:
            self.encoder = AudioEncoder.from_pretrained(folder, model.device)

    def check_model(self, model: WanModel) -> None:
        from svi_infer.talk import get_talk

        if any(get_talk(t) is None for t in model.transformers):
            raise ValueError(
                "conditioning=audio needs MultiTalk's audio modules on the model (attach_talk_modules), "
                "e.g. model.multitalk=multitalk.safetensors"
            )
        if self.encoder is None:
            raise ValueError("conditioning=audio needs a wav2vec2 audio encoder (model.audio_encoder=<folder>)")
        check_audio_encoder(self.encoder, model)
        self.config = get_talk(model.transformers[0]).config

    def prepare(self, inputs: RunInputs, settings: GenerationSettings) -> None:
        from svi_infer.audio import is_silent

        audio = inputs.files["audio"]
        samples = read_audio(audio, normalize=True)
        silent = is_silent(samples)
        if silent:
            warnings.warn(
                f"the audio of {audio} is silent: the clips get the features of silence (a closed, still mouth)",
                stacklevel=3,
            )
        features, _ = self.encoder.features(samples, fps=settings.fps)
        del samples
        check_talk_audio(features.shape[0], settings, audio)
        self.features = features
        inputs.record["audio"] = {
            "path": str(audio),
            "sha256": file_sha256(audio),
            "frames": features.shape[0],
            "seconds": round(features.shape[0] / settings.fps, 3),
            "silent": silent,
        }
        inputs.identity["audio"] = inputs.record["audio"]["sha256"]

    def num_clips(self, settings: GenerationSettings) -> int | None:
        from svi_infer.audio import clips_for_frames

        return clips_for_frames(self.features.shape[0], settings.frames_per_clip, settings.overlap_frames)

    def passes(
        self, clip: ClipContext, settings: GenerationSettings, text: Tensor, negative: Tensor, image: Tensor | None
    ) -> tuple[dict[str, PassInputs], Guidance]:
        from svi_infer.sampler import PassInputs, TalkGuidance

        windows = clip_audio_windows(
            self.features, clip.index, clip.frames_per_clip, clip.overlap_frames, self.config.window,
            self.config.vae_scale,
        )  # fmt: skip
        inputs = {
            "cond": PassInputs(text, image, audio=windows),
            "droptext": PassInputs(negative, image, audio=windows),
            "uncond": PassInputs(negative, image, audio=windows.zeros_like()),
        }
        return inputs, TalkGuidance(settings.cfg_scale, settings.cfg_scale_audio)

    def finish(self, output: Path, parts: Path, inputs: RunInputs, clips: list[dict]) -> dict[str, str]:
        """The parts stay silent, so a resumed run joins and muxes the same bytes."""
        from svi_infer.video_io import mux_audio

        mux_audio(output, inputs.files["audio"], output, start_s=0.0)
        return {}

    # -- training --------------------------------------------------------------------------------------------
    def attach_training(self, model: WanModel, transformer: torch.nn.Module, seed: int) -> None:
        """MultiTalk's modules, frozen (no LoRA, not in the optimizer, not in checkpoints: rebuilt from
        ``model.multitalk``). Call after ``add_adapter``: peft then never sees the audio layers."""
        from svi_infer.talk import get_talk

        attach_talk_modules(model, self.multitalk)
        self.config = get_talk(model.transformers[0]).config

    def draw_dropout(self, generator: torch.Generator) -> Dropped:
        """One draw; below ``audio_dropout`` both audio windows are zeroed."""
        import torch

        (u,) = torch.rand(1, generator=generator, dtype=torch.float64).tolist()
        return Dropped(audio=u < self.audio_dropout)

    def set_batch(self, transformer: torch.nn.Module, batch: dict, dropped: list[Dropped]) -> None:
        from svi_infer.talk import set_audio

        if batch.get("audio") is None:
            raise ValueError(
                f"variant.conditioning=audio (Talk) but the batch of samples {batch['key']} holds no audio "
                "features: prepare the shards with `python -m data_tools prepare audio=true fps=25 ...`"
            )
        windows = batch_audio_windows(batch["audio"], dropped, self.config, batch["num_frames"], batch["audio_context"])
        set_audio(transformer, windows)


def _multitalk_file(multitalk: str | Path | None) -> Path | None:
    if multitalk is None:
        return None
    multitalk = Path(multitalk).expanduser()
    if not multitalk.is_file():
        raise FileNotFoundError(f"model.multitalk {multitalk} does not exist (MultiTalk's multitalk.safetensors)")
    if multitalk.suffix != ".safetensors":
        raise ValueError(f"model.multitalk must be a .safetensors file (pickles are not read), got {multitalk}")
    return multitalk


def check_talk_audio(audio_frames: int, settings: GenerationSettings, source: str | Path) -> None:
    """Refuse audio shorter than one clip: a Talk clip is driven by its audio, and silence padded over most of
    the only clip would hide the user's mistake (a wrong file, or frames_per_clip too long for a short line)."""
    frames = settings.frames_per_clip
    if audio_frames < frames:
        raise AudioError(
            f"the audio of {source} lasts {audio_frames / settings.fps:.2f} s ({audio_frames} frames at "
            f"{settings.fps} fps), shorter than one clip ({frames} frames, {frames / settings.fps:.2f} s); give a "
            "longer audio or lower frames_per_clip (4k+1)"
        )


def attach_talk_modules(model: WanModel, multitalk: str | Path | None = None) -> list[TalkConfig]:
    """Add MultiTalk's audio modules to every transformer of ``model``, with weights from ``multitalk``.

    ``multitalk=None`` is for tiny models only: their modules (``TalkConfig.tiny``, sized for
    ``AudioEncoder.tiny``) are initialised randomly under a fixed seed, so every process builds the same ones
    (an adapter trained on them generates with the same ones).
    """
    import torch

    from svi_infer.talk import TalkConfig, attach_talk, load_multitalk

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
    from svi_infer.talk import get_talk

    layers, width = encoder.model.config.num_hidden_layers, encoder.model.config.hidden_size
    for transformer in model.transformers:
        talk = get_talk(transformer)
        if talk is not None and (talk.config.audio_layers, talk.config.audio_dim) != (layers, width):
            raise ValueError(
                f"the audio encoder gives {layers} layers x {width} features but the Talk modules read "
                f"{talk.config.audio_layers} x {talk.config.audio_dim}; use the wav2vec2 model they were trained "
                "with (chinese-wav2vec2-base: 12 x 768)"
            )


def clip_audio_windows(
    features: Tensor, clip_index: int, frames_per_clip: int, overlap: int, window: int = 5, vae_scale: int = 4
) -> AudioWindows:
    """Generation: the audio windows of clip ``clip_index``: the output frames it covers,
    ``clip_index * (frames_per_clip - overlap) + (0 .. frames_per_clip - 1)`` (the generator keeps clip 0 whole
    and drops the first ``overlap`` frames of later clips), each with its ``window // 2`` neighbours on each side
    from the whole track, grouped per latent frame.

    Convention (that of :func:`svi_infer.audio.clip_audio`): a neighbour before the start of the track is its
    first feature frame (MultiTalk's clamp), a frame at or past the end is zeros, the "no audio" input the model
    saw in training (audio dropout) and in the unconditional pass.
    """
    from svi_infer.audio import clip_audio
    from svi_infer.talk import latent_windows

    per_frame = clip_audio(features, clip_index, frames_per_clip, overlap, radius=window // 2)
    return latent_windows(per_frame, vae_scale)


def batch_audio_windows(
    audio: Tensor, dropped: list[Dropped], config: TalkConfig, num_frames: int, context: int = 0
) -> AudioWindows:
    """Training: per-sample audio windows of a batch of shard features ``[B, F + 2 context, layers, dim]`` (one row
    per video frame: the clip's ``num_frames`` and ``context`` of the track either side); a dropped sample's
    windows are zeros (as MultiTalk's audio-free input).

    With the shards' context of 2, each frame's ±2 window reads the track exactly as generation does
    (:func:`clip_audio_windows`); shards from before the context was stored (0) clamp it inside the clip.
    """
    from svi_infer.talk import AudioWindows, audio_windows

    windows = []
    for features, drop in zip(audio.float(), dropped, strict=True):
        w = audio_windows(features, num_frames, context, window=config.window, vae_scale=config.vae_scale)
        windows.append(w.zeros_like() if drop.audio else w)
    return AudioWindows.stack(windows)
