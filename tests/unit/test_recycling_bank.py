"""ErrorBank: storage, the three replacement policies, capacity and byte cap, sampling, stats, checkpoints."""

import io

import pytest
import torch

from svi_train.recycling import ErrorBank, RecyclingConfig, make_banks


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bank(replacement: str = "fifo", capacity: int = 3, num_grids: int = 4, **kw) -> ErrorBank:
    kw.setdefault("storage_dtype", "float32")
    return ErrorBank("x0", num_grids=num_grids, capacity=capacity, replacement=replacement, **kw)


def contents(b: ErrorBank, grid: int) -> list[list[float]]:
    return [e.tolist() for e in b.state_dict()["errors"][grid]]


def test_add_stores_a_detached_cpu_copy_in_the_storage_dtype():
    b = ErrorBank("noise", num_grids=2, capacity=2, storage_dtype="bfloat16")
    source = torch.tensor([1.0, 2.5, -3.0], requires_grad=True)
    b.add(source * 1, 1, gen())
    with torch.no_grad():
        source.add_(100.0)  # later changes to the caller's tensor never reach the bank
    stored = b.sample(1, gen())
    assert stored.dtype == torch.bfloat16 and stored.device.type == "cpu" and not stored.requires_grad
    assert stored.tolist() == [1.0, 2.5, -3.0]
    same_dtype = torch.tensor([4.0, 5.0, 6.0], dtype=torch.bfloat16)
    b.add(same_dtype, 0, gen())
    same_dtype.add_(1.0)  # no aliasing even when no conversion was needed
    assert b.sample(0, gen()).tolist() == [4.0, 5.0, 6.0]


def test_empty_bank():
    b = bank()
    assert b.sample(0, gen()) is None and b.sample_any(gen()) is None
    assert len(b) == 0 and b.nbytes == 0
    assert b.stats() == {"entries": 0.0, "nbytes": 0.0, "inserts": 0.0, "fill": 0.0, "capacity": 3.0} | {
        f"grid{g:02d}/fill": 0.0 for g in range(4)
    }


def test_capacity_per_grid():
    b = bank(capacity=3)
    for i in range(10):
        b.add(torch.full((2,), float(i)), 1, gen(i))
    assert (b.grid_len(1), len(b), b.grid_len(0)) == (3, 3, 0)


def test_fifo_overwrites_the_oldest():
    b = bank("fifo")
    slots = [b.add(torch.tensor([float(v)]), 0, gen()) for v in (1, 2, 3, 4, 5)]
    assert slots == [0, 1, 2, 0, 1]
    assert contents(b, 0) == [[4.0], [5.0], [3.0]]


def test_random_overwrites_a_uniform_slot_drawn_from_the_generator():
    b = bank("random")
    for v in (1, 2, 3):
        b.add(torch.tensor([float(v)]), 0, gen())
    slot = b.add(torch.tensor([9.0]), 0, gen(5))
    assert slot == int(torch.randint(3, (1,), generator=gen(5)))
    expected = [[1.0], [2.0], [3.0]]
    expected[slot] = [9.0]
    assert contents(b, 0) == expected


def test_nearest_l2_overwrites_the_closest_entry():
    b = bank("nearest_l2")
    for e in ([0.0, 0.0], [10.0, 0.0], [0.0, 10.0]):
        b.add(torch.tensor(e), 2, gen())
    assert b.add(torch.tensor([9.0, 1.0]), 2, gen()) == 1
    assert b.add(torch.tensor([1.0, 2.0]), 2, gen()) == 0
    assert b.add(torch.tensor([1.0, 9.0]), 2, gen()) == 2
    assert contents(b, 2) == [[1.0, 2.0], [9.0, 1.0], [1.0, 9.0]]


def test_nearest_l2_on_the_sketch_of_large_errors():
    """More coordinates than the sketch holds: the clearly nearest entry is still found."""
    b = bank("nearest_l2", capacity=4, sketch_size=16)
    g = gen(1)
    base = [torch.randn(4, 8, 8, generator=g) for _ in range(4)]
    for e in base:
        b.add(e, 0, g)
    assert b.entry_nbytes == 4 * 256 + 4 * 16  # error + 16-float sketch
    new = base[2] + 0.1 * torch.randn(4, 8, 8, generator=g)
    assert b.add(new, 0, g) == 2


