"""Streaming pre-encoded shards (data_tools' output) into training batches with webdataset.

Every sample is validated against the shard schema on read; a bad one is skipped and counted, never fatal.
Samples are bucketed by resolution so a batch never mixes shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from torch import Tensor
from webdataset.tariterators import group_by_keys, tar_file_expander

from svi_infer.errors import UserError
from svi_infer.schema import TEXT_LEN, SchemaError, from_members, padded_text
from svi_train import remote
from svi_train.config import DataConfig
from svi_train.shards import few

log = logging.getLogger(__name__)


class DataSkipError(UserError):
    """Too many samples or shards could not be used.

    Raised in a DataLoader worker, it reaches the main process re-made from torch's text of it (``Caught
    DataSkipError in DataLoader worker process 0. Original Traceback ... DataSkipError: <message>``): the message is
    taken back out of that, so the user gets the one line and not the worker's traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip())


class _Validated:
    """Decode + validate raw members; count, log and drop bad samples and unreadable shards (the count rides along
    in each sample). Fails when the share of skipped items passes ``max_skip_ratio``: as soon as ``min_seen`` items
    were read, and at the end of every pass over the shards, so a small set of bad samples fails on its first pass
    instead of giving empty epochs forever."""

    def __init__(
        self,
        max_skip_ratio: float,
        shards: list[str],
        min_seen: int = 10,
        text_len: int = TEXT_LEN,
        root: str | None = None,
    ) -> None:
        self.text_len = text_len  # text padded to the model's length (Wan: 512), as its prompt encoder pads
        self.root = root  # data.path: a remote one's shards are named by it (URLs, pipe: commands)
        self.skipped = 0
        self.good = 0
        self.max_skip_ratio = max_skip_ratio
        self.shards = shards
        self.min_seen = min_seen
        self.bad_shards: dict[str, None] = {}  # names of the shards skipped items came from, in order
        self.unreadable: set[str] = set()  # shards that kept failing: counted once, their cut-off sample with them
        self.first_problem: str | None = None

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler for a truncated, missing or unreadable shard: count it and go on. One that kept
        failing after its retries (:class:`remote.Unreadable`, raised again on each later read) counts once."""
        if isinstance(exn, remote.Unreadable):
            if not exn.reported:
                exn.reported = True
                self.unreadable.add(exn.location)
                self._skip(f"shard {remote.shown(exn.location)}: {exn.reason}", exn.location)
            return True
        shard = next((s for s in self.shards if any(s in str(arg) for arg in exn.args)), None)
        reason = exn.strerror if isinstance(exn, OSError) and exn.strerror else (exn.args or [exn])[0]
        if self.root and remote.is_remote(self.root):
            reason = remote.shown(str(reason))  # a URL in it may carry a password
        self._skip(f"shard {self._name(shard) if shard else '?'}: {type(exn).__name__}: {reason}", shard)
        return True

    def _name(self, shard: str) -> str:
        """The shard's file name, for messages."""
        if self.root and remote.is_remote(self.root):
            return remote.name_in(self.root, shard).removeprefix("shards/")
        return Path(shard).name

    def _skip(self, what: str, shard: str | None) -> None:
        self.skipped += 1
        log.warning("data: skipped %s", what)
        self.first_problem = self.first_problem or what
        if shard:
            self.bad_shards[self._name(shard)] = None
        self._check(end_of_pass=False)

    def _check(self, end_of_pass: bool) -> None:
        seen = self.skipped + self.good
        if seen and (end_of_pass or seen >= self.min_seen) and self.skipped / seen > self.max_skip_ratio:
            if self.root and remote.is_remote(self.root):
                folder, check = remote.shown(remote.member(self.root, "shards")), "<a local copy>"
            else:
                folder = Path(self.shards[0]).parent
                check = folder.parent
            raise DataSkipError(
                f"{self.skipped} of {seen} samples read could not be used (more than data.max_skip_ratio="
                f"{self.max_skip_ratio}), from {few(list(self.bad_shards))} in {folder}; the first: "
                f"{self.first_problem}; check the shards with `python -m data_tools verify output={check}` "
                "and prepare them again"
            )

    def __call__(self, source: Iterator[dict]) -> Iterator[dict]:
        for raw in source:
            try:
                sample = from_members(raw)
            except SchemaError as err:
                if raw.get("__url__") not in self.unreadable:
                    self._skip(str(err), raw.get("__url__"))
                continue
            self.good += 1
            t = sample.tensors
            yield {
                "key": sample.key,
                "latents": t["latents"],
                "cond": {int(k.removeprefix("cond.m")): v for k, v in t.items() if k.startswith("cond.m")},
                "anchor": t.get("anchor"),  # latent hand-off: [C, 1, h, w] latent of the anchor image
                "motion": {int(k.removeprefix("motion.n")): v for k, v in t.items() if k.startswith("motion.n")},
                "text": padded_text(t["text"], self.text_len),
                "image": t.get("image"),
                "audio": t.get("audio"),  # Talk: [F + 2c, layers, dim] wav2vec2 features, one row per video frame
                "audio_context": sample.meta.get("audio_context", 0),  # c: frames of the track either side
                "pose": t.get("pose"),  # Dance: [3, F, H, W] uint8 pose video
                "num_frames": sample.meta["num_frames"],
                "pro_motion": sample.meta.get("pro_motion"),  # latent hand-off: continuation | window
                "data_skipped": self.skipped,
            }
        self._check(end_of_pass=True)


