"""Where a long video goes: the joined mp4, its sidecar JSON, and the parts of a run in progress. Torch-free: the
output path is checked before anything loads."""

from __future__ import annotations

from pathlib import Path


def parts_dir(output: Path) -> Path:
    """``<output>.parts/``: the finished clips and the state of a run in progress."""
    return output.with_name(output.name + ".parts")


def sidecar_path(output: Path) -> Path:
    return output.with_suffix(".json")


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a finished video unless asked to: ``output`` exists and no interrupted run of it
    (``<output>.parts/state.json``) is being resumed."""
    resuming = resume and (parts_dir(output) / "state.json").is_file()
    if output.exists() and not overwrite and not resuming:
        raise FileExistsError(
            f"{output} already exists; pass overwrite=true to replace it, or choose another output=<path>"
        )
