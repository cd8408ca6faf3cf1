"""Two-rank training on CPU processes (gloo) under DDP, DeepSpeed ZeRO-2/3 and FSDP, through svi_train.run.

Each case runs tests/distributed/distributed_train.py in a subprocess (never Lightning's launcher inside pytest:
it would re-run pytest for rank 1) with a cleaned environment and a free port, then checks what every rank reported:
the LoRA is the same on both ranks and has moved; during the warm-up each rank's banks took both ranks' errors;
the exported adapter holds exactly the trained weights and loads in svi_infer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from svi_infer.adapters import load_adapter
from svi_infer.model import build_model
from svi_infer.spec import get_spec
from tests.helpers import STEPS, TINY21, WORLD, train_distributed


def loaded_lora(path: Path) -> dict[str, torch.Tensor]:
    """Load an adapter as svi_infer does; return what ended up in the transformer."""
    model = build_model(get_spec(TINY21))
    load_adapter(model, path, adapter_name="check")
    return get_peft_model_state_dict(model.transformers[0], adapter_name="check")


def assert_same_weights(path: Path, trained: dict[str, torch.Tensor]) -> None:
    loaded = loaded_lora(path)
    missing = sorted(set(trained) - set(loaded))
    assert not missing, f"{path}: {len(missing)} trained tensors did not load, e.g. {missing[:3]}"
    for key, value in trained.items():
        assert torch.equal(loaded[key].float(), value.float()), f"{path}: {key} differs from the trained weight"


CASES = {  # case: (trainer config, offload, strategy class, optimizer class)
    "ddp": ("ddp", False, "DDPStrategy", "AdamW"),
    "deepspeed_z2": ("deepspeed_z2", False, "CPUDeepSpeedStrategy", "AdamW"),
    "deepspeed_z3": ("deepspeed_z3", False, "CPUDeepSpeedStrategy", "AdamW"),
    # optimizer state and parameters offloaded; DeepSpeed's CPU Adam is JIT-compiled on first use (~1 min, cached)
    "deepspeed_z3_offload": ("deepspeed_z3", True, "CPUDeepSpeedStrategy", "DeepSpeedCPUAdam"),
    "fsdp": ("fsdp", False, "CPUFSDPStrategy", "AdamW"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_share_errors_and_export(case, shards, tmp_path):
    strategy, offload, strategy_class, optimizer_class = CASES[case]
    reports = train_distributed(strategy, shards, tmp_path, offload)
    r0, r1 = reports
    for r in reports:
        facts = (r["strategy"], r["optimizer"], r["world_size"], r["global_step"], r["iteration"])
        assert facts == (strategy_class, optimizer_class, WORLD, STEPS, STEPS)

    # the LoRA: every tensor, full-size, identical on both ranks and moved by training
    assert sorted(r0["lora"]) == r0["initial_keys"] and len(r0["lora"]) == 40
    assert r0["lora"] == r1["lora"], "the ranks ended with different LoRA weights"
    assert all(r0["lora_shapes"][k][0] > 0 for k in r0["lora"])
    for r in reports:
        assert all(r["lora_changed"].values()), f"rank {r['rank']}: some LoRA tensors never moved"

    assert r0["generator"] != r1["generator"], "the ranks drew from the same random stream"

    # warm-up: each rank inserted every rank's errors (STEPS steps x WORLD ranks x batch 1), so both banks agree
    for name in ("noise", "x0"):
        for r in reports:
            assert r["bank_inserts"][name] == WORLD * STEPS, (name, r["rank"], r["bank_inserts"])
        assert r0["bank_norms"][name] == r1["bank_norms"][name], f"{name} banks differ between the ranks"
        assert len(set(r0["bank_norms"][name])) == WORLD * STEPS, "the banks hold duplicated, not shared, errors"

    # exports: rank 0's adapter directory, and for DeepSpeed the CLI conversion of the checkpoint directory
    trained = load_file(str(tmp_path / "lora_rank0.safetensors"))
    assert_same_weights(tmp_path / "run" / "adapters" / "final", trained)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    if strategy.startswith("deepspeed"):
        from svi_train.export import main as export_cli

        for states in (checkpoint / "checkpoint").glob("*model_states.pt"):  # the frozen base is left out
            module = torch.load(states, map_location="cpu", weights_only=False)["module"]
            assert len(module) == 40 and all(".lora_" in k for k in module), (states.name, list(module)[:3])

        export_cli([str(checkpoint), "--format", "peft", "--output", str(tmp_path / "exported")])
        assert_same_weights(tmp_path / "exported", trained)
    else:
        from svi_train.export import export

        assert_same_weights(export(checkpoint, "peft", tmp_path / "exported")[0], trained)


# -- fast: the name -> strategy mapping and the trainer configs, no process group --------------------------------
@pytest.mark.parametrize("name", ["cpu", "ddp", "deepspeed_z2", "deepspeed_z3", "fsdp"])
def test_trainer_configs_compose(name):
    from svi_train.config import register

    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=tiny", f"trainer={name}"])
    assert cfg.trainer.strategy == ("auto" if name == "cpu" else name)
    assert cfg.trainer.accelerator == "cpu"  # the tiny experiment keeps its CPU


def test_make_strategy_maps_names_to_strategies():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from svi_train.strategies import (
        CPUDeepSpeedStrategy,
        CPUFSDPStrategy,
        make_optimizer,
        make_strategy,
        unwrapped_name,
        uses_cpu_adam,
    )

    assert make_strategy("auto", "cpu") == "auto"
    assert make_strategy("ddp_spawn", "cpu") == "ddp_spawn"  # Lightning's own names pass through
    assert type(make_strategy("ddp", "cpu")) is DDPStrategy
    z2, z3 = make_strategy("deepspeed_z2", "cpu"), make_strategy("deepspeed_z3", "cpu", offload=True)
    assert type(z2) is CPUDeepSpeedStrategy and z2.config["zero_optimization"]["stage"] == 2
    assert z3.config["zero_optimization"]["stage"] == 3 and "offload_param" in z3.config["zero_optimization"]
    assert z2.exclude_frozen_parameters and not uses_cpu_adam(z2) and uses_cpu_adam(z3)
    assert type(make_strategy("deepspeed_z2", "gpu")) is DeepSpeedStrategy
    fsdp = make_strategy("fsdp", "cpu")
    assert type(fsdp) is CPUFSDPStrategy and "auto_wrap_policy" in fsdp.kwargs
    assert type(make_strategy("fsdp", "gpu")) is FSDPStrategy
    with pytest.raises(ValueError, match="offload"):
        make_strategy("ddp", "cpu", offload=True)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(params, z2, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)) is torch.optim.AdamW
    name = "transformer.blocks.0._fsdp_wrapped_module.attn1.to_q.lora_A.default.weight"
    assert unwrapped_name(name) == "transformer.blocks.0.attn1.to_q.lora_A.default.weight"


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_are_bit_identical(shards, tmp_path):
    """SIGKILL both ranks after the step-k checkpoint, resume with ``resume=last``: as if never stopped."""
    k, n = 3, 7
    common = ("recycling.warmup_iters=2", f"trainer.checkpoint_every_n_steps={k}")  # rank-local banks from step 3
    straight = train_distributed("ddp", shards, tmp_path / "straight", False, *common, steps=n)
    killed = tmp_path / "killed"
    train_distributed("ddp", shards, killed, False, *common, f"--kill-at={k}", steps=n, rc_wanted=-9)
    assert (killed / "run" / "checkpoints" / "rank_states" / f"step{k:09d}-rank1.pt").is_file()
    resumed = train_distributed("ddp", shards, killed, False, *common, "resume=last", steps=n)
    for before, after in zip(straight, resumed, strict=True):
        assert sorted(int(s) for s in after["losses"]) == list(range(k + 1, n + 1)), after["losses"]
        assert {s: before["losses"][s] for s in after["losses"]} == after["losses"], f"rank {after['rank']}"
        assert (after["lora"], after["banks"], after["generator"]) == (
            before["lora"],
            before["banks"],
            before["generator"],
        ), f"rank {after['rank']}"
    assert straight[0]["banks"] != straight[1]["banks"], "after the warm-up each rank keeps its own errors"
    assert straight[0]["losses"] != straight[1]["losses"]

    # without rank 1's own state file, the resume still runs, says it is no longer exact, and is not
    (killed / "run" / "checkpoints" / "rank_states" / f"step{k:09d}-rank1.pt").unlink()
    step_k = killed / "run" / "checkpoints" / f"step{k:09d}.ckpt"
    lossy = train_distributed("ddp", shards, tmp_path / "lossy", False, *common, f"resume={step_k}", steps=n)
    assert "resuming without this rank's own random streams and banks" in (tmp_path / "lossy" / "train.log").read_text()
    first = str(k + 1)  # rank 0 resumed exactly; rank 1 draws other noise (later steps differ on both ranks)
    assert lossy[0]["losses"][first] == straight[0]["losses"][first]
    assert lossy[1]["losses"][first] != straight[1]["losses"][first]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_z2"])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(strategy, shards, tmp_path):
    """Both ranks run the step (collectives), but weights, Adam moments and step counts stay as they were."""
    reports = train_distributed(strategy, shards, tmp_path, False, "--nan-at=2", steps=3)
    for r in reports:
        steps = r["steps"]
        assert steps["2"] == steps["1"], f"rank {r['rank']}: the skipped step changed the LoRA or the optimizer"
        assert steps["3"]["lora"] != steps["2"]["lora"], "training went on after the skip"
    lora = [{step: state["lora"] for step, state in r["steps"].items()} for r in reports]
    assert lora[0] == lora[1]  # (ZeRO partitions the optimizer state, so only the LoRA is compared across ranks)
    assert reports[0]["iteration"] == 2  # no bank update for the skipped step
