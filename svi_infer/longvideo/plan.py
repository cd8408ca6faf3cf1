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
from svi_infer.longvideo.outputs import check_output
from svi_infer.prompts import load_prompts
from svi_infer.settings import TOP_LEVEL_SETTINGS, GenerationSettings
from svi_infer.spec import HIGH_NOISE, LOW_NOISE, ModelSpec, get_spec
from svi_infer.variants import make_conditioning
from svi_infer.variants.base import Conditioning, RunInputs
from svi_infer.video_io import read_image

if TYPE_CHECKING:
    from svi_infer.longvideo.generator import GenerationResult

_SPEC_DEFAULTS = ("frames_per_clip", "fps", "steps", "shift", "cfg_scale")
WEIGHTS_DTYPES = ("auto", "fp8")
OFFLOADS = ("none", "model", "group")


@dataclass(frozen=True)
class Memory:
    """``memory.*``, checked: the DiT's storage dtype and what is offloaded (:func:`svi_infer.memory.arrange`)."""

    weights_dtype: str = "auto"
    offload: str = "none"
    blocks_per_group: int = 1

    @property
    def placed(self) -> bool:
        """Whether the model is built on the CPU and placed by :func:`svi_infer.memory.arrange` (else built on its
        device, as without this setting)."""
        return self.weights_dtype != "auto" or self.offload != "none"


