"""svi_train for SVI-Talk (audio) and SVI-Dance (pose) on the tiny model: configs, dropout draws, smoke fits,
exported adapters that svi_infer loads with their pose encoder, exact resume."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file, save_file

import svi_train.run as run_module
from svi_infer.adapters import load_adapter, lora_modules
from svi_infer.model import build_model
from svi_infer.pose import POSE_KEY, PoseEncoder, attach_pose, find_pose_encoder, pose_state_dict, set_pose
from svi_infer.spec import get_spec
from svi_infer.talk import audio_windows, get_talk, multitalk_state_dict, set_audio
from svi_infer.tiny import tiny_transformer
from svi_infer.variants import make_conditioning
from svi_infer.variants.base import Dropped
from svi_infer.variants.dance import PoseKeep, build_pose
from svi_infer.variants.talk import attach_talk_modules
from svi_infer.variants.talk import batch_audio_windows as talk_windows
from svi_train.config import ConditioningSettings, LoraSettings, OptimSettings, register
from svi_train.export import FORMATS, export
from svi_train.recycling import Errors, RecyclingConfig, record
from tests.helpers import (
    REPO,
    TINY21,
    assert_same_outputs,
    clean_env,
    compose_data,
    compose_train,
    dit_inputs,
    log_tail,
    run_logged,
)

register()
STEPS = 4
TINY = [
    "model=tiny_wan21_i2v",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "logger.kind=csv",
    "lora.rank=4",
    "lora.alpha=4.0",
    "recycling.warmup_iters=2",
    "recycling.capacity=8",
    "data.shuffle_buffer=0",
]


def _config(experiment: str, shards: Path, out: Path, *overrides: str):
    return compose_train(
        [f"+experiment={experiment}", *TINY, f"data.path={shards}", f"output_dir={out}"]
        + [f"trainer.max_steps={STEPS}", *overrides]
    )


class _Record(L.Callback):
    """Keeps the losses, the DiT's inputs of every step and the trained module."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.inputs: list[dict] = []
        self.module = None

    def on_train_start(self, trainer, module) -> None:
        self.module = module
        pose = find_pose_encoder(module.transformer)
        self.initial_pose = pose_state_dict(pose) if pose is not None else None

        def keep(dit, args, kwargs) -> None:
            talk, pose = get_talk(dit), find_pose_encoder(dit)
            self.inputs.append(
                {
                    "y": kwargs["hidden_states"][:, 16:].detach().clone(),
                    "image": kwargs["encoder_hidden_states_image"].detach().clone(),
                    "audio": None if talk is None or talk.audio is None else [w.clone() for w in talk.audio],
                    "pose": None if pose is None or pose._pose is None else pose._pose.clone(),
                    "pose_keep": getattr(module.conditioning, "keep", None) and module.conditioning.keep.keep,
                }
            )

        module.transformer.register_forward_pre_hook(keep, with_kwargs=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(experiment: str, shards: Path, out: Path, *overrides: str) -> tuple[Path, _Record]:
    record = _Record()
    return run_module.run(_config(experiment, shards, out, *overrides), [record]), record


def _prepare(root: Path, kind: str) -> Path:
    """Tiny 25 fps shards whose samples all have audio (Talk) or a pose video (Dance): 2 windows of 9 frames."""
    from data_tools.app import run as prepare
    from data_tools.synthetic import make_dataset

    if not (root / "clips").is_dir():
        make_dataset(root / "clips", num_clips=4, fps=25, size=(96, 64), seconds=0.8)
    cfg = compose_data(
        [f"input={root / 'clips'}", f"output={root / kind}", "frames_per_clip=9", "buckets=[[48,80]]"]
        + ["fps=25", f"{kind}=true", "max_skip_ratio=1.0", "progress=false"]
    )
    prepare(cfg)
    return root / kind


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("variant_data")


@pytest.fixture(scope="module")
def talk_shards(data_root):
    return _prepare(data_root, "audio")


@pytest.fixture(scope="module")
def dance_shards(data_root):
    return _prepare(data_root, "pose")


@pytest.fixture(scope="module")
def dance_run(dance_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dance_run")
    adapter, record = _fit("dance", dance_shards, out)
    return adapter, record, out


def _lora_b(adapter: Path) -> dict:
    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if ".lora_B." in k}


def _talk_model():
    """A tiny model with svi_infer's MultiTalk modules (for a tiny model: random, the same in every process)."""
    model = build_model(get_spec(TINY21))
    attach_talk_modules(model)
    return model


def _pose_inputs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, 9, 48, 80), generator=g, dtype=torch.uint8)


