"""The memory planner against measured training steps, and its command line.

Measured = the bytes of the trained DiT's parameters plus the most bytes of tensor storage alive at once during
real ``python -m svi_train`` steps on the CPU (``LiveBytes`` over Lightning's fit: the batch, activations,
gradients, optimizer state, everything the steps allocate). The plan never runs the model: it counts a meta-device
build and measures activations on meta tensors at 2 and 3 blocks. The two must agree within 15% (issue #17).
"""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from svi_infer.spec import SPECS, get_spec
from svi_train.config import LoraSettings
from svi_train.memory_plan import (
    Choice,
    GiB,
    LiveBytes,
    Sample,
    activation_bytes,
    plan_memory,
    run_memory,
)
from svi_train.shards import read_index
from tests.helpers import compose_train, run_cli

TOLERANCE = 0.15


class MeasurePeak(L.Callback):
    """Parameters of the trained DiT(s) + the peak of what the training steps allocate."""

    def on_train_start(self, trainer, module) -> None:
        params = [p for m in module.expert_modules().values() for p in m.parameters()]
        self.params = sum(p.numel() * p.element_size() for p in params)
        self.live = LiveBytes()
        self.live.__enter__()

    def on_train_end(self, trainer, module) -> None:
        self.live.__exit__(None, None, None)

    @property
    def peak(self) -> int:
        return self.params + self.live.peak


def measured_and_planned(shards, tmp_path, *overrides: str) -> tuple[int, int]:
    from svi_train.run import run

    cfg = compose_train(
        ["+experiment=tiny", f"data.path={shards}", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=3"]
        + ["recycling=off", "callbacks.export_every_n_steps=0", "logger.kind=none", *overrides]
    )
    measure = MeasurePeak()
    run(cfg, [measure])
    return measure.peak, run_memory(cfg, read_index(shards)).plan().gpu


@pytest.fixture
def mid_spec(monkeypatch):
    """A mid-size Wan 2.1 DiT (4 blocks of width 384, 14M parameters) that trains on the tiny shards."""
    spec = replace(get_spec("tiny-wan2.1-i2v"), id="mid-wan2.1-i2v", dim=384, num_heads=6, num_layers=4, ffn_dim=1536)
    monkeypatch.setitem(SPECS, spec.id, spec)
    return spec


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_a_measured_tiny_training_step(shards, tmp_path, checkpointing):
    measured, planned = measured_and_planned(shards, tmp_path, f"optim.gradient_checkpointing={checkpointing}")
    print(f"measured {measured} planned {planned} ratio {planned / measured:.3f}")
    assert abs(planned - measured) <= TOLERANCE * measured, (planned, measured)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_plan_matches_a_measured_mid_size_training_step(shards, tmp_path, mid_spec, optimizer):
    measured, planned = measured_and_planned(
        shards, tmp_path, f"model.spec={mid_spec.id}", "lora.rank=128", "lora.alpha=128", f"optim.optimizer={optimizer}"
    )
    assert measured > 50 * 2**20  # the weights and optimizer state dominate: this checks their accounting
    print(f"measured {measured} planned {planned} ratio {planned / measured:.3f}")
    assert abs(planned - measured) <= TOLERANCE * measured, (planned, measured)


@pytest.mark.slow
def test_activations_of_a_larger_sample_match_a_real_cpu_step(mid_spec):
    """Activations at 560 tokens (where they outweigh the weights), the plan's meta measurement against the real
    DiT on the CPU, forward and backward, with and without checkpointing."""
    import torch
    from peft import LoraConfig

    from svi_infer.tiny import tiny_transformer

    lora = LoraSettings(rank=8, alpha=8.0)
    sample = Sample(1, 17, 128, 224)
    for checkpointing in (False, True):
        transformer = tiny_transformer(mid_spec).requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=list(lora.target_modules)))
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        lora_numel = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
        frames, h, w = mid_spec.latent_frames(sample.frames), sample.height // 8, sample.width // 8
        with LiveBytes() as live:
            latents = torch.randn(1, mid_spec.latent_channels, frames, h, w)
            x0 = torch.randn(1, mid_spec.latent_channels, frames, h, w)
            target = torch.randn_like(x0) - x0
            out = transformer(
                hidden_states=torch.cat([latents, torch.randn(1, 20, frames, h, w)], dim=1),
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, mid_spec.text_len, mid_spec.text_dim),
                encoder_hidden_states_image=torch.randn(1, mid_spec.image_tokens, mid_spec.image_dim),
                return_dict=False,
            )[0]
            (out - target).pow(2).mean().backward()
            del out
        measured = live.peak - lora_numel * 4  # the LoRA gradients are counted apart in the plan
        planned = activation_bytes(mid_spec, lora, "fp32", checkpointing, torch.float32, sample)
        assert measured > 20 * 2**20
        print(f"checkpointing={checkpointing} measured {measured} planned {planned} ratio {planned / measured:.3f}")
        assert abs(planned - measured) <= TOLERANCE * measured, (checkpointing, planned, measured)


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_a_16_bit_base_under_32_bit_precision_is_planned(base):
    """The module computes a bf16 or float8 base in bf16 (its inputs are cast to it), whatever the precision."""
    cfg = compose_train(["+experiment=tiny", f"memory.base_dtype={base}"])
    plan = run_memory(cfg).plan()
    assert plan.choice.base_dtype == base and base in plan.base and plan.activations > 0


