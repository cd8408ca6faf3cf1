"""Training timesteps, the bell loss weight and the grid lookup (svi.md §1.1, §1.3)."""

import pytest
import torch

from svi_infer.flow import inference_sigmas, timesteps_from_sigmas
from svi_train.recycling import TimestepSampler, bell_loss_weights, grid_anchors, grid_of


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_grid_anchors_are_the_inference_timesteps():
    anchors = grid_anchors(50, 5.0)
    assert torch.equal(anchors, timesteps_from_sigmas(inference_sigmas(50, 5.0))[:-1])
    assert len(anchors) == 50 and anchors[0].item() == 1000.0
    assert anchors[1].item() == pytest.approx(995.935, abs=1e-3)
    assert anchors[-1].item() == pytest.approx(92.593, abs=1e-3)


def test_grid_of_is_the_nearest_anchor():
    anchors = grid_anchors(50, 5.0)
    assert grid_of(1000.0, anchors).item() == 0
    assert grid_of(997.0, anchors).item() == 1  # nearer 995.9 than 1000
    assert grid_of(998.0, anchors).item() == 0
    assert grid_of(0.0, anchors).item() == 49
    assert grid_of(torch.tensor([500.0, 92.6, 995.9]), anchors).tolist() == [42, 49, 1]
    assert grid_of(torch.tensor([1.0, 5.0, 6.0]), torch.tensor([0.0, 10.0])).tolist() == [0, 0, 1]  # tie: first


def test_bell_loss_weight_values():
    sampler = TimestepSampler()
    t, w = sampler.timesteps, sampler.weights
    assert torch.equal(w, bell_loss_weights(t))
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert w[0].item() == 0.0 and t[0].item() == 1000.0  # the minimum sits at t = 1000
    for timestep, weight in ((500.0, 2.0764), (800.0, 1.2086), (900.0, 0.6309), (990.0, 0.0639)):
        assert sampler.weight_of(timestep).item() == pytest.approx(weight, abs=1e-4)


def test_shifted_uniform_draws_one_table_index_per_sample():
    sampler = TimestepSampler()
    draw = sampler.sample(5, gen(3))
    index = torch.randint(1000, (5,), generator=gen(3))
    assert torch.equal(draw.index, index)
    assert torch.equal(draw.timestep, sampler.timesteps[index].float())
    assert torch.equal(draw.sigma, sampler.sigmas[index].float())
    assert torch.equal(draw.weight, sampler.weights[index].float())
    many = sampler.sample(20000, gen(4)).timestep
    assert (many > 500).float().mean().item() == pytest.approx(0.834, abs=0.015)


def test_logit_normal_weight_one_on_the_table():
    sampler = TimestepSampler(mode="logit_normal")
    a, b = sampler.sample(64, gen(5)), sampler.sample(64, gen(5))
    assert torch.equal(a.timestep, b.timestep) and torch.equal(a.weight, torch.ones(64))
    assert torch.equal(a.timestep, sampler.timesteps[a.index].float())
    assert sampler.weight_of(500.0).item() == 1.0


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        TimestepSampler(mode="uniform")
