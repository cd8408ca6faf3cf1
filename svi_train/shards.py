"""A shard folder (``python -m data_tools prepare``'s output) as its ``index.json`` describes it, torch-free: read
and checked at start, before torch and Lightning load."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import MISSING

from svi_infer.errors import UserError
from svi_infer.variants import VariantSpec
from svi_train import remote

PREPARE = "`python -m data_tools prepare`"


def read_index(path: str | Path) -> dict:
    """The folder's ``index.json`` (data_tools writes it last: a folder without it was never fully prepared). A
    remote folder's (a URL, a ``pipe:`` command: :mod:`svi_train.remote`) is fetched with retries; one that stays
    out of reach is a one-line error."""
    if str(path) == MISSING:
        raise UserError(f"data.path is required: the folder {PREPARE} wrote (with index.json and shards/)")
    if remote.is_remote(str(path)):
        location = remote.member(str(path), "index.json")
        try:
            text = remote.read_bytes(location)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{remote.shown(location)} does not exist: check data.path, or prepare shards with {PREPARE} and "
                "upload the folder"
            ) from None
        except ImportError as err:  # gs:// without gcsfs: fsspec's message names the package
            raise UserError(f"cannot read {remote.shown(location)}: {err}") from None
        except (OSError, ValueError) as err:  # kept failing; refused; an unknown protocol
            reason = err.reason if isinstance(err, remote.Unreadable) else remote.describe(err)
            raise UserError(
                f"cannot read {remote.shown(location)}: {reason}; check data.path and the connection (and, for s3:// "
                "or gs://, the credentials)"
            ) from None
        index_path = remote.shown(location)
    else:
        index_path = Path(path).expanduser() / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} does not exist: prepare shards with {PREPARE}")
        text = index_path.read_bytes()
    try:
        return json.loads(text.decode("utf-8"))
    except ValueError as err:
        raise UserError(f"{index_path} is not valid JSON ({err}): prepare the shards again with {PREPARE}") from None


def shard_files(path: str | Path, index: dict) -> list[str]:
    """Every shard ``index.json`` lists, each present: one gone (a partial copy, a deleted file) is named at start
    rather than skipped mid-run. Remote ones are URLs (``pipe:`` commands); they are checked where the store lists
    a folder in one request (``s3://``, ``gs://``; not ``http(s)://`` nor ``pipe:``), else as they are read."""
    names = [shard["name"] for shard in index.get("shards", [])]
    if not names:
        raise UserError(f"{path} holds no shard (index.json lists none): prepare shards with {PREPARE}")
    files = [remote.member(str(path), f"shards/{name}") for name in names]
    if remote.is_remote(str(path)):
        folder = remote.member(str(path), "shards")
        present = remote.listed_names(folder)
        missing = [] if present is None else [name for name in names if name not in present]
        folder = remote.shown(folder)
    else:
        folder = Path(path).expanduser() / "shards"
        missing = [name for name, file in zip(names, files, strict=True) if not Path(file).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(files)} shards index.json lists are missing from {folder}: {few(missing)}; "
            f"copy them back, or prepare the folder again with {PREPARE}"
        )
    return files


def few(names: list[str], limit: int = 5) -> str:
    """``a, b, c and 7 more``: names for a one-line message."""
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def shards_variant(index: dict, path: str | Path, unrecorded_conditioning: str = "text") -> VariantSpec:
    """The variant the shards were prepared for (index.json's ``variant``). Shards from before it was recorded
    carry its parts at the top level and no conditioning (``unrecorded_conditioning`` stands in: their samples
    show whether they hold audio or poses)."""
    if "variant" in index:
        remote_path = remote.is_remote(str(path))
        label = remote.shown(remote.member(str(path), "index.json")) if remote_path else Path(path) / "index.json"
        return VariantSpec.from_record(index["variant"], f"{label}")
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