def _out(transformer) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**dit_inputs())[0]


# -- configs ------------------------------------------------------------------------------------------------------


def test_cli_composes_talk_and_dance_with_the_tiny_and_the_real_model():
    runs = {
        (experiment, model): subprocess.Popen(
            [sys.executable, "-m", "svi_train", f"+experiment={experiment}", f"model={model}", "--cfg", "job"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for experiment in ("talk", "dance")
        for model in ("tiny_wan21_i2v", "wan21_i2v_14b_480p")
    }
    for (experiment, _model), proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        if experiment == "talk":
            assert "conditioning: audio" in out and "audio_dropout: 0.1" in out and "cfg_scale_audio: 5.0" in out
            assert "multitalk: null" in out
        else:
            assert "conditioning: pose" in out and "pose_dropout: 0.05" in out
            assert "pose_extra_dropout: 0.1" in out and "image_dropout: 0.1" in out and "cond_error_frames: 1" in out
        assert "fps: 25" in out


def test_conditioning_schema_defaults_typos_and_ranges(talk_shards, tmp_path):
    cfg = compose_train([])
    assert dict(cfg.conditioning) == {
        "audio_dropout": 0.0,
        "pose_dropout": 0.0,
        "pose_extra_dropout": 0.0,
        "image_dropout": 0.0,
        "pose_encoder": None,
    }
    with pytest.raises(ConfigCompositionException):
        compose_train(["conditioning.audio_drop=0.1"])
    with pytest.raises(ConfigCompositionException):
        compose_train(["conditioning.pose_dropout=often"])
    with pytest.raises(ValueError, match=r"conditioning.audio_dropout must be a probability in \[0, 1\], got 1.5"):
        run_module.run(_config("talk", talk_shards, tmp_path, "conditioning.audio_dropout=1.5"))
    with pytest.raises(ValueError, match="conditioning.image_dropout"):
        ConditioningSettings(image_dropout=-0.1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["variant.conditioning=speech"], "variant.conditioning must be one of"),
        (["variant.fps=16"], r"variant.fps=16, but the shards.* were prepared at 25.0 fps"),
        (["callbacks.preview_every_n_steps=2"], "rollout previews do not feed audio"),
        (["model=wan21_i2v_14b_480p", "model.path=/nonexistent"], "needs model.multitalk="),
    ],
)
def test_talk_settings_are_checked_before_the_model_is_built(talk_shards, tmp_path, overrides, message):
    cfg = _config("talk", talk_shards, tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        run_module.run(cfg)


@pytest.mark.parametrize(("experiment", "fix"), [("talk", "audio=true"), ("dance", "pose=true")])
def test_shards_without_the_conditioning_name_the_fix(shards, tmp_path, experiment, fix):
    cfg = _config(experiment, shards, tmp_path, "variant.fps=16", "data.motion_frames=[1]")
    with pytest.raises(ValueError, match=f"prepare the shards with `python -m data_tools prepare {fix}"):
        run_module.run(cfg)


# -- dropout draws ------------------------------------------------------------------------------------------------


def draw_dropout(conditioning: str | None, settings: ConditioningSettings, g: torch.Generator) -> Dropped:
    """One sample's dropout, drawn by the conditioning strategy ``conditioning`` (None: text) built from
    ``settings``, as training builds it."""
    return make_conditioning(conditioning or "text", **asdict(settings)).draw_dropout(g)


def test_text_only_draws_nothing():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert draw_dropout(None, ConditioningSettings(audio_dropout=1.0, pose_dropout=1.0), g) == Dropped()
    assert torch.equal(g.get_state(), state)


def test_audio_dropout_is_one_draw_per_sample():
    settings = ConditioningSettings(audio_dropout=0.3)
    g, twin = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    drops = [draw_dropout("audio", settings, g) for _ in range(400)]
    expected = torch.rand(400, generator=twin, dtype=torch.float64) < 0.3
    assert [d.audio for d in drops] == expected.tolist()
    assert not any(d.pose or d.image for d in drops)
    assert 0.2 < sum(d.audio for d in drops) / 400 < 0.4
    # probability 0 still draws: changing it never shifts the later draws
    g0 = torch.Generator().manual_seed(11)
    [draw_dropout("audio", ConditioningSettings(), g0) for _ in range(400)]
    assert torch.equal(g0.get_state(), g.get_state())


def test_pose_dropout_is_three_independent_draws_as_the_reference():
    """SVI's train_svi_dance.py: pose off if u1 < 0.05 or u2 < 0.1; y and CLIP off if u3 < 0.1, independently."""
    settings = ConditioningSettings(pose_dropout=0.05, pose_extra_dropout=0.1, image_dropout=0.1)
    n = 20_000
    g, twin = torch.Generator().manual_seed(12), torch.Generator().manual_seed(12)
    drops = [draw_dropout("pose", settings, g) for _ in range(n)]
    u = torch.rand(n, 3, generator=twin, dtype=torch.float64)
    pose = ((u[:, 0] < 0.05) | (u[:, 1] < 0.1)).tolist()
    image = (u[:, 2] < 0.1).tolist()
    assert [d.pose for d in drops] == pose and [d.image for d in drops] == image
    assert not any(d.audio for d in drops)
    # the joint frequencies: pose only 0.145 * 0.9, image only 0.855 * 0.1, both 0.145 * 0.1 = 0.0145
    joint = {(p, i): sum(d.pose == p and d.image == i for d in drops) / n for p in (True, False) for i in (True, False)}
    for (p, i), expected in {(True, False): 0.1305, (False, True): 0.0855, (True, True): 0.0145}.items():
        assert abs(joint[p, i] - expected) < 4 * (expected * (1 - expected) / n) ** 0.5, (p, i, joint[p, i])
    assert draw_dropout("pose", ConditioningSettings(image_dropout=1.0), g) == Dropped(pose=False, image=True)
    assert draw_dropout("pose", ConditioningSettings(pose_extra_dropout=1.0), g) == Dropped(pose=True, image=False)


def test_audio_windows_of_dropped_samples_are_zero():
    from svi_infer.talk import TalkConfig

    config = TalkConfig.tiny(tiny_transformer(get_spec(TINY21)))
    audio = torch.randn(2, 9, 2, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    windows = talk_windows(audio, [Dropped(audio=True), Dropped()], config, 9)
    kept = audio_windows(audio[1].float())
    assert windows.first.shape == (2, 1, 5, 2, 16) and windows.later.shape == (2, 2, 8, 2, 16)
    assert not windows.first[0].any() and not windows.later[0].any()
    assert torch.equal(windows.first[1], kept.first) and torch.equal(windows.later[1], kept.later)


def test_training_reads_the_audio_context_exactly_as_generation():
    """Shards keep 2 frames of the track either side of the clip; training's windows of a clip then equal what
    generation reads from the whole track for those frames, at the clip's edges too (the reference's ±2 frames)."""
    from svi_infer.talk import AUDIO_CONTEXT, TalkConfig
    from svi_infer.variants.talk import clip_audio_windows

    config = TalkConfig.tiny(tiny_transformer(get_spec(TINY21)))
    track = torch.randn(40, 2, 16, generator=torch.Generator().manual_seed(1))
    frames, clip, overlap = 9, 2, 1
    start = clip * (frames - overlap)  # output frames 16..24
    shard = track[start - AUDIO_CONTEXT : start + frames + AUDIO_CONTEXT]  # what data_tools stores
    trained = talk_windows(shard[None], [Dropped()], config, frames, AUDIO_CONTEXT)
    generated = clip_audio_windows(track, clip, frames, overlap, config.window, config.vae_scale)
    assert torch.equal(trained.first[0], generated.first) and torch.equal(trained.later[0], generated.later)
    clamped = talk_windows(shard[None, AUDIO_CONTEXT:-AUDIO_CONTEXT], [Dropped()], config, frames)  # old shards
    assert not torch.equal(clamped.first[0], generated.first)  # clamped inside the clip: the edges differ


@pytest.mark.numerics
def test_pose_dropout_in_a_mixed_batch_zeroes_only_the_dropped_samples_encoded_pose():
    dit = tiny_transformer(get_spec(TINY21))
    plain = _out(dit)
    encoder = attach_pose(dit, PoseEncoder(24))
    keep = PoseKeep(encoder)
    pose = _pose_inputs()
    set_pose(dit, pose)
    keep.set([Dropped(), Dropped()])
    assert keep.keep is None
    with_pose = _out(dit)
    batch = {
        k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and k != "timestep" else v for k, v in dit_inputs().items()
    }
    batch["timestep"] = torch.cat([batch["timestep"]] * 2)
    set_pose(dit, torch.cat([pose, pose]))
    keep.set([Dropped(pose=True), Dropped()])
    with torch.no_grad():
        mixed = dit(**batch)[0]
    assert_same_outputs(mixed[0], plain[0])
    assert_same_outputs(mixed[1], with_pose[0])
    # every sample dropped: still encoded (DDP needs every trainable parameter in every step), output exactly plain
    keep.set([Dropped(pose=True, image=True)])
    set_pose(dit, pose)
    calls = []
    encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    dit.train()
    out = dit(**dit_inputs())[0]
    out.square().mean().backward()
    assert calls and torch.equal(out.detach(), plain)
    assert all(p.grad is not None and not p.grad.any() for p in encoder.parameters())


def test_image_dropout_zeroes_y_and_injects_no_y_error():
    from svi_train.module import SVILitModule

    recycling = RecyclingConfig(p_cond=1.0, p_clean=0.0, p_latent=0.0, capacity=4)
    module = SVILitModule(get_spec(TINY21), None, LoraSettings(rank=2, alpha=2.0), recycling, OptimSettings(), seed=0)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(16, 3, 6, 10, generator=g), torch.randn(20, 3, 6, 10, generator=g)
    error = torch.ones(16, 3, 6, 10)
    record(Errors(noise=error, x0=error), 0, module.noise_errors, module.x0_errors, g)
    _, y_kept, _, flags = module._recycled_inputs(x0, y, torch.tensor(0.5), 0)
    assert flags.cond and not torch.equal(y_kept, y)  # the y error lands when y is kept
    _, y_dropped, _, flags = module._recycled_inputs(x0, y, torch.tensor(0.5), 0, drop_y=True)
    assert not flags.cond and not y_dropped.any()


# -- Talk ---------------------------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_talk_smoke_fit(talk_shards, tmp_path):
    adapter, record = _fit("talk", talk_shards, tmp_path / "run", "trainer.log_every_n_steps=1")
    module = record.module
    assert len(record.losses) == STEPS and all(math.isfinite(x) for x in record.losses)
    assert all(b.abs().sum() > 0 for b in _lora_b(adapter).values())  # the LoRA moved off its zero init
    # the MultiTalk modules: frozen, unchanged, no LoRA on them, not in the optimizer or the checkpoint
    fresh = _talk_model().transformers[0]
    trained_audio = multitalk_state_dict(module.transformer)
    assert trained_audio.keys() == multitalk_state_dict(fresh).keys()
    assert all(torch.equal(v, multitalk_state_dict(fresh)[k]) for k, v in trained_audio.items())
    names = [n for n, _ in module.transformer.named_parameters()]
    assert not any("lora_" in n for n in names if "audio" in n or "norm_x" in n)
    assert not any(p.requires_grad for n, p in module.transformer.named_parameters() if "audio" in n)
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in get_talk(module.transformer).audio_proj.parameters()}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    # every step fed per-sample audio windows of the batch
    assert all(step["audio"] is not None and step["audio"][0].shape == (1, 1, 5, 2, 16) for step in record.inputs)
    # the exported adapter: svi.json says Talk, and svi_infer reproduces the trained DiT with the same audio
    meta = load_adapter(model := build_model(get_spec(TINY21)), adapter)
    assert meta.defaults["conditioning"] == "audio" and meta.defaults["cfg_scale_audio"] == 5.0
    assert meta.defaults["fps"] == 25 and len(lora_modules(model.transformers[0])) == 20
    attach_talk_modules(model)  # as svi_infer does for a tiny model: the same random audio modules
    windows = audio_windows(torch.randn(9, 2, 16, generator=torch.Generator().manual_seed(1)))
    module.transformer.eval()
    for dit in (model.transformers[0], module.transformer):
        set_audio(dit, windows)
    with_audio = _out(model.transformers[0])
    assert_same_outputs(with_audio, _out(module.transformer))
    set_audio(model.transformers[0], None)
    assert not torch.allclose(with_audio, _out(model.transformers[0]))  # the audio path is live


def test_talk_loads_multitalk_weights_and_drops_audio(talk_shards, tmp_path):
    donor = _talk_model().transformers[0]
    weights = {k: v + 0.5 for k, v in multitalk_state_dict(donor).items()}
    save_file(weights, str(tmp_path / "multitalk.safetensors"))
    _, record = _fit(
        "talk",
        talk_shards,
        tmp_path / "run",
        f"model.multitalk={tmp_path / 'multitalk.safetensors'}",
        "conditioning.audio_dropout=1.0",
        "trainer.max_steps=2",
    )
    trained = multitalk_state_dict(record.module.transformer)
    assert all(torch.equal(trained[k], v) for k, v in weights.items())
    assert all(not step["audio"][0].any() and not step["audio"][1].any() for step in record.inputs)


# -- Dance --------------------------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_dance_smoke_fit(dance_run, tmp_path):
    adapter, record, out = dance_run
    module = record.module
    assert len(record.losses) == STEPS and all(math.isfinite(x) for x in record.losses)
    initial = tiny_transformer(get_spec(TINY21))
    build_pose(initial, None, seed=0)
    trained = pose_state_dict(module.transformer)
    assert all(not torch.equal(v, pose_state_dict(initial)[k]) for k, v in trained.items() if ".weight" in k)
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in find_pose_encoder(module.transformer).parameters()} <= optimized
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert {k for k in ckpt["state_dict"] if POSE_KEY in k} == {f"transformer.{k}" for k in trained}
    poses = [step["pose"] for step in record.inputs]
    assert all(p.dtype == torch.uint8 and p.shape == (1, 3, 9, 48, 80) for p in poses)
    # the exported adapter holds the pose encoder in its own file beside the LoRA; loading it attaches an identical one
    file = load_file(str(adapter / "pose_encoder.safetensors"))
    assert file.keys() == trained.keys() and all(torch.equal(file[k], v) for k, v in trained.items())
    assert not any(POSE_KEY in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    model = build_model(get_spec(TINY21))
    meta = load_adapter(model, adapter)
    assert meta.defaults["conditioning"] == "pose"
    loaded = find_pose_encoder(model.transformers[0])
    assert isinstance(loaded, PoseEncoder) and loaded.dim == 24
    assert all(torch.equal(v, trained[k]) for k, v in pose_state_dict(loaded).items())
    module.transformer.eval()
    module.conditioning.keep.keep = None
    for dit in (model.transformers[0], module.transformer):
        set_pose(dit, _pose_inputs())
    assert_same_outputs(_out(model.transformers[0]), _out(module.transformer))


def test_dance_starts_from_given_pose_encoder_weights(dance_shards, tmp_path):
    torch.manual_seed(9)
    weights = {f"pipe.dit.{k}": v for k, v in pose_state_dict(PoseEncoder(24)).items()}  # as UniAnimate-DiT ships
    save_file(weights, str(tmp_path / "unianimate.safetensors"))
    _, record = _fit(
        "dance", dance_shards, tmp_path / "run", f"conditioning.pose_encoder={tmp_path / 'unianimate.safetensors'}"
    )
    assert all(torch.equal(record.initial_pose[k.removeprefix("pipe.dit.")], v) for k, v in weights.items())
    with pytest.raises(FileNotFoundError, match="conditioning.pose_encoder"):
        run_module.run(_config("dance", dance_shards, tmp_path / "x", "conditioning.pose_encoder=/nonexistent"))


@pytest.mark.numerics
@pytest.mark.parametrize("fmt", FORMATS)
def test_dance_exports_carry_the_pose_encoder(dance_run, tmp_path, fmt):
    adapter, _record, out = dance_run
    reference = build_model(get_spec(TINY21))
    load_adapter(reference, adapter)
    set_pose(reference.transformers[0], _pose_inputs())
    for source in (adapter, out / "checkpoints" / "last.ckpt"):
        (dest,) = export(source, fmt, tmp_path / source.stem / ("lora.safetensors" if fmt == "comfyui" else "exported"))
        model = build_model(get_spec(TINY21))
        load_adapter(model, dest)
        encoder = find_pose_encoder(model.transformers[0])
        assert all(
            torch.equal(v, pose_state_dict(reference.transformers[0])[k]) for k, v in pose_state_dict(encoder).items()
        )
        set_pose(model.transformers[0], _pose_inputs())
        assert_same_outputs(_out(model.transformers[0]), _out(reference.transformers[0]))


def test_image_and_pose_dropout_in_the_step(dance_shards, tmp_path):
    _, record = _fit(
        "dance",
        dance_shards,
        tmp_path / "drop",
        "conditioning.image_dropout=1.0",
        "conditioning.pose_dropout=0.0",
        "conditioning.pose_extra_dropout=0.0",
        "trainer.max_steps=2",
    )
    assert all(not s["y"].any() and not s["image"].any() for s in record.inputs)
    assert all(s["pose"] is not None and s["pose_keep"] is None for s in record.inputs)  # pose + text, no image
    _, record = _fit(
        "dance", dance_shards, tmp_path / "nopose", "conditioning.pose_extra_dropout=1.0", "trainer.max_steps=2"
    )
    assert all(s["pose"] is not None and not s["pose_keep"].any() for s in record.inputs)  # the pose is zeroed
    _, record = _fit(
        "dance",
        dance_shards,
        tmp_path / "keep",
        "conditioning.pose_dropout=0.0",
        "conditioning.pose_extra_dropout=0.0",
        "conditioning.image_dropout=0.0",
        "trainer.max_steps=2",
    )
    assert len(record.inputs) == 2
    assert all(s["y"].any() and s["image"].any() and s["pose"] is not None for s in record.inputs)
    assert all(s["pose_keep"] is None for s in record.inputs)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["talk", "dance"])
