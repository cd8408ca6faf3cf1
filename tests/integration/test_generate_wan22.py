"""Wan 2.2 long-video generation on the tiny twins: A14B (two experts) with the pixel and the latent hand-off,
TI2V-5B (held latents replacing the first latent frames at timestep 0), resume, split per-expert adapters, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import svi_infer.longvideo.generator as generate
import svi_infer.longvideo.plan as app
from svi_infer.adapters import AdapterError, AdapterMeta, expert_dirs, load_adapter, lora_modules, save_adapter
from svi_infer.errors import USER_ERRORS
from svi_infer.longvideo.generator import LongVideoGenerator
from svi_infer.longvideo.outputs import parts_dir
from svi_infer.model import build_model
from svi_infer.settings import GenerationSettings
from svi_infer.spec import HIGH_NOISE, LOW_NOISE, get_spec
from svi_infer.video_io import fit_image, frames_to_tensor, read_video
from tests.helpers import TINY21, TINY22, compose_infer, interrupt_at

TINY5B = "tiny-wan2.2-ti2v-5b"
PROMPTS = ["a boat", "the sea"]
# small runs: 2 steps at shift 5 are t = 1000 (high-noise expert) and 833 (low-noise expert, below 875)
A14B_RUN = ["num_clips=3", "frames_per_clip=9", "height=48", "width=80", "variant.steps=2"]
TI2V_RUN = ["num_clips=3", "frames_per_clip=13", "height=64", "width=128", "variant.steps=2"]


@pytest.fixture
def tiny5b():
    return build_model(get_spec(TINY5B))


def _settings(image_file, experiment, model, run) -> GenerationSettings:
    """The preset's settings as ``python -m svi_infer +experiment=... model=...`` resolves them, made small."""
    cfg = compose_infer([f"+experiment={experiment}", f"model={model}", f"image={image_file}", "prompts=a", *run])
    return app.plan(cfg).settings


def _log_calls(model, log):
    """Forward pre-hooks recording (expert index, DiT input, timestep) of every transformer call."""
    hooks = []
    for index, transformer in enumerate(model.transformers):

        def hook(module, args, kwargs, index=index):
            log.append((index, kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))

        hooks.append(transformer.register_forward_pre_hook(hook, with_kwargs=True))
    return hooks


def _spy_sampler(monkeypatch, log):
    """Record every sample_clip call's y / held latents and its returned latents."""
    original = generate.sample_clip

    def spy(model, y, *args, **kwargs):
        out = original(model, y, *args, **kwargs)
        log.append({"y": y, "held": kwargs.get("held"), "latents": out.clone()})
        return out

    monkeypatch.setattr(generate, "sample_clip", spy)


def _anchor_latent(model, image, settings):
    anchor = frames_to_tensor(np.asarray(fit_image(image, settings.height, settings.width))[None])
    return model.encode_video(anchor[None])


def _check_expert_switch(calls, clips, steps, passes):
    assert len(calls) == clips * steps * passes
    for expert, _, timestep in calls:
        assert expert == (0 if float(timestep) >= 875.0 else 1)
    high = sum(expert == 0 for expert, _, _ in calls)
    assert high == clips * passes and len(calls) - high == clips * (steps - 1) * passes  # both experts every clip


# --- Wan 2.2 A14B --------------------------------------------------------------------------------------------


def test_a14b_shot_pixel_handoff_three_clips(tiny22, first_frame, image_file, tmp_path):
    s = _settings(image_file, "wan22_shot", "tiny_wan22_i2v_a14b", A14B_RUN)
    assert (s.handoff, s.ref_pad_num, s.motion_frames, s.use_first_prompt_only) == ("pixel", -1, 1, True)
    calls = []
    _log_calls(tiny22, calls)
    result = LongVideoGenerator(tiny22, s).generate(first_frame, PROMPTS, tmp_path / "v.mp4", progress=False)
    expected = 9 + 2 * (9 - 1)  # clip 0 whole, later clips drop the frame that repeats the seam
    assert result.frames == expected and read_video(result.video).shape == (expected, 48, 80, 3)
    _check_expert_switch(calls, clips=3, steps=2, passes=2)
    sidecar = json.loads(result.sidecar.read_text())
    assert [c["prompt"] for c in sidecar["clips"]] == ["a boat"] * 3
    assert [c["frames"] for c in sidecar["clips"]] == [[0, 9], [9, 17], [17, 25]]


