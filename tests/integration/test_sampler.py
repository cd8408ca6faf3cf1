import torch

from svi_infer.conditioning import first_frames_mask, with_mask
from svi_infer.flow import inference_sigmas
from svi_infer.sampler import PassInputs, TextGuidance, sample_clip
from svi_infer.spec import get_spec


def test_text_guidance_exact():
    v = {"cond": torch.tensor([2.0]), "uncond": torch.tensor([1.0])}
    assert TextGuidance(5.0).passes() == ("cond", "uncond")
    assert TextGuidance(5.0).combine(v).tolist() == [6.0]
    assert TextGuidance(1.0).passes() == ("cond",)
    assert TextGuidance(1.0).combine({"cond": torch.tensor([2.0])}).tolist() == [2.0]


def test_expert_boundary():
    spec = get_spec("wan2.2-i2v-a14b")
    assert spec.boundary_ratio == 0.875
    assert spec.expert_for_timestep(1000.0) == 0 and spec.expert_for_timestep(875.0) == 0
    assert spec.expert_for_timestep(874.99) == 1
    assert get_spec("wan2.1-i2v-14b-480p").expert_for_timestep(10.0) == 0


def _inputs(model):
    text = model.encode_text(["a cat walks"])
    image = torch.zeros(1, 1025, model.spec.image_dim) if model.spec.image_dim else None
    return {"cond": PassInputs(text, image), "uncond": PassInputs(torch.zeros_like(text), image)}


def _y(model, frames=9):
    return with_mask(torch.zeros(1, 16, 3, 6, 10), first_frames_mask(frames, 6, 10))


def _count_calls(transformer, log, name):
    return transformer.register_forward_pre_hook(
        lambda m, a, kw: log.append((name, float(kw["timestep"]))), with_kwargs=True
    )


def test_cfg_runs_two_passes_and_one_at_scale_one(tiny21):
    calls = []
    _count_calls(tiny21.transformers[0], calls, "main")
    sample_clip(tiny21, _y(tiny21), _inputs(tiny21), TextGuidance(5.0), 3, 5.0, torch.Generator().manual_seed(1))
    assert len(calls) == 6
    calls.clear()
    sample_clip(tiny21, _y(tiny21), _inputs(tiny21), TextGuidance(1.0), 3, 5.0, torch.Generator().manual_seed(1))
    assert len(calls) == 3


def test_wan22_switches_expert_at_boundary(tiny22):
    calls = []
    _count_calls(tiny22.transformers[0], calls, "high")
    _count_calls(tiny22.transformers[1], calls, "low")
    steps = 8
    sample_clip(tiny22, _y(tiny22), _inputs(tiny22), TextGuidance(1.0), steps, 5.0, torch.Generator().manual_seed(0))
    expected = ["high" if t >= 875.0 else "low" for t in (inference_sigmas(steps, 5.0)[:-1] * 1000).tolist()]
    assert [name for name, _ in calls] == expected
    assert "high" in expected and "low" in expected


def test_seed_decides_the_clip(tiny21):
    def run(seed):
        return sample_clip(
            tiny21, _y(tiny21), _inputs(tiny21), TextGuidance(3.0), 2, 5.0, torch.Generator().manual_seed(seed)
        )

    a, b, c = run(7), run(7), run(8)
    assert a.shape == (1, 16, 3, 6, 10)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_step_lands_on_the_x0_jump(tiny21):
    """One step from sigma 1 to 0 is ``x0 = noise - v(noise, t=1000)``."""
    inputs, y = _inputs(tiny21), _y(tiny21)
    out = sample_clip(tiny21, y, inputs, TextGuidance(1.0), 1, 5.0, torch.Generator().manual_seed(3))
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    v = tiny21.transformers[0](
        hidden_states=torch.cat([noise, y], 1),
        timestep=torch.tensor([1000.0]),
        encoder_hidden_states=inputs["cond"].text,
        encoder_hidden_states_image=inputs["cond"].image,
        return_dict=False,
    )[0]
    assert torch.allclose(out, noise - v, atol=1e-6)
