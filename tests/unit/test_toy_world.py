"""data_tools.toy_world: deterministic scenes, disjoint splits, and files that hold the ground truth."""

import re

import decord
import numpy as np
import pytest

from data_tools.toy_world import (
    HELDOUT_SEED0,
    SIZE,
    load_truth,
    main,
    make_world,
    render,
    split_seeds,
    sprite_coverage,
    write_world,
)


def test_world_is_a_pure_function_of_its_seed():
    a, b = render(make_world(7), 20), render(make_world(7), 20)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(make_world(8), 20))


def test_sprites_move_and_stay_inside_the_frame():
    for seed in range(20):
        world = make_world(seed)
        pos = world.positions(400)
        lo, hi = world.radii[None, :, None], SIZE - world.radii[None, :, None]
        assert ((pos >= lo - 1e-4) & (pos <= hi + 1e-4)).all()
        step = np.abs(np.diff(pos, axis=0)).max(axis=(1, 2))
        assert step.max() <= 1.21 and step.min() > 0  # at most the top speed per frame, never still
        assert 1 <= len(world.shapes) <= 3


def test_frames_show_the_background_and_the_sprites():
    world = make_world(3)
    frame = render(world, 1)[0].astype(np.float32) / 255
    covered = np.zeros((SIZE, SIZE), bool)
    for k, shape in enumerate(world.shapes):
        cover = sprite_coverage(shape, float(world.radii[k]), world.start[k])
        covered |= cover > 0
        inside = cover >= 1
        assert inside.sum() > 50
        if k == len(world.shapes) - 1:  # drawn last: nothing covers it
            assert np.abs(frame[inside] - world.sprite_colours[k]).max() < 0.01
    assert np.abs(frame[~covered] - world.background[~covered]).max() < 0.003


def test_splits_never_share_a_seed():
    train, held = split_seeds("train", 1000), split_seeds("heldout", 1000)
    assert not set(train) & set(held)
    assert held[0] == HELDOUT_SEED0
    with pytest.raises(ValueError, match="split must be"):
        split_seeds("test", 1)


def test_caption_names_what_is_drawn():
    world = make_world(1)
    caption = world.caption
    for name, shape in zip(world.sprite_names, world.shapes, strict=True):
        assert f"{name} {shape}" in caption
    for colour in world.colour_names:
        assert colour in caption
    assert not re.search(r"\ba [aeiou]", caption)  # "an orange", not "a orange"


def test_written_files_hold_video_caption_and_truth(tmp_path):
    paths = write_world(tmp_path, "heldout", videos=2, seconds=2.0)
    assert [p.name for p in paths] == [f"heldout_{HELDOUT_SEED0:06d}.mp4", f"heldout_{HELDOUT_SEED0 + 1:06d}.mp4"]
    world = make_world(HELDOUT_SEED0)
    true = render(world, 16)
    decoded = decord.VideoReader(str(paths[0])).get_batch(list(range(16))).asnumpy()
    assert np.abs(decoded.astype(int) - true).mean() < 2.0  # near-lossless: the file is the truth
    assert paths[0].with_suffix(".txt").read_text() == world.caption + "\n"
    gt = load_truth(paths[0])
    assert np.array_equal(gt["positions"], world.positions(16))
    assert gt["background"].shape == (SIZE, SIZE, 3) and gt["colours"].shape == (len(world.shapes), 3)
    assert list(gt["shapes"]) == list(world.shapes)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_cli_writes_and_refuses_bad_counts(tmp_path, capsys):
    assert main([str(tmp_path / "w"), "--videos", "1", "--seconds", "1"]) == 0
    assert (tmp_path / "w" / "train_000000.truth.npz").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "w"), "--videos", "0"])
    assert exit_info.value.code == 2
    assert "--videos must be >= 1" in capsys.readouterr().err
