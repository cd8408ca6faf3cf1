"""Exact resume: a run killed with SIGKILL and resumed continues as if it had never stopped (CPU)."""

import csv
import os
import sys

import pytest

from tests.helpers import log_tail, run_logged, train_tiny

KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import lightning as L
import svi_train.run as run_module
from hydra import compose, initialize_config_module
from svi_train.config import register

register()
out, shards, k, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


class KillAt(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        print(f"step {trainer.global_step}", flush=True)  # the test's sign of progress
        if trainer.global_step == k:  # the step-k checkpoint is on disk: die without any clean-up
            os.kill(os.getpid(), signal.SIGKILL)


with initialize_config_module("conf", version_base="1.3"):
    overrides = ["+experiment=tiny", f"data.path={shards}", f"output_dir={out}", f"trainer.max_steps={n}"]
    overrides += ["trainer.log_every_n_steps=1", f"trainer.checkpoint_every_n_steps={k}"]
    run_module.run(compose("train", overrides=overrides), [KillAt()])
"""


def _losses(run_dir, version):
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as handle:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(handle) if r.get("train/loss")}


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(shards, tmp_path):
    k, n = 5, 12  # 8 samples an epoch: the kill is mid-epoch and the resumed run crosses an epoch boundary
    straight = tmp_path / "straight"
    train_tiny(shards, straight, f"trainer.max_steps={n}", "trainer.log_every_n_steps=1")
    killed = tmp_path / "killed"
    env = {k_: v for k_, v in os.environ.items() if k_ not in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    log = tmp_path / "killed.log"
    rc = run_logged([sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(killed), str(shards), str(k), str(n)], log, env)
    assert rc == -9, log_tail(log)
    assert not (killed / "adapters" / "final").exists()
    train_tiny(
        shards,
        killed,
        f"trainer.max_steps={n}",
        "trainer.log_every_n_steps=1",
        f"resume={killed / 'checkpoints' / 'last.ckpt'}",
    )
    before, after = _losses(straight, 0), _losses(killed, 1)
    assert sorted(after) == list(range(k, n))
    assert {s: before[s] for s in after} == after  # losses k+1..n, exactly
    final = "adapters/final/adapter_model.safetensors"
    assert (straight / final).read_bytes() == (killed / final).read_bytes()
