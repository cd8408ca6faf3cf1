"""The pieces composed as a training step does, with a stand-in DiT: banks fill, runs repeat, off = baseline."""

import torch

from svi_train.recycling import (
    RecyclingConfig,
    TimestepSampler,
    draw_flags,
    grid_anchors,
    grid_of,
    inject,
    make_banks,
    measure,
    record,
    recycled_input_and_target,
    should_update,
)

C, T, H, W = 2, 5, 2, 3


def run(cfg: RecyclingConfig, steps: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    noise_bank, x0_bank = make_banks(cfg)
    sampler, anchors = TimestepSampler(shift=cfg.shift), grid_anchors(cfg.num_grids, cfg.shift)
    losses = []
    for _ in range(steps):
        x0 = torch.randn(C, T, H, W, generator=gen)
        noise = torch.randn(C, T, H, W, generator=gen)
        y = torch.cat([torch.ones(4, T, H, W), torch.randn(C, T, H, W, generator=gen)])
        draw = sampler.sample(1, gen)
        grid = int(grid_of(draw.timestep[0], anchors))
        flags = draw_flags(cfg, gen)
        injected = inject(x0, noise, y, grid, noise_bank, x0_bank, cfg, gen, flags)
        x_t, v_target = recycled_input_and_target(x0, injected, draw.sigma[0])
        v_pred = v_target + 0.1 * x_t + 0.01 * injected.y[4:]  # a stand-in DiT with an error that depends on y
        losses.append(float(((v_pred - v_target) ** 2).mean() * draw.weight[0]))
        if should_update(flags, cfg, gen):
            record(measure(v_pred, v_target, draw.sigma[0]), grid, noise_bank, x0_bank, gen)
    return noise_bank, x0_bank, losses


def test_banks_fill_and_runs_are_deterministic():
    cfg = RecyclingConfig(num_grids=10, capacity=3)
    noise_bank, x0_bank, losses = run(cfg)
    assert 0 < len(noise_bank) == len(x0_bank) <= 30
    assert noise_bank.stats() == run(cfg)[0].stats() and losses == run(cfg)[2]


def test_disabled_is_the_plain_baseline():
    noise_bank, x0_bank, _ = run(RecyclingConfig(num_grids=10, capacity=3, enabled=False))
    assert len(noise_bank) == len(x0_bank) == 0
