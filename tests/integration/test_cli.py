import json
import subprocess
import sys
from pathlib import Path

import pytest

import svi_infer.longvideo.plan as app
from svi_infer.adapters import AdapterMeta, save_adapter
from svi_infer.errors import USER_ERRORS
from svi_infer.model import build_model
from svi_infer.spec import get_spec
from tests.helpers import CONF, TINY21, compose_infer, sine, write_wav

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_model(experiment, model):
    cfg = compose_infer([f"+experiment={experiment}", f"model={model}", "image=x.png", "prompts=a"])
    assert cfg.variant.handoff in ("pixel", "latent")
    get_spec(cfg.model.spec)


def test_cfg_job_prints_without_running():
    out = subprocess.run(
        [sys.executable, "-m", "svi_infer", "+experiment=shot", "--cfg", "job"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "ref_pad_num: -1" in out.stdout


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("svi_infer.model.build_model", refuse)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["image=/no/such.png"], "image /no/such.png does not exist"),
        (["prompts=/no/such/prompts.txt"], "prompt file /no/such/prompts.txt does not exist"),
        (["frames_per_clip=80"], "4k\\+1"),
        (["variant.motion_frames=9", "frames_per_clip=9"], "motion_frames must be"),
        (["height=50"], "multiple of 16"),
        (["model=wan21_i2v_14b_480p"], "model.path is required"),
        (["adapter.path=/no/adapter"], "adapter /no/adapter does not exist"),
        (["adapter.high_noise=/x"], "one transformer"),
        (["+variant.bogus=1"], "unknown variant setting"),
        (["model.transformer_files=[/no/dit.safetensors]"], "original Wan file /no/dit.safetensors does not exist"),
    ],
)
def test_bad_input_fails_before_any_model_loads(no_model_load, image_file, overrides, message):
    cfg = compose_infer(["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a boat", *overrides])
    with pytest.raises(USER_ERRORS, match=message):
        app.run(cfg)


