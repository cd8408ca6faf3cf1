"""Flags and injection (svi.md §1.4 steps 1-2) on tiny hand-made latents: C=2 channels, T=4 frames, 1x1."""

import pytest
import torch

from svi_train.recycling import (
    ErrorBank,
    Flags,
    Injected,
    RecyclingConfig,
    draw_flags,
    inject,
    recycled_input_and_target,
)

C, T = 2, 4
GRID = 3
ALL = RecyclingConfig(p_noise=1.0, p_latent=1.0, p_cond=1.0, p_clean=0.0, cond_error_frames=2)
NONE = RecyclingConfig(p_noise=0.0, p_latent=0.0, p_cond=0.0, p_clean=0.0)
YES = Flags(noise=True, latent=True, cond=True, clean=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs():
    x0 = torch.arange(C * T, dtype=torch.float32).reshape(C, T, 1, 1)
    noise = torch.full((C, T, 1, 1), 0.5)
    y = torch.cat([torch.ones(4, T, 1, 1), -torch.ones(C, T, 1, 1)])  # mask channels first
    return x0, noise, y


def x0_error() -> torch.Tensor:
    """Distinct value per (channel, frame): 100 * (c + 1) + t."""
    return (100.0 * torch.arange(1, C + 1).reshape(C, 1) + torch.arange(T)).reshape(C, T, 1, 1)


def banks(noise_grids=(GRID,), x0_grids=(GRID,)):
    noise_bank = ErrorBank("noise", num_grids=8, capacity=2)
    x0_bank = ErrorBank("x0", num_grids=8, capacity=2)
    for g in noise_grids:
        noise_bank.add(torch.full((C, T, 1, 1), 0.25), g, gen())
    for g in x0_grids:
        x0_bank.add(x0_error(), g, gen())
    return noise_bank, x0_bank


def test_flags_probabilities_zero_and_one():
    g = gen()
    assert draw_flags(NONE, g) == Flags(noise=False, latent=False, cond=False, clean=False)
    assert draw_flags(ALL, g) == YES
    assert draw_flags(RecyclingConfig(p_noise=1.0, p_latent=1.0, p_cond=1.0, p_clean=1.0), g) == Flags(
        noise=False, latent=False, cond=False, clean=True
    )
    off = RecyclingConfig(p_noise=1.0, p_latent=1.0, p_cond=1.0, p_clean=1.0, enabled=False)
    assert draw_flags(off, g) == Flags(noise=False, latent=False, cond=False, clean=False)


def test_flags_use_four_draws_in_the_reference_order():
    cfg = RecyclingConfig(p_noise=0.5, p_cond=0.5, p_latent=0.5, p_clean=0.5)
    for seed in range(8):
        u = torch.rand(4, generator=gen(seed), dtype=torch.float64).tolist()  # noise, cond, latent, clean
        clean = u[3] < 0.5
        expected = Flags(
            noise=u[0] < 0.5 and not clean, latent=u[2] < 0.5 and not clean, cond=u[1] < 0.5 and not clean, clean=clean
        )
        g = gen(seed)
        assert draw_flags(cfg, g) == expected
        assert torch.equal(g.get_state(), _after_four(seed))
    g = gen(0)
    draw_flags(RecyclingConfig(enabled=False), g)  # a baseline run consumes the generator alike
    assert torch.equal(g.get_state(), _after_four(0))


def _after_four(seed):
    g = gen(seed)
    torch.rand(4, generator=g, dtype=torch.float64)
    return g.get_state()


def test_no_flags_is_an_exact_no_op():
    x0, noise, y = inputs()
    noise_bank, x0_bank = banks()
    flags = draw_flags(NONE, gen())
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, NONE, gen(), flags)
    assert out.x0 is x0 and out.noise is noise and out.y is y
    assert out.flags == Flags(noise=False, latent=False, cond=False, clean=False)


def test_full_injection_exact_values():
    x0, noise, y = inputs()
    x0_in, noise_in, y_in = x0.clone(), noise.clone(), y.clone()
    noise_bank, x0_bank = banks()
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, ALL, gen(), YES)
    assert out.flags == YES
    assert torch.equal(out.x0, x0_in + x0_error())
    assert torch.equal(out.noise, torch.full((C, T, 1, 1), 0.75))
    # conditioning: latent channels of the first k=2 frames get frames j..j+1 of the error; nothing else moves
    delta = out.y - y_in
    assert torch.equal(delta[:4], torch.zeros(4, T, 1, 1))  # mask channels untouched
    assert torch.equal(delta[4:, 2:], torch.zeros(C, T - 2, 1, 1))  # frames >= k untouched
    windows = [j for j in range(T - 1) if torch.equal(delta[4:, :2], x0_error()[:, j : j + 2])]
    assert len(windows) == 1
    assert torch.equal(x0, x0_in) and torch.equal(noise, noise_in) and torch.equal(y, y_in)  # inputs untouched


