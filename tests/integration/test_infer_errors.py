"""``python -m svi_infer`` mistakes: one line, a non-zero exit, nothing half-written, and no torch start-up for the
cheap ones. Subprocess cases run under ``python -X importtime`` and assert which heavy packages were imported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import svi_infer.longvideo.plan as app
from svi_infer.adapters import AdapterError, AdapterMeta, file_metadata, load_adapter, read_meta, save_adapter
from svi_infer.longvideo.generator import LongVideoGenerator
from svi_infer.longvideo.outputs import parts_dir
from svi_infer.model import build_model
from svi_infer.settings import GenerationSettings
from svi_infer.spec import get_spec
from svi_infer.video_io import read_video
from svi_train.export import export
from tests.helpers import HEAVY, REPO, TINY21, TINY22, compose_infer, interrupt_at, run_cli

TINY = ["model=tiny_wan21_i2v", "frames_per_clip=5", "height=48", "width=80", "variant.steps=1", "progress=false"]


def _cli(args: list[str], cwd: Path, module: str = "svi_infer") -> tuple[int, list[str], str, frozenset[str]]:
    run = run_cli(module, *args, cwd=cwd)
    return run.code, run.stderr, run.stdout, run.imported


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path, image_file):
    """A folder holding only the first frame; the CLI runs there and must leave nothing else behind."""
    return tmp_path


# --- 1. types and unknown keys fail at compose time ------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=abc", "seed=abc: Value 'abc' of type 'str' could not be converted to Integer; fix the value of seed"),
        ("num_clips=abc", "num_clips=abc: Value 'abc' of type 'str' could not be converted to Integer; fix the value"),
        ("variant.cfg_scale=abc", "variant.cfg_scale=abc: Value 'abc' of type 'str' could not be converted to Float"),
        ("resume=maybe", "resume=maybe: Value 'maybe' is not a valid bool"),
        ("seeed=7", "seeed=7: unknown key seeed; check its spelling against conf/infer.yaml"),
        ("variant.cfg=3", "variant.cfg=3: unknown key variant.cfg; check its spelling"),
        ("model=nope", "there is no config 'model/nope'; choose one of: tiny_wan21_i2v, "),
    ],
)
def test_config_mistakes_fail_at_compose_time_in_one_line(workdir, image_file, override, message):
    out = workdir / "v.mp4"
    before = _files(workdir)
    rc, err, _, imported = _cli([*TINY, f"image={image_file}", "prompts=a", f"output={out}", override], workdir)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"svi_infer: error: {message}"), err
    assert not imported & HEAVY  # answered before torch starts
    assert _files(workdir) == before  # no <output>.parts/, no outputs/


def test_a_mistake_in_an_experiment_file_names_the_file(workdir, image_file):
    (workdir / "my_conf" / "experiment").mkdir(parents=True)
    (workdir / "my_conf" / "experiment" / "mine.yaml").write_text("# @package _global_\nvariant:\n  cfg_sale: 3\n")
    args = [
        *TINY,
        f"image={image_file}",
        "prompts=a",
        "+experiment=mine",
        f"hydra.searchpath=[file://{workdir}/my_conf]",
    ]
    rc, err, _, imported = _cli(args, workdir)
    assert rc == 2 and not imported & HEAVY
    assert err == [
        "svi_infer: error: experiment/mine.yaml: unknown key variant.cfg_sale; check its spelling against "
        "conf/infer.yaml (python -m svi_infer --cfg job prints every key)"
    ]


def test_experiments_set_training_keys_that_svi_infer_ignores(image_file):
    cfg = compose_infer(["+experiment=dance", "model=tiny_wan21_i2v", f"image={image_file}", "prompts=a"])
    assert cfg.recycling.p_clean == 0.2 and cfg.conditioning.pose_dropout == 0.05  # composed, not refused
    assert app.resolve_settings(cfg, get_spec(TINY21), {}).conditioning == "pose"


# --- 7. cheap checks answer before torch starts up -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["image=/no/such.png"], "image /no/such.png does not exist; check the path"),
        (["prompts=/no/such/prompts.txt"], "prompt file /no/such/prompts.txt does not exist; check the path"),
        (
            ["adapter.path=/no/adapter.safetensors"],
            "adapter /no/adapter.safetensors does not exist; check adapter.path",
        ),
        (["+experiment=talk", "audio=/no/such.wav"], "audio file /no/such.wav does not exist; check the path"),
        (["seed_policy=fixed"], "invalid generation settings: seed_policy=fixed is now called seed_policy=multiply"),
        (["frames_per_clip=6"], "invalid generation settings: frames_per_clip must be 4k+1"),
    ],
)
def test_missing_inputs_and_bad_settings_answer_without_torch(workdir, image_file, overrides, message):
    before = _files(workdir)
    args = [*TINY, f"image={image_file}", "prompts=a", f"output={workdir / 'v.mp4'}", *overrides]
    rc, err, _, imported = _cli(args, workdir)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"svi_infer: error: {message}"), err
    assert not imported & HEAVY
    assert _files(workdir) == before


def test_help_and_cfg_job_import_no_torch(tmp_path):
    rc, err, out, imported = _cli(["+experiment=shot", "--cfg", "job"], tmp_path)
    assert rc == 0 and not err and "ref_pad_num: -1" in out and not imported & HEAVY
    rc, err, out, imported = _cli(["--help"], tmp_path, module="svi_infer.evaluate")
    assert rc == 0 and out.startswith("usage: python -m svi_infer.evaluate") and not imported & HEAVY


# --- 6. --help shows what svi_infer uses ----------------------------------------------------------------------


def test_help_lists_only_what_svi_infer_reads(tmp_path):
    rc, err, out, imported = _cli(["--help"], tmp_path)
    assert rc == 0 and not err and not imported & HEAVY
    assert out.startswith("python -m svi_infer: generate a long video")
    listed = set(re.findall(r"(?:model=|\+experiment=|\| )(\w+)", out))
    for group in ("model", "experiment"):  # every option of the two groups svi_infer uses
        assert {p.stem for p in (REPO / "conf" / group).glob("*.yaml")} <= listed, group
    assert "overwrite: false" in out and "seed_policy: increment" in out and "  cfg_scale_audio: null" in out
    assert "Configuration groups" not in out  # Hydra's list of every group of the conf package
    for training in ("lora", "recycling", "trainer", "logger", "callbacks", "optim", "data", "conditioning"):
        assert not re.search(rf"^\+?{training}[:=]", out, re.MULTILINE), training  # no such top-level key


# --- 2. a finished video is not overwritten without overwrite=true ---------------------------------------------


def test_finished_video_is_kept_unless_overwrite(workdir, image_file, monkeypatch, capsys):
    out = workdir / "v.mp4"
    base = [*TINY, f"image={image_file}", "prompts=a boat", f"output={out}", "num_clips=2"]
    app.run(compose_infer(base))
    video = out.read_bytes()
    rc, err, _, imported = _cli(base, workdir)
    assert rc == 2 and not imported & HEAVY
    assert err == [
        f"svi_infer: error: {out} already exists; pass overwrite=true to replace it, or choose another output=<path>"
    ]
    assert out.read_bytes() == video and not parts_dir(out).exists()
    # overwrite=true replaces it; interrupted after clip 1, the same command without the flag resumes it
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            app.run(compose_infer([*base, "overwrite=true", "seed=7"]))
    assert out.read_bytes() == video and (parts_dir(out) / "state.json").is_file()
    capsys.readouterr()
    result = app.run(compose_infer([*base, "seed=7"]))
    # 5. the resumed run says so, with how many clips remain
    plan_line, resumed = capsys.readouterr().out.splitlines()
    assert plan_line.startswith("memory plan: ") and resumed == f"resuming {out} after clip 1 of 2: 1 to go"
    assert result.clips == 2 and out.read_bytes() != video and not parts_dir(out).exists()
    assert json.loads(result.sidecar.read_text())["settings"]["seed"] == 7


# --- 3. every clip's seed follows seed, clip 0 included ---------------------------------------------------------


SMALL = dict(frames_per_clip=5, steps=1, height=48, width=80)


def _first_clip(model, image, out: Path, **settings) -> tuple[np.ndarray, list[int], dict]:
    result = LongVideoGenerator(model, GenerationSettings(**SMALL, **settings)).generate(
        image, ["a boat"], out, progress=False
    )
    sidecar = json.loads(result.sidecar.read_text())
    return read_video(out)[:5], [c["seed"] for c in sidecar["clips"]], sidecar["settings"]


def test_seed_changes_every_clip_and_the_first(tiny21, first_frame, tmp_path):
    frames7, seeds7, recorded = _first_clip(tiny21, first_frame, tmp_path / "a.mp4", seed=7, num_clips=2)
    frames42, seeds42, _ = _first_clip(tiny21, first_frame, tmp_path / "b.mp4", seed=42, num_clips=1)
    assert seeds7 == [7, 8] and seeds42 == [42] and recorded["seed_policy"] == "increment"
    assert not np.array_equal(frames7, frames42)  # clip 0 follows the seed (reruns repeat it: see the resume tests)
    svi = GenerationSettings(seed=7, seed_policy="multiply")
    assert [svi.clip_seed(k) for k in range(3)] == [0, 7, 14]  # SVI's exact seeds, on request


def test_old_seed_policy_name_is_refused_naming_the_new_one():
    with pytest.raises(ValueError) as err:
        GenerationSettings(seed_policy="fixed").validate(get_spec(TINY21))
    assert str(err.value) == (
        "invalid generation settings: seed_policy=fixed is now called seed_policy=multiply (clip k uses seed x k, "
        "SVI's seeds); the default, seed_policy=increment, gives clip k seed + k"
    )


# --- 4. a bare LoRA file made for another base is refused as a directory is ------------------------------------


@pytest.fixture
def exported(tmp_path):
    """A tiny Wan 2.1 adapter exported as ComfyUI and diffusers files, each copied alone (no svi.json beside)."""
    model = build_model(get_spec(TINY21))
    model.transformers[0].add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    source = save_adapter(model.transformers[0], tmp_path / "adapter", AdapterMeta.for_spec(model.spec))
    comfy = export(source, "comfyui", tmp_path / "svi_comfy.safetensors")[0]
    (diffusers_dir,) = export(source, "diffusers", tmp_path / "diffusers")
    bare = tmp_path / "bare" / "pytorch_lora_weights.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((diffusers_dir / "pytorch_lora_weights.safetensors").read_bytes())
    return {"comfyui": comfy, "diffusers": bare}


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_exported_file_for_another_base_is_refused(exported, workdir, image_file, fmt):
    file = exported[fmt]
    assert read_meta(file).base["spec"] == TINY21
    if fmt == "diffusers":  # diffusers' own record of the LoRA config stays beside ours
        assert "lora_adapter_metadata" in file_metadata(file)
    expected = (
        f"adapter {file} was trained for {TINY21} (family=wan2.1-i2v) and cannot load into {TINY22} "
        "(family=wan2.2-i2v-a14b); choose the matching model"
    )
    args = ["model=tiny_wan22_i2v_a14b", f"image={image_file}", "prompts=a", f"adapter.path={file}"]
    rc, err, _, imported = _cli([*args, f"output={workdir / 'v.mp4'}"], workdir)
    assert rc == 2 and err == [f"svi_infer: error: {expected}"] and not imported & HEAVY
    assert not (workdir / "v.mp4.parts").exists()
    with pytest.raises(AdapterError) as err:  # the library refuses it too
        load_adapter(build_model(get_spec(TINY22)), file)
    assert str(err.value) == expected


def test_file_without_a_base_record_loads_with_a_note(exported, image_file, tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(exported["comfyui"])), str(plain))  # the same weights, no metadata
    assert read_meta(plain) is None
    p = app.plan(compose_infer(["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", f"adapter.path={plain}"]))
    assert p.adapters == [(plain, None)]
    assert capsys.readouterr().err == (
        f"svi_infer: note: adapter {plain} does not record the base model it was made for (no svi.json, no 'svi' "
        f"safetensors metadata): it loads if its tensor shapes fit {TINY21}, unchecked\n"
    )
    assert load_adapter(build_model(get_spec(TINY21)), plain) is None  # loads
