import json
import subprocess
import sys
from pathlib import Path

import pytest

import svi_infer.app as app
from svi_infer.adapters import AdapterMeta, save_adapter
from svi_infer.model import build_model
from svi_infer.spec import get_spec
from tests.conftest import TINY21, compose_infer

CONF = Path(__file__).resolve().parents[1] / "conf"
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

    monkeypatch.setattr(app, "build_model", refuse)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["image=/no/such.png"], "image /no/such.png does not exist"),
        (["prompts=/no/such/prompts.txt"], "prompt file /no/such/prompts.txt does not exist"),
        (["frames_per_clip=80"], "4k\\+1"),
        (["variant.num_motion_frames=9", "frames_per_clip=9"], "num_motion_frames must be"),
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
    with pytest.raises(app.USER_ERRORS, match=message):
        app.run(cfg)


def test_unreadable_prompt_file(no_model_load, image_file, tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    cfg = compose_infer(["model=tiny_wan21_i2v", f"image={image_file}", f"prompts={bad}"])
    with pytest.raises(app.USER_ERRORS, match="cannot read prompt file"):
        app.run(cfg)


def test_adapter_defaults_fill_what_the_user_did_not_give(tmp_path, image_file):
    model = build_model(get_spec(TINY21))
    from peft import LoraConfig

    model.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    defaults = {"ref_pad_num": 0, "num_motion_frames": 5, "cfg_scale": 4.0, "fps": 15}
    save_adapter(model.transformers[0], tmp_path / "a", AdapterMeta.for_spec(model.spec, defaults=defaults))
    base = ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", f"adapter.path={tmp_path / 'a'}"]
    s = app.plan(compose_infer(base)).settings
    assert (s.ref_pad_num, s.num_motion_frames, s.cfg_scale, s.fps) == (0, 5, 4.0, 15)
    assert s.steps == get_spec(TINY21).steps  # not in svi.json: the model's default
    s = app.plan(compose_infer([*base, "+experiment=shot", "variant.fps=24"])).settings
    assert (s.ref_pad_num, s.num_motion_frames, s.cfg_scale, s.fps) == (-1, 1, 5.0, 24)


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
    assert sidecar["frames"] == 9 + 2 * 4 and sidecar["settings"]["num_motion_frames"] == 5
    assert [c["prompt"] for c in sidecar["clips"]] == ["a boat", "the sea", "a boat"]
    assert not (tmp_path / "outputs").exists()  # Hydra writes no run directory


def test_cli_reports_user_errors_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "svi_infer", "model=tiny_wan21_i2v", "image=/no.png", "prompts=a"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "svi_infer: error: image /no.png does not exist"
    assert "Traceback" not in done.stderr
