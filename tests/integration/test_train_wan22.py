"""svi_train on the tiny Wan 2.2 twins: two-expert training (per-expert ranges, banks, losses, export), one expert
only, a shared LoRA, the SVI 2.0 Pro latent hand-off on A14B and first-frame latent replacement on TI2V-5B."""

import json
import math

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from svi_infer.adapters import load_adapter, lora_modules
from svi_infer.model import build_model
from svi_infer.spec import HIGH_NOISE, LOW_NOISE, get_spec
from svi_train.config import ExpertSettings, register
from svi_train.export import FORMATS, export
from svi_train.recycling import RecyclingConfig, TimestepSampler, expert_grid, grid_anchors, make_banks
from tests.helpers import compose_data, compose_train, train_distributed

register()
A14B = "tiny-wan2.2-i2v-a14b"
TI2V = "tiny-wan2.2-ti2v-5b"
BOUNDARY = 875.0


def _prepare(root, model, *overrides):
    from data_tools.app import run as prepare
    from data_tools.synthetic import make_dataset

    make_dataset(root / "clips", num_clips=4, fps=16, size=(96, 64), seconds=1.5)
    cfg = compose_data(
        [f"input={root / 'clips'}", f"output={root / 'ds'}", "frames_per_clip=9", f"model={model}"]
        + ["progress=false", *overrides]
    )
    prepare(cfg)
    return root / "ds"


@pytest.fixture(scope="module")
def a14b_shards(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("a14b"), "tiny_wan22_i2v_a14b", "buckets=[[48,80]]")


@pytest.fixture(scope="module")
def pro_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pro")
    return _prepare(root, "tiny_wan22_i2v_a14b", "buckets=[[48,80]]", "handoff=latent", "motion_latents=[1]")


@pytest.fixture(scope="module")
def ti2v_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti2v")
    return _prepare(root, "tiny_wan22_ti2v_5b", "buckets=[[64,96]]", "handoff=latent", "motion_latents=[1]")


class Recorder(L.Callback):
    """Per step: the expert trained, the DiT inputs of each transformer, and the LoRA weights after the step."""

    def __init__(self):
        self.steps = []
        self.batches = []
        self.calls = []
        self.handles = []

    def on_train_start(self, trainer, module):
        for transformer in module.model.transformers:
            name = module.spec.experts[module.model.transformers.index(transformer)]

            def hook(mod, args, kwargs, name=name):
                self.calls.append((name, kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))

            self.handles.append(transformer.register_forward_pre_hook(hook, with_kwargs=True))
        self.before = self._weights(module)

    @staticmethod
    def _weights(module):
        return {
            name: {k: p.detach().clone() for k, p in t.named_parameters() if ".lora_" in k}
            for name, t in zip(module.spec.experts, module.model.transformers, strict=True)
        }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append((module.step_expert, self._weights(module), float(outputs["loss"])))
        self.batches.append(batch)

    def on_train_end(self, trainer, module):
        for handle in self.handles:
            handle.remove()


def _train_experts(
    shards, out, *overrides, experiment="wan22_shot", model="tiny_wan22_i2v_a14b", steps=6, callbacks=()
) -> tuple:
    """A short run of a Wan2.2 experiment; the final adapter directory and a :class:`Recorder` of its steps."""
    from svi_train.run import run

    recorder = Recorder()
    cfg = compose_train(
        [f"+experiment={experiment}", f"model={model}", f"data.path={shards}", f"output_dir={out}"]
        + ["lora.rank=4", "lora.alpha=4.0", "recycling.warmup_iters=2", "recycling.capacity=8"]
        + ["trainer.accelerator=cpu", "trainer.devices=1", f"trainer.max_steps={steps}", "logger.kind=csv"]
        + ["trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.shuffle_buffer=0"]
        + ["callbacks.export_every_n_steps=0", "trainer.checkpoint_every_n_steps=100", *overrides]
    )
    return run(cfg, [recorder, *callbacks]), recorder


def _changed(before, after):
    return any(not torch.equal(before[k], after[k]) for k in before)