def test_byte_cap_is_never_exceeded_and_empty_grids_get_room():
    b = bank("fifo", capacity=5, max_bytes=40)  # float32 [4] = 16 bytes: 2 entries fit
    for v in range(4):
        b.add(torch.full((4,), float(v)), 0, gen())
        assert b.nbytes <= 40
    assert (b.grid_len(0), b.nbytes) == (2, 32)
    assert contents(b, 0) == [[2.0] * 4, [3.0] * 4]  # replaced in its grid by policy, below capacity
    b.add(torch.full((4,), 7.0), 3, gen())  # empty grid: the oldest entry of the fullest grid makes room
    assert (b.grid_len(0), b.grid_len(3), b.nbytes) == (1, 1, 32)
    assert contents(b, 0) == [[3.0] * 4]


def test_byte_cap_counts_sketches():
    b = bank("nearest_l2", capacity=5, max_bytes=70)  # float32 [4] + 4-float sketch = 32 bytes: 2 fit
    for v in range(5):
        b.add(torch.full((4,), float(v)), 1, gen())
    assert (b.entry_nbytes, len(b), b.nbytes) == (32, 2, 64)


def test_invalid_adds():
    b = bank(max_bytes=8)
    with pytest.raises(ValueError, match="above max_bytes"):
        b.add(torch.zeros(4), 0, gen())
    b.add(torch.zeros(2), 0, gen())  # a rejected error does not fix the bank's shape
    b = bank()
    b.add(torch.zeros(4), 0, gen())
    with pytest.raises(ValueError, match="shape"):
        b.add(torch.zeros(5), 0, gen())
    with pytest.raises(ValueError, match="grid must be in"):
        b.add(torch.zeros(4), 4, gen())


def test_sample_and_sample_any_are_uniform_draws_from_the_generator():
    b = bank(capacity=3)
    for grid, v in ((0, 1.0), (0, 2.0), (2, 3.0), (3, 4.0), (3, 5.0)):
        b.add(torch.tensor([v]), grid, gen())
    for seed in range(6):
        assert b.sample(3, gen(seed)).item() == [4.0, 5.0][int(torch.randint(2, (1,), generator=gen(seed)))]
        assert b.sample_any(gen(seed)).item() == float(int(torch.randint(5, (1,), generator=gen(seed))) + 1)
    assert b.sample(1, gen()) is None


def test_stats_are_plain_numbers():
    b = bank(capacity=4)
    b.add(torch.tensor([3.0, 4.0]), 0, gen())
    b.add(torch.tensor([0.0, 1.0]), 0, gen())
    b.add(torch.tensor([6.0, 8.0]), 2, gen())
    stats = b.stats()
    assert stats == {
        "entries": 3.0,
        "nbytes": 24.0,
        "inserts": 3.0,
        "fill": 3 / 16,
        "capacity": 4.0,
        "norm": 16.0 / 3,
        "age": 1.0,
        "grid00/fill": 0.5,
        "grid00/norm": 3.0,
        "grid00/age": 1.5,
        "grid01/fill": 0.0,
        "grid02/fill": 0.25,
        "grid02/norm": 10.0,
        "grid02/age": 0.0,
        "grid03/fill": 0.0,
    }
    assert all(type(v) is float for v in stats.values())


def _filled(replacement: str) -> ErrorBank:
    b = bank(replacement, capacity=3, storage_dtype="bfloat16", sketch_size=8)
    g = gen(7)
    for _ in range(20):
        b.add(torch.randn(2, 3, 2, generator=g), int(torch.randint(4, (1,), generator=g)), g)
    return b