def test_checkpointing_and_fp8_and_offload_shrink_the_14b_plan():
    spec = get_spec("wan2.1-i2v-14b-480p")
    sample = Sample(1, 81, 480, 832)
    plain = plan_memory(spec, LoraSettings(), Choice("bf16", False), sample)
    ckpt = plan_memory(spec, LoraSettings(), Choice("bf16", True), sample)
    fp8 = plan_memory(spec, LoraSettings(), Choice("fp8", True, "adamw8bit"), sample)
    group = plan_memory(spec, LoraSettings(), Choice("fp8", True, "adamw8bit", "group"), sample)
    # 14B parameters in bf16, a few hundred MB kept in fp32 by diffusers
    assert 30 * GiB < sum(plain.base.values()) < 32 * GiB
    assert 14 * GiB < sum(fp8.base.values()) < 16.5 * GiB
    assert group.base["fp8"] < 2 * GiB and group.host > 13 * GiB
    # SVI's LoRA (r=128 on q, k, v, o and both FFN layers of self- and cross-attention): 612M parameters
    assert plain.lora == pytest.approx(612_368_384 * 4, rel=0.01)
    assert fp8.optimizer < plain.optimizer / 3
    # checkpointing keeps one block's activations plus every block's input: far below 40 blocks' activations
    assert ckpt.activations < plain.activations / 10
    assert plain.gpu > ckpt.gpu > fp8.gpu > group.gpu


@pytest.mark.slow
def test_the_planner_command_prints_the_plan_and_what_fits(tmp_path):
    result = run_cli("svi_train.plan", "trainer=gpu", "memory.gpu_gib=48", cwd=tmp_path)
    assert result.code == 0, result.stderr
    out = result.stdout
    assert "memory plan for wan2.1-i2v-14b-480p" in out and "peak per GPU" in out
    assert "this run does NOT fit a 48 GiB GPU" in out
    for size in ("24 GB:", "48 GB:", "80 GB:"):
        assert size in out
    # at 81 frames nothing fits 24 GB: the most frugal settings' longest clip instead
    assert "24 GB: none at 81 frames; memory.base_dtype=fp8 " in out and " fits 49 frames (" in out
    assert not (tmp_path / "outputs").exists()  # a plan writes nothing


def test_the_planner_answers_a_mistake_in_one_line(tmp_path):
    result = run_cli("svi_train.plan", "memory.base_dtype=fp4", cwd=tmp_path)
    assert result.code == 2
    assert result.stderr[-1].startswith("svi_train.plan: error:") and "fp4" in result.stderr[-1], result.stderr
    assert not any("Traceback" in line for line in result.stderr)


def _autocast_step(spec, lora, sample, follow_autocast: bool) -> tuple[int, torch.Tensor]:
    """A bf16-mixed step of a bf16 base with an fp32 LoRA on the CPU (Lightning's bf16-mixed: CPU autocast), its
    peak beyond the weights and LoRA gradients, and its output."""
    from peft import LoraConfig

    from svi_infer.tiny import tiny_transformer
    from svi_train.module import cast_lora_inputs_outside_autocast

    transformer = tiny_transformer(spec).requires_grad_(False).to(torch.bfloat16)
    transformer.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if follow_autocast:
        cast_lora_inputs_outside_autocast(transformer)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    inputs = {k: torch.randn(v.shape, dtype=torch.float32) for k, v in dit_inputs(spec, sample).items()}
    live = LiveBytes(existing=transformer)
    for p in transformer.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: live.exclude(q.grad))
    with live, torch.autocast("cpu", dtype=torch.bfloat16):
        out = transformer(
            hidden_states=inputs["latents"].bfloat16(),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=inputs["text"].bfloat16(),
            encoder_hidden_states_image=inputs["image"].bfloat16(),
            return_dict=False,
        )[0]
        out.float().pow(2).mean().backward()
    return live.peak, out.detach().float()


