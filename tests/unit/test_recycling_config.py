"""RecyclingConfig: the shipped script defaults, and one clear ValueError per bad field."""

from dataclasses import FrozenInstanceError

import pytest

from svi_train.recycling import RecyclingConfig


def test_defaults_are_the_shipped_script_values():
    cfg = RecyclingConfig()
    assert (cfg.p_noise, cfg.p_latent, cfg.p_cond, cfg.p_clean, cfg.p_clean_update) == (0.01, 0.9, 0.9, 0.2, 0.1)
    assert (cfg.num_grids, cfg.shift, cfg.capacity, cfg.warmup_iters) == (50, 5.0, 500, 50)
    assert (cfg.replacement, cfg.cond_error_frames, cfg.cond_from_all_grids) == ("nearest_l2", 3, True)
    assert (cfg.modulation, cfg.storage_dtype, cfg.max_bytes_per_bank, cfg.enabled) == (0.0, "bfloat16", "auto", True)


def test_byte_cap_is_auto_or_a_positive_integer():
    assert RecyclingConfig(max_bytes_per_bank=1 << 30).max_bytes_per_bank == 1 << 30


def test_frozen():
    with pytest.raises(FrozenInstanceError):
        RecyclingConfig().p_noise = 0.5


def test_integer_probabilities_are_accepted():
    assert RecyclingConfig(p_noise=1, p_clean=0).p_noise == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("p_noise", 1.5),
        ("p_latent", -0.1),
        ("p_cond", "0.9"),
        ("p_clean", True),
        ("p_clean_update", 2),
        ("num_grids", 0),
        ("capacity", 2.5),
        ("cond_error_frames", 0),
        ("max_bytes_per_bank", 0),
        ("max_bytes_per_bank", "lots"),
        ("max_bytes_per_bank", 1.5e9),
        ("max_bytes_per_bank", True),
        ("sketch_size", 0),
        ("warmup_iters", -1),
        ("shift", 0.0),
        ("modulation", 1.5),
        ("replacement", "l2_batch"),
        ("storage_dtype", "int8"),
        ("cond_from_all_grids", 1),
        ("enabled", "yes"),
    ],
)
def test_bad_field_names_itself(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        RecyclingConfig(**{field: value})