def _memory(cfg: DictConfig) -> Memory:
    given = OmegaConf.to_container(cfg.memory, resolve=True) if cfg.get("memory") is not None else {}
    known = [f.name for f in fields(Memory)]
    unknown = [key for key in given if key not in known]
    if unknown:
        raise ValueError(f"unknown key memory.{unknown[0]}: memory takes {', '.join(known)}")
    memory = Memory(**given)
    if memory.weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"memory.weights_dtype must be one of {WEIGHTS_DTYPES}, got {memory.weights_dtype!r}")
    if memory.offload not in OFFLOADS:
        raise ValueError(f"memory.offload must be one of {OFFLOADS}, got {memory.offload!r}")
    count = memory.blocks_per_group
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"memory.blocks_per_group must be an integer >= 1, got {count!r}")
    return memory


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before torch is imported."""

    spec: ModelSpec
    model_path: str | None
    settings: GenerationSettings
    adapters: list[tuple[Path, str | None]]  # (path, expert)
    extras: list[tuple[Path, float]]  # LoRAs stacked on them: (path, strength)
    image: Image.Image
    prompts: list[str]
    output: Path
    conditioning: Conditioning  # the variant's: Talk's audio, Dance's pose, or text only
    inputs: RunInputs  # its checked inputs (audio, pose video, side_by_side, Talk's model files)
    memory: Memory = Memory()  # the DiT's storage dtype and offload


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


def _extras(cfg: DictConfig, spec: ModelSpec) -> list[tuple[Path, float]]:
    """``adapter.extra``: LoRAs stacked on the SVI adapter (a step-distill or style LoRA), each ``{path, strength}``;
    one made for another base is refused, and their recorded defaults are not used."""
    extras = []
    given = cfg.adapter.get("extra")
    if given is not None and not OmegaConf.is_list(given):
        raise ValueError(f"adapter.extra must be a list of {{path, strength}}, got {given!r}")
    for i, entry in enumerate(OmegaConf.to_container(given, resolve=True) if given is not None else []):
        if not isinstance(entry, dict) or set(entry) - {"path", "strength"} or "path" not in entry:
            raise ValueError(f"adapter.extra[{i}] must be {{path: <LoRA file or directory>, strength: <number>}}")
        path = Path(entry["path"]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"adapter {path} does not exist; check adapter.extra[{i}].path")
        strength = entry.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"adapter.extra[{i}].strength must be a number, got {strength!r}")
        meta = read_meta(path)
        if meta is not None:
            meta.check_base(spec, path)
        extras.append((path, float(strength)))
    return extras


def resolve_settings(cfg: DictConfig, spec: ModelSpec, adapter_defaults: dict[str, Any]) -> GenerationSettings:
    """Each setting: the user's value, else the adapter's ``svi.json`` default, else the spec / built-in one.

    ``num_clips: null`` stays None (Talk: as many clips as the audio lasts; otherwise the built-in 3). A
    conditioning tied to a frame rate (Talk's 25) sets fps when neither the user nor the adapter does. The negative
    prompt defaults to the model's (Wan 2.2: Wan's Chinese one). Height and width stay None unless given: they
    depend on the image (:meth:`GenerationSettings.resolve`, called by :func:`plan`).
    """
    given = {k: v for k, v in OmegaConf.to_container(cfg.variant, resolve=True).items() if v is not None}
    given |= {key: cfg[key] for key in TOP_LEVEL_SETTINGS if cfg.get(key) is not None}
    names = {f.name for f in fields(GenerationSettings)}
    unknown = sorted(set(given) - names)  # only keys forced in with +variant.<key>=... get past the schema
    if unknown:
        raise ValueError(f"unknown variant setting(s) {unknown}; known: {sorted(names)}")
    chosen = {k: v for k, v in adapter_defaults.items() if k in names} | given
    values = {k: getattr(spec, k) for k in _SPEC_DEFAULTS}
    values["negative_prompt"] = spec.negative_prompt
    tied = make_conditioning(chosen.get("conditioning", "text")).fps
    if tied is not None:
        values["fps"] = int(tied)
    return GenerationSettings(**(values | chosen))


def _adapter_defaults(adapters: list[tuple[Path, str | None]], spec: ModelSpec) -> tuple[dict[str, Any], list]:
    """Refuse an adapter made for another base or expert; its recorded variant defaults, the first adapter's
    winning, and ``(path, VariantSpec)`` of every adapter that records what it was trained on. An adapter that
    records no base (a LoRA file made elsewhere) is noted on stderr and loads if its tensor shapes fit."""
    defaults: dict[str, Any] = {}
    trained = []
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
        if (variant := meta.trained_variant(path)) is not None:
            trained.append((path, variant))
    return defaults, trained


def _check_trained(settings: GenerationSettings, trained: list) -> None:
    """Refuse settings an adapter was not trained for (the hand-off, padding and motion counts, the
    conditioning): it would load, and drift or fail to follow the conditioning."""
    for path, variant in trained:
        problems = variant.refusals(settings)
        if problems:
            raise AdapterError(
                f"adapter {path} was not trained for {'; '.join(problems)}: leave those settings to the adapter's "
                "svi.json (drop the overrides), or use an adapter trained for them"
            )


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
    memory = _memory(cfg)
    output = Path(cfg.output).expanduser()
    check_output(output, cfg.resume, cfg.overwrite)
    adapters = _adapters(cfg, spec)
    extras = _extras(cfg, spec)
    defaults, trained = _adapter_defaults(adapters, spec)
    settings = resolve_settings(cfg, spec, defaults)
    settings.validate(spec)
    _check_trained(settings, trained)
    conditioning = make_conditioning(settings.conditioning)
    conditioning.check_adapters(adapters)
    given = {key: cfg.get(key) for key in ("audio", "pose", "side_by_side")}
    given |= {key: cfg.model.get(key) for key in ("multitalk", "audio_encoder")}
    inputs = conditioning.plan_inputs(given, settings, spec)
    prompts = load_prompts(OmegaConf.to_object(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts)
    image = read_image(cfg.image)
    settings = settings.resolve(spec, image.size)  # the size the generator will resolve too, checked now
    settings.validate(spec)
    return Plan(
        spec,
        model_path,
        settings,
        adapters,
        extras,
        image,
        prompts,
        output,
        conditioning,
        inputs,
        memory,
    )


def run(cfg: DictConfig) -> GenerationResult:
    """Plan, build the model (+ the conditioning's modules), load adapters, generate."""
    p = plan(cfg)
    # torch, diffusers and peft start up only now, once every cheap check has passed
    from svi_infer.adapters import load_adapter, set_strength
    from svi_infer.longvideo.generator import LongVideoGenerator
    from svi_infer.memory import arrange
    from svi_infer.memory_plan import Clip, plan_generation
    from svi_infer.model import OriginalFiles, build_model, resolve_device

    device, dtype = resolve_device(cfg.model.device, cfg.model.dtype)
    original = OriginalFiles.from_paths(
        cfg.model.get("transformer_files"), cfg.model.get("transformer_2_files"), cfg.model.get("vae_file")
    )
    settings = p.settings.resolve(p.spec, p.image.size)
    clip = Clip(settings.frames_per_clip or p.spec.frames_per_clip, settings.height, settings.width)
    memory = p.memory
    estimate = plan_generation(
        p.spec, clip, memory.weights_dtype, memory.offload, memory.blocks_per_group, dtype, p.model_path
    )
    print(estimate.line(), flush=True)
    # memory.*: built on the CPU, stored and placed once the adapters are in (svi_infer.memory.arrange); the
    # conditioning's own runtime modules (Talk's audio encoder) go to the device at once
    model = build_model(p.spec, p.model_path, "cpu" if p.memory.placed else device, dtype, original)
    model.device = device
    p.conditioning.attach(model, p.inputs)  # before the adapters, so an adapter holding LoRA for its modules finds them
    for path, expert in p.adapters:
        load_adapter(model, path, expert=expert, ignore_unmatched=cfg.adapter.ignore_unmatched)
    stacked = {f"extra_{i}": strength for i, (_, strength) in enumerate(p.extras)}
    for name, (path, _) in zip(stacked, p.extras, strict=True):
        load_adapter(model, path, adapter_name=name, ignore_unmatched=cfg.adapter.ignore_unmatched)
    if p.adapters or p.extras:
        set_strength(model, cfg.adapter.strength, stacked)
    if p.memory.placed:
        arrange(model, p.memory.weights_dtype, p.memory.offload, p.memory.blocks_per_group, device)
    provenance = {
        "model_path": p.model_path,
        "original_files": [str(f) for f in (*original.transformer, *original.transformer_2, original.vae) if f],
        "adapters": [{"path": str(a), "expert": e} for a, e in p.adapters],
        "extra_adapters": [{"path": str(a), "strength": s} for a, s in p.extras],
        "adapter_strength": cfg.adapter.strength,
        "image": str(cfg.image),
    }
    if p.memory.weights_dtype != "auto":  # changes the frames (offloading does not): a resume must match
        provenance["weights_dtype"] = p.memory.weights_dtype
    for key in ("multitalk", "audio_encoder"):  # Talk's model files
        if key in p.inputs.files:
            provenance[key] = str(p.inputs.files[key]) if p.inputs.files[key] else None
    generator = LongVideoGenerator(model, p.settings, provenance, conditioning=p.conditioning)
    given = {key: p.inputs.files.get(key) for key in ("audio", "pose", "side_by_side")}
    return generator.generate(p.image, p.prompts, p.output, resume=cfg.resume, progress=cfg.progress, **given)