def test_a14b_pro_latent_handoff_three_clips(tiny22, first_frame, image_file, tmp_path, monkeypatch):
    s = _settings(image_file, "wan22_pro", "tiny_wan22_i2v_a14b", A14B_RUN)
    assert (s.handoff, s.motion_latents, s.cfg_scale, s.overlap_frames) == ("latent", 1, 4.0, 5)
    calls, clips = [], []
    _log_calls(tiny22, calls)
    _spy_sampler(monkeypatch, clips)
    result = LongVideoGenerator(tiny22, s).generate(first_frame, PROMPTS, tmp_path / "v.mp4", progress=False)
    expected = 9 + 2 * (9 - 5)
    assert result.frames == expected and read_video(result.video).shape[0] == expected
    _check_expert_switch(calls, clips=3, steps=2, passes=2)
    anchor = _anchor_latent(tiny22, first_frame, s)
    for k, clip in enumerate(clips):  # y: mask, then anchor latent, previous clip's last latent, zeros
        assert clip["held"] is None
        y = clip["y"]
        assert torch.equal(y[:, 4:, :1], anchor)
        if k:
            assert torch.equal(y[:, 4:, 1:2], clips[k - 1]["latents"][:, :, -1:])
        assert not y[:, 4:, 1 + (k > 0) :].any()
        for _, hidden, _ in calls[k * 4 : (k + 1) * 4]:  # each DiT input carries exactly this y
            assert torch.equal(hidden[:, 16:], y)


# --- Wan 2.2 TI2V-5B -----------------------------------------------------------------------------------------


def test_ti2v_5b_holds_anchor_and_motion_latents_three_clips(tiny5b, first_frame, image_file, tmp_path, monkeypatch):
    s = _settings(image_file, "wan22_5b", "tiny_wan22_ti2v_5b", TI2V_RUN)
    assert (s.handoff, s.motion_latents, s.fps, s.overlap_frames) == ("latent", 1, 24, 5)
    calls, clips = [], []
    _log_calls(tiny5b, calls)
    _spy_sampler(monkeypatch, clips)
    result = LongVideoGenerator(tiny5b, s).generate(first_frame, PROMPTS, tmp_path / "v.mp4", progress=False)
    expected = 13 + 2 * (13 - 5)
    assert result.frames == expected and read_video(result.video).shape == (expected, 64, 128, 3)
    assert [c["frames"] for c in json.loads(result.sidecar.read_text())["clips"]] == [[0, 13], [13, 21], [21, 29]]

    anchor = _anchor_latent(tiny5b, first_frame, s)
    assert anchor.shape == (1, 48, 1, 4, 8)
    latent_frames, tokens_per_frame = 4, 2 * 4  # 13 frames; 4x8 latents in 2x2 patches
    passes = 2  # cfg 5
    assert len(calls) == 3 * s.steps * passes
    for k, clip in enumerate(clips):
        held = clip["held"]
        assert clip["y"] is None
        if k == 0:
            assert torch.equal(held, anchor)
        else:  # anchor latent, then clip k-1's last latent
            assert torch.equal(held, torch.cat([anchor, clips[k - 1]["latents"][:, :, -1:]], dim=2))
        n = held.shape[2]
        assert n == (1 if k == 0 else 2)
        assert torch.equal(clip["latents"][:, :, :n], held)  # the final latents hold them exactly
        for step, (_, hidden, timestep) in enumerate(calls[k * 4 : (k + 1) * 4]):
            assert hidden.shape == (1, 48, latent_frames, 4, 8)  # no y channels
            assert torch.equal(hidden[:, :, :n], held)
            t = 1000.0 if step < passes else 833.3333333333334
            assert timestep.shape == (1, latent_frames * tokens_per_frame)
            assert not timestep[0, : n * tokens_per_frame].any()
            assert torch.allclose(timestep[0, n * tokens_per_frame :], torch.tensor(t))


