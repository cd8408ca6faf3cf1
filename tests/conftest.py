"""Shared fixtures: tiny models, a synthetic first frame, Hydra composition of the apps' configs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from PIL import Image  # noqa: E402

from svi_infer.model import build_model  # noqa: E402
from svi_infer.spec import get_spec  # noqa: E402

TINY21 = "tiny-wan2.1-i2v"
TINY22 = "tiny-wan2.2-i2v-a14b"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(16)


@pytest.fixture
def tiny21():
    return build_model(get_spec(TINY21))


@pytest.fixture
def tiny22():
    return build_model(get_spec(TINY22))


@pytest.fixture(scope="session")
def first_frame() -> Image.Image:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:48, 0:80]
    img = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 20, (48, 80, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture
def image_file(tmp_path, first_frame):
    path = tmp_path / "first.png"
    first_frame.save(path)
    return path


def assert_same_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Outputs of two model instances (or loaders, layouts) holding the same weights: equal up to float rounding.

    Bit equality does not hold: the tiny DiTs' outputs (values up to ~2.5) differ by up to 6e-7 between two
    instances with equal weights, because MKL picks its kernels by the weights' memory alignment, and other CPUs
    pick other kernels (measured under ATEN_CPU_CAPABILITY=avx512, avx2 and default). 1e-5 leaves ~16x room;
    a missing or wrong weight moves the outputs by orders of magnitude more.
    """
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


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


def compose_infer(overrides: list[str]):
    """``conf/infer.yaml`` composed as ``python -m svi_infer <overrides>`` would (with its schema)."""
    from svi_infer.config import register

    register()
    with initialize_config_module("conf", version_base="1.3"):
        return compose("infer", overrides=overrides)


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


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Tiny shards (4 synthetic clips, 9-frame windows at 48x80, motion frames 1 and 5) for training tests."""
    from data_tools.app import run as prepare
    from data_tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("train_data")
    make_dataset(root / "clips", num_clips=4, fps=16, size=(96, 64), seconds=1.5)
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose(
            "data",
            overrides=[f"input={root / 'clips'}", f"output={root / 'ds'}", "frames_per_clip=9", "buckets=[[48,80]]"]
            + ["motion_frames=[1,5]", "progress=false"],
        )
    prepare(cfg)
    return root / "ds"
