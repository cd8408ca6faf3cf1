"""Finding and checking training checkpoints without torch: what ``resume=`` and ``svi_train.export`` read.

A checkpoint written by ``torch.save`` is a zip archive whose directory sits at the end of the file, so opening it
as a zip (milliseconds, nothing loaded) tells a complete checkpoint from a truncated copy or another kind of file
before torch and Lightning start up, and before a 14B model is built only to fail on it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from svi_infer.errors import UserError

CHECKPOINT_DIR = "checkpoints"  # in the run folder: step<N>.ckpt, last.ckpt (rank_states/ beside them)
LAST = "last.ckpt"


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint (None: it can). A directory is a DeepSpeed checkpoint, read later by
    DeepSpeed; a file must be a complete torch archive."""
    if path.is_dir():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "truncated, or not a checkpoint"
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return "a zip archive, but not a torch checkpoint"
    return None


def previous_checkpoint(path: Path) -> Path | None:
    """The newest readable ``step<N>.ckpt`` beside ``path`` other than ``path`` itself."""
    steps = sorted(path.parent.glob("step*.ckpt"), reverse=True)  # zero-padded steps: newest first
    return next((p for p in steps if p != path and unreadable(p) is None), None)


def check_checkpoint(path: Path, what: str, option: str = "") -> Path:
    """``path`` if it is a readable checkpoint, else a user error naming it and the newest readable one beside it
    (given as ``<option><path>``). ``what`` says where the path came from (``resume=last``, ``SOURCE``)."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist; check the path")
    why = unreadable(path)
    if why is not None:
        previous = previous_checkpoint(path)
        instead = f"; use the previous one instead: {option}{previous}" if previous else ""
        raise UserError(f"{what}: {path} is not a readable checkpoint ({why}){instead}")
    return path


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint ``resume=`` names, checked: ``last`` is ``<run_dir>/checkpoints/last.ckpt``. A run folder
    without one is refused rather than trained from step 0 (a mistyped folder would lose the run's history)."""
    if resume is None:
        return None
    if resume != "last":
        return str(check_checkpoint(Path(resume).expanduser(), f"resume={resume}", "resume="))
    last = run_dir / CHECKPOINT_DIR / LAST
    if last.exists():
        return str(check_checkpoint(last, "resume=last", "resume="))
    previous = previous_checkpoint(last)
    if previous is not None:
        raise UserError(f"resume=last: no {LAST} in {last.parent}; resume from the newest one there: resume={previous}")
    raise UserError(
        f"resume=last: no checkpoint in {last.parent}"
        f"{'' if last.parent.is_dir() else ' (no such folder)'}: give the run's folder as hydra.run.dir=<folder> "
        "or a checkpoint as resume=<path>; to start a new run, leave resume out"
    )