def test_sampler_refuses_the_wrong_conditioning(tiny22, tiny5b):
    from svi_infer.sampler import PassInputs, TextGuidance, sample_clip

    def sample(model, y, **kw):
        inputs = {"cond": PassInputs(model.encode_text(["a boat"]))}
        return sample_clip(model, y, inputs, TextGuidance(1.0), 1, 5.0, torch.Generator().manual_seed(0), **kw)

    held = torch.zeros(1, 48, 1, 2, 4)
    with pytest.raises(ValueError, match="has no y channels"):
        sample(tiny5b, torch.zeros(1, 52, 3, 2, 4))
    with pytest.raises(ValueError, match="needs the held latents and latent_frames"):
        sample(tiny5b, None, held=held)
    with pytest.raises(ValueError, match="give y, not held latents"):
        sample(tiny22, None, held=torch.zeros(1, 16, 1, 2, 4), latent_frames=3)
    out = sample(tiny5b, None, held=held, latent_frames=3)
    assert out.shape == (1, 48, 3, 2, 4) and not out[:, :, :1].any()


def test_ti2v_5b_resume_gives_the_same_bytes(tiny5b, first_frame, image_file, tmp_path, monkeypatch):
    s = _settings(image_file, "wan22_5b", "tiny_wan22_ti2v_5b", [*TI2V_RUN, "frames_per_clip=9"])

    def run(out):
        return LongVideoGenerator(tiny5b, s).generate(first_frame, PROMPTS, out, progress=False)

    full = run(tmp_path / "full.mp4")
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed.mp4")
    state = json.loads((parts_dir(tmp_path / "resumed.mp4") / "state.json").read_text())
    assert len(state["clips"]) == 2 and state["tail"]
    assert load_file(str(parts_dir(tmp_path / "resumed.mp4") / state["tail"]))["tail"].shape == (1, 48, 1, 4, 8)
    resumed = run(tmp_path / "resumed.mp4")
    assert resumed.frames == full.frames == 9 + 2 * 4
    assert full.video.read_bytes() == resumed.video.read_bytes()


# --- validation ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("svi_infer.model.build_model", refuse)


def test_ti2v_5b_pixel_handoff_is_refused(no_model_load, image_file):
    spec = get_spec(TINY5B)
    with pytest.raises(ValueError, match="use variant.handoff=latent \\(\\+experiment=wan22_5b\\)") as err:
        GenerationSettings(frames_per_clip=9, height=64, width=96, handoff="pixel").validate(spec)
    assert "\n" not in str(err.value)  # one clear line
    GenerationSettings(frames_per_clip=9, height=64, width=96, handoff="latent").validate(spec)
    cfg = compose_infer(["model=tiny_wan22_ti2v_5b", f"image={image_file}", "prompts=a", "variant.handoff=pixel"])
    with pytest.raises(USER_ERRORS, match="TI2V-5B.*use variant.handoff=latent"):
        app.run(cfg)


def _split_dir(root: Path, spec_id: str = TINY22, defaults=None) -> tuple[Path, dict[str, dict]]:
    """``root/high_noise`` and ``root/low_noise``: a random LoRA per expert, as training writes them."""
    source = build_model(get_spec(spec_id))
    saved = {}
    for index, expert in enumerate((HIGH_NOISE, LOW_NOISE)):
        transformer = source.transformers[index]
        torch.manual_seed(100 + index)
        transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
        meta = AdapterMeta.for_spec(source.spec, expert=expert, defaults=(defaults or {}).get(expert, {}))
        save_adapter(transformer, root / expert, meta)
        saved[expert] = load_file(str(root / expert / "adapter_model.safetensors"))
    return root, saved


