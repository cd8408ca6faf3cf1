"""svi_train on the tiny model: configs, a smoke fit, resume state, export round trips."""

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException

from svi_infer.adapters import load_adapter, lora_modules
from svi_infer.model import build_model
from svi_infer.spec import get_spec
from svi_train.config import register
from svi_train.export import FORMATS, export
from tests.helpers import CONF, TINY21, assert_same_outputs, compose_train, dit_inputs, train_tiny

register()
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, model):
    cfg = compose_train([f"+experiment={experiment}", f"model={model}"])
    assert cfg.recycling.num_grids == 50 and cfg.lora.rank > 0


def test_typos_and_wrong_types_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_train(["recycling.p_nosie=0.5"])
    with pytest.raises(ConfigCompositionException):
        compose_train(["lora.rank=many"])
    with pytest.raises(ConfigCompositionException):
        compose_train(["trainer.max_step=3"])


def test_smoke_fit_exports_an_adapter_that_svi_infer_loads(shards, tmp_path):
    adapter = train_tiny(shards, tmp_path / "run")
    meta = json.loads((adapter / "svi.json").read_text())
    assert meta["base"]["spec"] == TINY21 and meta["defaults"]["ref_pad_num"] == -1
    assert meta["provenance"]["step"] == 6
    model = build_model(get_spec(TINY21))
    base = model.transformers[0](**dit_inputs())[0]
    load_adapter(model, adapter)
    assert len(lora_modules(model.transformers[0])) == 20
    assert not torch.allclose(model.transformers[0](**dit_inputs())[0], base)  # training moved B off zero
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["svi_recycling"]["iteration"] == 6
    assert ckpt["svi_recycling"]["banks"]["noise"] is not None
    assert all(".lora_" in k for k in ckpt["state_dict"])  # the frozen base is not written


def test_resume_restores_banks_and_counters(shards, tmp_path):
    train_tiny(shards, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    train_tiny(shards, tmp_path / "run2", "trainer.max_steps=9", f"resume={last}")
    resumed = torch.load(tmp_path / "run2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 9 and resumed["svi_recycling"]["iteration"] == 9
    assert resumed["svi_recycling"]["banks"]["noise"]["inserts"] >= first["svi_recycling"]["banks"]["noise"]["inserts"]


def test_rollout_preview_and_metrics(shards, tmp_path):
    train_tiny(
        shards,
        tmp_path / "run",
        "callbacks.preview_every_n_steps=3",
        "callbacks.preview_clips=2",
        "trainer.log_every_n_steps=1",
    )
    assert sorted(p.name for p in (tmp_path / "run" / "previews").glob("*.mp4")) == [
        "step_000003.mp4",
        "step_000006.mp4",
    ]
    preview = json.loads((tmp_path / "run" / "previews" / "step_000006.json").read_text())
    assert preview["frames"] == 9 + 8 and preview["preview_step"] == 6
    header = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "lr-AdamW", "perf/step_s", "perf/data_wait_s", "perf/bank_s", "data/skipped"):
        assert name in header
    # drift metrics of every preview, against the preview image, as curves over training
    for name in ("preview/color_drift_last", "preview/ssim_ref_last", "preview/seam_flicker_max", "preview/motion_min"):
        assert name in header
    report = json.loads((tmp_path / "run" / "previews" / "step_000006.eval.json").read_text())
    assert [(c["start"], c["end"]) for c in report["clips"]] == [(0, 9), (9, 17)]
    assert report["reference"]["path"].endswith("reference.png")
    assert (tmp_path / "run" / "previews" / "step_000006.eval.png").stat().st_size > 0


def test_recycling_off_is_the_plain_lora_baseline(shards, tmp_path):
    adapter = train_tiny(shards, tmp_path / "run", "recycling.enabled=false")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["svi_recycling"]["iteration"] == 0
    assert (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.numerics
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source", ["adapter", "checkpoint"])
def test_export_round_trips(shards, tmp_path, fmt, source):
    adapter = train_tiny(shards, tmp_path / "run", "lora.alpha=8.0")
    src = adapter if source == "adapter" else tmp_path / "run" / "checkpoints" / "last.ckpt"
    (out,) = export(src, fmt, tmp_path / ("lora.safetensors" if fmt == "comfyui" else "exported"))
    reference = build_model(get_spec(TINY21))
    load_adapter(reference, adapter)
    model = build_model(get_spec(TINY21))
    load_adapter(model, out)
    inputs = dit_inputs()
    assert_same_outputs(model.transformers[0](**inputs)[0], reference.transformers[0](**inputs)[0])


def test_warmup_sharing_follows_the_receiving_ranks_own_update_draw():
    """During the warm-up the gathered errors of every rank enter this rank's banks when this rank keeps its own
    sample (its clean flag and its draw), as the reference does; the senders' decisions do not count."""
    from types import SimpleNamespace

    from svi_infer.spec import get_spec
    from svi_train.config import LoraSettings, OptimSettings
    from svi_train.module import SVILitModule
    from svi_train.recycling import Errors, Flags, RecyclingConfig

    recycling = RecyclingConfig(warmup_iters=10, capacity=64, p_clean_update=0.0)
    module = SVILitModule(get_spec(TINY21), None, LoraSettings(rank=2, alpha=2.0), recycling, OptimSettings())
    module._trainer = SimpleNamespace(world_size=2)
    module.all_gather = lambda v: torch.stack([v, v + 100.0])  # this rank's, then the "other" rank's values
    kept, clean = Flags(True, True, True, False), Flags(False, False, False, True)
    errors = Errors(noise=torch.ones(2, 16, 3, 6, 10), x0=torch.ones(2, 16, 3, 6, 10))
    t = torch.tensor([100.0, 900.0])
    module._update_banks(errors, t, [kept, clean])  # sample 0 kept, sample 1 clean and not updated (p=0)
    # sample 0 of both ranks is in, sample 1 of neither (the other rank's sample 1 follows this rank's draw)
    assert len(module.noise_errors) == len(module.x0_errors) == 2
    module._update_banks(errors, t, [kept, kept])
    assert len(module.noise_errors) == 6