def test_unreadable_prompt_file(no_model_load, image_file, tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    cfg = compose_infer(["model=tiny_wan21_i2v", f"image={image_file}", f"prompts={bad}"])
    with pytest.raises(USER_ERRORS, match="cannot read prompt file"):
        app.run(cfg)


def test_adapter_defaults_fill_what_the_user_did_not_give(tmp_path, image_file):
    model = build_model(get_spec(TINY21))
    from peft import LoraConfig

    model.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    defaults = {"ref_pad_num": 0, "motion_frames": 5, "cfg_scale": 4.0, "fps": 15}
    save_adapter(model.transformers[0], tmp_path / "a", AdapterMeta.for_spec(model.spec, defaults=defaults))
    base = ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", f"adapter.path={tmp_path / 'a'}"]
    s = app.plan(compose_infer(base)).settings
    assert (s.ref_pad_num, s.motion_frames, s.cfg_scale, s.fps) == (0, 5, 4.0, 15)
    assert s.steps == get_spec(TINY21).steps  # not in svi.json: the model's default
    s = app.plan(compose_infer([*base, "+experiment=shot", "variant.fps=24"])).settings
    assert (s.ref_pad_num, s.motion_frames, s.cfg_scale, s.fps) == (-1, 1, 5.0, 24)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, image_file):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# demo\na boat\nthe sea\n", encoding="utf-8")
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "svi_infer", "model=tiny_wan21_i2v", "+experiment=film", f"image={image_file}"]
    cmd += [
        f"prompts={prompts}",
        f"output={out}",
        "num_clips=3",
        "frames_per_clip=9",
        "variant.steps=2",
        "progress=false",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"video:   {out}" in done.stdout and f"sidecar: {out.with_suffix('.json')}" in done.stdout
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["frames"] == 9 + 2 * 4 and sidecar["settings"]["motion_frames"] == 5
    assert [c["prompt"] for c in sidecar["clips"]] == ["a boat", "the sea", "a boat"]
    assert not (tmp_path / "outputs").exists()  # Hydra writes no run directory


def test_cli_reports_user_errors_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "svi_infer", "model=tiny_wan21_i2v", "image=/no.png", "prompts=a"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "svi_infer: error: image /no.png does not exist; check the path"
    assert "Traceback" not in done.stderr


# --- Talk and Dance inputs -------------------------------------------------------------------------------------


def _pose_video(path: Path, frames: int = 5) -> Path:
    import numpy as np

    from svi_infer.video_io import write_mp4

    write_mp4(path, np.full((frames, 32, 48, 3), 200, dtype=np.uint8), 25)
    return path


@pytest.fixture
def inputs(tmp_path):
    """Audio and pose files, good and bad, plus an adapter file for Dance plans (read for its metadata only)."""
    import numpy as np
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00 certainly not audio")
    bad_video = tmp_path / "junk.mp4"
    bad_video.write_bytes(b"not a video" * 100)
    adapter = tmp_path / "dance.safetensors"
    save_file({"dwpose_embedding.0.weight": np.zeros((16, 3, 3, 3, 3), np.float32)}, adapter)
    return {
        "speech": write_wav(tmp_path / "speech.wav", sine(4.0, 0.3)),
        "short": write_wav(tmp_path / "short.wav", sine(1.0, 0.3)),
        "junk": junk,
        "pose": _pose_video(tmp_path / "pose.mp4"),
        "bad_video": bad_video,
        "adapter": adapter,
        "dir": tmp_path,
    }


TALK = ["+experiment=talk"]
DANCE = ["+experiment=dance", "adapter.path={adapter}"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (TALK, "conditioning=audio \\(Talk\\) needs audio="),
        ([*TALK, "audio=/no/such.wav"], "audio file /no/such.wav does not exist"),
        ([*TALK, "audio={junk}"], "cannot decode the audio of .*junk.wav"),
        ([*TALK, "audio={short}"], "lasts 1.00 s \\(25 frames at 25 fps\\), shorter than one clip \\(81 frames"),
        ([*TALK, "audio={pose}"], "has no audio track"),
        ([*TALK, "audio={speech}", "variant.fps=16"], "needs fps=25"),
        ([*TALK, "audio={speech}", "model=tiny_wan22_i2v_a14b"], "made for Wan 2.1 I2V"),
        ([*TALK, "audio={speech}", "model=wan21_i2v_14b_480p", "model.path=/w"], "needs model.multitalk and model"),
        (
            [*TALK, "audio={speech}", "model=wan21_i2v_14b_480p", "model.path=/w", "model.multitalk=/no/m.safetensors"]
            + ["model.audio_encoder={dir}"],
            "model.multitalk /no/m.safetensors does not exist",
        ),
        ([*TALK, "audio={speech}", "model.audio_encoder={dir}"], "is not a wav2vec2 folder"),
        (["audio={speech}"], "audio= is for Talk"),
        (["+experiment=dance"], "needs the Dance adapter"),
        (DANCE, "conditioning=pose \\(Dance\\) needs pose="),
        ([*DANCE, "pose=/no/pose.mp4"], "pose video /no/pose.mp4 does not exist"),
        ([*DANCE, "pose={bad_video}"], "cannot read pose video .*junk.mp4"),
        ([*DANCE, "pose={speech}"], "pose video .*speech.wav has no video frames"),
        (["pose={pose}"], "pose= is for Dance"),
        (["side_by_side=true"], "side_by_side= is for Dance"),
        (["variant.conditioning=speech"], "conditioning must be one of"),
        (["variant.cfg_scale_audio=0"], "cfg_scale_audio"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_talk_and_dance_inputs_fail_before_any_model_loads(no_model_load, image_file, inputs, overrides, message):
    given = [o.format(**inputs) for o in overrides]
    cfg = compose_infer(["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", *given])
    with pytest.raises(USER_ERRORS, match=message) as err:
        app.run(cfg)
    assert "\n" not in str(err.value)  # one line (settings problems: every bad setting, on that line)


def test_talk_plan_num_clips_fps_and_model_files(image_file, inputs):
    base = ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", *TALK, f"audio={inputs['speech']}"]
    p = app.plan(compose_infer(base))
    s = p.settings
    assert (s.conditioning, s.num_clips, s.fps, s.cfg_scale, s.cfg_scale_audio) == ("audio", None, 25, 2.0, 5.0)
    files = p.inputs.files
    assert files["audio"] == inputs["speech"] and files["multitalk"] is None and files["audio_encoder"] is None
    assert app.plan(compose_infer([*base, "num_clips=4"])).settings.num_clips == 4
    plain = app.plan(compose_infer(["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a"])).settings
    assert plain.num_clips is None and plain.conditioning == "text"  # the generator's default: 3 clips


def test_conditioning_from_an_adapter_sets_talk_fps(tmp_path, image_file, inputs):
    from peft import LoraConfig

    model = build_model(get_spec(TINY21))
    model.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    meta = AdapterMeta.for_spec(model.spec, defaults={"conditioning": "audio", "cfg_scale_audio": 4.0})
    save_adapter(model.transformers[0], tmp_path / "talk", meta)
    base = ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", f"adapter.path={tmp_path / 'talk'}"]
    s = app.plan(compose_infer([*base, f"audio={inputs['speech']}"])).settings
    assert (s.conditioning, s.fps, s.cfg_scale_audio) == ("audio", 25, 4.0)
    with pytest.raises(USER_ERRORS, match="needs audio="):
        app.plan(compose_infer(base))


def test_dance_without_a_pose_encoder_in_the_adapter(tmp_path, image_file, inputs):
    from peft import LoraConfig

    model = build_model(get_spec(TINY21))
    model.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    save_adapter(model.transformers[0], tmp_path / "lora", AdapterMeta.for_spec(model.spec))
    cfg = compose_infer(
        ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", "+experiment=dance"]
        + [f"adapter.path={tmp_path / 'lora'}", f"pose={inputs['pose']}", f"output={tmp_path / 'v.mp4'}"]
    )
    with pytest.raises(USER_ERRORS, match="needs the pose encoder \\(dwpose_embedding"):
        app.run(cfg)
    assert not (tmp_path / "v.mp4.parts").exists()


@pytest.mark.parametrize("kind", ["audio", "pose"])
def test_cli_reports_bad_talk_and_dance_files_in_one_line(tmp_path, image_file, inputs, kind):
    cmd = [sys.executable, "-m", "svi_infer", "model=tiny_wan21_i2v", f"image={image_file}", "prompts=a"]
    if kind == "audio":
        cmd += ["+experiment=talk", f"audio={inputs['junk']}"]
        expected = f"svi_infer: error: cannot decode the audio of {inputs['junk']}"
    else:
        cmd += ["+experiment=dance", f"adapter.path={inputs['adapter']}", f"pose={inputs['bad_video']}"]
        expected = f"svi_infer: error: cannot read pose video {inputs['bad_video']}"
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(expected)


@pytest.mark.slow
def test_cli_talk_end_to_end(tmp_path, image_file):
    from svi_infer.video_io import probe_streams

    audio = write_wav(tmp_path / "speech.wav", sine(1.4, 0.3))  # 35 frames: 3 clips of 13 frames
    out = tmp_path / "talk.mp4"
    cmd = [sys.executable, "-m", "svi_infer", "model=tiny_wan21_i2v", "+experiment=talk", f"image={image_file}"]
    cmd += ["prompts=a person is talking", f"audio={audio}", f"output={out}", "frames_per_clip=13"]
    cmd += ["variant.steps=1", "progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["num_clips"] == 3 and sidecar["frames"] == 37 and sidecar["settings"]["conditioning"] == "audio"
    assert sidecar["audio"]["path"] == str(audio) and sidecar["multitalk"] is None
    info = probe_streams(out)
    assert info["frames"] == 37 and abs(info["audio"] - 37 / 25) <= 1024 / 48000


def test_dance_end_to_end_with_the_pose_encoder_from_the_adapter(tmp_path, image_file, inputs):
    """The Dance adapter carries the pose encoder (dwpose_embedding.*); load_adapter attaches it."""
    import torch
    from peft import LoraConfig

    from svi_infer.pose import PoseEncoder, attach_pose
    from svi_infer.video_io import read_video

    model = build_model(get_spec(TINY21))
    model.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    torch.manual_seed(3)
    attach_pose(model.transformers[0], PoseEncoder(model.spec.dim))
    save_adapter(model.transformers[0], tmp_path / "dance", AdapterMeta.for_spec(model.spec))
    out = tmp_path / "dance.mp4"
    cfg = compose_infer(
        ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=the person is dancing", "+experiment=dance"]
        + [f"adapter.path={tmp_path / 'dance'}", f"pose={inputs['pose']}", "side_by_side=true", f"output={out}"]
        + ["num_clips=3", "frames_per_clip=9", "variant.steps=1", "progress=false"]
    )
    result = app.run(cfg)
    assert result.clips == 3 and result.frames == 9 + 2 * 8
    assert read_video(out.with_name("dance.sbs.mp4")).shape == (25, 48, 240, 3)
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["pose"]["frames"] == 5 and sidecar["settings"]["conditioning"] == "pose"