# -- pure parts -------------------------------------------------------------------------------------------
def test_timesteps_restricted_to_an_expert_range():
    sampler = TimestepSampler("shifted_uniform", shift=5.0)
    high = sampler.in_range((BOUNDARY, 1001.0))
    assert len(high) == 417  # entries of the shift-5 table at or above t = 875
    assert sampler.range_share((BOUNDARY, 1001.0)) == pytest.approx(0.417)
    assert sampler.range_share((0.0, BOUNDARY)) == pytest.approx(0.583)
    g = torch.Generator().manual_seed(0)
    draw = sampler.sample(4000, g, (BOUNDARY, 1001.0))
    assert draw.timestep.min() >= BOUNDARY and draw.timestep.max() <= 1000.0
    assert sampler.weights[high].div(sampler.weights[high].mean()).mean() == pytest.approx(1.0)
    low = sampler.sample(4000, g, (0.0, BOUNDARY))
    assert low.timestep.max() < BOUNDARY
    assert low.weight.float().mean() == pytest.approx(1.0, abs=0.05)  # mean 1 over the range, up to sampling
    logit = TimestepSampler("logit_normal", shift=5.0)
    assert logit.range_share((0.0, 1001.0)) == pytest.approx(1.0)
    assert logit.sample(500, g, (0.0, BOUNDARY)).timestep.max() < BOUNDARY
    with pytest.raises(ValueError, match="no training timestep"):
        sampler.in_range((1000.5, 1001.0))


def test_banks_are_keyed_by_expert_and_grid():
    cfg = RecyclingConfig(num_grids=50, capacity=4)
    noise, x0 = make_banks(cfg, num_experts=2)
    assert noise.num_grids == 100 and x0.num_grids == 100
    assert expert_grid(7, 0, 50) == 7 and expert_grid(7, 1, 50) == 57
    with pytest.raises(ValueError):
        expert_grid(50, 0, 50)
    g = torch.Generator().manual_seed(0)
    x0.add(torch.ones(2, 3), expert_grid(7, 0, 50), g)
    assert x0.sample(expert_grid(7, 0, 50), g) is not None
    assert x0.sample(expert_grid(7, 1, 50), g) is None  # the low-noise expert never replays the high one's errors
    assert x0.sample_any(g) is not None  # conditioning errors: any grid of any expert
    one, _ = make_banks(cfg)
    assert one.num_grids == 50


def test_expert_settings_are_checked():
    assert ExpertSettings().trained((HIGH_NOISE, LOW_NOISE)) == (HIGH_NOISE, LOW_NOISE)
    assert ExpertSettings(train=LOW_NOISE).trained((HIGH_NOISE, LOW_NOISE)) == (LOW_NOISE,)
    assert ExpertSettings().trained(("main",)) == ("main",)
    with pytest.raises(ValueError, match="one transformer"):
        ExpertSettings(train=HIGH_NOISE).trained(("main",))
    with pytest.raises(ValueError, match="experts.train=all"):
        ExpertSettings(train=HIGH_NOISE, shared_lora=True)
    with pytest.raises(ValueError, match="experts.train must be"):
        ExpertSettings(train="both")
    with pytest.raises(ValueError, match="high_noise_share"):
        ExpertSettings(high_noise_share=1.5)


# -- two experts --------------------------------------------------------------------------------------------
def test_two_expert_training_changes_each_lora_only_on_its_range(a14b_shards, tmp_path):
    adapter, rec = _train_experts(a14b_shards, tmp_path / "run", steps=8)
    experts = [s[0] for s in rec.steps]
    assert set(experts) == {HIGH_NOISE, LOW_NOISE}, experts  # the seed draws both within 8 steps
    before = rec.before
    for expert, after, _ in rec.steps:
        other = LOW_NOISE if expert == HIGH_NOISE else HIGH_NOISE
        assert _changed(before[expert], after[expert]), f"{expert} did not train on its step"
        assert not _changed(before[other], after[other]), f"{other} changed on a {expert} step"
        before = after
    for name, _, timestep in rec.calls:  # every forward ran the expert of its timestep range
        assert (timestep >= BOUNDARY).all() if name == HIGH_NOISE else (timestep < BOUNDARY).all()
    header = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss_high_noise" in header and "train/loss_low_noise" in header
    # one adapter per expert, svi.json naming it
    assert sorted(p.name for p in adapter.iterdir()) == [HIGH_NOISE, LOW_NOISE]
    for expert in (HIGH_NOISE, LOW_NOISE):
        assert json.loads((adapter / expert / "svi.json").read_text())["expert"] == expert
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    banks = ckpt["svi_recycling"]["banks"]["x0"]["errors"]
    assert len(banks) == 100  # 50 grids per expert
    filled_high = [g for g in range(50) if banks[g]]
    filled_low = [g - 50 for g in range(50, 100) if banks[g]]
    assert filled_high and filled_low
    grid_t = grid_anchors(50, 5.0)  # a grid's anchor lies near its expert's range (nearest anchor to t)
    assert min(grid_t[g] for g in filled_high) > 850 and max(grid_t[g] for g in filled_low) < 900


