import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from svi_infer.flow import (
    add_noise,
    euler_step,
    inference_sigmas,
    noise_from_velocity,
    shift_sigmas,
    timesteps_from_sigmas,
    training_sigmas,
    velocity_target,
    x0_from_velocity,
)


def test_shift_exact_values():
    out = shift_sigmas(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 5.0)
    assert out.tolist() == [0.0, 2.5 / 3.0, 1.0]
    assert shift_sigmas(torch.tensor([0.25]), 1.0).item() == 0.25


def test_inference_schedule_is_svis():
    sigmas = inference_sigmas(50, 5.0)
    t = timesteps_from_sigmas(sigmas)
    assert len(sigmas) == 51 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert t[0].item() == 1000.0
    assert t[1].item() == pytest.approx(1000 * 4.9 / 4.92, abs=1e-9)  # 995.93...
    assert t[49].item() == pytest.approx(1000 * 0.1 / 1.08, abs=1e-9)  # 92.59...
    assert inference_sigmas(2, 1.0).tolist() == [1.0, 0.5, 0.0]


def test_matches_diffusers_flow_euler_with_explicit_sigmas():
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, 51)[:-1].numpy())
    assert torch.allclose(sched.sigmas.double(), inference_sigmas(50, 5.0), atol=1e-6)


def test_training_table_shift5_distribution():
    t = timesteps_from_sigmas(training_sigmas(1000, 5.0))
    assert len(t) == 1000 and t[0] == 1000.0
    assert int((t > 500).sum()) == 834  # sigma_raw > 1/6
    assert int((t > 800).sum()) == 556  # sigma_raw > 4/9


def test_step_and_endpoints_exact():
    x0 = torch.tensor([1.0, -2.0])
    noise = torch.tensor([0.5, 0.25])
    x_t = add_noise(x0, noise, 0.25)
    assert x_t.tolist() == [0.875, -1.4375]
    v = velocity_target(x0, noise)
    assert v.tolist() == [-0.5, 2.25]
    assert torch.equal(x0_from_velocity(x_t, v, 0.25), x0)
    assert torch.equal(noise_from_velocity(x_t, v, 0.25), noise)
    assert euler_step(x_t, v, 0.25, 0.0).tolist() == [1.0, -2.0]
    assert euler_step(torch.tensor([2.0]), torch.tensor([4.0]), 1.0, 0.75).tolist() == [1.0]


def test_steps_must_be_positive():
    with pytest.raises(ValueError):
        inference_sigmas(0)
