"""A shard folder (``python -m data_tools prepare``'s output) as its ``index.json`` describes it, torch-free: read
and checked at start, before torch and Lightning load."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import MISSING

from svi_infer.errors import UserError
from svi_train.config import DataConfig

PREPARE = "`python -m data_tools prepare`"


def read_index(path: str | Path) -> dict:
    """The folder's ``index.json`` (data_tools writes it last: a folder without it was never fully prepared)."""
    if str(path) == MISSING:
        raise UserError(f"data.path is required: the folder {PREPARE} wrote (with index.json and shards/)")
    index_path = Path(path).expanduser() / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist: prepare shards with {PREPARE}")
    try:
        return json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{index_path} is not valid JSON ({err}): prepare the shards again with {PREPARE}") from None


def shard_files(path: str | Path, index: dict) -> list[str]:
    """Every shard ``index.json`` lists, each present: one gone (a partial copy, a deleted file) is named at start
    rather than skipped mid-run."""
    folder = Path(path).expanduser() / "shards"
    files = [folder / shard["name"] for shard in index.get("shards", [])]
    if not files:
        raise UserError(f"{path} holds no shard (index.json lists none): prepare shards with {PREPARE}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(files)} shards index.json lists are missing from {folder}: {few(missing)}; "
            f"copy them back, or prepare the folder again with {PREPARE}"
        )
    return [str(f) for f in files]


def few(names: list[str], limit: int = 5) -> str:
    """``a, b, c and 7 more``: names for a one-line message."""
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def check_shards_handoff(index: dict, config: DataConfig, handoff: str) -> None:
    """The shards must hold the conditioning members the run's hand-off reads: ``cond.m<m>`` for every count of
    ``data.motion_frames`` (pixel), ``motion.n<n>`` for every ``data.motion_latents`` (latent). Shards from before
    the latent hand-off existed have no ``handoff`` entry: they are pixel ones."""
    prepared = index.get("handoff", "pixel")
    if prepared != handoff:
        raise ValueError(
            f"variant.handoff={handoff}, but the shards in {config.path} were prepared with handoff={prepared}: "
            f"prepare them with `python -m data_tools prepare handoff={handoff} ...` (or train with "
            f"variant.handoff={prepared})"
        )
    if handoff == "pixel":
        missing = sorted(set(config.motion_frames) - set(index["motion_frames"]))
        if missing:
            raise ValueError(
                f"the shards in {config.path} hold conditioning for motion frames {index['motion_frames']}, "
                f"not {missing}: prepare them with motion_frames={sorted(set(index['motion_frames']) | set(missing))}"
            )
    else:
        missing = sorted(set(config.motion_latents) - {0} - set(index.get("motion_latents", [])))
        if missing:
            raise ValueError(
                f"the shards in {config.path} hold motion latents {index.get('motion_latents', [])}, not {missing}: "
                f"prepare them with motion_latents={sorted(set(index.get('motion_latents', [])) | set(missing))}"
            )
