"""The stages of a data run: scan -> encode -> pack -> verify, each resumable on its own (the files it keeps are
described in :mod:`data_tools.layout`)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import decord
import imageio_ffmpeg
import webdataset as wds
from tqdm.auto import tqdm

from data_tools.augment import draw_params
from data_tools.config import DataSettings
from data_tools.decoder import decoding
from data_tools.encode import choose_anchor, encode_window
from data_tools.layout import output_paths
from data_tools.report import Report
from data_tools.scan import scan
from data_tools.windows import (
    choose_bucket,
    continuation_sources,
    crop_box,
    crop_resize,
    plan_windows,
    read_frames,
    resample_indices,
)
from svi_infer.atomic import atomic_path, write_json
from svi_infer.audio import AudioEncoder, AudioError, read_audio
from svi_infer.model import WanModel
from svi_infer.schema import SCHEMA_VERSION, Sample, SchemaError, from_members, to_members

MANIFEST_VERSION = 1
# DataSettings fields newer than the first manifests (an older manifest lacks them and means their defaults)
_ADDED_SETTINGS = (
    "handoff", "motion_latents", "augment", "vae_tiling", "vae_tile_size", "vae_tile_stride", "pro_motion",
)  # fmt: skip


def _key_stem(source: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", str(Path(source).with_suffix("")))[-48:]
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def _rng(settings: DataSettings, key: str) -> random.Random:
    return random.Random(f"{settings.seed}:{key}")


# -- scan ------------------------------------------------------------------------------------------
def _audio_file(root: Path, audio: str, source: str) -> Path:
    """The file a video's audio comes from: ``audio`` (a file next to it) or, for ``"track"``, the video itself."""
    return root / source if audio == "track" else Path(audio)


def _probe(path: Path) -> tuple[int, float, int, int, str]:
    """Frame count, fps, height and width as decord sees them, and what the decoder said meanwhile (a file it
    cannot open raises :class:`ValueError` in the decoder's own words)."""
    with decoding(path.name) as log:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        num, src_fps = len(reader), float(reader.get_avg_fps())
        height, width = reader[0].shape[:2]
    return num, src_fps, height, width, log.message()


def run_scan(root: Path, output: Path, settings: DataSettings, report: Report) -> dict:
    """Find videos and captions, probe each video (and its audio for Talk), plan its windows; write
    ``work/manifest.json``. Each unusable file is skipped once, with a reason that names it."""
    entries = scan(root, report, settings.fallback_caption, settings.audio, settings.pose)
    videos = []
    for entry in entries:
        path = root / entry.source
        if path.stat().st_size == 0:
            report.skip(entry.source, "empty_file", f"{entry.source} is empty (zero bytes)")
            continue
        try:
            num, src_fps, height, width, decoder_said = _probe(path)
        except ValueError as err:
            report.skip(entry.source, "unreadable", str(err))
            continue
        declared = declared_seconds(path)
        if declared and num < 0.9 * declared * src_fps - 1:  # the index lists fewer frames than the header promises
            said = f" (decoder: {decoder_said})" if decoder_said else ""
            report.skip(
                entry.source,
                "truncated",
                f"{entry.source}: {num} decodable frames of the {declared:.2f} s the header declares{said}",
            )
            continue
        windows = plan_windows(
            num, src_fps, settings.fps, settings.frames_per_clip, settings.stride, settings.short_videos
        )
        continuations = _continuations(windows, num, src_fps, settings)
        if continuations is not None:  # SVI 2.0 Pro: only windows that continue a previous clip
            windows = [w for w in windows if w.index in continuations]
        if not windows:
            seconds = num / src_fps if src_fps else 0.0
            window = f"{settings.frames_per_clip} frames at {settings.fps} fps"
            why = f"{entry.source} is {seconds:.2f} s; a window is {window}"
            if continuations is not None:
                why += " and the latent hand-off's samples continue a previous clip (pro_motion=continuation): "
                why += "the video needs a window after the first"
            report.skip(entry.source, "too_short", why)
            continue
        if entry.audio:
            try:
                read_audio(_audio_file(root, entry.audio, entry.source))
            except AudioError as err:
                report.skip(entry.source, "no_audio", str(err))
                continue
        stem = _key_stem(entry.source)
        keys = [f"{stem}-w{w.index:04d}" for w in windows]
        h, w = choose_bucket(width, height, list(settings.buckets))
        videos.append(
            {
                **entry.to_dict(),
                "source_frames": num,
                "source_fps": src_fps,
                "source_size": [width, height],
                "bucket": [h, w],
                "windows": [
                    {
                        "key": key,
                        "index": win.index,
                        "start": win.start,
                        "source_indices": list(win.source_indices),
                        "padded": win.padded,
                        "prev_key": keys[i - 1] if i > 0 else None,
                        "next_key": keys[i + 1] if i + 1 < len(keys) else None,
                        **(continuations or {}).get(win.index, {}),
                    }
                    for i, (key, win) in enumerate(zip(keys, windows, strict=True))
                ],
            }
        )
    report.count("videos_scanned", len(entries))
    report.count("windows_planned", sum(len(v["windows"]) for v in videos))
    manifest = {"version": MANIFEST_VERSION, "root": str(root), "settings": asdict(settings), "videos": videos}
    write_json(output_paths(output)["manifest"], manifest)
    return manifest


