"""memory.* and optim.optimizer: each value checked when the config is typed, each combination a strategy or
another setting cannot honour refused by the plan with one message (before torch loads), and base_dtype=auto
resolved per precision and strategy."""

import re

import pytest

from svi_infer.spec import get_spec
from svi_train.config import MemorySettings, OptimSettings, TrainerSettings
from svi_train.plan import plan
from tests.helpers import compose_infer, compose_train


def _plan(*overrides: str):
    return plan(compose_train(["+experiment=tiny", "data.path=/nonexistent", "output_dir=/tmp/x", *overrides]))


def test_bad_values_are_refused_when_typed():
    with pytest.raises(ValueError, match=r"optim.optimizer must be one of \('adamw', 'adamw8bit'\), got 'sgd'"):
        OptimSettings(optimizer="sgd")
    with pytest.raises(ValueError, match=r"memory.base_dtype must be one of \('auto', 'bf16', 'fp8'\), got 'fp16'"):
        MemorySettings(base_dtype="fp16")
    with pytest.raises(ValueError, match="optim.optimizer must be one of"):
        _plan("optim.optimizer=adam8")


GROUP = ("memory.offload=group", "optim.gradient_checkpointing=true")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("memory.base_dtype=fp8", "trainer.strategy=deepspeed_z2"),
            "memory.base_dtype=fp8: trainer.strategy=deepspeed_z2 sets the base's dtype itself (DeepSpeed casts the "
            "whole module, FSDP flattens each block into one dtype); use memory.base_dtype=auto",
        ),
        (
            ("memory.base_dtype=bf16", "trainer.strategy=fsdp"),
            "memory.base_dtype=bf16: trainer.strategy=fsdp sets the base's dtype itself",
        ),
        (
            ("memory.base_dtype=fp8", "trainer.precision=bf16-true"),
            "memory.base_dtype=fp8: trainer.precision=bf16-true makes Lightning cast the whole module, the float8 "
            "base and the LoRA, to 16 bits; use trainer.precision=bf16-mixed",
        ),
        (
            (*GROUP, "trainer.strategy=deepspeed_z3"),
            "memory.offload=group works on one device only (DDP broadcasts, DeepSpeed and FSDP move, cast or shard the "
            "whole module, offloaded layers included): use it with trainer.strategy=auto trainer.devices=1 (got "
            "deepspeed_z3, devices=1)",
        ),
        ((*GROUP, "trainer.strategy=fsdp"), "memory.offload=group works on one device only"),
        ((*GROUP, "trainer.devices=2"), "use it with trainer.strategy=auto trainer.devices=1 (got auto, devices=2)"),
        (
            ("memory.offload=group",),
            "memory.offload=group needs gradient checkpointing: without it the backward keeps the GPU copy of every "
            "offloaded layer until the step ends, so nothing is saved; set optim.gradient_checkpointing=true",
        ),
        (
            (*GROUP, "memory.blocks_per_group=2"),
            "memory.blocks_per_group=2: training moves each linear layer of the base on its own",
        ),
        (
            ("optim.optimizer=adamw8bit", "trainer.strategy=deepspeed_z2"),
            "optim.optimizer=adamw8bit: trainer.strategy=deepspeed_z2 wraps the optimizer in DeepSpeed's own, which "
            "partitions its state itself; use optim.optimizer=adamw",
        ),
        (
            ("optim.optimizer=adamw8bit", "trainer.strategy=fsdp", "trainer.offload=true"),
            "optim.optimizer=adamw8bit and trainer.offload both shrink the optimizer state on the GPU (8-bit moments, "
            "or the state on the CPU): choose one",
        ),
    ],
)
def test_each_refusal_says_what_to_do(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _plan(*overrides)


def test_group_offload_refuses_offload_idle_on_wan22():
    with pytest.raises(ValueError, match="memory.offload=group already keeps both experts' base layers on the CPU"):
        _plan(*GROUP, "model=tiny_wan22_i2v_a14b", "experts.offload_idle=true")


def test_accepted_combinations_reach_the_shards():
    """What is allowed gets past these checks (and fails on the missing shards, the next thing the plan reads)."""
    for overrides in [
        ("memory.base_dtype=fp8", "optim.optimizer=adamw8bit"),
        (*GROUP, "memory.base_dtype=fp8"),
        ("memory.base_dtype=fp8", "trainer.precision=bf16-mixed"),
        ("trainer.strategy=deepspeed_z2",),  # base_dtype=auto: the strategy decides
        ("optim.optimizer=adamw8bit", "trainer.strategy=fsdp"),
        (
            "trainer=gpu",
            "memory.base_dtype=fp8",
            "memory.offload=group",
            "optim.optimizer=adamw8bit",
            "optim.gradient_checkpointing=true",
        ),
    ]:
        with pytest.raises(FileNotFoundError, match="index.json does not exist"):
            _plan(*overrides)


def test_auto_base_dtype_follows_precision_and_strategy():

    auto = MemorySettings()
    assert auto.storage(TrainerSettings()) == "fp32"
    assert auto.storage(TrainerSettings(precision="bf16-mixed")) == "bf16"
    assert auto.storage(TrainerSettings(precision="bf16-mixed", strategy="ddp")) == "bf16"
    for strategy in ("deepspeed_z2", "deepspeed_z3", "fsdp"):
        assert auto.storage(TrainerSettings(precision="bf16-mixed", strategy=strategy)) == "fp32"
    assert MemorySettings(base_dtype="fp8").storage(TrainerSettings()) == "fp8"
    assert get_spec("tiny-wan2.1-i2v")  # the spec the planned runs use


def test_infer_memory_keys_are_typed_and_checked(tmp_path):
    from hydra.errors import ConfigCompositionException

    import svi_infer.longvideo.plan as app

    with pytest.raises(ConfigCompositionException):
        compose_infer(["image=x.png", "prompts=a", "memory.weights_dtyp=fp8"])
    cfg = compose_infer(["image=x.png", "prompts=a"])
    assert (cfg.memory.weights_dtype, cfg.memory.offload, cfg.memory.blocks_per_group) == ("auto", "none", 1)
    for override, message in [
        ("memory.weights_dtype=fp16", r"memory.weights_dtype must be one of \('auto', 'fp8'\), got 'fp16'"),
        ("memory.offload=disk", r"memory.offload must be one of \('none', 'model', 'group'\), got 'disk'"),
        ("memory.blocks_per_group=0", "memory.blocks_per_group must be an integer >= 1, got 0"),
    ]:
        cfg = compose_infer(["model=tiny_wan21_i2v", "image=x.png", "prompts=a", f"output={tmp_path}/v.mp4", override])
        with pytest.raises(ValueError, match=message):
            app.plan(cfg)
