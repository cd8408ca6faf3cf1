"""The banks' real size: the auto byte cap, entries per grid at real latent shapes, the start-up line and warning."""

import warnings

import pytest

from svi_infer.spec import get_spec
from svi_train.recycling import RecyclingConfig
from svi_train.recycling.capacity import (
    ByteCap,
    announce_bank_capacity,
    auto_max_bytes,
    bank_capacity,
    entry_nbytes,
    latent_numel,
    ranks_per_node,
    resolve_max_bytes,
)

GiB = 1024**3
INDEX_480P = {"resolutions": [[480, 832]], "frames_per_clip": 81}
INDEX_720P = {"resolutions": [[480, 832], [720, 1280]], "frames_per_clip": 81}  # the largest latent counts


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_latent_shape_and_entry_bytes_at_real_size():
    spec = get_spec("wan2.1-i2v-14b-480p")
    assert latent_numel(spec, INDEX_480P) == 16 * 21 * 60 * 104 == 2_096_640
    assert latent_numel(spec, INDEX_720P) == 16 * 21 * 90 * 160 == 4_838_400
    assert entry_nbytes(2_096_640, "bfloat16", "nearest_l2", 4096) == 4_193_280 + 16_384  # error + sketch
    assert entry_nbytes(2_096_640, "float32", "fifo", 4096) == 8_386_560


def test_auto_cap_from_available_memory_and_ranks():
    assert auto_max_bytes(128 * GiB, 8) == 4 * GiB  # half of 128 GiB, over 8 ranks and 2 banks
    assert auto_max_bytes(64 * GiB, 1) == 16 * GiB
    assert auto_max_bytes(1000, 3) == 83  # 500 // 6
    assert resolve_max_bytes("auto", available=128 * GiB, ranks=8).nbytes == 4 * GiB
    assert resolve_max_bytes(123, available=128 * GiB, ranks=8) == ByteCap(123, "config")  # explicit wins


def test_ranks_per_node():
    assert ranks_per_node(3, env={"LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun knows best
    assert [ranks_per_node(d, env={}) for d in (4, "2", [0, 1, 2], "0,1", "[0, 1]", "1,")] == [4, 2, 3, 2, 2, 1]
    assert ranks_per_node("auto", env={}, accelerator="cpu") == 1


@pytest.mark.parametrize(
    ("spec_id", "index", "cap", "per_grid", "grids"),
    [
        ("wan2.1-i2v-14b-480p", INDEX_480P, 4 * GiB, 20, 50),  # 128 GiB node, 8 ranks: 1020 entries per bank
        ("wan2.1-i2v-14b-480p", INDEX_480P, 16 * GiB, 81, 50),  # 64 GiB workstation, 1 GPU
        ("wan2.1-i2v-14b-720p", INDEX_720P, 4 * GiB, 8, 50),
        ("wan2.1-i2v-14b-720p", INDEX_720P, 16 * GiB, 35, 50),
        ("wan2.2-i2v-a14b", INDEX_480P, 4 * GiB, 10, 100),  # two experts: twice the grids share the cap
        ("wan2.2-i2v-a14b", INDEX_480P, 16 * GiB, 40, 100),
        ("wan2.1-i2v-14b-480p", INDEX_480P, 1000 * GiB, 500, 50),  # never above the configured capacity
    ],
)
def test_per_grid_capacity_from_cap_and_latent_shape(spec_id, index, cap, per_grid, grids):
    spec = get_spec(spec_id)
    got = bank_capacity(RecyclingConfig(), latent_numel(spec, index), len(spec.experts), ByteCap(cap, "test"))
    assert (got.per_grid, got.grids) == (per_grid, grids)


def test_announce_prints_one_line_per_bank_warns_below_500_and_returns_the_cap(capsys):
    spec = get_spec("wan2.1-i2v-14b-480p")
    with pytest.warns(UserWarning, match="hold 20 errors per grid, below the reference's 500"):
        cfg = announce_bank_capacity(RecyclingConfig(), spec, INDEX_480P, devices=8, available=128 * GiB)
    assert cfg.max_bytes_per_bank == 4 * GiB
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"recycling: {bank} bank holds 20 errors per grid (capacity 500) x 50 grids, 4.01 MiB per error, cap 4.00 GiB "
        "(auto: 50% of 128.0 GiB available / 8 rank(s) on the node / 2 banks)"
        for bank in ("noise", "x0")
    ]


def test_no_warning_at_the_reference_size_or_a_chosen_smaller_capacity(capsys):
    spec = get_spec("wan2.1-i2v-14b-480p")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = RecyclingConfig(max_bytes_per_bank=300 * GiB)
        assert announce_bank_capacity(big, spec, INDEX_480P).max_bytes_per_bank == 300 * GiB
        small = RecyclingConfig(capacity=10, max_bytes_per_bank=8 * GiB)  # the user asked for 10
        announce_bank_capacity(small, spec, INDEX_480P)
    assert "(config)" in capsys.readouterr().out


def test_announce_is_silent_without_recycling(capsys):
    off = RecyclingConfig(enabled=False)
    assert announce_bank_capacity(off, get_spec("wan2.1-i2v-14b-480p"), INDEX_480P) is off
    assert capsys.readouterr().out == ""