def test_one_expert_only_and_resume(a14b_shards, tmp_path):
    adapter, rec = _train_experts(a14b_shards, tmp_path / "run", "experts.train=low_noise", steps=4)
    assert {s[0] for s in rec.steps} == {LOW_NOISE}
    assert all(t.max() < BOUNDARY for name, _, t in rec.calls) and {c[0] for c in rec.calls} == {LOW_NOISE}
    assert sorted(p.name for p in adapter.iterdir()) == [LOW_NOISE]
    model = build_model(get_spec(A14B))
    load_adapter(model, adapter / LOW_NOISE)
    assert not lora_modules(model.transformers[0]) and lora_modules(model.transformers[1])
    # a resumed two-expert run draws the same experts and ends with the same weights
    _, straight = _train_experts(a14b_shards, tmp_path / "straight", steps=6)
    _train_experts(a14b_shards, tmp_path / "first", steps=3, experiment="wan22_shot")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _, resumed = _train_experts(a14b_shards, tmp_path / "second", f"resume={last}", steps=6)
    assert [s[0] for s in resumed.steps] == [s[0] for s in straight.steps[3:]]
    final_a, final_b = straight.steps[-1][1], resumed.steps[-1][1]
    for expert in (HIGH_NOISE, LOW_NOISE):
        assert all(torch.equal(final_a[expert][k], final_b[expert][k]) for k in final_a[expert])


def test_shared_lora_is_one_set_of_weights(a14b_shards, tmp_path):
    adapter, rec = _train_experts(
        a14b_shards, tmp_path / "run", "experts.shared_lora=true", "callbacks.preview_every_n_steps=4", steps=4
    )
    assert (tmp_path / "run" / "previews" / "step_000004.mp4").is_file()  # a rollout through both experts
    final = rec.steps[-1][1]
    assert all(torch.equal(final[HIGH_NOISE][k], final[LOW_NOISE][k]) for k in final[HIGH_NOISE])
    assert _changed(rec.before[HIGH_NOISE], final[HIGH_NOISE])
    meta = json.loads((adapter / "svi.json").read_text())
    assert meta["expert"] is None and meta["provenance"]["experts"]["shared_lora"] is True
    model = build_model(get_spec(A14B))
    load_adapter(model, adapter)  # no expert: into both
    assert lora_modules(model.transformers[0]) == lora_modules(model.transformers[1]) != []


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_export_round_trips(a14b_shards, tmp_path_factory, fmt):
    root = tmp_path_factory.getbasetemp() / "split_run"
    if not (root / "adapters" / "final").is_dir():
        _train_experts(a14b_shards, root, steps=8)
    trained = root / "adapters" / "final"
    for source in (trained, root / "checkpoints" / "last.ckpt"):
        out = tmp_path_factory.mktemp("export") / ("svi_lora.safetensors" if fmt == "comfyui" else "exported")
        paths = export(source, fmt, out)
        if fmt == "comfyui":
            assert [p.name for p in paths] == ["svi_lora_high_noise.safetensors", "svi_lora_low_noise.safetensors"]
        else:
            assert paths == [out / HIGH_NOISE, out / LOW_NOISE]
        for expert, path in zip((HIGH_NOISE, LOW_NOISE), paths, strict=True):
            index = (HIGH_NOISE, LOW_NOISE).index(expert)
            reference = build_model(get_spec(A14B))
            load_adapter(reference, trained / expert)
            model = build_model(get_spec(A14B))
            load_adapter(model, path, expert=expert)
            assert lora_modules(model.transformers[1 - index]) == []  # the other expert got nothing
            want = dict(reference.transformers[index].named_parameters())
            for name, param in model.transformers[index].named_parameters():
                if ".lora_" in name:
                    key = name.replace(f".{_adapter_name(model, index)}.", f".{_adapter_name(reference, index)}.")
                    assert torch.equal(param, want[key]), name
        if fmt == "comfyui":
            assert all(k.startswith("diffusion_model.blocks.") for k in load_file(str(paths[0])))


def _adapter_name(model, index):
    return next(iter(model.transformers[index].peft_config))


