"""bench/gpu_check.sh and bench/gpu_generate.py: the --tiny CPU run end to end (the GPU run is the same code)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, clean_env

STEP_KEYS = ("step_s_off", "step_s_on", "peak_gb_off", "mfu_off", "planned_gb")
GEN_KEYS = ("gen_dit_s_per_step", "gen_decode_s", "gen_peak_gb_dit", "gen_peak_gb", "gen_planned_gb")


def figures(line: str) -> dict[str, float]:
    return {key: float(value) for key, value in (pair.split("=") for pair in line.split())}


@pytest.mark.slow
def test_gpu_check_runs_everything_and_ends_with_one_line_of_figures():
    env = clean_env() | {"PY": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--tiny"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = figures(done.stdout.strip().splitlines()[-1])
    for prefix in ("bf16_", "fp8_"):
        for key in STEP_KEYS:
            assert prefix + key in last
        assert last[prefix + "planned_gb"] > 0 and last[prefix + "step_s_off"] > 0
        assert math.isnan(last[prefix + "peak_gb_off"])  # CUDA-only
    for key in GEN_KEYS:
        assert key in last
    assert last["gen_planned_gb"] > 0 and last["gen_dit_s_per_step"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
def test_gpu_generate_refuses_without_a_gpu():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_generate.py")], capture_output=True, text=True, env=clean_env()
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr
