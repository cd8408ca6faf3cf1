"""What ``python -m svi_train`` and ``python -m svi_train.export`` tell the user when something is wrong: one line
naming the file or key and what to do, a non-zero exit, nothing half-written; and mistakes found at start are
answered before torch, Lightning, diffusers or DeepSpeed are imported (checked with ``python -X importtime``)."""

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from svi_train.__main__ import train_or_exit
from svi_train.data import DataSkipError, WdsDataModule
from svi_train.module import SVILitModule
from svi_train.plan import plan
from tests.helpers import HEAVY, compose_train, run_cli, train_tiny


def _cli(module: str, *args: str, cwd: Path) -> tuple[int, str, list[str], frozenset[str]]:
    run = run_cli(module, *args, cwd=cwd)
    return run.code, run.stdout, run.stderr, run.imported


def _train_cli(*args: str, cwd: Path) -> tuple[int, str, list[str], set[str]]:
    return _cli("svi_train", "+experiment=tiny", *args, cwd=cwd)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- answered at once: --help, --cfg job, config mistakes, missing inputs --------------------------------------------


def test_help_and_cfg_job_import_nothing_heavy(tmp_path):
    for module, args in (("svi_train", ["--help"]), ("svi_train", ["+experiment=tiny", "--cfg", "job"])):
        code, out, err, imported = _cli(module, *args, cwd=tmp_path)
        assert code == 0, err
        assert not imported & HEAVY, (args, imported & HEAVY)
    assert "max_nonfinite_in_row: 5" in out and "max_skip_ratio: 0.1" in out  # the composed config, printed
    code, out, err, imported = _cli("svi_train.export", "--help", cwd=tmp_path)
    assert code == 0 and "--format {peft,diffusers,comfyui}" in out
    assert not imported & HEAVY, imported & HEAVY


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+optim.lrr=1e-4",
            "unknown key optim.lrr: optim takes lr, weight_decay, betas, optimizer, timesteps, gradient_checkpointing, "
            "max_nonfinite_in_row (python -m svi_train --cfg job prints every key)",
        ),
        ("+lora.foo=1", "unknown key lora.foo: lora takes rank, alpha, target_modules, init (python -m svi_train"),
        ("+trainer.x=1", "unknown key trainer.x: trainer takes accelerator, devices, num_nodes, strategy, precision"),
        ("recycling.p_noise=1.5", "p_noise must be a probability in [0, 1], got 1.5"),
        ("optim.lrr=1e-4", "optim.lrr=1e-4: unknown key optim.lrr; check its spelling against conf/train.yaml"),
        ("lora.rank=many", "lora.rank=many: Value 'many' of type 'str' could not be converted to Integer; fix the"),
    ],
)
def test_config_mistakes_name_the_key_before_torch_loads(shards, tmp_path, override, message):
    code, _, err, imported = _train_cli(
        f"data.path={shards}", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"svi_train: error: {message}"), err  # one line
    assert "Traceback" not in "\n".join(err)
    assert not imported & HEAVY, imported & HEAVY


def test_missing_data_folder_and_data_path(tmp_path):
    code, _, err, imported = _train_cli("data.path=/no/such/dir", cwd=tmp_path)
    assert (code, err[-1]) == (
        2,
        "svi_train: error: /no/such/dir/index.json does not exist: prepare shards with `python -m data_tools prepare`",
    )
    assert not imported & HEAVY, imported & HEAVY
    code, _, err, _ = _train_cli(cwd=tmp_path)
    assert err[-1] == (
        "svi_train: error: data.path is required: the folder `python -m data_tools prepare` wrote "
        "(with index.json and shards/)"
    )


