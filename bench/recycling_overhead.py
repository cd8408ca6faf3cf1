"""Does error recycling cost the training step anything? Bank insert time at real latent size, ours vs reference.

The reference replaces "the most similar entry" of a full grid by stacking every entry of the grid (500 x 4.2 MB
at Wan 2.1 480p) and taking the L2 distance to the new error on every insert: seconds of CPU and a 2 GB
transient per insert, twice per training step (svi.md §1.3). Our ``ErrorBank`` picks the nearest entry on
small per-entry sketches kept since insert. This script fills one grid of a bank to capacity with bf16 errors
of the real latent shape [16, 21, 60, 104], then inserts new errors, timing side by side in the same rounds:

- reference: ``torch.stack`` of the grid, ``torch.norm(stack - new)``, argmin, overwrite (its ``l2_batch``);
- ours: ``ErrorBank.add`` with ``nearest_l2`` (copy, norm, sketch, nearest on sketches, overwrite).

Both choose on identical bank contents each round, so it also reports how often the sketch picks the exact L2
nearest entry (``nearest_agree``) and how much farther, in full L2, its pick is on average
(``nearest_excess``, mean relative excess; 0 = always the exact nearest). The errors have random scales, so
that distances differ between entries as real errors of different samples do.

Run: ``.venv/bin/python bench/recycling_overhead.py`` (1-2.5 minutes on a 2-core CPU and ~8 GB peak RSS at the
real capacity 500, most of it the reference's per-insert stack; ``--capacity 100`` needs ~2 GB). On a machine
shared with other work, ``--threads 1`` keeps OpenMP waits out of the millisecond-scale timings (both sides run
with the same thread count). Ends with one line of ``name=value`` figures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from machine_load import busy_cpu_s  # noqa: E402  (bench/ is on sys.path when run as a script)

from svi_train.recycling import ErrorBank

REAL_SHAPE = (16, 21, 60, 104)  # Wan 2.1 latent of an 81 x 480 x 832 clip
SPEEDUP_TARGET = 100.0


def reference_insert(entries: list[torch.Tensor], error: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The reference's ``l2_batch`` replacement on a full grid; returns the slot and the full L2 distances."""
    stacked = torch.stack(entries)
    distances = torch.norm(stacked.flatten(start_dim=1) - error.flatten().unsqueeze(0), p=2, dim=1)
    slot = int(torch.argmin(distances))
    entries[slot] = error
    return slot, distances


class ErrorSource:
    """bf16 errors of the real shape with log-uniform scales in [0.5, 2].

    Each is a randomly rolled copy of one of a few Gaussian tensors (a roll decorrelates i.i.d. noise), which is
    ~10x cheaper than a fresh ``randn`` per error and keeps filling 500 entries to seconds.
    """

    def __init__(self, generator: torch.Generator, pool: int = 4) -> None:
        self.generator = generator
        self.pool = [torch.randn(REAL_SHAPE, generator=generator).flatten() for _ in range(pool)]

    def __call__(self) -> torch.Tensor:
        base = self.pool[int(torch.randint(len(self.pool), (1,), generator=self.generator))]
        shift = int(torch.randint(1, base.numel(), (1,), generator=self.generator))
        scale = 2.0 ** (2.0 * float(torch.rand(1, generator=self.generator)) - 1.0)
        return (base.roll(shift) * scale).to(torch.bfloat16).reshape(REAL_SHAPE)


def insert_figures(capacity: int, rounds: int, ours_per_round: int, seed: int = 0) -> dict[str, float]:
    """Fill one grid to ``capacity``, then time reference and ours inserts in interleaved rounds."""
    generator = torch.Generator().manual_seed(seed)
    random_error = ErrorSource(generator)
    bank = ErrorBank("x0", num_grids=1, capacity=capacity, replacement="nearest_l2", max_bytes=1 << 40)
    t0 = time.perf_counter()
    for _ in range(capacity):
        bank.add(random_error(), 0, generator)
    print(f"filled one grid with {capacity} errors of {list(REAL_SHAPE)} bf16 in {time.perf_counter() - t0:.1f}s")

    ref_s, ours_s, agree, excess = [], [], [], []
    for r in range(rounds):
        entries = list(bank.state_dict()["errors"][0])  # the bank's own tensors: same contents, no copy
        new = random_error()
        t = time.perf_counter()
        ref_slot, distances = reference_insert(entries, new)
        ref_s.append(time.perf_counter() - t)
        del entries
        t = time.perf_counter()
        our_slot = bank.add(new, 0, generator)
        ours_s.append(time.perf_counter() - t)
        agree.append(our_slot == ref_slot)
        excess.append(float(distances[our_slot] / distances[ref_slot]) - 1.0)
        for _ in range(ours_per_round - 1):  # more samples of the cheap side, under the same conditions
            new = random_error()
            t = time.perf_counter()
            bank.add(new, 0, generator)
            ours_s.append(time.perf_counter() - t)
        print(f"round {r + 1}/{rounds}: reference {ref_s[-1] * 1e3:8.1f} ms   ours {ours_s[-1] * 1e3:6.2f} ms")

    ref_ms, ours_ms = statistics.median(ref_s) * 1e3, statistics.median(ours_s) * 1e3
    entry_mb = bank.entry_nbytes / 2**20
    return {
        "insert_speedup": ref_ms / ours_ms,
        "reference_insert_ms": ref_ms,
        "ours_insert_ms": ours_ms,
        "capacity": capacity,
        "entry_mb": entry_mb,
        "reference_transient_mb": capacity * entry_mb,
        "nearest_agree": sum(agree) / len(agree),
        "nearest_excess": statistics.fmean(excess),
    }


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