def test_split_adapter_directory_is_refused_on_a_one_expert_model(no_model_load, image_file, tmp_path):
    for expert in (HIGH_NOISE, LOW_NOISE):
        (tmp_path / "split" / expert).mkdir(parents=True)
    for model in ("tiny_wan21_i2v", "tiny_wan22_ti2v_5b"):
        cfg = compose_infer(
            [f"model={model}", f"image={image_file}", "prompts=a", f"adapter.path={tmp_path / 'split'}"]
        )
        with pytest.raises(USER_ERRORS, match="a LoRA per Wan 2.2 A14B expert .* has one transformer"):
            app.run(cfg)
    with pytest.raises(AdapterError, match="has one transformer"):
        load_adapter(build_model(get_spec(TINY21)), tmp_path / "split")
    assert expert_dirs(tmp_path / "split") == {e: tmp_path / "split" / e for e in (HIGH_NOISE, LOW_NOISE)}


def test_split_adapter_with_a_misplaced_expert_is_refused(no_model_load, image_file, tmp_path):
    root, _ = _split_dir(tmp_path / "split")
    meta = json.loads((root / LOW_NOISE / "svi.json").read_text())
    (root / LOW_NOISE / "svi.json").write_text(json.dumps({**meta, "expert": HIGH_NOISE}))
    cfg = compose_infer(["model=tiny_wan22_i2v_a14b", f"image={image_file}", "prompts=a", f"adapter.path={root}"])
    with pytest.raises(USER_ERRORS, match="is for the high_noise expert, not low_noise"):
        app.run(cfg)


# --- split adapters ------------------------------------------------------------------------------------------


def test_split_adapter_directory_loads_each_expert(image_file, tmp_path, monkeypatch):
    defaults = {HIGH_NOISE: {"cfg_scale": 3.0, "handoff": "latent"}, LOW_NOISE: {"cfg_scale": 7.0}}
    root, saved = _split_dir(tmp_path / "final", defaults=defaults)
    built = []
    monkeypatch.setattr(
        "svi_infer.model.build_model", lambda *a, **kw: built.append(build_model(*a, **kw)) or built[-1]
    )
    out = tmp_path / "v.mp4"
    cfg = compose_infer(
        ["model=tiny_wan22_i2v_a14b", f"image={image_file}", "prompts=a boat", f"adapter.path={root}"]
        + [f"output={out}", "num_clips=1", "frames_per_clip=9", "height=48", "width=80", "variant.steps=1"]
        + ["progress=false"]
    )
    p = app.plan(cfg)
    assert p.adapters == [(root / HIGH_NOISE, HIGH_NOISE), (root / LOW_NOISE, LOW_NOISE)]
    assert (p.settings.cfg_scale, p.settings.handoff) == (3.0, "latent")  # the first adapter's svi.json wins
    result = app.run(cfg)
    (model,) = built
    for index, expert in enumerate((HIGH_NOISE, LOW_NOISE)):
        transformer = model.transformers[index]
        assert list(transformer.peft_config) == [expert]
        assert lora_modules(transformer) == sorted({k.rsplit(".lora_", 1)[0] for k in saved[expert]})
        loaded = get_peft_model_state_dict(transformer, adapter_name=expert)
        assert loaded.keys() == saved[expert].keys()
        assert all(torch.equal(loaded[k], saved[expert][k]) for k in loaded)
    key = "blocks.0.attn1.to_q.lora_A.weight"
    assert not torch.equal(saved[HIGH_NOISE][key], saved[LOW_NOISE][key])  # two different LoRAs
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["adapters"] == [
        {"path": str(root / HIGH_NOISE), "expert": HIGH_NOISE},
        {"path": str(root / LOW_NOISE), "expert": LOW_NOISE},
    ]