def test_a_shard_missing_at_start_is_named_before_torch_loads(shards, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(shards, data)
    index = json.loads((data / "index.json").read_text())
    index["shards"] += [{"name": "shard-000007.tar", "samples": 3, "bytes": 0}]
    (data / "index.json").write_text(json.dumps(index))
    run = tmp_path / "run"
    code, _, err, imported = _train_cli(f"data.path={data}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert (code, err[-1]) == (
        2,
        f"svi_train: error: 1 of the 2 shards index.json lists are missing from {data / 'shards'}: shard-000007.tar; "
        "copy them back, or prepare the folder again with `python -m data_tools prepare`",
    )
    assert not imported & HEAVY, imported & HEAVY
    assert not (run / "checkpoints").exists() and not (run / "adapters").exists()


# --- resume ---------------------------------------------------------------------------------------------------------


def _checkpoints(run: Path) -> Path:
    """A run folder with a good step-4 checkpoint and a truncated last.ckpt (a copy cut short)."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"global_step": 4, "state_dict": {"w": torch.ones(64)}}, folder / "step000000004.ckpt")
    data = (folder / "step000000004.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])
    return folder


def test_resume_last_without_a_checkpoint_is_refused(shards, tmp_path):
    run = tmp_path / "mistyped_run"
    code, _, err, imported = _train_cli(f"data.path={shards}", f"hydra.run.dir={run}", "resume=last", cwd=tmp_path)
    assert (code, err[-1]) == (
        2,
        f"svi_train: error: resume=last: no checkpoint in {run / 'checkpoints'} (no such folder): give the run's "
        "folder as hydra.run.dir=<folder> or a checkpoint as resume=<path>; to start a new run, leave resume out",
    )
    assert not imported & HEAVY, imported & HEAVY
    assert not (run / "checkpoints").exists()  # nothing trained from step 0 in its place


def test_resume_last_from_a_truncated_checkpoint_points_to_the_previous_one(shards, tmp_path):
    run = tmp_path / "run"
    folder = _checkpoints(run)
    before = _files(folder)
    code, _, err, imported = _train_cli(f"data.path={shards}", f"hydra.run.dir={run}", "resume=last", cwd=tmp_path)
    assert (code, err[-1]) == (
        2,
        f"svi_train: error: resume=last: {folder / 'last.ckpt'} is not a readable checkpoint (truncated, or not a "
        f"checkpoint); use the previous one instead: resume={folder / 'step000000004.ckpt'}",
    )
    assert not imported & HEAVY, imported & HEAVY
    assert _files(folder) == before


def test_resume_from_a_missing_checkpoint(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"resume={tmp_path}/x.ckpt: {tmp_path}/x.ckpt does not exist"):
        plan(
            compose_train(
                ["+experiment=tiny", f"data.path={shards}", f"output_dir={tmp_path}", f"resume={tmp_path}/x.ckpt"]
            )
        )


# --- export ---------------------------------------------------------------------------------------------------------


def test_export_of_a_missing_file_a_png_or_a_truncated_checkpoint(tmp_path, image_file):
    folder = _checkpoints(tmp_path / "run")
    output = tmp_path / "out.safetensors"
    source = "svi_train.export: error: SOURCE (an adapter directory or a checkpoint)"
    for path, message in (
        (tmp_path / "no.ckpt", f"{source}: {tmp_path / 'no.ckpt'} does not exist; check the path"),
        (image_file, f"{source}: {image_file} is not a readable checkpoint (truncated, or not a checkpoint)"),
        (
            folder / "last.ckpt",
            f"{source}: {folder / 'last.ckpt'} is not a readable checkpoint (truncated, or not a checkpoint); use the "
            f"previous one instead: {folder / 'step000000004.ckpt'}",
        ),
    ):
        code, _, err, imported = _cli("svi_train.export", str(path), "--output", str(output), cwd=tmp_path)
        assert (code, err) == (2, [message])
        assert not imported & HEAVY, imported & HEAVY
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["first.png", "run"]


# --- bad data mid-run -----------------------------------------------------------------------------------------------


def _poisoned(shards: Path, out: Path) -> Path:
    """A copy of the shards whose every latent is NaN (each sample then breaks the schema on read)."""
    shutil.copytree(shards, out)
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                if member.name.endswith(".latents.safetensors"):
                    data = save({k: torch.full_like(v, float("nan")) for k, v in load(data).items()})
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return out


def test_a_small_set_of_bad_samples_fails_on_its_first_pass(shards, tmp_path):
    """8 samples, all bad: fewer than the 10 the ratio waits for, so each pass used to end empty, forever."""
    data = _poisoned(shards, tmp_path / "nan")
    config = compose_train(["+experiment=tiny", f"data.path={data}", f"output_dir={tmp_path}"])
    checked = plan(config)
    module = WdsDataModule(checked.data, checked.shards)
    with pytest.raises(DataSkipError, match=r"^8 of 8 samples read could not be used .* shard-000000.tar in "):
        list(module.train_dataloader())


def test_a_pass_without_a_batch_is_refused(shards, tmp_path):
    checked = plan(compose_train(["+experiment=tiny", f"data.path={shards}", "data.batch_size=16", "output_dir=x"]))
    with pytest.raises(ValueError, match="gave this process no batch of data.batch_size=16 samples of one shape"):
        list(WdsDataModule(checked.data, checked.shards).train_dataloader())


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_stop_the_run_in_one_line(shards, tmp_path, capsys, workers):
    """In a DataLoader worker (workers=1) the error reaches the main process as torch's text of the worker's
    traceback: the user still gets the one line."""
    data = _poisoned(shards, tmp_path / "nan")
    run = tmp_path / "run"
    config = compose_train(
        ["+experiment=tiny", f"data.path={data}", f"output_dir={run}", f"data.num_workers={workers}"]
    )
    with pytest.raises(SystemExit) as exited:
        train_or_exit(config)
    err = capsys.readouterr().err
    expected = (
        f"svi_train: error: 8 of 8 samples read could not be used (more than data.max_skip_ratio=0.1), from "
        f"shard-000000.tar in {data / 'shards'}; the first: sample KEY: latents has non-finite values; check the "
        f"shards with `python -m data_tools verify output={data}` and prepare them again"
    )
    assert exited.value.code == 2
    assert re.fullmatch(re.escape(expected).replace("KEY", r"\S+"), err.splitlines()[-1]), err[-2000:]
    assert "Traceback" not in err
    assert not (run / "checkpoints").exists() and not (run / "adapters" / "final").exists()


def test_a_diverged_run_exits_with_1_naming_the_last_good_checkpoint(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(SVILitModule, "_predict", lambda self, *a: torch.full((1, 16, 3, 6, 10), float("nan")))
    overrides = [f"data.path={shards}", f"output_dir={tmp_path}", "optim.max_nonfinite_in_row=2"]
    with pytest.raises(SystemExit) as exited:
        train_or_exit(compose_train(["+experiment=tiny", *overrides]))
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "svi_train: error: 2 non-finite losses in a row (last nan) at step 1; the last good checkpoint is none "
        "written yet: resume from it with a lower optim.lr, or check the data"
    )


# --- progress -------------------------------------------------------------------------------------------------------


def test_progress_lines_on_a_stream(shards, tmp_path, capsys):
    train_tiny(shards, tmp_path / "run", "trainer.max_steps=4", "trainer.log_every_n_steps=2")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2, out
    for step, line in zip((2, 4), lines, strict=True):
        assert re.fullmatch(rf"step {step}/4  loss \d+\.\d{{4}}  \d+\.\d\d s/step  eta \d+:\d\d:\d\d", line), line
    assert "Epoch" not in out and "\r" not in out


def test_progress_on_a_terminal_redraws_one_line_between_lines(capsys):
    """live: the line is redrawn in place every optimizer step (not every micro-batch), kept every N steps."""
    from types import SimpleNamespace

    from svi_train.callbacks import StepProgress

    progress = StepProgress(every_n_steps=2, live=True)
    trainer = SimpleNamespace(global_step=0, max_steps=3, is_global_zero=True, callback_metrics={})
    progress.on_train_start(trainer, None)
    for step, loss in ((0, 1.0), (1, 3.0), (2, 5.0), (3, 0.5)):  # 2 micro-batches make step 1, as Lightning counts
        trainer.global_step, trainer.callback_metrics = step, {"train/loss": torch.tensor(loss)}
        progress.on_train_batch_end(trainer, None, None, None, 0)
    progress.on_train_end(trainer, None)
    shown = re.sub(r"\d+\.\d\d s/step  eta \d+:\d\d:\d\d", "T", capsys.readouterr().out)
    clear = "\r\x1b[K"
    assert shown == f"{clear}step 1/3  loss 2.0000  T{clear}step 2/3  loss 3.0000  T\n{clear}step 3/3  loss 0.5000  T\n"


@pytest.mark.slow
def test_cli_run_piped_to_a_file_shows_progress_and_bad_data_ends_in_one_line(shards, tmp_path):
    """The real command, stdout not a terminal: progress lines, then where the adapter went; on a set of bad samples
    read in a DataLoader worker, the one line and no traceback (Hydra, Lightning and torch print none either)."""
    run = tmp_path / "run"
    overrides = ["trainer.max_steps=4", "trainer.log_every_n_steps=2", "data.num_workers=1"]
    code, out, err, _ = _train_cli(f"data.path={shards}", f"hydra.run.dir={run}", *overrides, cwd=tmp_path)
    assert code == 0, err[-20:]
    assert [line.split("  ")[0] for line in out.splitlines() if line.startswith("step ")] == ["step 2/4", "step 4/4"]
    assert out.splitlines()[-2:] == [f"adapter: {run / 'adapters' / 'final'}", f"run:     {run}"]
    data = _poisoned(shards, tmp_path / "nan")
    code, _, err, _ = _train_cli(f"data.path={data}", f"hydra.run.dir={tmp_path / 'bad'}", *overrides, cwd=tmp_path)
    assert code == 2
    assert err[-1].startswith("svi_train: error: 8 of 8 samples read could not be used"), err[-20:]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "bad" / "checkpoints").exists()
