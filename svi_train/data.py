"""Streaming pre-encoded shards (data_tools' output) into training batches with webdataset.

Every sample is validated against the shard schema on read; a bad one is skipped and counted, never fatal.
Samples are bucketed by resolution so a batch never mixes shapes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from torch import Tensor

from svi_infer.schema import SchemaError, from_members, padded_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they stream."""

    path: str = "???"  # a data_tools output folder (with index.json and shards/)
    batch_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 64
    resampled: bool = False  # endless sampling with replacement (multi-node); else epochs over the shards
    motion_frames: tuple[int, ...] = (1,)  # conditioning variants to draw from (must be in the shards)
    p_more_motion: float = 0.9  # with several: the largest count with this probability, else the smallest
    motion_latents: tuple[int, ...] = (0, 1)  # latent hand-off: motion latents to draw (0 = a clip-0 sample)
    max_skip_ratio: float = 0.1  # stop when more than this share of samples/shards cannot be used


def read_index(path: str | Path) -> dict:
    index_path = Path(path).expanduser() / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist: prepare shards with `python -m data_tools prepare`")
    return json.loads(index_path.read_text(encoding="utf-8"))


class DataSkipError(RuntimeError):
    """Too many samples or shards could not be used."""


class _Validated:
    """Decode + validate raw members; count, log once and drop bad samples and unreadable shards (the count
    rides along in each sample); fail only when the share of skipped items passes ``max_skip_ratio``."""

    def __init__(self, max_skip_ratio: float, min_seen: int = 10) -> None:
        self.skipped = 0
        self.good = 0
        self.max_skip_ratio = max_skip_ratio
        self.min_seen = min_seen

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler for a truncated, missing or unreadable shard: count it and go on."""
        self._skip(f"shard error: {exn}")
        return True

    def _skip(self, what: str) -> None:
        self.skipped += 1
        log.warning("data: skipped %s", what)
        seen = self.skipped + self.good
        if seen >= self.min_seen and self.skipped / seen > self.max_skip_ratio:
            raise DataSkipError(
                f"{self.skipped} of {seen} samples/shards could not be used (data.max_skip_ratio="
                f"{self.max_skip_ratio}); check the shards with `python -m data_tools verify output=...`"
            )

    def __call__(self, source: Iterator[dict]) -> Iterator[dict]:
        for raw in source:
            try:
                sample = from_members(raw)
            except SchemaError as err:
                self._skip(str(err))
                continue
            self.good += 1
            t = sample.tensors
            yield {
                "key": sample.key,
                "latents": t["latents"],
                "cond": {int(k.removeprefix("cond.m")): v for k, v in t.items() if k.startswith("cond.m")},
                "anchor": t.get("anchor"),  # latent hand-off: [C, 1, h, w] latent of the anchor image
                "motion": {int(k.removeprefix("motion.n")): v for k, v in t.items() if k.startswith("motion.n")},
                "text": padded_text(t["text"]),
                "image": t.get("image"),
                "audio": t.get("audio"),  # Talk: [F, layers, dim] wav2vec2 features, one row per video frame
                "pose": t.get("pose"),  # Dance: [3, F, H, W] uint8 pose video
                "num_frames": sample.meta["num_frames"],
                "data_skipped": self.skipped,
            }


def _bucketed(batch_size: int):
    """Group samples of equal latent shape into batches (a partial bucket is dropped at the end)."""

    def stage(source: Iterator[dict]) -> Iterator[dict]:
        buckets: dict[tuple, list[dict]] = {}
        for sample in source:
            bucket = buckets.setdefault(tuple(sample["latents"].shape), [])
            bucket.append(sample)
            if len(bucket) == batch_size:
                yield collate(bucket)
                bucket.clear()

    return stage


def _stacked(samples: list[dict], name: str) -> Tensor | None:
    """``name`` stacked over the batch, or None unless every sample has it (the step then says what is missing)."""
    values = [s.get(name) for s in samples]
    return None if any(v is None for v in values) else torch.stack(values)


def collate(samples: list[dict]) -> dict:
    """Stack tensors; conditioning variants present in every sample are kept. ``audio`` is ``[B, F, layers,
    dim]`` and ``pose`` uint8 ``[B, 3, F, H, W]`` when every sample holds them, else None."""
    counts = sorted(set.intersection(*(set(s["cond"]) for s in samples)))
    motion = sorted(set.intersection(*(set(s.get("motion") or {}) for s in samples)))
    batch = {
        "key": [s["key"] for s in samples],
        "latents": torch.stack([s["latents"] for s in samples]),
        "cond": {m: torch.stack([s["cond"][m] for s in samples]) for m in counts},
        "anchor": _stacked(samples, "anchor"),
        "motion": {n: torch.stack([s["motion"][n] for s in samples]) for n in motion},
        "text": torch.stack([s["text"] for s in samples]),
        "image": torch.stack([s["image"] for s in samples]) if samples[0]["image"] is not None else None,
        "audio": _stacked(samples, "audio"),
        "pose": _stacked(samples, "pose"),
        "num_frames": samples[0]["num_frames"],
        "data_skipped": max(s["data_skipped"] for s in samples),
    }
    return batch


class WdsDataModule(L.LightningDataModule):
    """Streams ``<path>/shards/*.tar`` (split by node and worker) into bucketed batches."""

    def __init__(self, config: DataConfig, seed: int = 0, handoff: str = "pixel") -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.handoff = handoff  # which conditioning members the run reads: cond.m<m> (pixel), motion.n<n> (latent)
        self._skip_batches = 0  # set on resume: batches of the interrupted epoch already trained on

    def urls(self) -> list[str]:
        index = read_index(self.config.path)
        if not index["shards"]:
            raise ValueError(f"{self.config.path} holds no shard (index.json lists none)")
        check_shards_handoff(index, self.config, self.handoff)
        missing = sorted(set(self.config.motion_frames) - set(index["motion_frames"]))
        if self.handoff == "pixel" and missing:
            raise ValueError(
                f"the shards in {self.config.path} hold conditioning for motion frames {index['motion_frames']}, "
                f"not {missing}: prepare them with motion_frames={sorted(set(index['motion_frames']) | set(missing))}"
            )
        return [str(Path(self.config.path).expanduser() / "shards" / s["name"]) for s in index["shards"]]

    def pipeline(self) -> wds.DataPipeline:
        c = self.config
        urls = self.urls()
        validated = self.validated = _Validated(c.max_skip_ratio)  # its counts, for num_workers=0
        shards = (
            [wds.ResampledShards(urls, seed=self.seed, deterministic=True)]  # per rank and worker: resumable
            if c.resampled
            else [wds.SimpleShardList(urls), wds.split_by_node]
        )
        return wds.DataPipeline(
            *shards,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=validated.shard_error),
            wds.shuffle(c.shuffle_buffer, seed=self.seed) if c.shuffle_buffer > 1 else (lambda s: s),
            validated,
            _bucketed(c.batch_size),
        )

    def train_dataloader(self) -> _ResumableLoader:
        loader = wds.WebLoader(self.pipeline(), batch_size=None, num_workers=self.config.num_workers)
        return _ResumableLoader(loader, self)

    # the stream position goes into checkpoints, so a resumed run sees exactly the batches it had not seen
    def state_dict(self) -> dict:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"batches_into_epoch": int(progress.processed), "epoch": int(self.trainer.current_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self._skip_batches = int(state.get("batches_into_epoch", 0))


def check_shards_handoff(index: dict, config: DataConfig, handoff: str) -> None:
    """The shards must hold the conditioning members the run's hand-off reads (shards from before the latent
    hand-off existed have no ``handoff`` entry: they are pixel ones)."""
    prepared = index.get("handoff", "pixel")
    if prepared != handoff:
        raise ValueError(
            f"variant.handoff={handoff}, but the shards in {config.path} were prepared with handoff={prepared}: "
            f"prepare them with `python -m data_tools prepare handoff={handoff} ...` (or train with "
            f"variant.handoff={prepared})"
        )
    if handoff == "latent":
        missing = sorted(set(config.motion_latents) - {0} - set(index.get("motion_latents", [])))
        if missing:
            raise ValueError(
                f"the shards in {config.path} hold motion latents {index.get('motion_latents', [])}, not {missing}: "
                f"prepare them with motion_latents={sorted(set(index.get('motion_latents', [])) | set(missing))}"
            )


class _ResumableLoader:
    """Iterates the loader; the first iteration after a resume skips the batches already trained on.
    The stream's order is the same every epoch (seeded shuffle), so skipping lands on the exact next batch."""

    def __init__(self, loader: wds.WebLoader, owner: WdsDataModule) -> None:
        self.loader, self.owner = loader, owner

    def __iter__(self) -> Iterator[dict]:
        iterator = iter(self.loader)
        skip, self.owner._skip_batches = self.owner._skip_batches, 0
        for _ in range(skip):
            next(iterator, None)
        yield from iterator


def choose_cond(
    cond: dict[int, Tensor], motion_frames: tuple[int, ...], p_more: float, generator
) -> tuple[int, Tensor]:
    """Pick the conditioning variant for a step (Film: 5 motion frames with p=0.9, else 1)."""
    counts = sorted(m for m in motion_frames if m in cond)
    if not counts:
        raise ValueError(f"batch has conditioning for {sorted(cond)}, training asks for {list(motion_frames)}")
    m = counts[-1] if len(counts) == 1 or torch.rand((), generator=generator).item() < p_more else counts[0]
    return m, cond[m]