def test_split_adapter_directory_one_expert_and_explicit_sub_directories(tmp_path):
    root, saved = _split_dir(tmp_path / "final")
    model = build_model(get_spec(TINY22))
    load_adapter(model, root, expert=LOW_NOISE)  # only the named expert's sub-directory
    assert not lora_modules(model.transformers[0]) and lora_modules(model.transformers[1])
    model = build_model(get_spec(TINY22))
    meta = load_adapter(model, root)
    assert meta.expert == HIGH_NOISE
    for index, expert in enumerate((HIGH_NOISE, LOW_NOISE)):
        loaded = get_peft_model_state_dict(model.transformers[index], adapter_name=expert)
        assert all(torch.equal(loaded[k], saved[expert][k]) for k in saved[expert])
    cfg = compose_infer(["model=tiny_wan22_i2v_a14b", "image=x.png", "prompts=a", f"adapter.high_noise={root}"])
    assert app._adapters(cfg, get_spec(TINY22)) == [(root / HIGH_NOISE, HIGH_NOISE)]
    (tmp_path / "only_high" / HIGH_NOISE).mkdir(parents=True)
    cfg = compose_infer(["model=tiny_wan22_i2v_a14b", "image=x.png", "prompts=a"])
    cfg.adapter.low_noise = str(tmp_path / "only_high")
    with pytest.raises(AdapterError, match="holds no low_noise/ sub-directory"):
        app._adapters(cfg, get_spec(TINY22))


def test_shared_adapter_still_loads_into_both_experts(tmp_path):
    source = build_model(get_spec(TINY22))
    source.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    save_adapter(source.transformers[0], tmp_path / "shared", AdapterMeta.for_spec(source.spec))
    assert expert_dirs(tmp_path / "shared") == {}
    model = build_model(get_spec(TINY22))
    load_adapter(model, tmp_path / "shared")
    expected = get_peft_model_state_dict(source.transformers[0])
    for transformer in model.transformers:
        loaded = get_peft_model_state_dict(transformer, adapter_name="shared")
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


# --- CLI -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, model, size, frames",
    [
        ("wan22_pro", "tiny_wan22_i2v_a14b", ["height=48", "width=80"], 9 + 2 * 4),
        ("wan22_5b", "tiny_wan22_ti2v_5b", ["height=64", "width=128"], 9 + 2 * 4),
    ],
)
def test_cli_wan22(tmp_path, image_file, experiment, model, size, frames):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "svi_infer", f"+experiment={experiment}", f"model={model}", f"image={image_file}"]
    cmd += ["prompts=a boat", f"output={out}", "num_clips=3", "frames_per_clip=9", "variant.steps=2", *size]
    cmd += ["progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"video:   {out}" in done.stdout and f"sidecar: {out.with_suffix('.json')}" in done.stdout
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["complete"] and sidecar["frames"] == frames and sidecar["num_clips"] == 3
    assert sidecar["model"] == get_spec(compose_infer([f"model={model}"]).model.spec).id
    assert sidecar["settings"]["handoff"] == "latent"
    assert read_video(out).shape[0] == frames


@pytest.mark.parametrize(
    "spec_id, sizes, refused",
    [
        ("wan2.1-i2v-14b-720p", [(720, 1280), (1280, 720)], (704, 1270)),
        ("wan2.2-i2v-a14b", [(720, 1280), (1280, 720), (480, 832), (832, 480)], (720, 1275)),
        ("wan2.2-ti2v-5b", [(704, 1280), (1280, 704)], (720, 1280)),  # 16x VAE x patch 2: multiples of 32
    ],
)
def test_720p_landscape_and_portrait_sizes(spec_id, sizes, refused):
    spec = get_spec(spec_id)
    handoff = "pixel" if spec.conditioning_by_concat else "latent"
    for height, width in sizes:
        GenerationSettings(height=height, width=width, handoff=handoff).validate(spec)
    with pytest.raises(ValueError, match=f"multiple of {spec.spatial_multiple}"):
        GenerationSettings(height=refused[0], width=refused[1], handoff=handoff).validate(spec)
