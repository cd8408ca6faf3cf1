"""Error measurement (svi.md §1.4 step 4) and the bank-update decision (step 5)."""

import torch

from svi_infer.flow import add_noise, noise_from_velocity, x0_from_velocity
from svi_train.recycling import ErrorBank, Flags, RecyclingConfig, in_warmup, measure, record, should_update

CLEAN = Flags(noise=False, latent=False, cond=False, clean=True)
DIRTY = Flags(noise=True, latent=True, cond=True, clean=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_zero_when_the_prediction_is_the_target():
    v = torch.randn(2, 3, 4, generator=gen())
    errors = measure(v, v.clone(), 0.3)
    assert torch.equal(errors.noise, torch.zeros_like(v)) and torch.equal(errors.x0, torch.zeros_like(v))


def test_sign_and_scale_by_hand():
    errors = measure(torch.tensor([1.0, 3.0]), torch.tensor([0.5, -1.0]), 0.25)  # d = [0.5, 4]
    assert errors.noise.tolist() == [0.375, 3.0]  # (1 - sigma) d: the predicted noise overshoots
    assert errors.x0.tolist() == [-0.125, -1.0]  # -sigma d


def test_equals_the_one_step_jumps_to_both_endpoints():
    g = gen(1)
    x0, noise, v_pred = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = 0.7
    x_t, v_target = add_noise(x0, noise, sigma), noise - x0
    errors = measure(v_pred, v_target, torch.tensor(sigma))
    noise_jump = noise_from_velocity(x_t, v_pred, sigma) - noise_from_velocity(x_t, v_target, sigma)
    x0_jump = x0_from_velocity(x_t, v_pred, sigma) - x0_from_velocity(x_t, v_target, sigma)
    assert torch.allclose(errors.noise.double(), noise_jump, atol=1e-6)
    assert torch.allclose(errors.x0.double(), x0_jump, atol=1e-6)


def test_detached_float32_and_one_sigma_per_sample():
    v_pred = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    errors = measure(v_pred * 3, torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor([0.25, 0.5]))
    assert errors.noise.dtype == torch.float32 and not errors.noise.requires_grad and not errors.x0.requires_grad
    assert errors.noise.tolist() == [[1.5] * 3, [1.0] * 3]
    assert errors.x0.tolist() == [[-0.5] * 3, [-1.0] * 3]


def test_should_update():
    cfg = RecyclingConfig(p_clean_update=0.0)
    g = gen()
    state = g.get_state()
    assert should_update(DIRTY, cfg, g) is True
    assert torch.equal(g.get_state(), state)  # no draw for a non-clean sample
    assert should_update(CLEAN, cfg, g) is False
    assert should_update(CLEAN, RecyclingConfig(p_clean_update=1.0), g) is True
    assert should_update(DIRTY, RecyclingConfig(enabled=False), g) is False
    hits = sum(should_update(CLEAN, RecyclingConfig(p_clean_update=0.1), g) for _ in range(2000))
    assert 140 <= hits <= 260


def test_in_warmup_covers_the_first_steps():
    cfg = RecyclingConfig(warmup_iters=50)
    assert [in_warmup(s, cfg) for s in (0, 49, 50, 51)] == [True, True, False, False]
    assert not in_warmup(0, RecyclingConfig(warmup_iters=0))


def test_record_fills_both_banks_under_the_grid():
    noise_bank = ErrorBank("noise", num_grids=4, capacity=2, storage_dtype="float32")
    x0_bank = ErrorBank("x0", num_grids=4, capacity=2, storage_dtype="float32")
    record(measure(torch.tensor([2.0]), torch.tensor([1.0]), 0.25), 2, noise_bank, x0_bank, gen())
    assert noise_bank.sample(2, gen()).tolist() == [0.75] and x0_bank.sample(2, gen()).tolist() == [-0.25]
