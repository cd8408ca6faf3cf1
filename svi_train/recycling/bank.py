"""Per-timestep-grid replay memory of the model's own errors, kept in host memory (reference/svi.md §1.3).

One bank holds one kind of error: the noise-endpoint errors or the x0-endpoint errors. Each grid keeps at most
``capacity`` entries and the whole bank at most ``max_bytes`` bytes; at real size the byte cap binds long before
500 per grid (errors are bf16 by default, as in the reference; see :mod:`svi_train.recycling.capacity`). When a new
error does not fit, it replaces an entry chosen by the policy:

- ``random``: a uniformly drawn slot of the grid;
- ``fifo``: the oldest entry of the grid;
- ``nearest_l2``: the entry most similar to the new error, so near-duplicates give way and the bank stays
  diverse. Similarity is the L2 distance **on a sketch**, not on the full tensor: each entry keeps, from its
  insert on, the values at a fixed seeded random subset of ``sketch_size`` coordinates (all coordinates when
  the error has no more than that; then the choice is the exact L2 nearest). The squared distance over a
  uniform coordinate sample is, up to a constant factor, an unbiased estimate of the full squared distance.
  The reference stacks every entry of the grid on each insert (2 GB at real size); the sketch costs
  ``sketch_size`` floats per entry and makes an insert O(capacity * sketch_size).

All entries of a bank share one shape (set by the first insert), so the byte cost of an entry is fixed.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import Tensor

from svi_train.recycling.capacity import entry_nbytes, per_grid_capacity, resolve_max_bytes
from svi_train.recycling.config import REPLACEMENT_POLICIES, STORAGE_DTYPES, RecyclingConfig

STATE_FORMAT = 1


class ErrorBank:
    """Errors of one kind, per grid, as detached CPU tensors in the storage dtype."""

    def __init__(
        self,
        name: str,
        num_grids: int,
        capacity: int,
        replacement: str = "nearest_l2",
        storage_dtype: str = "bfloat16",
        max_bytes: int = 8 * 1024**3,
        sketch_size: int = 4096,
        sketch_seed: int = 0,
    ) -> None:
        if replacement not in REPLACEMENT_POLICIES:
            raise ValueError(f"replacement must be one of {REPLACEMENT_POLICIES}, got {replacement!r}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {tuple(STORAGE_DTYPES)}, got {storage_dtype!r}")
        for label, value in (("num_grids", num_grids), ("capacity", capacity), ("max_bytes", max_bytes)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if sketch_size < 1:
            raise ValueError(f"sketch_size must be >= 1, got {sketch_size}")
        self.name = name
        self.num_grids = num_grids
        self.capacity = capacity
        self.replacement = replacement
        self.storage_dtype = storage_dtype
        self.dtype = STORAGE_DTYPES[storage_dtype]
        self.max_bytes = max_bytes
        self.sketch_size = sketch_size
        self.sketch_seed = sketch_seed
        self._clear()

    @classmethod
    def from_config(cls, cfg: RecyclingConfig, name: str) -> ErrorBank:
        """A bank laid out as ``cfg`` says; a byte cap of ``auto`` is sized from this host's memory now."""
        return cls(
            name=name,
            num_grids=cfg.num_grids,
            capacity=cfg.capacity,
            replacement=cfg.replacement,
            storage_dtype=cfg.storage_dtype,
            max_bytes=resolve_max_bytes(cfg.max_bytes_per_bank).nbytes,
            sketch_size=cfg.sketch_size,
        )

    def _clear(self) -> None:
        self._errors: list[list[Tensor]] = [[] for _ in range(self.num_grids)]
        self._inserted_at: list[list[int]] = [[] for _ in range(self.num_grids)]
        self._norms: list[list[float]] = [[] for _ in range(self.num_grids)]
        self._sketches: list[Tensor | None] = [None] * self.num_grids  # [n, sketch] float32, nearest_l2 only
        self._sketch_sq: list[Tensor | None] = [None] * self.num_grids  # [n] squared norms of those rows
        self._inserts = 0
        self._shape: tuple[int, ...] | None = None
        self._sketch_index: Tensor | None = None

    # ---- layout -------------------------------------------------------------------------------------------
    @property
    def _uses_sketches(self) -> bool:
        return self.replacement == "nearest_l2"

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        numel = _numel(shape)
        if numel <= self.sketch_size:
            self._sketch_index = None  # the sketch is the whole error: nearest is exact
        else:
            coords = torch.Generator().manual_seed(self.sketch_seed)
            self._sketch_index = torch.randint(numel, (self.sketch_size,), generator=coords).sort().values

    def _sketch(self, stored: Tensor) -> Tensor:
        flat = stored.reshape(-1)
        picked = flat if self._sketch_index is None else flat.index_select(0, self._sketch_index)
        return picked.float()

    @property
    def entry_nbytes(self) -> int:
        """Bytes one entry costs (error plus its sketch); 0 until the first insert fixes the shape."""
        return 0 if self._shape is None else self._nbytes_of(self._shape)

    def _nbytes_of(self, shape: tuple[int, ...]) -> int:
        return entry_nbytes(_numel(shape), self.storage_dtype, self.replacement, self.sketch_size)

    @property
    def grid_capacity(self) -> int:
        """Entries a grid can hold on average: ``capacity``, or fewer once the byte cap binds (shape known)."""
        if self._shape is None:
            return self.capacity
        return per_grid_capacity(self.capacity, self.max_bytes, self.entry_nbytes, self.num_grids)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored errors and their sketches; never above ``max_bytes``."""
        return len(self) * self.entry_nbytes

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._errors)

    def grid_len(self, grid: int) -> int:
        """Number of errors stored for ``grid``."""
        return len(self._errors[self._check_grid(grid)])

    def _check_grid(self, grid: int | Tensor) -> int:
        index = int(grid)
        if not 0 <= index < self.num_grids:
            raise ValueError(f"grid must be in [0, {self.num_grids}), got {index}")
        return index

    # ---- insert -------------------------------------------------------------------------------------------
    def add(self, error: Tensor, grid: int | Tensor, generator: torch.Generator) -> int:
        """Store a detached CPU copy of ``error`` under ``grid``; return the slot it went to.

        When the grid is full, or the byte cap would be exceeded, the policy picks an entry of this grid to
        overwrite. If the cap is reached and this grid is still empty, the oldest entry of the fullest grid
        makes room, so every timestep region can be represented.
        """
        g = self._check_grid(grid)
        shape = tuple(error.shape)
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"bank {self.name!r} stores errors of shape {list(self._shape)}, got {list(shape)}")
        if self._nbytes_of(shape) > self.max_bytes:
            raise ValueError(f"one error costs {self._nbytes_of(shape)} bytes, above max_bytes={self.max_bytes}")
        if self._shape is None:
            self._set_shape(shape)
        source = error.detach()
        if source.device.type != "cpu":
            source = source.to(self.dtype)  # convert where it lives, so fewer bytes cross to the host
        norm = float(torch.linalg.vector_norm(source.float()))  # faster than a bf16 reduction on CPU
        # copy=True: the bank never aliases the caller's tensor, even when it is already CPU + storage dtype.
        stored = source.to(device="cpu", dtype=self.dtype, memory_format=torch.contiguous_format, copy=True)
        sketch = self._sketch(stored) if self._uses_sketches else None

        fits = self.nbytes + self.entry_nbytes <= self.max_bytes
        if len(self._errors[g]) < self.capacity and fits:
            slot = self._append(g, stored, sketch, norm)
        elif self._errors[g]:
            slot = self._victim(g, sketch, generator)
            self._errors[g][slot] = stored  # a fresh tensor: errors handed out by sample() never change
            self._inserted_at[g][slot] = self._inserts
            self._norms[g][slot] = norm
            if sketch is not None:
                self._sketches[g][slot] = sketch
                self._sketch_sq[g][slot] = sketch.square().sum()
        else:
            donor = max(range(self.num_grids), key=lambda i: (len(self._errors[i]), -i))
            self._remove(donor, self._oldest(donor))
            slot = self._append(g, stored, sketch, norm)
        self._inserts += 1
        return slot

    def _append(self, g: int, stored: Tensor, sketch: Tensor | None, norm: float) -> int:
        self._errors[g].append(stored)
        self._inserted_at[g].append(self._inserts)
        self._norms[g].append(norm)
        if sketch is not None:
            rows, sq, new_sq = self._sketches[g], self._sketch_sq[g], sketch.square().sum()[None]
            self._sketches[g] = sketch[None] if rows is None else torch.cat([rows, sketch[None]])
            self._sketch_sq[g] = new_sq if sq is None else torch.cat([sq, new_sq])
        return len(self._errors[g]) - 1

    def _remove(self, g: int, slot: int) -> None:
        del self._errors[g][slot], self._inserted_at[g][slot], self._norms[g][slot]
        rows, sq = self._sketches[g], self._sketch_sq[g]
        if rows is not None:
            keep = [i for i in range(len(rows)) if i != slot]
            self._sketches[g] = rows[keep] if keep else None
            self._sketch_sq[g] = sq[keep] if keep else None

    def _oldest(self, g: int) -> int:
        ages = self._inserted_at[g]
        return min(range(len(ages)), key=ages.__getitem__)

    def _victim(self, g: int, sketch: Tensor | None, generator: torch.Generator) -> int:
        if self.replacement == "random":
            return _draw_index(len(self._errors[g]), generator)
        if self.replacement == "fifo":
            return self._oldest(g)
        # Nearest on the sketch (module docstring): |S_i - s|^2 - |s|^2 = |S_i|^2 - 2 S_i.s, one pass over S.
        distances = torch.addmv(self._sketch_sq[g], self._sketches[g], sketch, alpha=-2.0)
        return int(distances.argmin())

    # ---- sample -------------------------------------------------------------------------------------------
    def sample(self, grid: int | Tensor, generator: torch.Generator) -> Tensor | None:
        """A uniformly drawn error of ``grid`` (CPU, storage dtype; do not modify in place), or None if empty."""
        entries = self._errors[self._check_grid(grid)]
        if not entries:
            return None
        return entries[_draw_index(len(entries), generator)]

    def sample_any(self, generator: torch.Generator) -> Tensor | None:
        """An error drawn uniformly over all entries of all grids, or None if the bank is empty."""
        index = len(self)
        if index == 0:
            return None
        index = _draw_index(index, generator)
        for entries in self._errors:
            if index < len(entries):
                return entries[index]
            index -= len(entries)
        raise AssertionError("unreachable: index within len(self)")

    # ---- logging ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Plain numbers for ``recycling/<bank>/<key>``: totals, then ``gridNN/{fill,norm,age}`` per grid.

        ``fill`` is entries / capacity, ``norm`` the mean L2 norm of the stored errors, ``age`` the mean number
        of inserts into this bank since each entry was written (0 = the newest). ``capacity`` is
        :attr:`grid_capacity`: what the byte cap really leaves per grid, to compare with the reference's 500.
        """
        last = self._inserts - 1
        count = len(self)
        all_norms = [n for norms in self._norms for n in norms]
        all_ages = [last - i for inserted in self._inserted_at for i in inserted]
        out: dict[str, float] = {
            "entries": float(count),
            "nbytes": float(self.nbytes),
            "inserts": float(self._inserts),
            "fill": count / (self.num_grids * self.capacity),
            "capacity": float(self.grid_capacity),
        }
        if count:
            out["norm"] = sum(all_norms) / count
            out["age"] = sum(all_ages) / count
        for g, norms in enumerate(self._norms):
            out[f"grid{g:02d}/fill"] = len(norms) / self.capacity
            if norms:
                out[f"grid{g:02d}/norm"] = sum(norms) / len(norms)
                out[f"grid{g:02d}/age"] = sum(last - i for i in self._inserted_at[g]) / len(norms)
        return out

    # ---- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed for an exact resume; plain containers and tensors (``torch.load(weights_only=True)``).

        The error tensors are the bank's own (never modified in place); sketches are rebuilt on load.
        """
        return {
            "format": STATE_FORMAT,
            "num_grids": self.num_grids,
            "storage_dtype": self.storage_dtype,
            "inserts": self._inserts,
            "shape": None if self._shape is None else list(self._shape),
            "errors": [list(entries) for entries in self._errors],
            "inserted_at": [list(inserted) for inserted in self._inserted_at],
            "norms": [list(norms) for norms in self._norms],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with ``state`` from :meth:`state_dict`; the layout must match."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown error-bank state format {state.get('format')!r}")
        for key in ("num_grids", "storage_dtype"):
            if state[key] != getattr(self, key):
                raise ValueError(f"bank {self.name!r}: state has {key}={state[key]!r}, bank has {getattr(self, key)!r}")
        self._clear()
        if state["shape"] is not None:
            self._set_shape(tuple(state["shape"]))
        for g in range(self.num_grids):
            entries = state["errors"][g]
            if len(entries) > self.capacity:
                raise ValueError(f"grid {g} holds {len(entries)} errors, above capacity={self.capacity}")
            for error, inserted, norm in zip(entries, state["inserted_at"][g], state["norms"][g], strict=True):
                if tuple(error.shape) != self._shape or error.dtype != self.dtype:
                    raise ValueError(f"grid {g}: stored {error.dtype} {list(error.shape)} does not match the bank")
                stored = error.detach().cpu().contiguous()
                self._errors[g].append(stored)
                self._inserted_at[g].append(int(inserted))
                self._norms[g].append(float(norm))
            if self._uses_sketches and entries:
                self._sketches[g] = torch.stack([self._sketch(e) for e in self._errors[g]])
                self._sketch_sq[g] = self._sketches[g].square().sum(dim=1)
        self._inserts = int(state["inserts"])
        if self.nbytes > self.max_bytes:
            self._trim_to_cap()

    def _trim_to_cap(self) -> None:
        """Drop the oldest entries of the fullest grids until the bank fits ``max_bytes``.

        An ``auto`` cap follows the host's free memory, so a resumed run may get a little less than the run that
        saved the banks; it keeps what fits (as inserts would have) rather than refusing to resume.
        """
        before = len(self)
        while self.nbytes > self.max_bytes:
            donor = max(range(self.num_grids), key=lambda i: (len(self._errors[i]), -i))
            self._remove(donor, self._oldest(donor))
        warnings.warn(
            f"bank {self.name!r}: the checkpoint holds {before} errors, {before - len(self)} above "
            f"max_bytes={self.max_bytes}; the oldest of the fullest grids were dropped",
            stacklevel=3,
        )


def make_banks(cfg: RecyclingConfig, num_experts: int = 1) -> tuple[ErrorBank, ErrorBank]:
    """The two banks of ERFT: (noise-endpoint errors, x0-endpoint errors), named ``noise`` and ``x0``.

    With several experts (Wan 2.2 A14B) the banks are keyed by (expert, grid): ``num_grids`` grids per expert
    (:func:`expert_grid`), so an expert's errors are only replayed to that expert; conditioning errors drawn
    from all grids (``cond_from_all_grids``) come from every expert, as the previous clip was made by all.
    """
    layout = replace(cfg, num_grids=cfg.num_grids * num_experts)
    return ErrorBank.from_config(layout, "noise"), ErrorBank.from_config(layout, "x0")


def expert_grid(grid: int, expert: int, num_grids: int) -> int:
    """The bank grid of timestep grid ``grid`` for expert ``expert`` (its index in ``spec.experts``)."""
    if not 0 <= grid < num_grids:
        raise ValueError(f"grid {grid} outside 0..{num_grids - 1}")
    return expert * num_grids + grid


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def _draw_index(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator))