def _continuations(windows: list, num: int, src_fps: float, settings: DataSettings) -> dict[int, dict] | None:
    """Latent hand-off with ``pro_motion=continuation``: per window that can continue a previous clip, the source
    frames of that clip per motion count (``previous``) and the frames the anchor is drawn from
    (``anchor_frames``); None for every other layout."""
    if settings.handoff != "latent" or settings.pro_motion != "continuation":
        return None
    indices = resample_indices(num, src_fps, settings.fps)
    found = {}
    for w in windows:
        sources = continuation_sources(indices, w.start, settings.frames_per_clip, settings.motion_latents)
        if sources is not None and not w.padded:
            previous, anchors = sources
            found[w.index] = {
                "previous": {str(n): list(p) for n, p in previous.items()},
                "anchor_frames": list(anchors),
            }
    return found


def declared_seconds(path: Path) -> float | None:
    """Duration the container header declares (ffmpeg reads only the header), or None if it has none."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return float(next(reader).get("duration") or 0.0) or None
    except Exception:  # no header to read: decord's own checks decide
        return None
    finally:
        reader.close()


def load_manifest(output: Path, settings: DataSettings) -> dict:
    path = output_paths(output)["manifest"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the scan stage (or prepare) first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    wanted = json.loads(json.dumps(asdict(settings)))
    # settings added since the manifest was written: their defaults reproduce what the older code did
    defaults = json.loads(json.dumps(asdict(DataSettings())))
    stored = {k: v for k, v in defaults.items() if k in _ADDED_SETTINGS} | manifest["settings"]
    if stored != wanted:
        changed = "; ".join(
            f"{k}={json.dumps(stored.get(k))} there, {json.dumps(wanted[k])} now"
            for k in wanted
            if stored.get(k) != wanted[k]
        )
        raise ValueError(
            f"{output} was prepared with other settings ({changed}): give the settings it was prepared with, or use "
            f"a new output folder (deleting {output / 'work'} encodes everything again)"
        )
    return manifest


# -- encode ----------------------------------------------------------------------------------------
def _write_sample(path: Path, members: dict) -> None:
    with atomic_path(path) as tmp:
        writer = wds.TarWriter(str(tmp), mtime=0, encoder=False)
        writer.write(members)
        writer.close()


def read_sample_file(path: Path) -> dict:
    """Members of a one-sample tar as webdataset yields them (``__key__`` and raw bytes)."""
    members: dict = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            members["__key__"] = key
            members[ext] = tar.extractfile(info).read()
    return members


def _pending(video: dict, samples: Path) -> list[dict]:
    """The video's windows neither encoded nor skipped yet (none when the whole video was skipped)."""
    if (samples / f"{_key_stem(video['source'])}.skip.json").exists():
        return []
    return [
        w for w in video["windows"]
        if not (samples / f"{w['key']}.tar").exists() and not (samples / f"{w['key']}.skip.json").exists()
    ]  # fmt: skip


def count_pending(manifest: dict, output: Path) -> int:
    """Windows left to encode: with none, a rerun needs no model."""
    return sum(len(_pending(v, output_paths(output)["samples"])) for v in manifest["videos"])


def _open_video(path: Path) -> decord.VideoReader:
    with decoding(path.name):
        return decord.VideoReader(str(path), ctx=decord.cpu(0))