@pytest.mark.parametrize("replacement", ["random", "fifo", "nearest_l2"])
def test_state_dict_round_trip_resumes_exactly(replacement):
    a = _filled(replacement)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = bank(replacement, capacity=3, storage_dtype="bfloat16", sketch_size=8)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.stats() == a.stats()
    for bk in (a, b):  # the same generator gives the same samples and the same replacements afterwards
        g = gen(3)
        bk.drawn = [bk.sample_any(g) for _ in range(5)] + [bk.sample(1, g) for _ in range(5)]
        bk.slots = [bk.add(torch.randn(2, 3, 2, generator=g), i % 4, g) for i in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a.drawn, b.drawn, strict=True))
    assert a.slots == b.slots and a.stats() == b.stats()
    for g in range(4):
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict()["errors"][g], b.state_dict()["errors"][g], strict=True)
        )


def test_load_rejects_another_layout():
    state = _filled("fifo").state_dict()
    with pytest.raises(ValueError, match="num_grids"):
        bank(num_grids=5, storage_dtype="bfloat16").load_state_dict(state)
    with pytest.raises(ValueError, match="capacity"):
        bank(capacity=1, storage_dtype="bfloat16").load_state_dict(state)


def test_same_seed_same_bank():
    assert _filled("random").stats() == _filled("random").stats()


def test_make_banks_names_them_after_what_they_store():
    noise_bank, x0_bank = make_banks(RecyclingConfig(capacity=7))
    assert (noise_bank.name, x0_bank.name, noise_bank.capacity, x0_bank.replacement) == ("noise", "x0", 7, "nearest_l2")


def test_stats_capacity_is_what_the_byte_cap_leaves_per_grid():
    b = bank("fifo", capacity=5, max_bytes=100)  # float32 [4] = 16 bytes: 6 entries fit, 1 per grid of 4
    assert b.stats()["capacity"] == 5.0  # the shape, so the entry size, is known from the first insert on
    b.add(torch.zeros(4), 0, gen())
    assert (b.grid_capacity, b.stats()["capacity"]) == (1, 1.0)
    roomy = bank("fifo", capacity=5, max_bytes=1000)  # room for 62 entries: 15 per grid
    roomy.add(torch.zeros(4), 0, gen())
    assert roomy.grid_capacity == 5  # never above the configured capacity


def test_bf16_is_the_default_storage():
    assert ErrorBank("x0", num_grids=1, capacity=1).dtype == torch.bfloat16
    noise_bank, x0_bank = make_banks(RecyclingConfig(max_bytes_per_bank=1 << 20))
    assert noise_bank.dtype == x0_bank.dtype == torch.bfloat16
    noise_bank.add(torch.zeros(2, 3), 0, gen())
    assert noise_bank.entry_nbytes == 6 * 2 + 6 * 4  # bf16 error + float32 sketch
    assert make_banks(RecyclingConfig(storage_dtype="float32", max_bytes_per_bank=64))[0].dtype == torch.float32


def test_auto_cap_is_resolved_when_banks_are_made(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr("svi_train.recycling.capacity.available_memory", lambda: 64 * 1024**3)
    noise_bank, x0_bank = make_banks(RecyclingConfig())
    assert noise_bank.max_bytes == x0_bank.max_bytes == 4 * 1024**3  # 50% of 64 GiB / 4 ranks / 2 banks


def test_load_into_a_smaller_cap_keeps_what_fits():
    """An auto cap may come out a little smaller on resume: the newest errors that fit are kept, with a warning."""
    big = bank("fifo", capacity=5, max_bytes=1000)
    for v in range(6):
        big.add(torch.full((4,), float(v)), v % 2, gen())  # grid 0: 0, 2, 4; grid 1: 1, 3, 5
    small = bank("fifo", capacity=5, max_bytes=64)  # 16-byte entries: 4 fit
    with pytest.warns(UserWarning, match="6 errors, 2 above max_bytes=64"):
        small.load_state_dict(big.state_dict())
    assert (len(small), small.nbytes) == (4, 64)
    assert contents(small, 0) == [[2.0] * 4, [4.0] * 4] and contents(small, 1) == [[3.0] * 4, [5.0] * 4]