def dit_inputs(spec, sample: Sample) -> dict:
    frames, h, w = spec.latent_frames(sample.frames), sample.height // 8, sample.width // 8
    return {
        "latents": torch.empty(1, spec.in_channels, frames, h, w),
        "text": torch.empty(1, spec.text_len, spec.text_dim),
        "image": torch.empty(1, spec.image_tokens, spec.image_dim),
    }


def test_bf16_mixed_steps_keep_no_float32_copies_of_the_lora_inputs_as_planned(mid_spec):
    """Under autocast the module turns peft's input casting off: the same output, less memory, and the plan (which
    computes the LoRA in bf16 as autocast does) then matches the measured step."""

    lora, sample = LoraSettings(rank=8, alpha=8.0), Sample(1, 17, 128, 224)

    torch.manual_seed(0)
    cast_peak, cast_out = _autocast_step(mid_spec, lora, sample, follow_autocast=False)
    torch.manual_seed(0)
    peak, out = _autocast_step(mid_spec, lora, sample, follow_autocast=True)
    torch.testing.assert_close(out, cast_out, rtol=0, atol=0)  # bf16 matmuls either way: the same numbers
    assert peak < 0.8 * cast_peak, (peak, cast_peak)
    planned = activation_bytes(mid_spec, lora, "bf16", True, torch.bfloat16, sample)
    print(f"autocast: measured {peak} planned {planned} ratio {planned / peak:.3f} (with peft casting {cast_peak})")
    assert abs(planned - peak) <= TOLERANCE * peak, (planned, peak)


def test_generation_plan_of_a_dit_forward_matches_a_real_cpu_forward(mid_spec):
    from svi_infer.memory_plan import Clip, forward_bytes
    from svi_infer.tiny import tiny_transformer

    clip = Clip(17, 128, 224)
    transformer = tiny_transformer(mid_spec)
    frames, h, w = mid_spec.latent_frames(clip.frames), clip.height // 8, clip.width // 8
    with torch.no_grad(), LiveBytes() as live:
        transformer(
            hidden_states=torch.randn(1, mid_spec.in_channels, frames, h, w),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, mid_spec.text_len, mid_spec.text_dim),
            encoder_hidden_states_image=torch.randn(1, mid_spec.image_tokens, mid_spec.image_dim),
            return_dict=False,
        )
    planned = forward_bytes(mid_spec, "fp32", torch.float32, clip)
    print(f"forward: measured {live.peak} planned {planned} ratio {planned / live.peak:.3f}")
    assert live.peak > 5 * 2**20
    assert abs(planned - live.peak) <= TOLERANCE * live.peak, (planned, live.peak)


def test_14b_480p_generation_is_planned_within_24_gb_with_group_offload_and_fp8():
    from svi_infer.memory_plan import Clip, fits, plan_generation

    spec, clip = get_spec("wan2.1-i2v-14b-480p"), Clip(81, 480, 832)
    plain = plan_generation(spec, clip, "auto", "none")
    frugal = plan_generation(spec, clip, "fp8", "group")
    assert not fits(plain.gpu, 48) and fits(frugal.gpu, 24), (plain.line(), frugal.line())
    assert frugal.dit["fp8"] < 1 * GiB and frugal.dit_host > 13 * GiB  # the blocks wait on the host, in float8
    names = [c.name for c in frugal.components]
    assert names == ["text encoder", "image encoder", "VAE"]
    assert 10 * GiB < frugal.components[0].weights < 11 * GiB  # UMT5-XXL, 5.7B parameters in bf16


def test_training_refuses_a_plan_that_does_not_fit(shards, tmp_path, capsys):
    from svi_infer.errors import USER_ERRORS
    from svi_train.run import run

    base = ["+experiment=tiny", f"data.path={shards}", "trainer.max_steps=1", "logger.kind=none", "memory.gpu_gib=0.5"]
    with pytest.raises(
        USER_ERRORS,
        match=r"the memory plan needs 1\.\d MiB per GPU \(\+ 1\.5 GiB for CUDA itself\), more than this 0\.5 GiB "
        r"GPU; what fits it: none at 9 frames; python -m svi_train.plan",
    ):
        run(compose_train([*base, f"output_dir={tmp_path / 'refused'}"]))
    assert not (tmp_path / "refused" / "checkpoints").exists()
    assert capsys.readouterr().out.startswith("memory plan: 1.")  # the plan's line comes first
    run(compose_train([*base, f"output_dir={tmp_path / 'forced'}", "memory.ignore_plan=true"]))
    assert (tmp_path / "forced" / "adapters" / "final").is_dir()
