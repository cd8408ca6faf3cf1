"""Bit-identical resume: each rank's random streams, error banks and warm-up counter go with the checkpoints
(rank 0's into the checkpoint itself, the other ranks' into files beside it) and come back after Lightning's
own start-up seeding."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from svi_infer.atomic import write_with
from svi_train.recycling import ErrorBank


class RankState:
    """This rank's state outside the weights: its generator (noise, timesteps, every draw of the step), the error
    banks (shared with the training step, restored in place) and the recycling steps taken."""

    def __init__(
        self, seed: int, generator: torch.Generator, noise_errors: ErrorBank, x0_errors: ErrorBank, save_banks: bool
    ) -> None:
        self.seed, self.generator, self.save_banks = seed, generator, save_banks
        self.noise_errors, self.x0_errors = noise_errors, x0_errors
        self.iteration = 0  # recycling steps taken (gates the warm-up); checkpointed
        self._restored_rng: dict | None = None
        self._restored_generator: torch.Tensor | None = None

    def seed_rank(self, rank: int) -> None:
        """One random stream per rank (torchtitan's reasoning: ranks must not draw the same noise / timesteps)."""
        self.generator.manual_seed(self.seed * 100_003 + rank)

    def state(self) -> dict:
        """This rank's random streams, banks and warm-up counter (rank 0's go into the checkpoint itself)."""
        banks = {"noise": self.noise_errors.state_dict(), "x0": self.x0_errors.state_dict()}
        return {
            "svi_rng": random_state(),
            "svi_recycling": {
                "iteration": self.iteration,
                "generator": self.generator.get_state(),
                "banks": banks if self.save_banks else None,
            },
        }

    def save(self, checkpoint: dict, trainer: L.Trainer) -> None:
        """Into ``checkpoint`` (the file only rank 0 writes); a rank > 0 also into its own file beside it."""
        state = self.state()
        checkpoint["svi_rng"], checkpoint["svi_recycling"] = state["svi_rng"], state["svi_recycling"]
        checkpoint["svi_recycling"]["world_size"] = trainer.world_size
        if trainer.world_size > 1 and trainer.global_rank > 0:  # rank 0's state is the checkpoint's own
            target = rank_state_path(_checkpoint_dir(trainer), checkpoint["global_step"], trainer.global_rank)
            write_with(target, lambda tmp: torch.save(state, tmp))

    def restore(self, checkpoint: dict, trainer: L.Trainer) -> None:
        """The warm-up counter and banks now; the random streams wait for :meth:`start`."""
        state = {"svi_rng": checkpoint.get("svi_rng"), "svi_recycling": checkpoint.get("svi_recycling") or {}}
        self.iteration = state["svi_recycling"].get("iteration", 0)
        if trainer.world_size > 1 and trainer.global_rank > 0:
            state = self._load(checkpoint, trainer)
        self._restored_rng, recycling = state["svi_rng"], state["svi_recycling"]
        self._restored_generator = recycling.get("generator")
        if recycling.get("banks"):
            self.noise_errors.load_state_dict(recycling["banks"]["noise"])
            self.x0_errors.load_state_dict(recycling["banks"]["x0"])

    def start(self, trainer: L.Trainer) -> None:
        """Restore every random stream last, after Lightning's own start-up seeding."""
        if self._restored_generator is not None:
            self.generator.set_state(self._restored_generator)
        elif self._restored_rng is None and trainer.global_step > 0:  # this rank's state was lost
            self.generator.manual_seed(self.seed * 100_003 + trainer.global_rank + 7_919 * (trainer.global_step + 1))
        if self._restored_rng:
            set_random_state(self._restored_rng)

    def _load(self, checkpoint: dict, trainer: L.Trainer) -> dict:
        """Ranks > 0 read their own state file; without it (lost, or another world size) they start fresh
        streams and rank 0's banks, and the resume is no longer bit-identical: said once, on every such rank."""
        saved_world = (checkpoint.get("svi_recycling") or {}).get("world_size")
        path = rank_state_path(Path(trainer.ckpt_path).parent, checkpoint["global_step"], trainer.global_rank)
        if saved_world == trainer.world_size and path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        why = f"{path} is missing" if saved_world == trainer.world_size else f"it ran on {saved_world} ranks"
        warnings.warn(
            f"rank {trainer.global_rank}: resuming without this rank's own random streams and banks ({why}); "
            "training continues, but not bit-identically to an uninterrupted run",
            stacklevel=2,
        )
        recycling = dict(checkpoint.get("svi_recycling") or {}, generator=None)
        return {"svi_rng": None, "svi_recycling": recycling}


def _checkpoint_dir(trainer: L.Trainer) -> Path:
    """The folder the checkpoints go to (the rank state files beside them)."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def rank_state_path(checkpoint_dir: Path, global_step: int, rank: int) -> Path:
    """Where rank ``rank`` keeps its state for the checkpoint of ``global_step`` (beside the checkpoints)."""
    return checkpoint_dir / "rank_states" / f"step{global_step:09d}-rank{rank}.pt"


def random_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as plain data, loadable with ``weights_only=True``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(np.random.get_state(legacy=False), default=lambda a: a.tolist()),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_random_state(state: dict) -> None:
    """Put back the streams of :func:`random_state`."""
    python = json.loads(state["python"])
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = json.loads(state["numpy"])
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
