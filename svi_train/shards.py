"""A shard folder (``python -m data_tools prepare``'s output) as its ``index.json`` describes it, torch-free: read
and checked at start, before torch and Lightning load."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import MISSING

from svi_infer.errors import UserError
from svi_infer.variants import VariantSpec

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


def shards_variant(index: dict, path: str | Path, unrecorded_conditioning: str = "text") -> VariantSpec:
    """The variant the shards were prepared for (index.json's ``variant``). Shards from before it was recorded
    carry its parts at the top level and no conditioning (``unrecorded_conditioning`` stands in: their samples
    show whether they hold audio or poses)."""
    if "variant" in index:
        return VariantSpec.from_record(index["variant"], f"{Path(path) / 'index.json'}")
    handoff = index.get("handoff", "pixel")  # shards from before the latent hand-off existed are pixel ones
    return VariantSpec(
        conditioning=unrecorded_conditioning,
        handoff=handoff,
        ref_pad_num=index.get("ref_pad_num", -1),
        motion_frames=index.get("motion_frames", []) if handoff == "pixel" else (),
        motion_latents=index.get("motion_latents", []),
    )


def check_trained_variant(shards: VariantSpec, trained: VariantSpec, path: str | Path, index: dict) -> None:
    """Refuse a training config that asks of the shards what they were not prepared with, naming each difference
    and both ways out; and latent hand-off shards from before SVI 2.0 Pro's authors' recipe."""
    if trained.handoff == "latent" and shards.handoff == "latent" and "pro_motion" not in index:
        raise UserError(
            f"the shards in {path} were prepared with the earlier SVI 2.0 Pro layout (motion latents taken from the "
            "window's own first frames, which teaches the model to copy them): prepare them again with "
            f"`{trained.prepare_command()}` for the authors' recipe (the window continues a previous clip), or "
            "with pro_motion=window to keep the earlier layout"
        )
    problems = shards.contradictions(trained)
    if problems:
        raise UserError(
            f"the training config asks for {'; '.join(problems)}: prepare the shards with "
            f"`{trained.prepare_command()}` (output={path}), or set variant.* / data.* to what they hold"
        )
