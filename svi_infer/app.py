"""From a composed ``conf/infer.yaml`` to a generated video: check everything cheap first, then load.

:func:`plan` imports no torch: the settings, the output path, the image, prompts, adapters (and the base they were
made for), audio and pose are checked before torch and diffusers start up, let alone before a model loads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from svi_infer.adapter_files import AdapterError, expert_dirs, read_meta
from svi_infer.audio_file import TALK_FPS, frames_for_samples, read_audio
from svi_infer.config import TOP_LEVEL_SETTINGS
from svi_infer.errors import USER_ERRORS  # noqa: F401  (re-exported for tests)
from svi_infer.prompts import load_prompts
from svi_infer.settings import GenerationSettings, check_output, check_talk_audio
from svi_infer.spec import HIGH_NOISE, LOW_NOISE, ModelSpec, get_spec
from svi_infer.video_io import probe_streams, read_image

if TYPE_CHECKING:
    from svi_infer.generate import GenerationResult

_SPEC_DEFAULTS = ("frames_per_clip", "fps", "steps", "shift", "cfg_scale")


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before torch is imported."""

    spec: ModelSpec
    model_path: str | None
    settings: GenerationSettings
    adapters: list[tuple[Path, str | None]]  # (path, expert)
    image: Image.Image
    prompts: list[str]
    output: Path
    audio: Path | None = None  # Talk: the driving audio
    pose: Path | None = None  # Dance: the pose video
    side_by_side: bool = False  # Dance: also write <output stem>.sbs.mp4
    multitalk: Path | None = None  # Talk: MultiTalk's weights (None: random tiny modules)
    audio_encoder: Path | None = None  # Talk: wav2vec2 folder (None: the tiny encoder)


def _adapters(cfg: DictConfig, spec: ModelSpec) -> list[tuple[Path, str | None]]:
    """``(path, expert)`` per adapter to load, in order; a split A14B directory (``high_noise/``, ``low_noise/``)
    becomes one entry per expert sub-directory (adapter.high_noise / low_noise may name one too: their own
    sub-directory is taken)."""
    sources = [
        (cfg.adapter.path, None),
        (cfg.adapter.high_noise, HIGH_NOISE),
        (cfg.adapter.low_noise, LOW_NOISE),
    ]
    adapters = []
    for path, expert in sources:
        if path is None:
            continue
        if expert is not None and expert not in spec.experts:
            raise ValueError(
                f"adapter.{expert} is for Wan 2.2 A14B experts; {spec.id} has one transformer (use adapter.path)"
            )
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"adapter {path} does not exist; check adapter.{expert or 'path'}")
        split = expert_dirs(path, spec)
        if not split:
            adapters.append((path, expert))
        elif expert is None:
            adapters.extend((sub, name) for name, sub in split.items())
        elif expert in split:
            adapters.append((split[expert], expert))
        else:
            raise AdapterError(f"adapter.{expert}={path} holds no {expert}/ sub-directory (it has {', '.join(split)})")
    return adapters


def resolve_settings(cfg: DictConfig, spec: ModelSpec, adapter_defaults: dict[str, Any]) -> GenerationSettings:
    """Each setting: the user's value, else the adapter's ``svi.json`` default, else the spec / built-in one.

    ``num_clips: null`` stays None (Talk: as many clips as the audio lasts; otherwise the built-in 3). With
    ``conditioning=audio`` and no fps from the user or the adapter, fps is Talk's 25, not the model's.
    """
    given = {k: v for k, v in OmegaConf.to_container(cfg.variant, resolve=True).items() if v is not None}
    given |= {key: cfg[key] for key in TOP_LEVEL_SETTINGS if cfg.get(key) is not None}
    names = {f.name for f in fields(GenerationSettings)}
    unknown = sorted(set(given) - names)  # only keys forced in with +variant.<key>=... get past the schema
    if unknown:
        raise ValueError(f"unknown variant setting(s) {unknown}; known: {sorted(names)}")
    chosen = {k: v for k, v in adapter_defaults.items() if k in names} | given
    values = {k: getattr(spec, k) for k in _SPEC_DEFAULTS}
    values |= {"height": spec.height, "width": spec.width}
    if chosen.get("conditioning") == "audio":
        values["fps"] = int(TALK_FPS)
    return GenerationSettings(**(values | chosen))


