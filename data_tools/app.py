"""The ``python -m data_tools`` commands over a composed ``conf/data.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from data_tools.augment import AugmentSettings
from data_tools.encode import configure_vae
from data_tools.report import Report
from data_tools.stages import (
    DataSettings,
    collect_skips,
    contact_sheet,
    load_manifest,
    read_shard,
    run_encode,
    run_pack,
    run_scan,
    run_verify,
    shard_urls,
)
from data_tools.windows import resolve_buckets
from svi_infer.audio import AudioEncoder
from svi_infer.conditioning import HANDOFFS, check_frames_per_clip
from svi_infer.model import build_model, resolve_device
from svi_infer.spec import ModelSpec, get_spec

COMMANDS = ("prepare", "scan", "encode", "pack", "verify", "inspect")


class DataRunError(RuntimeError):
    """The run finished but its result is not usable (nothing landed, or too much was skipped)."""


def settings_from(cfg: DictConfig, spec: ModelSpec) -> DataSettings:
    """Checked settings; defaults that depend on the model come from its spec."""
    frames = int(cfg.frames_per_clip or spec.frames_per_clip)  # null: the model's (81; 121 for TI2V-5B)
    check_frames_per_clip(frames, spec.vae_temporal)
    buckets = resolve_buckets(cfg.buckets, spec.spatial_multiple, (spec.height, spec.width))
    motion = tuple(int(m) for m in cfg.motion_frames)
    if not motion or not all(1 <= m < frames for m in motion):
        raise ValueError(f"motion_frames must be counts in 1..{frames - 1}, got {list(motion)}")
    for name, allowed in (("short_videos", ("skip", "pad")), ("crop", ("center", "random")), ("handoff", HANDOFFS)):
        if cfg[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {cfg[name]!r}")
    latents = tuple(int(n) for n in cfg.motion_latents)
    room = spec.latent_frames(frames) - 1  # latents after the anchor latent
    if cfg.handoff == "latent" and (not latents or not all(1 <= n < room for n in latents)):
        raise ValueError(
            f"motion_latents must be counts n >= 1 that leave room after the anchor latent in a "
            f"{room + 1}-latent clip (n < {room}; frames_per_clip={frames}), got {list(latents)}"
        )
    tile, tile_stride = int(cfg.vae_tile_size), int(cfg.vae_tile_stride)
    if cfg.vae_tiling and (tile % spec.vae_spatial or tile_stride % spec.vae_spatial or not 0 < tile_stride <= tile):
        raise ValueError(
            f"vae_tile_size ({tile}) and vae_tile_stride ({tile_stride}) must be multiples of {spec.vae_spatial} "
            "with 0 < stride <= size"
        )
    augment = AugmentSettings.from_dict(OmegaConf.to_container(cfg.augment) if cfg.augment is not None else None)
    return DataSettings(
        frames_per_clip=frames,
        fps=float(cfg.fps or spec.fps),
        stride=int(cfg.stride or frames),
        short_videos=cfg.short_videos,
        buckets=buckets,
        crop=cfg.crop,
        motion_frames=motion,
        ref_pad_num=cfg.ref_pad_num,
        anchor=cfg.anchor,
        fallback_caption=cfg.fallback_caption,
        audio=cfg.audio,
        pose=cfg.pose,
        seed=cfg.seed,
        handoff=cfg.handoff,
        motion_latents=tuple(sorted(set(latents))),
        augment=augment,
        vae_tiling=bool(cfg.vae_tiling),
        vae_tile_size=tile,
        vae_tile_stride=tile_stride,
    )


def _model(cfg: DictConfig, spec: ModelSpec, settings: DataSettings | None = None):
    device, dtype = resolve_device(cfg.model.device, cfg.model.dtype)
    model = build_model(spec, cfg.model.path, device, dtype)
    if settings is not None:
        configure_vae(model, settings.vae_tiling, settings.vae_tile_size, settings.vae_tile_stride)
    return model


def _audio_encoder(cfg: DictConfig, spec: ModelSpec, device) -> AudioEncoder | None:
    if not cfg.audio:
        return None
    if cfg.audio_encoder:
        return AudioEncoder.from_pretrained(cfg.audio_encoder, device)
    if spec.tiny:
        return AudioEncoder.tiny(device)
    raise ValueError("audio=true needs audio_encoder=<folder of a wav2vec2 model, e.g. chinese-wav2vec2-base>")


def _finish(report: Report, output: Path, landed: int, max_skip_ratio: float) -> None:
    report.count("samples", landed)
    report.write(output / "report.json")
    print(f"data_tools: {report.summary()}; report: {output / 'report.json'}")
    ratio = len(report.skipped) / max(1, len(report.skipped) + landed)
    if landed == 0:
        raise DataRunError(f"no usable sample: see {output / 'report.json'} for what was skipped and why")
    if ratio > max_skip_ratio:
        raise DataRunError(f"{ratio:.0%} of the inputs were skipped (max_skip_ratio={max_skip_ratio}); see the report")


def run(cfg: DictConfig) -> None:
    """Run ``cfg.command``."""
    if cfg.command not in COMMANDS:
        raise ValueError(f"unknown command {cfg.command!r}; commands: {', '.join(COMMANDS)}")
    if OmegaConf.is_missing(cfg, "output") or (
        cfg.command in ("prepare", "scan") and OmegaConf.is_missing(cfg, "input")
    ):
        raise ValueError("give input=<folder of videos> and output=<dataset folder>")
    spec = get_spec(cfg.model.spec)
    output = Path(cfg.output).expanduser()
    if cfg.command == "verify":
        count, problems = run_verify(output)
        print(f"data_tools: verified {count} samples in {len(shard_urls(output))} shards; {len(problems)} problems")
        if problems:
            raise DataRunError("\n  ".join(["shards do not match the schema or the index:", *problems[:20]]))
        return
    if cfg.command == "inspect":
        inspect(cfg, spec, output)
        return
    settings = settings_from(cfg, spec)
    report = Report()
    if cfg.command in ("prepare", "scan"):
        manifest = run_scan(Path(cfg.input).expanduser(), output, settings, report)
        print(f"data_tools: scanned {report.summary()}")
        if cfg.command == "scan":
            report.write(output / "report.json")
            return
    manifest = load_manifest(output, settings)
    if cfg.command in ("prepare", "encode"):
        model = _model(cfg, spec, settings)
        run_encode(manifest, output, settings, model, report, _audio_encoder(cfg, spec, model.device), cfg.progress)
    index = run_pack(manifest, output, settings, spec.id, cfg.shard_max_bytes) if cfg.command != "encode" else None
    if cfg.command == "prepare":
        count, problems = run_verify(output)
        if problems:
            raise DataRunError("\n  ".join(["the new shards do not verify:", *problems[:20]]))
    collect_skips(output, report)
    if index is not None:
        print(f"data_tools: {index['samples']} samples in {len(index['shards'])} shards under {output / 'shards'}")
        _finish(report, output, index["samples"], cfg.max_skip_ratio)


def inspect(cfg: DictConfig, spec: ModelSpec, output: Path) -> Path:
    """Print a shard's samples (key, caption, tensor shapes) and write a contact sheet of first frames."""
    urls = shard_urls(output)
    shard = str(cfg.shard)
    url = urls[int(shard)] if shard.isdigit() else str(output / "shards" / shard)
    samples = read_shard(url)
    for s in samples:
        shapes = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in s.tensors.items())
        print(f"{s.key}: {json.dumps(s.meta['caption'])}\n    {shapes}")
    if not samples:
        print(f"{url}: no samples")
        return Path(url)
    sheet = contact_sheet(_model(cfg, get_spec(samples[0].meta["spec"])), [s.tensors["latents"] for s in samples])
    path = output / f"inspect_{Path(url).stem}.png"
    Image.fromarray(sheet).save(path)
    print(f"contact sheet: {path}")
    return path
