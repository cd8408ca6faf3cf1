"""``+preset=lightx2v_4step``: LightX2V's few-step schedule, one DiT pass per step."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

import svi_infer.longvideo.plan as app
from svi_infer.flow import inference_sigmas
from tests.helpers import CONF, compose_infer

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PRESET = "+preset=lightx2v_4step"


def lightx2v_sigmas(steps=(1000, 750, 500, 250), shift: float = 5.0) -> torch.Tensor:
    """LightX2V's step-distill scheduler, from its definition: the 1000-entry shifted table at 1000 - step."""
    table = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    table = shift * table / (1 + (shift - 1) * table)
    return table[[1000 - s for s in steps]]


def test_the_preset_schedule_is_lightx2v_s_own():
    cfg = compose_infer(["model=tiny_wan21_i2v", "image=x.png", "prompts=a", "+experiment=shot", PRESET])
    variant = cfg.variant
    assert (variant.steps, variant.shift, variant.cfg_scale, variant.cfg_scale_audio) == (4, 5.0, 1.0, 1.0)
    sigmas = inference_sigmas(variant.steps, variant.shift)
    torch.testing.assert_close(sigmas[:-1], lightx2v_sigmas(), rtol=0, atol=1e-12)
    assert sigmas[-1] == 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_preset_composes_after_every_experiment(experiment):
    cfg = compose_infer(["model=tiny_wan21_i2v", "image=x.png", "prompts=a", f"+experiment={experiment}", PRESET])
    assert (cfg.variant.steps, cfg.variant.cfg_scale) == (4, 1.0)


def test_a_preset_run_takes_one_dit_pass_per_step(tmp_path, image_file, monkeypatch):
    calls = []
    forward = WanTransformer3DModel.forward

    def counted(self, *args, **kwargs):
        if kwargs["hidden_states"].device.type != "meta":  # not the memory plan's measuring forwards
            calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "forward", counted)
    out = tmp_path / "v.mp4"
    cfg = compose_infer(
        ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a boat", "+experiment=shot", PRESET]
        + [f"output={out}", "num_clips=2", "frames_per_clip=9", "progress=false"]
    )
    app.run(cfg)
    assert len(calls) == 2 * 4  # 2 clips x 4 steps x 1 pass (cfg 1: no unconditional pass)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    settings = sidecar["settings"]
    assert (settings["steps"], settings["cfg_scale"], settings["shift"]) == (4, 1.0, 5.0)