# -- Pro and TI2V-5B -----------------------------------------------------------------------------------------
def test_pro_training_conditions_on_anchor_and_motion_latents(pro_shards, tmp_path):
    overrides = ("recycling.p_cond=0.0", "data.p_more_motion=0.5")
    _, rec = _train_experts(pro_shards, tmp_path / "run", *overrides, experiment="wan22_pro", steps=6)
    header = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/motion_latents" in header
    seen = set()
    for (_, hidden, _), batch in zip(rec.calls, rec.batches, strict=True):
        y = hidden[:, 16:]  # [mask 4 | held latents, zeros]
        assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and not y[:, :4, 1:].any()
        assert not y[:, 4:, 2:].any()  # one motion latent at most: literal zeros after it
        if y[:, 4:, 1].any():  # a later-clip sample: the anchor latent, then the motion latent
            assert torch.equal(y[:, 4:, :1], batch["anchor"].float())
            assert torch.equal(y[:, 4:, 1:2], batch["motion"][1].float())
            seen.add(1)
        else:  # a clip-0 sample: the window's first latent is the anchor
            assert torch.equal(y[:, 4:, :1], batch["latents"][:, :, :1].float())
            seen.add(0)
    assert seen == {0, 1}, seen  # both kinds within 6 steps for this seed
    assert all(math.isfinite(s[2]) for s in rec.steps)


def test_ti2v_training_replaces_the_first_frames_at_timestep_zero(ti2v_shards, tmp_path):
    _, rec = _train_experts(
        ti2v_shards,
        tmp_path / "run",
        "recycling.p_cond=0.0",
        "recycling.p_latent=0.0",
        experiment="wan22_5b",
        model="tiny_wan22_ti2v_5b",
        steps=4,
    )
    spec = get_spec(TI2V)
    for (_, hidden, timestep), batch in zip(rec.calls, rec.batches, strict=True):
        assert hidden.shape[1] == 48  # no y channels
        t, h, w = hidden.shape[-3:]
        per_frame = timestep.view(hidden.shape[0], t, -1)
        assert per_frame.shape[-1] == (h // spec.patch_size[1]) * (w // spec.patch_size[2])
        held = int((per_frame[0, :, 0] == 0).sum())
        assert held in (1, 2) and (per_frame[:, :held] == 0).all() and (per_frame[:, held:] > 0).all()
        if held == 1:  # a clip-0 sample: the window's own first latent
            assert torch.equal(hidden[:, :, :1], batch["latents"][:, :, :1].float())
        else:  # the anchor latent, then the motion latent (no conditioning error drawn)
            assert torch.equal(hidden[:, :, :1], batch["anchor"].float())
            assert torch.equal(hidden[:, :, 1:2], batch["motion"][1].float())
        assert not torch.equal(hidden[:, :, held:], batch["latents"][:, :, held:].float())  # noised


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_z3"])
def test_two_ranks_train_both_experts(a14b_shards, tmp_path, strategy):
    """Each step trains one expert on every rank (the same one): DDP must accept the idle expert's LoRA, ZeRO-3
    must gather only the running expert's shards."""
    reports = train_distributed(strategy, a14b_shards, tmp_path, False, "model=tiny_wan22_i2v_a14b", steps=4)
    assert reports[0]["lora"] == reports[1]["lora"] and all(reports[0]["lora_changed"].values())
    final = tmp_path / "run" / "adapters" / "final"
    for expert in (HIGH_NOISE, LOW_NOISE):
        weights = load_file(str(final / expert / "adapter_model.safetensors"))
        assert weights and all(".lora_" in k for k in weights)


@pytest.mark.gpu
def test_offload_idle_keeps_the_other_expert_on_the_cpu(a14b_shards, tmp_path):
    devices = []

    class Where(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            modules = module.expert_modules()
            devices.append({name: next(m.parameters()).device.type for name, m in modules.items()})

    _, rec = _train_experts(
        a14b_shards,
        tmp_path / "run",
        "experts.offload_idle=true",
        "trainer.accelerator=gpu",
        steps=6,
        callbacks=[Where()],
    )
    for (expert, _, _), where in zip(rec.steps, devices, strict=True):
        other = LOW_NOISE if expert == HIGH_NOISE else HIGH_NOISE
        assert where == {expert: "cuda", other: "cpu"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=tiny_wan22_ti2v_5b", "variant.handoff=pixel"], "variant.handoff=latent"),
        (["+experiment=wan22_shot", "model=tiny_wan22_i2v_a14b", "variant.handoff=latent"], "handoff=pixel"),
        (
            ["+experiment=wan22_shot", "model=tiny_wan22_i2v_a14b", "+variant.conditioning=audio"],
            "made for Wan 2.1 I2V",
        ),
        (["+experiment=wan22_shot", "model=tiny_wan22_i2v_a14b", "experts.offload_idle=true"], "one device"),
        (["+experiment=tiny", "experts.train=high_noise"], "one transformer"),
    ],
)
def test_wan22_settings_that_cannot_work_are_refused(a14b_shards, tmp_path, overrides, message):
    from svi_train.run import run

    cfg = compose_train([f"data.path={a14b_shards}", f"output_dir={tmp_path}", "trainer.accelerator=cpu", *overrides])
    with pytest.raises(ValueError, match=message):
        run(cfg)