def test_cond_window_covers_every_full_window():
    noise_bank, x0_bank = banks()
    starts = set()
    for seed in range(40):
        x0, noise, y = inputs()
        out = inject(x0, noise, y, GRID, noise_bank, x0_bank, ALL, gen(seed), YES)
        starts.add(int(out.y[4, 0, 0, 0] - y[4, 0, 0, 0]) - 100)
    assert starts == {0, 1, 2}


def test_each_error_is_gated_on_its_own_bank():
    x0, noise, y = inputs()
    noise_bank, x0_bank = banks(noise_grids=(), x0_grids=(GRID,))  # reference would skip the latent error here
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, ALL, gen(), YES)
    assert out.flags == Flags(noise=False, latent=True, cond=True, clean=False)
    assert torch.equal(out.noise, noise) and torch.equal(out.x0, x0 + x0_error())

    noise_bank, x0_bank = banks(noise_grids=(GRID,), x0_grids=())  # reference would add a zero latent error
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, ALL, gen(), YES)
    assert out.flags == Flags(noise=True, latent=False, cond=False, clean=False)
    assert torch.equal(out.x0, x0) and torch.equal(out.y, y)


def test_conditioning_error_from_any_grid_or_the_same_grid():
    x0, noise, y = inputs()
    noise_bank, x0_bank = banks(noise_grids=(), x0_grids=(6,))
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, ALL, gen(), YES)
    assert out.flags == Flags(noise=False, latent=False, cond=True, clean=False)
    same_grid = RecyclingConfig(p_clean=0.0, cond_from_all_grids=False, cond_error_frames=2)
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, same_grid, gen(), YES)
    assert out.flags.cond is False and torch.equal(out.y, y)


def test_cond_frames_are_capped_by_the_clip_length():
    x0, noise, y = inputs()
    noise_bank, x0_bank = banks()
    cfg = RecyclingConfig(p_clean=0.0, cond_error_frames=9)
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, cfg, gen(), Flags(False, False, True, False))
    assert torch.equal(out.y[4:] - y[4:], x0_error())


def test_cond_frames_stop_at_the_held_latents():
    """Latent hand-off: the error reaches only the held latents; the zero latents after them stay zero."""
    x0, noise, y = inputs()
    noise_bank, x0_bank = banks()
    cfg = RecyclingConfig(p_clean=0.0, cond_error_frames=3)
    out = inject(x0, noise, y, GRID, noise_bank, x0_bank, cfg, gen(), Flags(False, False, True, False), cond_frames=1)
    delta = out.y[4:] - y[4:]
    assert not delta[:, 1:].any()
    g = gen()
    x0_bank.sample_any(g)  # replay the draws: the error, then the start of its 1-frame window (of four)
    start = int(torch.randint(T, (1,), generator=g))
    assert torch.equal(delta[:, :1], x0_error()[:, start : start + 1])


def test_modulation_scales_each_error_uniformly():
    x0, noise, y = inputs()
    noise_bank, x0_bank = banks()
    cfg = RecyclingConfig(p_clean=0.0, modulation=0.5)
    flags = Flags(noise=False, latent=True, cond=False, clean=False)
    scale = (inject(x0, noise, y, GRID, noise_bank, x0_bank, cfg, gen(1), flags).x0 - x0) / x0_error()
    g = gen(1)
    torch.randint(1, (1,), generator=g)  # the latent sample's draw
    expected = 1.0 + 0.5 * (2.0 * float(torch.rand(1, generator=g, dtype=torch.float64)) - 1.0)
    assert torch.allclose(scale, torch.full_like(scale, expected))
    assert 0.5 <= expected <= 1.5


def test_errors_follow_the_input_dtype_and_determinism():
    x0, noise, y = (t.to(torch.bfloat16) for t in inputs())
    noise_bank, x0_bank = banks()
    a = inject(x0, noise, y, GRID, noise_bank, x0_bank, ALL, gen(4), YES)
    b = inject(x0, noise, y, GRID, noise_bank, x0_bank, ALL, gen(4), YES)
    assert a.x0.dtype == a.noise.dtype == a.y.dtype == torch.bfloat16
    assert torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise) and torch.equal(a.y, b.y)


def test_shape_check():
    x0, noise, y = inputs()
    noise_bank, x0_bank = banks()
    with pytest.raises(ValueError, match=r"y \[4\+C"):
        inject(x0, noise, y[1:], GRID, noise_bank, x0_bank, ALL, gen(), YES)


def test_recycled_input_and_target():
    x0 = torch.tensor([1.0, -2.0])
    injected = Injected(x0=torch.tensor([1.5, -2.0]), noise=torch.tensor([0.5, 0.25]), y=torch.zeros(1), flags=YES)
    x_t, v_target = recycled_input_and_target(x0, injected, 0.25)
    assert x_t.tolist() == [0.75 * 1.5 + 0.25 * 0.5, 0.75 * -2.0 + 0.25 * 0.25]  # corrupted x0 and noise
    assert v_target.tolist() == [-0.5, 2.25]  # corrupted noise minus the CLEAN x0