def _opened(handler: Callable[[Exception], bool], retries: int | None) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """webdataset's url_opener, a remote shard read through :class:`remote.RetryingReader` (``retries``: None for
    its default): a dropped connection is reopened where it stopped, so the samples stay whole."""

    def stage(source: Iterator[dict]) -> Iterator[dict]:
        for sample in source:
            url = sample["url"]
            try:
                stream = remote.RetryingReader(url, retries) if remote.is_remote(url) else open(url, "rb")  # noqa: SIM115
            except Exception as exn:  # noqa: BLE001 (the handler decides, as webdataset's own opener does)
                exn.args = (*exn.args, url)
                if handler(exn):
                    continue
                break
            yield {**sample, "stream": stream}

    return stage


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
    """Stack tensors; conditioning variants present in every sample are kept. ``audio`` is ``[B, F + 2c, layers,
    dim]`` (``audio_context`` c) and ``pose`` uint8 ``[B, 3, F, H, W]`` when every sample holds them, else None."""
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
        "audio_context": samples[0]["audio_context"],
        "pose": _stacked(samples, "pose"),
        "num_frames": samples[0]["num_frames"],
        "pro_motion": samples[0]["pro_motion"],
        "data_skipped": max(s["data_skipped"] for s in samples),
    }
    return batch


class WdsDataModule(L.LightningDataModule):
    """Streams the shard files (``<path>/shards/*.tar``, split by node and worker) into bucketed batches."""

    def __init__(self, config: DataConfig, shards: list[str], seed: int = 0, text_len: int = TEXT_LEN) -> None:
        super().__init__()
        self.config = config
        self.text_len = text_len
        self.shards = shards
        self.seed = seed
        self._skip_batches = 0  # set on resume: batches of the interrupted epoch already trained on

    def pipeline(self) -> wds.DataPipeline:
        c = self.config
        # its counts, for num_workers=0
        validated = self.validated = _Validated(c.max_skip_ratio, self.shards, text_len=self.text_len, root=c.path)
        shards = (
            [wds.ResampledShards(self.shards, seed=self.seed, deterministic=True)]  # per rank and worker: resumable
            if c.resampled
            else [wds.SimpleShardList(self.shards), wds.split_by_node]
        )
        return wds.DataPipeline(
            *shards,
            wds.split_by_worker,
            _opened(validated.shard_error, c.retries),
            wds.pipelinefilter(tar_file_expander)(handler=validated.shard_error),
            wds.pipelinefilter(group_by_keys)(handler=validated.shard_error),
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


class _ResumableLoader:
    """Iterates the loader; the first iteration after a resume skips the batches already trained on.
    The stream's order is the same every epoch (seeded shuffle), so skipping lands on the exact next batch.

    A pass that gives no batch at all is refused: Lightning would start the next empty epoch, and the next, and
    the run would print nothing forever.
    """

    def __init__(self, loader: wds.WebLoader, owner: WdsDataModule) -> None:
        self.loader, self.owner = loader, owner

    def __iter__(self) -> Iterator[dict]:
        iterator = iter(self.loader)
        skip, self.owner._skip_batches = self.owner._skip_batches, 0
        batches = sum(next(iterator, None) is not None for _ in range(skip))
        for batch in iterator:
            batches += 1
            yield batch
        if not batches:
            c = self.owner.config
            raise UserError(
                f"a pass over the {len(self.owner.shards)} shards in {_folder(self.owner)} gave this "
                f"process no batch of data.batch_size={c.batch_size} samples of one shape: lower data.batch_size or "
                "prepare more samples (with more ranks than shards: data.resampled=true)"
            )


def _folder(data: WdsDataModule) -> str:
    """Where the data module's shards are, for messages."""
    root = data.config.path
    if remote.is_remote(root):
        return remote.shown(remote.member(root, "shards"))
    return str(Path(data.shards[0]).parent)