def run_encode(
    manifest: dict, output: Path, settings: DataSettings, model: WanModel, report: Report,
    audio_encoder: AudioEncoder | None = None, progress: bool = True,
) -> None:  # fmt: skip
    """Encode every planned window not encoded (or skipped) yet; each sample is written atomically. A video that
    cannot be used at all is skipped once (a marker named after it), a window that fails alone is skipped alone."""
    root, samples = Path(manifest["root"]), output_paths(output)["samples"]
    samples.mkdir(parents=True, exist_ok=True)
    enc = settings.encode_settings()
    total = sum(len(v["windows"]) for v in manifest["videos"])
    bar = tqdm(total=total, desc="encode", unit="clip", disable=not progress)

    def skip(name: str, item: str, reason: str, detail: str) -> None:
        write_json(samples / f"{name}.skip.json", {"item": item, "reason": reason, "detail": detail})

    for video in manifest["videos"]:
        pending = _pending(video, samples)
        bar.update(len(video["windows"]) - len(pending))
        if not pending:
            continue
        source = video["source"]
        try:
            reader = _open_video(root / source)
            pose_reader = _open_video(root / video["pose"]) if video["pose"] else None
            audio = None
            if video["audio"]:
                audio_file = _audio_file(root, video["audio"], source)
                try:
                    audio = audio_encoder.features(read_audio(audio_file, normalize=True), fps=enc.fps)
                except AudioError as err:
                    skip(_key_stem(source), source, "no_audio", f"{audio_file.name}: {err}")
                    bar.update(len(pending))
                    continue
        except ValueError as err:
            skip(_key_stem(source), source, "unreadable", str(err))
            bar.update(len(pending))
            continue
        height, width = video["bucket"]
        for w in pending:
            key, rng = w["key"], _rng(settings, w["key"])
            span = f"{source} frames {w['source_indices'][0]}-{w['source_indices'][-1]}"
            try:
                with decoding(span):
                    box = crop_box(*video["source_size"], height, width, settings.crop, rng)
                    frames = crop_resize(read_frames(reader, tuple(w["source_indices"])), box, height, width)
                    anchor_idx = None
                    anchor = None
                    if "anchor_frames" in w:  # a continuation: the anchor comes from before the previous clip
                        anchor_idx = rng.choice(w["anchor_frames"])
                    elif enc.needs_anchor:
                        anchor_idx = choose_anchor(
                            video["source_frames"], tuple(w["source_indices"]), settings.anchor, rng
                        )
                    if anchor_idx is not None:
                        anchor = crop_resize(read_frames(reader, (anchor_idx,)), box, height, width)[0]
                    previous = {
                        int(n): crop_resize(read_frames(reader, tuple(p)), box, height, width)
                        for n, p in w.get("previous", {}).items()
                    }
                    augment = draw_params(settings.augment, rng)  # after the crop and anchor draws: none when off
                    pose = None
                    if pose_reader is not None:
                        pose = crop_resize(read_frames(pose_reader, tuple(w["source_indices"])), box, height, width)
            except ValueError as err:  # truncated or corrupt streams fail while decoding
                skip(key, f"{source}#{key}", "truncated_or_corrupt", str(err))
                bar.update(1)
                continue
            meta = {
                "caption": video["caption"],
                "source": source,
                "source_fps": video["source_fps"],
                "start_frame": w["start"],
                "window_index": w["index"],
                "prev_key": w["prev_key"],
                "next_key": w["next_key"],
                "padded": w["padded"],
                "crop": list(box),
                "anchor_frame": anchor_idx,
            }
            try:
                sample = encode_window(
                    model, enc, key, meta, frames, anchor, audio, pose, augment=augment, previous=previous
                )
                members = to_members(sample)
            except SchemaError as err:
                reason = "non_finite" if "non-finite" in str(err) else "invalid_sample"
                skip(key, f"{source}#{key}", reason, f"{source}: {err}")
                bar.update(1)
                continue
            _write_sample(samples / f"{key}.tar", members)
            bar.update(1)
    bar.close()


def collect_skips(output: Path, report: Report) -> None:
    """Fold the encode stage's skip markers into the report (sorted, so reports are stable)."""
    for marker in sorted(output_paths(output)["samples"].glob("*.skip.json")):
        entry = json.loads(marker.read_text(encoding="utf-8"))
        report.skip(entry["item"], entry["reason"], entry["detail"])


