"""Faults during training: bad shards and samples are skipped and counted; non-finite losses are skipped.

(A shard missing at start is refused before training: tests/integration/test_train_errors.py. Here shards break
mid-run: the data module gets the list as it stood when the run started.)"""

import io
import json
import shutil
import tarfile

import pytest
import torch

from svi_train.data import DataConfig, DataSkipError, WdsDataModule
from svi_train.module import SVILitModule
from tests.helpers import train_tiny


def _bad_copy(shards, tmp_path):
    """The shards with one truncated, one missing and one holding a pickle member."""
    out = tmp_path / "ds"
    shutil.copytree(shards, out)
    index = json.loads((out / "index.json").read_text())
    good = out / "shards" / index["shards"][0]["name"]
    data = good.read_bytes()
    (out / "shards" / "truncated.tar").write_bytes(data[: len(data) // 3])
    with tarfile.open(out / "shards" / "pickled.tar", "w") as tar:
        for name, payload in (("evil.json", b"{}"), ("evil.latents.pth", b"\x80\x04K\x01.")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    index["shards"] += [
        {"name": "truncated.tar", "samples": 3, "bytes": 0},
        {"name": "missing.tar", "samples": 3, "bytes": 0},
        {"name": "pickled.tar", "samples": 1, "bytes": 0},
    ]
    (out / "index.json").write_text(json.dumps(index))
    return out, index["samples"]


def _listed(path):
    """Every shard file index.json lists, present or not."""
    return [str(path / "shards" / s["name"]) for s in json.loads((path / "index.json").read_text())["shards"]]


def test_bad_shards_and_samples_are_skipped_and_counted(shards, tmp_path):
    path, good = _bad_copy(shards, tmp_path)
    data = WdsDataModule(DataConfig(path=str(path), shuffle_buffer=0, max_skip_ratio=0.9), _listed(path))
    batches = list(data.train_dataloader())
    assert len(batches) >= good  # every good sample arrives (the truncated shard may yield its intact head too)
    assert data.validated.skipped >= 3  # truncated shard, missing shard, pickle member
    assert all(k != "evil" for b in batches for k in b["key"])


def test_too_many_skips_stop_the_run_with_a_message(shards, tmp_path):
    path, _ = _bad_copy(shards, tmp_path)
    data = WdsDataModule(DataConfig(path=str(path), shuffle_buffer=0, max_skip_ratio=0.01), _listed(path))
    with pytest.raises(DataSkipError, match="max_skip_ratio"):
        list(data.train_dataloader())


def test_nonfinite_losses_are_skipped(shards, tmp_path, monkeypatch):
    original, calls = SVILitModule._predict, []

    def sometimes_nan(self, *args):
        calls.append(1)
        out = original(self, *args)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(SVILitModule, "_predict", sometimes_nan)
    train_tiny(shards, tmp_path / "run", "trainer.log_every_n_steps=1")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["svi_recycling"]["iteration"] == 5  # 6 batches, one skipped: no bank update for it
    header, *rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "train/nonfinite_steps" in header.split(",")


def test_nonfinite_losses_in_a_row_stop_the_run(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(SVILitModule, "_predict", lambda self, *a: torch.full((1, 16, 3, 6, 10), float("nan")))
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row.*last good checkpoint"):
        train_tiny(shards, tmp_path / "run", "optim.max_nonfinite_in_row=3")