def _talk_model_files(cfg: DictConfig, spec: ModelSpec) -> tuple[Path | None, Path | None]:
    """MultiTalk weights and wav2vec2 folder: required for real models, optional (random twins) for tiny ones."""
    multitalk, encoder = cfg.model.get("multitalk"), cfg.model.get("audio_encoder")
    if not spec.tiny:
        missing = [name for name, value in (("multitalk", multitalk), ("audio_encoder", encoder)) if value is None]
        if missing:
            raise ValueError(
                f"conditioning=audio with {spec.id} needs model.{' and model.'.join(missing)}: MultiTalk's "
                "multitalk.safetensors (MeiGen-AI/MeiGen-MultiTalk) and the wav2vec2 folder "
                "(TencentGameMate/chinese-wav2vec2-base)"
            )
    multitalk = Path(multitalk).expanduser() if multitalk is not None else None
    encoder = Path(encoder).expanduser() if encoder is not None else None
    if multitalk is not None:
        if not multitalk.is_file():
            raise FileNotFoundError(f"model.multitalk {multitalk} does not exist")
        if multitalk.suffix != ".safetensors":
            raise ValueError(f"model.multitalk must be a .safetensors file (pickles are not read), got {multitalk}")
    if encoder is not None and not (encoder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.audio_encoder {encoder} is not a wav2vec2 folder (no config.json; e.g. chinese-wav2vec2-base)"
        )
    return multitalk, encoder


def _audio_input(path: Any, settings: GenerationSettings) -> Path:
    """Decode the audio once here (cheap next to the models), so a bad or too short file fails before loading."""
    if path is None:
        raise ValueError("conditioning=audio (Talk) needs audio=<wav, mp3 or any file with an audio track>")
    path = Path(path).expanduser()
    samples = read_audio(path)
    check_talk_audio(frames_for_samples(len(samples), settings.fps), settings, path)
    return path


def _pose_input(path: Any) -> Path:
    """The pose video must exist and have video frames; its size and frame count may be anything (looped, fitted)."""
    if path is None:
        raise ValueError("conditioning=pose (Dance) needs pose=<pose video, e.g. a rendered DWPose skeleton mp4>")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pose video {path} does not exist")
    try:
        streams = probe_streams(path)
    except ValueError as err:
        raise ValueError(f"cannot read pose video {path}: {err}") from None
    if not streams["frames"]:
        raise ValueError(f"pose video {path} has no video frames; give a video of the poses (e.g. dwpose.mp4)")
    return path


def _adapter_defaults(adapters: list[tuple[Path, str | None]], spec: ModelSpec) -> dict[str, Any]:
    """Refuse an adapter made for another base or expert; its recorded variant defaults, the first adapter's
    winning. An adapter that records no base (a LoRA file made elsewhere) is noted on stderr and loads if its
    tensor shapes fit."""
    defaults: dict[str, Any] = {}
    for path, expert in reversed(adapters):
        meta = read_meta(path)
        if meta is None:
            print(
                f"svi_infer: note: adapter {path} does not record the base model it was made for (no svi.json, no "
                f"'svi' safetensors metadata): it loads if its tensor shapes fit {spec.id}, unchecked",
                file=sys.stderr,
            )
            continue
        meta.check_base(spec, path)
        if expert is not None and meta.expert is not None and meta.expert != expert:
            raise AdapterError(f"adapter {path} is for the {meta.expert} expert, not {expert}")
        defaults |= meta.defaults
    return defaults