def test_resume_is_exact(talk_shards, dance_shards, tmp_path, experiment):
    shards = talk_shards if experiment == "talk" else dance_shards
    straight, _ = _fit(experiment, shards, tmp_path / "straight", "trainer.checkpoint_every_n_steps=2")
    ckpt = tmp_path / "straight" / "checkpoints" / "step000000002.ckpt"
    assert ckpt.is_file()
    resumed, _ = _fit(experiment, shards, tmp_path / "resumed", f"resume={ckpt}", "trainer.checkpoint_every_n_steps=2")
    for name in ("adapter_model.safetensors", "pose_encoder.safetensors"):  # the pose encoder: Dance only
        assert (
            (straight / name).is_file()
            == (resumed / name).is_file()
            == (name.startswith("adapter") or experiment == "dance")
        )
        if (straight / name).is_file():
            a, b = load_file(str(straight / name)), load_file(str(resumed / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- two ranks: the pose encoder is trained in sync and gathered like the LoRA under ZeRO-3 and FSDP ---------------

TWO_RANKS = """
import os, sys
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, sys.argv[4])
import lightning as L
from hydra import compose, initialize_config_module
from safetensors.torch import save_file
import svi_train.run as run_module
from svi_train.config import register
from svi_train.strategies import lora_state_dict

strategy, shards, out, _repo, experiment = sys.argv[1:6]


class Dump(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        print(f"rank {trainer.global_rank} step {trainer.global_step}", flush=True)  # the test's sign of progress

    def on_train_end(self, trainer, module):
        weights = lora_state_dict(trainer.strategy, module.transformer, module.ADAPTER)  # a collective
        save_file({k: v.contiguous() for k, v in weights.items()}, f"{out}/rank{trainer.global_rank}.safetensors")


register()
with initialize_config_module("conf", version_base="1.3"):
    cfg = compose("train", overrides=[
        f"+experiment={experiment}", "model=tiny_wan21_i2v", f"trainer={strategy}", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.max_steps=3", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "logger.kind=none", "lora.rank=4", "lora.alpha=4.0", "recycling.warmup_iters=3", "recycling.capacity=8",
        f"data.path={shards}", "data.resampled=true", "data.shuffle_buffer=0", f"output_dir={out}/run",
        "conditioning.image_dropout=0.5",
    ])
original = L.Trainer


def trainer(**kwargs):
    if strategy == "deepspeed_z3":  # partition even the tiny weights
        kwargs["strategy"].config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return original(**{**kwargs, "callbacks": [*kwargs["callbacks"], Dump()]})


run_module.L.Trainer = trainer
run_module.run(cfg)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("experiment", "strategy"),
    [("dance", "ddp"), ("dance", "deepspeed_z3"), ("dance", "fsdp"), ("talk", "deepspeed_z3"), ("talk", "fsdp")],
)
def test_two_ranks(talk_shards, dance_shards, tmp_path, experiment, strategy):
    """Two CPU ranks over gloo; Lightning re-executes the script for rank 1, so it runs from a file."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS, encoding="utf-8")
    shards = dance_shards if experiment == "dance" else talk_shards
    log = tmp_path / "two_ranks.log"
    cmd = [sys.executable, str(script), strategy, str(shards), str(tmp_path), str(REPO), experiment]
    rc = run_logged(cmd, log, env=clean_env(), cwd=REPO)
    assert rc == 0, log_tail(log)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), "the ranks differ"
    pose = {k: v for k, v in r0.items() if k.startswith(POSE_KEY)}
    assert len(r0) - len(pose) == 40 and len(pose) == (14 if experiment == "dance" else 0)
    if pose:  # gathered whole, not a rank's shard
        assert r0["dwpose_embedding.12.weight"].shape == (24, 16, 1, 2, 2)
    final = tmp_path / "run" / "adapters" / "final"
    exported = load_file(str(final / "adapter_model.safetensors"))
    if pose:  # the pose encoder is written beside the LoRA
        exported |= load_file(str(final / "pose_encoder.safetensors"))
    assert exported.keys() == r0.keys() and all(torch.equal(exported[k], r0[k]) for k in r0)
