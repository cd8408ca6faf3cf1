"""From a composed ``conf/infer.yaml`` to a generated video: check everything cheap first, then load."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from svi_infer.adapters import AdapterError, load_adapter, read_meta, set_strength
from svi_infer.generate import GenerationResult, GenerationSettings, LongVideoGenerator, ResumeMismatchError
from svi_infer.model import ModelFolderError, OriginalFiles, build_model, resolve_device
from svi_infer.prompts import PromptError, load_prompts
from svi_infer.spec import HIGH_NOISE, LOW_NOISE, ModelSpec, get_spec
from svi_infer.video_io import read_image

# Errors that are the user's input, reported as one line without a traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    PromptError,
    AdapterError,
    ModelFolderError,
    ResumeMismatchError,
)
_SPEC_DEFAULTS = ("frames_per_clip", "fps", "steps", "shift", "cfg_scale")


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before any model is loaded."""

    spec: ModelSpec
    model_path: str | None
    original: OriginalFiles
    device: torch.device
    dtype: torch.dtype
    settings: GenerationSettings
    adapters: list[tuple[Path, str | None]]  # (path, expert)
    image: Image.Image
    prompts: list[str]


def _adapters(cfg: DictConfig, spec: ModelSpec) -> list[tuple[Path, str | None]]:
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
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"adapter {path} does not exist")
        adapters.append((Path(path).expanduser(), expert))
    return adapters


def resolve_settings(cfg: DictConfig, spec: ModelSpec, adapter_defaults: dict[str, Any]) -> GenerationSettings:
    """Each setting: the user's value, else the adapter's ``svi.json`` default, else the spec / built-in one."""
    given = {k: v for k, v in OmegaConf.to_container(cfg.variant, resolve=True).items() if v is not None}
    for key in ("num_clips", "frames_per_clip", "height", "width", "seed", "seed_policy"):
        if cfg.get(key) is not None:
            given[key] = cfg[key]
    names = {f.name for f in fields(GenerationSettings)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown variant setting(s) {unknown}; known: {sorted(names)}")
    values = {k: getattr(spec, k) for k in _SPEC_DEFAULTS}
    values |= {"height": spec.height, "width": spec.width}
    values |= {k: v for k, v in adapter_defaults.items() if k in names}
    values |= given
    return GenerationSettings(**values)


def plan(cfg: DictConfig) -> Plan:
    """Validate the request: model, adapters, settings, image and prompts. Loads no weights."""
    spec = get_spec(cfg.model.spec)
    model_path = cfg.model.get("path")
    if OmegaConf.is_missing(cfg.model, "path") or (model_path is None and not spec.tiny):
        raise ValueError(
            f"model.path is required for {spec.id}: the local folder with its weights in diffusers layout "
            "(or choose a tiny model, e.g. model=tiny_wan21_i2v)"
        )
    if OmegaConf.is_missing(cfg, "image") or OmegaConf.is_missing(cfg, "prompts"):
        raise ValueError("give image=<path to the first frame> and prompts=<.txt/.json file or a prompt>")
    device, dtype = resolve_device(cfg.model.device, cfg.model.dtype)
    original = OriginalFiles.from_paths(
        cfg.model.get("transformer_files"), cfg.model.get("transformer_2_files"), cfg.model.get("vae_file")
    )
    adapters = _adapters(cfg, spec)
    defaults: dict[str, Any] = {}
    for path, _ in reversed(adapters):  # the first adapter's defaults win
        meta = read_meta(path) if path.is_dir() else None
        if meta is not None:
            meta.check_base(spec, path)
            defaults |= meta.defaults
    settings = resolve_settings(cfg, spec, defaults)
    settings.validate(spec)
    prompts = load_prompts(OmegaConf.to_object(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts)
    image = read_image(cfg.image)
    return Plan(spec, model_path, original, device, dtype, settings, adapters, image, prompts)


def run(cfg: DictConfig) -> GenerationResult:
    """Plan, build the model, load adapters, generate."""
    p = plan(cfg)
    model = build_model(p.spec, p.model_path, p.device, p.dtype, p.original)
    for path, expert in p.adapters:
        load_adapter(model, path, expert=expert, ignore_unmatched=cfg.adapter.ignore_unmatched)
    if p.adapters:
        set_strength(model, cfg.adapter.strength)
    provenance = {
        "model_path": p.model_path,
        "original_files": [str(f) for f in (*p.original.transformer, *p.original.transformer_2, p.original.vae) if f],
        "adapters": [{"path": str(a), "expert": e} for a, e in p.adapters],
        "adapter_strength": cfg.adapter.strength,
        "image": str(cfg.image),
    }
    generator = LongVideoGenerator(model, p.settings, provenance)
    return generator.generate(p.image, p.prompts, Path(cfg.output), resume=cfg.resume, progress=cfg.progress)