STEP_TARGET = 1.05  # tiny-model step time with recycling / without


def step_time_figures(steps: int = 40, repeats: int = 2) -> dict[str, float]:
    """Tiny-model training step time with recycling on vs off (plain LoRA), same batch, fits alternated."""
    import lightning as L

    from svi_infer.spec import get_spec
    from svi_train.config import LoraSettings, OptimSettings
    from svi_train.module import SVILitModule
    from svi_train.recycling import RecyclingConfig

    g = torch.Generator().manual_seed(0)
    batch = {
        "key": ["bench"],
        "latents": torch.randn(1, 16, 9, 6, 10, generator=g).to(torch.bfloat16),
        "cond": {1: torch.randn(1, 16, 9, 6, 10, generator=g).to(torch.bfloat16)},
        "text": torch.randn(1, 512, 32, generator=g),
        "image": torch.randn(1, 1025, 4, generator=g),
        "num_frames": 33,
        "data_skipped": 0,
    }

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter() - self.start)

    medians: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for enabled in (True, False):
            recycling = RecyclingConfig(enabled=enabled, warmup_iters=5, capacity=16)
            module = SVILitModule(
                get_spec("tiny-wan2.1-i2v"), None, LoraSettings(rank=4, alpha=4.0), recycling, OptimSettings()
            )
            timer = StepTimer()
            trainer = L.Trainer(
                accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
            )  # fmt: skip
            loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b)
            trainer.fit(module, train_dataloaders=loader)
            medians[enabled].append(statistics.median(timer.times[5:]))
    on, off = min(medians[True]), min(medians[False])
    return {"step_ms_recycling": on * 1000, "step_ms_plain": off * 1000, "step_time_ratio": on / off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--capacity", type=int, default=500, help="entries in the full grid (default 500, the real one)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="reference inserts timed (default 5)")
    parser.add_argument("--ours-per-round", type=int, default=10, help="our inserts timed per round (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start, busy0, own0 = time.perf_counter(), busy_cpu_s(), _own_cpu_s()
    figures: dict[str, float] = {}
    figures.update(insert_figures(args.capacity, args.rounds, args.ours_per_round))
    figures.update(step_time_figures())
    wall = time.perf_counter() - t_start
    figures["other_load_cpus"] = max(0.0, (busy_cpu_s() - busy0) - (_own_cpu_s() - own0)) / wall
    figures["threads"] = torch.get_num_threads()

    ok = figures["insert_speedup"] >= SPEEDUP_TARGET
    print(
        f"\nbank insert into a full grid of {args.capacity} x {figures['entry_mb']:.2f} MiB: reference "
        f"{figures['reference_insert_ms']:.1f} ms (stacks {figures['reference_transient_mb']:.0f} MiB per insert), "
        f"ours {figures['ours_insert_ms']:.2f} ms"
    )
    print(
        f"sketch picked the exact L2 nearest in {figures['nearest_agree']:.0%} of rounds; mean excess distance "
        f"{figures['nearest_excess']:.2e}"
    )
    step_ok = figures["step_time_ratio"] <= STEP_TARGET
    print(
        f"tiny-model step: recycling {figures['step_ms_recycling']:.1f} ms vs plain LoRA "
        f"{figures['step_ms_plain']:.1f} ms -> ratio {figures['step_time_ratio']:.3f} "
        f"(target <= {STEP_TARGET}): {'MET' if step_ok else 'NOT MET'}"
    )
    if figures["other_load_cpus"] > 0.25:
        print(f"WARNING: other work kept {figures['other_load_cpus']:.2f} CPUs busy; timings are unreliable")
    print(
        f"speedup target >= {SPEEDUP_TARGET:.0f}x: {figures['insert_speedup']:.0f}x -> {'MET' if ok else 'NOT MET'} "
        f"(benchmark took {wall:.0f}s)"
    )
    print(" ".join(f"{name}={_fmt(value)}" for name, value in figures.items()))


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


if __name__ == "__main__":
    main()
