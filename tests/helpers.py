"""Helpers shared by the test tiers (plain functions and constants; the fixtures live in tests/conftest.py).

Imported as ``from tests.helpers import ...``; no test file imports from another test file or from conftest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module

from svi_infer.schema import Sample
from svi_infer.spec import get_spec

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

TINY21 = "tiny-wan2.1-i2v"
TINY22 = "tiny-wan2.2-i2v-a14b"


def assert_same_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Outputs of two model instances (or loaders, layouts) holding the same weights: equal up to float rounding.

    Bit equality does not hold: the tiny DiTs' outputs (values up to ~2.5) differ by up to 6e-7 between two
    instances with equal weights, because MKL picks its kernels by the weights' memory alignment, and other CPUs
    pick other kernels (measured under ATEN_CPU_CAPABILITY=avx512, avx2 and default). 1e-5 leaves ~16x room;
    a missing or wrong weight moves the outputs by orders of magnitude more.
    """
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def dit_inputs(spec_id: str = TINY21) -> dict:
    """A fixed input for one forward of a tiny transformer."""
    g = torch.Generator().manual_seed(0)
    spec = get_spec(spec_id)
    return dict(
        hidden_states=torch.randn(1, spec.in_channels, 3, 6, 10, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, spec.text_dim, generator=g),
        encoder_hidden_states_image=torch.randn(1, 1025, spec.image_dim, generator=g) if spec.image_dim else None,
        return_dict=False,
    )


# --- Hydra composition of the apps' configs -----------------------------------------------------------------------


def compose_infer(overrides: list[str]):
    """``conf/infer.yaml`` composed as ``python -m svi_infer <overrides>`` would (with its schema)."""
    from svi_infer.longvideo.config import register

    register()
    with initialize_config_module("conf", version_base="1.3"):
        return compose("infer", overrides=overrides)


def compose_train(overrides: list[str]):
    """``conf/train.yaml`` composed as ``python -m svi_train <overrides>`` would (with its schemas)."""
    from svi_train.config import register

    register()
    with initialize_config_module("conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def compose_data(overrides: list[str]):
    """``conf/data_tools.yaml`` composed as ``python -m data_tools <overrides>`` would (with its schema)."""
    import data_tools.config  # noqa: F401  (registers the schema on import)

    with initialize_config_module("conf", version_base="1.3"):
        return compose("data_tools", overrides=list(overrides))


def train_tiny(shards: Path, out: Path, *overrides: str, callbacks=None) -> Path:
    """Six steps of ``+experiment=tiny`` on ``shards`` into ``out``; returns the final adapter directory."""
    from svi_train.run import run

    cfg = compose_train(
        ["+experiment=tiny", f"data.path={shards}", f"output_dir={out}", "trainer.max_steps=6", *overrides]
    )
    return run(cfg, callbacks)


# --- generation ---------------------------------------------------------------------------------------------------


def interrupt_at(monkeypatch, clip: int) -> None:
    """Make ``LongVideoGenerator`` stop with a KeyboardInterrupt when it starts clip ``clip``."""
    from svi_infer.longvideo.generator import LongVideoGenerator

    original = LongVideoGenerator._clip

    def failing(self, context, *args):
        if context.index == clip:
            raise KeyboardInterrupt
        return original(self, context, *args)

    monkeypatch.setattr(LongVideoGenerator, "_clip", failing)


# --- data ---------------------------------------------------------------------------------------------------------

SR = 16000  # the audio encoders' sample rate


def sine(seconds: float, amplitude: float = 0.1, freq: float = 440.0, rate: int = SR) -> np.ndarray:
    """A float32 sine tone."""
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SR) -> Path:
    """``samples`` (floats in [-1, 1], clipped) as a mono 16-bit WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes())
    return path


def changed_sample(meta: dict, tensors: dict, changes: dict) -> Sample:
    """A sample from ``meta`` and ``tensors`` with ``changes`` applied: a metadata field set, a tensor replaced,
    or removed (``None``)."""
    for k, v in changes.items():
        if k in meta:
            meta[k] = v
        elif v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    return Sample(meta["key"], meta, tensors)


# --- subprocesses: CLIs and multi-rank runs -----------------------------------------------------------------------

STALL_S = 300.0  # a run whose log has not grown for this long is stuck, however busy the machine is
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The environment for a multi-rank run: no launcher state from this process (or a cluster) leaks in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_", "GROUP_"))
    }
    env.update(MASTER_PORT=str(free_port()), DS_SKIP_SHM="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env.update(OMP_NUM_THREADS="1")  # two ranks on a 2-core machine
    return env


def run_logged(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None, stall_s: float = STALL_S
) -> int | None:
    """Run ``cmd`` (stdout and stderr into ``log``) until it exits; its exit code, or None if it stalled.

    No wall-clock limit: a loaded machine slows a run down without stopping its output, so the run is given up
    only when ``log`` has not grown for ``stall_s`` seconds (the training scripts print a line per step). The
    whole process group is killed at the end, so no rank outlives the test: ranks ignore SIGTERM while blocked
    in a collective, and rank 0 may exit first (the others get 10 s to finish on their own).
    """
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            size, last_growth = -1, time.monotonic()
            while (rc := proc.poll()) is None:
                if log.stat().st_size != size:
                    size, last_growth = log.stat().st_size, time.monotonic()
                elif time.monotonic() - last_growth > stall_s:
                    break
                time.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                for _ in range(50):
                    os.killpg(proc.pid, 0)
                    time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# What a CLI must not import before it has read its arguments and checked its inputs (seconds of start-up each)
HEAVY = frozenset(
    {"torch", "diffusers", "transformers", "peft", "lightning", "pytorch_lightning", "deepspeed", "webdataset"}
    | {"decord", "onnxruntime"}
)


@dataclass(frozen=True)
class CliRun:
    """One CLI run under ``python -X importtime``."""

    code: int
    stdout: str
    stderr: list[str]  # its lines, without the import times
    imported: frozenset[str]  # the top-level packages it imported


def run_cli(module: str, *args: str, cwd: Path) -> CliRun:
    """``python -X importtime -m <module> <args>`` in ``cwd``: what it printed and which packages it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    lines = done.stderr.splitlines()
    times = [line for line in lines if line.startswith("import time:")]
    imported = frozenset(line.rsplit("|", 1)[-1].strip().split(".")[0] for line in times)
    return CliRun(done.returncode, done.stdout, [line for line in lines if line not in times], imported)


DISTRIBUTED_SCRIPT = REPO / "tests" / "distributed" / "distributed_train.py"
WORLD, STEPS = 2, 3  # the ranks and steps of a distributed_train.py run


def train_distributed(
    strategy: str, shards: Path, out: Path, offload: bool = False, *extra: str, steps: int = STEPS, rc_wanted: int = 0
) -> list[dict]:
    """Run tests/distributed/distributed_train.py on two CPU ranks; what each rank reported (if it exited 0).

    The ranks' whole process group is killed whatever happens, so nothing is left behind.
    """
    log = out / "train.log"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(DISTRIBUTED_SCRIPT), strategy, str(shards), str(out), f"--devices={WORLD}"]
    cmd += [f"--steps={steps}"]
    cmd += ["--offload"] if offload else []
    cmd += list(extra)
    rc = run_logged(cmd, log, env=clean_env(), cwd=REPO)
    assert rc == rc_wanted, f"{strategy}: {'stalled' if rc is None else f'exit code {rc}'}\n{log_tail(log)}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)] if rc == 0 else []
