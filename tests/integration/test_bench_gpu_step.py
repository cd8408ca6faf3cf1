"""bench/gpu_step.py: the --tiny CPU run end to end, the FLOPs formula on hand-computed configs, the GPU refusal."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from svi_infer.spec import get_spec
from tests.helpers import REPO

SCRIPT = REPO / "bench" / "gpu_step.py"
FIGURES = (
    "step_s_off",
    "step_s_on",
    "time_ratio",
    "peak_gb_off",
    "peak_gb_on",
    "memory_ratio",
    "mfu_off",
    "mfu_on",
    "tflops_step",
    "hw_tflops_step",
    "planned_gb",
    "layers",
    "other_load_cpus",
    "threads",
)


def _load():
    sys.path.insert(0, str(SCRIPT.parent))  # its sibling machine_load, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_step = _load()


def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _figures(stdout: str) -> dict[str, float]:
    last = stdout.strip().splitlines()[-1]
    pairs = dict(item.split("=", 1) for item in last.split())
    assert tuple(pairs) == FIGURES, last
    return {key: float(value) for key, value in pairs.items()}


def test_tiny_run_prints_every_figure():
    done = _run("--tiny", "--steps", "1", "--warmup", "1", "--peak-tflops", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = _figures(done.stdout)
    for key in ("step_s_off", "step_s_on", "time_ratio", "mfu_off", "mfu_on", "tflops_step", "hw_tflops_step"):
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])
    assert figures["time_ratio"] == pytest.approx(figures["step_s_on"] / figures["step_s_off"], rel=2e-3)
    for key in ("peak_gb_off", "peak_gb_on", "memory_ratio"):  # CUDA only
        assert math.isnan(figures[key]), (key, figures[key])
    assert figures["layers"] == 2
    shape = gpu_step.StepShape.of(get_spec(gpu_step.TINY_SPEC), (1, 16, 3, 6, 10), 2, 4)
    assert figures["tflops_step"] == pytest.approx(gpu_step.train_step_flops(shape) / 1e12, rel=1e-3)
    # MFU = model FLOPs / (time x peak), here with a 1 TFLOPS peak
    assert figures["mfu_off"] == pytest.approx(figures["tflops_step"] / figures["step_s_off"], rel=2e-3)
    # recycling really ran: errors were injected from the pre-filled banks and recorded into them
    assert "recorded into the banks" in done.stdout
    injected = done.stdout.split("errors injected into noise ")[1].split(";")[0]
    assert sum(int(part.split()[-1]) for part in injected.split(",")) > 0, injected


def test_refuses_without_gpu_in_one_line():
    done = _run(env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tiny" in lines[0], done.stderr


def test_flops_formula_on_a_hand_computed_config():
    shape = gpu_step.StepShape(
        tokens=6, dim=4, ffn_dim=5, layers=2, text_tokens=3, image_tokens=2, in_channels=7, out_channels=3,
        patch_volume=2, text_dim=9, image_dim=8, freq_dim=10, lora_rank=1,
    )  # fmt: skip
    assert gpu_step.forward_flops(shape) == {
        "self_attn_proj": 1536,  # L·2·S·D²·4 = 2·2·6·16·4
        "self_attn_scores": 1152,  # L·2·2·S²·D = 2·4·36·4
        "cross_attn_proj": 1408,  # L·(2·S·D²·2 + 2·(Lt+Li)·D²·2) = 2·(384 + 320)
        "cross_attn_scores": 960,  # L·2·2·S·(Lt+Li)·D = 2·4·6·5·4
        "ffn": 960,  # L·2·2·S·D·F = 2·4·6·4·5
        "lora": 1776,  # L·2·r·(S·6·2D + Lt·2·2D + S·2·(D+F)) = 2·2·(288 + 48 + 108)
        "head": 288,  # 2·S·D·Cout·pv = 2·6·4·3·2
        "embed": 1672,  # 2·S·Cin·pv·D + 2·Lt·(td·D + D²) + 2·Li·(id² + id·D) + 2·(fd·D + D² + 6D²) = 672+312+384+304
    }
    assert gpu_step.train_step_flops(shape) == 3 * 9752
    # frozen linears 2x, attention scores and LoRA 3x, embedders 1x
    assert gpu_step.hardware_step_flops(shape) == 2 * (1536 + 1408 + 960 + 288) + 3 * (1152 + 960 + 1776) + 1672


def test_full_size_flops_and_layer_scaling():
    spec = get_spec(gpu_step.FULL_SPEC)
    latent = (1, 16, 21, 60, 104)  # 81 x 480 x 832

    def step(layers: int, rank: int = 128) -> int:
        return gpu_step.train_step_flops(gpu_step.StepShape.of(spec, latent, layers, rank))

    shape = gpu_step.StepShape.of(spec, latent, 40, 128)
    assert (shape.tokens, shape.dim, shape.ffn_dim, shape.text_tokens, shape.image_tokens) == (
        21 * 30 * 52, 5120, 13824, 512, 257
    )  # fmt: skip
    S, D, F, C = 32760, 5120, 13824, 512 + 257
    block = 2 * S * D * D * 4 + 4 * S * S * D + 2 * S * D * D * 2 + 2 * C * D * D * 2 + 4 * S * C * D + 4 * S * D * F
    lora = 2 * 128 * (S * 12 * D + 512 * 4 * D + S * 2 * (D + F))
    assert step(40) - step(0) == 3 * 40 * (block + lora)
    assert step(40) == 5_159_413_672_181_760  # 5159.4 TFLOPs per step (docs/benchmarks.md)
    assert step(2) - step(0) == (step(40) - step(0)) // 20  # --layers scales the blocks' share
    assert step(40, 128) - step(40, 0) == 3 * 40 * lora


def test_peak_table_and_unknown_peaks():
    bf16 = torch.bfloat16
    assert gpu_step.peak_for_name("NVIDIA H100 80GB HBM3", bf16)[0] == 989
    assert gpu_step.peak_for_name("NVIDIA H100 PCIe", bf16)[0] == 756
    assert gpu_step.peak_for_name("NVIDIA H200", bf16)[0] == 989
    assert gpu_step.peak_for_name("NVIDIA A100-SXM4-80GB", bf16)[0] == 312
    assert math.isnan(gpu_step.peak_for_name("NVIDIA H100 NVL", bf16)[0])
    assert math.isnan(gpu_step.peak_for_name("NVIDIA H200 NVL", bf16)[0])
    assert math.isnan(gpu_step.peak_for_name("NVIDIA GeForce RTX 4090", bf16)[0])
    assert math.isnan(gpu_step.peak_for_name("NVIDIA H100 80GB HBM3", torch.float32)[0])
    assert math.isnan(gpu_step.peak_tflops(torch.device("cpu"), torch.float32, None)[0])
    assert gpu_step.peak_tflops(torch.device("cpu"), torch.float32, 2.5)[0] == 2.5


@pytest.mark.gpu
def test_real_size_two_layers_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    done = _run("--layers", "2", "--steps", "1", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = _figures(done.stdout)
    for key in ("step_s_off", "step_s_on", "time_ratio", "peak_gb_off", "peak_gb_on", "memory_ratio"):
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])
    assert figures["layers"] == 2
    name = torch.cuda.get_device_name()
    if math.isfinite(gpu_step.peak_for_name(name, torch.bfloat16)[0]):
        assert 0 < figures["mfu_off"] < 1 and 0 < figures["mfu_on"] < 1
