"""Killed or out of disk mid-write: the previous checkpoint, adapter, sidecar or video stays intact."""

import errno
import os
import stat

import pytest
import torch
from peft import LoraConfig

import svi_infer.adapters as adapters
from svi_infer.adapters import AdapterMeta, read_meta, save_adapter
from svi_infer.atomic import atomic_dir, atomic_path, write_json
from svi_infer.model import build_model
from svi_infer.spec import get_spec
from svi_train.run import AtomicCheckpointIO
from tests.helpers import TINY21, train_tiny


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_path_keeps_the_old_file(tmp_path):
    target = tmp_path / "sidecar.json"
    write_json(target, {"v": 1})
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        _disk_full()
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["sidecar.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    """Temporaries are private (0600 / 0700); what lands must have the mode of any file the user creates."""
    old = os.umask(umask)
    try:
        write_json(tmp_path / "index.json", {"v": 1})
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "weights").write_text("w")
        (tmp_path / "plain.txt").write_text("p")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)

    def mode(name):
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("index.json") == mode("plain.txt") == 0o666 & ~umask
    assert mode("adapter") == mode("plain") == 0o777 & ~umask
    assert mode("adapter/weights") == 0o666 & ~umask


def test_atomic_dir_replaces_the_old_directory_only_on_success(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        _disk_full()
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    monkeypatch.setattr(torch, "save", _disk_full)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"step": 1}


def test_adapter_write_failure_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = build_model(get_spec(TINY21))
    model.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    save_adapter(model.transformers[0], tmp_path / "a", AdapterMeta.for_spec(model.spec, defaults={"fps": 1}))
    monkeypatch.setattr(adapters, "save_file", _disk_full)
    with pytest.raises(OSError):
        save_adapter(model.transformers[0], tmp_path / "a", AdapterMeta.for_spec(model.spec, defaults={"fps": 2}))
    assert read_meta(tmp_path / "a").defaults == {"fps": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_resume_with_another_lora_rank_fails_naming_the_key(shards, tmp_path):
    train_tiny(shards, tmp_path / "run")
    with pytest.raises(ValueError, match=r"lora.rank=8, but the checkpoint was trained with 4"):
        train_tiny(shards, tmp_path / "run2", "lora.rank=8", f"resume={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")


def test_config_errors_fail_at_start_naming_the_key(shards, tmp_path):
    with pytest.raises(ValueError, match="p_noise"):
        train_tiny(shards, tmp_path / "run", "recycling.p_noise=1.5")
    with pytest.raises(FileNotFoundError, match="index.json does not exist: prepare shards"):
        train_tiny(tmp_path / "nowhere", tmp_path / "run")
