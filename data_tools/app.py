"""The ``python -m data_tools`` commands over a composed ``conf/data_tools.yaml``.

The cheap checks come first (the command, the folders and files it needs, the model's spec), and torch, diffusers,
decord and webdataset are imported only after them, inside the functions that need them: a mistake is answered
at once, not after seconds of start-up.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from data_tools.config import COMMANDS, PRO_MOTIONS, AugmentSettings, DataSettings
from data_tools.layout import output_paths
from data_tools.report import Report
from svi_infer.atomic import atomic_path
from svi_infer.spec import ModelSpec, check_frames_per_clip, get_spec
from svi_infer.variants import HANDOFFS

if TYPE_CHECKING:
    from svi_infer.audio import AudioEncoder
    from svi_infer.model import WanModel


class DataRunError(RuntimeError):
    """The run finished but its result needs the user: nothing landed, too much was skipped, or shards are damaged."""


def check_paths(cfg: DictConfig) -> tuple[Path | None, Path]:
    """The input folder (``prepare`` / ``scan``) and the output folder, checked before anything heavy loads; each
    mistake names the path and what to give instead."""
    if cfg.command not in COMMANDS:
        raise ValueError(f"unknown command {cfg.command!r}: give one of {', '.join(COMMANDS)}")
    needs_input = cfg.command in ("prepare", "scan")
    if OmegaConf.is_missing(cfg, "output") or (needs_input and OmegaConf.is_missing(cfg, "input")):
        raise ValueError("give input=<folder of videos> and output=<dataset folder>")
    output = Path(cfg.output).expanduser()
    root = Path(cfg.input).expanduser() if needs_input else None
    if root is not None and not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"input folder {root} {what}: give input=<the folder that holds your videos>")
    if cfg.command in ("prepare", "scan", "encode", "pack"):
        _check_writable(output)
    paths = output_paths(output)
    if cfg.command in ("encode", "pack") and not paths["manifest"].is_file():
        raise FileNotFoundError(
            f"{paths['manifest']} does not exist: run `python -m data_tools scan input=<videos> output={output}` "
            "(or prepare) first"
        )
    if cfg.command in ("verify", "inspect") and not paths["index"].is_file():
        raise FileNotFoundError(
            f"{paths['index']} does not exist: give the output= folder of a prepare run, or run "
            f"`python -m data_tools pack output={output}` first"
        )
    return root, output


def _check_writable(output: Path) -> None:
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"output {output} cannot be a folder: {existing} is a file; give another output=")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {existing}: give output=<a folder you can write to>")


def settings_from(cfg: DictConfig, spec: ModelSpec) -> DataSettings:
    """Checked settings; defaults that depend on the model come from its spec."""
    from data_tools.windows import resolve_buckets

    frames = int(cfg.frames_per_clip or spec.frames_per_clip)  # null: the model's (81; 121 for TI2V-5B)
    check_frames_per_clip(frames, spec.vae_temporal)
    buckets = resolve_buckets(cfg.buckets, spec.spatial_multiple, (spec.height, spec.width))
    motion = tuple(int(m) for m in cfg.motion_frames)
    if not motion or not all(1 <= m < frames for m in motion):
        raise ValueError(f"motion_frames must be counts in 1..{frames - 1}, got {list(motion)}")
    choices = {"short_videos": ("skip", "pad"), "crop": ("center", "random"), "handoff": HANDOFFS}
    choices["pro_motion"] = PRO_MOTIONS
    for name, allowed in choices.items():
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
    settings = DataSettings(
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
        pro_motion=cfg.pro_motion,
        augment=augment,
        vae_tiling=bool(cfg.vae_tiling),
        vae_tile_size=tile,
        vae_tile_stride=tile_stride,
    )
    settings.variant()  # refuses what no variant is (audio and pose at once, a bad ref_pad_num)
    return settings


def _model(cfg: DictConfig, spec: ModelSpec, settings: DataSettings | None = None) -> WanModel:
    from data_tools.encode import configure_vae
    from svi_infer.model import build_model, resolve_device

    device, dtype = resolve_device(cfg.model.device, cfg.model.dtype)
    model = build_model(spec, cfg.model.path, device, dtype)
    if settings is not None:
        configure_vae(model, settings.vae_tiling, settings.vae_tile_size, settings.vae_tile_stride)
    return model


def _audio_encoder(cfg: DictConfig, spec: ModelSpec, device) -> AudioEncoder | None:
    if not cfg.audio:
        return None
    from svi_infer.audio import AudioEncoder

    if cfg.audio_encoder:
        return AudioEncoder.from_pretrained(cfg.audio_encoder, device)
    if spec.tiny:
        return AudioEncoder.tiny(device)
    raise ValueError("audio=true needs audio_encoder=<folder of a wav2vec2 model, e.g. chinese-wav2vec2-base>")


def accepting_ratio(skipped: int, landed: int) -> float:
    """The smallest ``max_skip_ratio`` with two decimals that accepts these skips."""
    return min(1.0, math.floor(skipped / max(1, skipped + landed) * 100 + 1) / 100)


def _finish(report: Report, output: Path, landed: int, max_skip_ratio: float) -> None:
    report.count("samples", landed)
    path = output_paths(output)["report"]
    report.write(path)
    print(f"data_tools: {report.summary()}; report: {path}")
    skipped = len(report.skipped)
    ratio = skipped / max(1, skipped + landed)
    if landed == 0:
        raise DataRunError(f"no usable sample: all {skipped} inputs were skipped; {path} says why each one was")
    if ratio > max_skip_ratio:
        raise DataRunError(
            f"{skipped} of {skipped + landed} inputs were skipped ({ratio:.0%}, more than max_skip_ratio="
            f"{max_skip_ratio}), but the {landed} samples in {output_paths(output)['shards']} (index.json) are "
            f"complete and usable; why each input was skipped: {path}; to accept the skips, rerun the same command "
            f"with max_skip_ratio={accepting_ratio(skipped, landed):.2f} (nothing is encoded again)"
        )


def _damaged(output: Path, problems: list[str]) -> DataRunError:
    from data_tools.stages import rebuild_hint

    if len(problems) == 1:
        return DataRunError(f"{problems[0]}: {rebuild_hint(output)}")
    head = f"{len(problems)} problems in the shards: {rebuild_hint(output)}"
    return DataRunError("\n  ".join([head, *problems[:20]]))


def run(cfg: DictConfig) -> None:
    """Run ``cfg.command``."""
    root, output = check_paths(cfg)
    spec = get_spec(cfg.model.spec)
    if cfg.command == "inspect":
        inspect(cfg, output)
        return
    settings = settings_from(cfg, spec) if cfg.command != "verify" else None
    from data_tools import stages  # the heavy part starts here

    if cfg.command == "verify":
        count, problems = stages.run_verify(output)
        shards = len(stages.shard_urls(output))
        print(f"data_tools: verified {count} samples in {shards} shards; {len(problems)} problems")
        if problems:
            raise _damaged(output, problems)
        return
    report = Report()
    if root is not None:
        stages.run_scan(root, output, settings, report)
        print(f"data_tools: scanned {report.summary()}")
        if cfg.command == "scan":
            report.write(output_paths(output)["report"])
            return
    manifest = stages.load_manifest(output, settings)
    if cfg.command in ("prepare", "encode") and stages.count_pending(manifest, output):  # else no model is needed
        model = _model(cfg, spec, settings)
        audio_encoder = _audio_encoder(cfg, spec, model.device)
        stages.run_encode(manifest, output, settings, model, report, audio_encoder, cfg.progress)
    index = None
    if cfg.command != "encode":
        index = stages.run_pack(manifest, output, settings, spec.id, cfg.shard_max_bytes)
    if cfg.command == "prepare":
        count, problems = stages.run_verify(output)
        if problems:
            raise _damaged(output, problems)
    stages.collect_skips(output, report)
    if index is not None:
        print(f"data_tools: {index['samples']} samples in {len(index['shards'])} shards under {output / 'shards'}")
        _finish(report, output, index["samples"], cfg.max_skip_ratio)


def inspect(cfg: DictConfig, output: Path) -> Path | None:
    """Print a shard's samples (key, caption, tensor shapes) and write a contact sheet of up to 16 of them: the
    source frame beside the decoded first frame, labelled. Samples before a damaged spot are still shown; the
    damage is then reported. Returns the sheet's path (None when no sample could be read)."""
    from data_tools.stages import ShardReader, shard_urls

    urls, shard = shard_urls(output), str(cfg.shard)
    if shard.isdigit() and int(shard) >= len(urls):
        listed = f"{output / 'index.json'} lists {len(urls)} shards"
        raise ValueError(f"shard={shard} is out of range: {listed}; give shard=0..{len(urls) - 1} or a file name")
    url = urls[int(shard)] if shard.isdigit() else str(output_paths(output)["shards"] / shard)
    if not Path(url).is_file():
        where = output_paths(output)["shards"]
        raise FileNotFoundError(f"shard {url} does not exist: give shard=<index in index.json or a file in {where}>")
    reader = ShardReader(url)
    shown = []
    for s in reader:
        shapes = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in s.tensors.items())
        print(f"{s.key}: {json.dumps(s.meta['caption'])}\n    {shapes}")
        if len(shown) < 16:
            shown.append(s)
    path = None
    if shown:
        from data_tools.contact_sheet import contact_sheet

        manifest = output_paths(output)["manifest"]
        root = Path(json.loads(manifest.read_text(encoding="utf-8"))["root"]) if manifest.is_file() else None
        sheet = contact_sheet(_model(cfg, get_spec(shown[0].meta["spec"])), shown, root)
        path = output / f"inspect_{Path(url).stem}.png"
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        print(f"contact sheet: {path}")
    else:
        print(f"{url}: no readable samples")
    if reader.problems:
        raise _damaged(output, reader.problems)
    return path