def plan(cfg: DictConfig) -> Plan:
    """Validate the request: model, output, adapters, settings, image, prompts, audio and pose. Imports no torch."""
    spec = get_spec(cfg.model.spec)
    model_path = cfg.model.path
    if model_path is None and spec.needs_path:
        raise ValueError(
            f"model.path is required for {spec.id}: the local folder with its weights in diffusers layout "
            "(or choose a tiny model, e.g. model=tiny_wan21_i2v)"
        )
    if OmegaConf.is_missing(cfg, "image") or OmegaConf.is_missing(cfg, "prompts"):
        raise ValueError("give image=<path to the first frame> and prompts=<.txt/.json file or a prompt>")
    output = Path(cfg.output).expanduser()
    check_output(output, cfg.resume, cfg.overwrite)
    adapters = _adapters(cfg, spec)
    settings = resolve_settings(cfg, spec, _adapter_defaults(adapters, spec))
    settings.validate(spec)
    mode = settings.mode
    multitalk = encoder = None
    if mode == "audio":
        multitalk, encoder = _talk_model_files(cfg, spec)
    for key, needs in (("audio", "audio"), ("pose", "pose")):
        if cfg.get(key) is not None and mode != needs:
            raise ValueError(
                f"{key}= is for {'Talk' if needs == 'audio' else 'Dance'} (variant.conditioning={needs}, "
                f"+experiment={'talk' if needs == 'audio' else 'dance'}); this run's conditioning is {mode}"
            )
    if cfg.get("side_by_side") and mode != "pose":
        raise ValueError("side_by_side=true shows reference | pose | generated: it needs variant.conditioning=pose")
    if mode == "pose" and not adapters:
        raise ValueError(
            "conditioning=pose (Dance) needs the Dance adapter, which carries the pose encoder (dwpose_embedding.*): "
            "adapter.path=svi-dance.safetensors"
        )
    prompts = load_prompts(OmegaConf.to_object(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts)
    image = read_image(cfg.image)
    audio = _audio_input(cfg.get("audio"), settings) if mode == "audio" else None
    pose = _pose_input(cfg.get("pose")) if mode == "pose" else None
    return Plan(
        spec,
        model_path,
        settings,
        adapters,
        image,
        prompts,
        output,
        audio=audio,
        pose=pose,
        side_by_side=bool(cfg.get("side_by_side")),
        multitalk=multitalk,
        audio_encoder=encoder,
    )


def run(cfg: DictConfig) -> GenerationResult:
    """Plan, build the model (+ Talk's audio modules and encoder), load adapters, generate."""
    p = plan(cfg)
    # torch, diffusers and peft start up only now, once every cheap check has passed
    from svi_infer.adapters import load_adapter, set_strength
    from svi_infer.audio import AudioEncoder
    from svi_infer.generate import LongVideoGenerator, attach_talk_modules
    from svi_infer.model import OriginalFiles, build_model, resolve_device

    device, dtype = resolve_device(cfg.model.device, cfg.model.dtype)
    original = OriginalFiles.from_paths(
        cfg.model.get("transformer_files"), cfg.model.get("transformer_2_files"), cfg.model.get("vae_file")
    )
    model = build_model(p.spec, p.model_path, device, dtype, original)
    audio_encoder = None
    if p.settings.mode == "audio":  # before the adapters, so an adapter holding audio-module LoRA finds them
        attach_talk_modules(model, p.multitalk)
        audio_encoder = (
            AudioEncoder.tiny(model.device)
            if p.audio_encoder is None
            else AudioEncoder.from_pretrained(p.audio_encoder, model.device)
        )
    for path, expert in p.adapters:
        load_adapter(model, path, expert=expert, ignore_unmatched=cfg.adapter.ignore_unmatched)
    if p.adapters:
        set_strength(model, cfg.adapter.strength)
    provenance = {
        "model_path": p.model_path,
        "original_files": [str(f) for f in (*original.transformer, *original.transformer_2, original.vae) if f],
        "adapters": [{"path": str(a), "expert": e} for a, e in p.adapters],
        "adapter_strength": cfg.adapter.strength,
        "image": str(cfg.image),
    }
    if p.settings.mode == "audio":
        provenance["multitalk"] = str(p.multitalk) if p.multitalk else None
        provenance["audio_encoder"] = str(p.audio_encoder) if p.audio_encoder else None
    generator = LongVideoGenerator(model, p.settings, provenance, audio_encoder=audio_encoder)
    return generator.generate(
        p.image,
        p.prompts,
        p.output,
        resume=cfg.resume,
        progress=cfg.progress,
        audio=p.audio,
        pose=p.pose,
        side_by_side=p.side_by_side,
    )