# -- pack ------------------------------------------------------------------------------------------
def run_pack(manifest: dict, output: Path, settings: DataSettings, spec_id: str, max_bytes: float) -> dict:
    """Write all encoded samples, in manifest order, into size-capped shards plus ``index.json``."""
    paths = output_paths(output)
    keys = [w["key"] for v in manifest["videos"] for w in v["windows"]]
    files = [paths["samples"] / f"{k}.tar" for k in keys if (paths["samples"] / f"{k}.tar").exists()]
    tmp = output / "shards.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: dict[str, int] = {}
    resolutions = set()
    if files:
        writer = wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxsize=max_bytes, verbose=0, mtime=0, encoder=False)
        for file in files:
            members = read_sample_file(file)
            meta = json.loads(members["json"])
            resolutions.add((meta["height"], meta["width"]))
            writer.write(members)
            name = Path(writer.fname).name
            shards[name] = shards.get(name, 0) + 1
        writer.close()
    shutil.rmtree(paths["shards"], ignore_errors=True)
    tmp.rename(paths["shards"])
    index = {
        "schema_version": SCHEMA_VERSION,
        "spec": spec_id,
        "resolutions": sorted([list(r) for r in resolutions]),
        "frames_per_clip": settings.frames_per_clip,
        "fps": settings.fps,
        "variant": settings.variant().to_record(),  # what training checks its config against
        **({"pro_motion": settings.pro_motion} if settings.handoff == "latent" else {}),
        "augment": asdict(settings.augment),
        "samples": len(files),
        "shards": [
            {"name": n, "samples": c, "bytes": (paths["shards"] / n).stat().st_size} for n, c in sorted(shards.items())
        ],
    }
    write_json(paths["index"], index)
    return index


# -- verify / inspect ------------------------------------------------------------------------------
def shard_urls(output: Path) -> list[str]:
    index = json.loads(output_paths(output)["index"].read_text(encoding="utf-8"))
    return [str(output_paths(output)["shards"] / s["name"]) for s in index["shards"]]


class ShardReader:
    """Iterates over one shard's samples that pass the schema. Problems do not raise: a refused sample, or a tar
    that breaks off (truncated, corrupt, missing), each adds a line naming the shard to ``problems``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0  # samples found, valid or not
        self.problems: list[str] = []
        self.broken = False

    def __iter__(self) -> Iterator[Sample]:
        try:
            for raw in wds.WebDataset(self.url, shardshuffle=False, empty_check=False):
                self.count += 1
                try:
                    yield from_members(raw)
                except SchemaError as err:
                    self.problems.append(f"{self.url}: {err}")
        except FileNotFoundError:
            self.broken = True
            self.problems.append(f"{self.url} is missing")
        except OSError as err:
            self.broken = True
            self.problems.append(f"{self.url} cannot be read ({err.strerror or err})")
        except (tarfile.TarError, EOFError) as err:  # the tar breaks off
            self.broken = True
            why = str(err.args[0] if err.args else type(err).__name__).split(" @ ")[0]  # webdataset appends the stream
            self.problems.append(f"{self.url} is truncated or corrupt ({why} after {self.count} samples)")


def run_verify(output: Path) -> tuple[int, list[str]]:
    """Read every shard back, validate every sample against the schema and the index counts; a damaged shard is
    reported and the others are still read."""
    index_path = output_paths(output)["index"]
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist: run pack (or prepare) first")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    problems, total = [], 0
    for shard in index["shards"]:
        reader = ShardReader(str(output_paths(output)["shards"] / shard["name"]))
        for _ in reader:
            pass
        total += reader.count
        problems += reader.problems
        if not reader.broken and reader.count != shard["samples"]:
            problems.append(f"{reader.url}: {reader.count} samples, index.json says {shard['samples']}")
    return total, problems


def rebuild_hint(output: Path) -> str:
    """What to do about damaged shards: rerunning prepare rebuilds them from the encoded samples it kept."""
    return (
        f"rerun the prepare command that made {output} to rebuild the shards (it reuses the encoded samples in "
        f"{output / 'work' / 'samples'}: nothing is encoded again)"
    )
