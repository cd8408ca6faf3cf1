import pytest
import torch

from svi_infer.conditioning import (
    check_frames_per_clip,
    conditioning_video,
    first_frames_mask,
    held_timesteps,
    held_y,
    latent_handoff,
    pro_training_pair,
    replace_held,
    with_mask,
)


def _frames(values, h=2, w=3):
    """[3, len(values), h, w] video whose frame i is filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, None].expand(3, -1, h, w).clone()


def _per_frame(video):
    return video[0, :, 0, 0].tolist()


@pytest.mark.parametrize(
    "ref_pad_num, expected",
    [(-1, [0.5, -0.25, -0.25, -0.25, -0.25]), (0, [0.5, 0, 0, 0, 0]), (2, [0.5, -0.25, -0.25, 0, 0])],
)
def test_padding_modes_one_motion_frame(ref_pad_num, expected):
    anchor = _frames([-0.25])[:, 0]
    video = conditioning_video(_frames([0.5]), anchor, 5, ref_pad_num)
    assert video.shape == (3, 5, 2, 3)
    assert _per_frame(video) == expected


@pytest.mark.parametrize("ref_pad_num, pad", [(-1, [-1.0] * 4), (0, [0.0] * 4), (1, [-1.0, 0, 0, 0]), (9, [-1.0] * 4)])
def test_padding_modes_five_motion_frames(ref_pad_num, pad):
    motion = _frames([0.1, 0.2, 0.3, 0.4, 0.5])
    video = conditioning_video(motion, _frames([-1.0])[:, 0], 9, ref_pad_num)
    assert _per_frame(video) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5] + pad)


def test_batched_video():
    motion = _frames([0.5])[None].repeat(2, 1, 1, 1, 1)
    anchor = _frames([1.0])[:, 0][None].repeat(2, 1, 1, 1)
    video = conditioning_video(motion, anchor, 5, -1)
    assert video.shape == (2, 3, 5, 2, 3)
    assert video[1, 0, :, 0, 0].tolist() == [0.5, 1, 1, 1, 1]


def test_video_errors():
    with pytest.raises(ValueError, match="motion frames"):
        conditioning_video(_frames([0.0] * 5), None, 5, 0)
    with pytest.raises(ValueError, match="ref_pad_num"):
        conditioning_video(_frames([0.0]), None, 5, -2)
    with pytest.raises(ValueError, match="anchor"):
        conditioning_video(_frames([0.0]), None, 5, -1)


def test_mask_marks_first_latent_only():
    mask = first_frames_mask(81, 2, 3)
    assert mask.shape == (4, 21, 2, 3)
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()


def test_mask_with_more_marked_frames():
    mask = first_frames_mask(9, 1, 1, marked=5)
    assert mask[:, :, 0, 0].T.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    mask = first_frames_mask(9, 1, 1, marked=2)
    assert mask[:, 1, 0, 0].tolist() == [1, 0, 0, 0]


def test_with_mask_concatenates_channels_and_broadcasts_batch():
    latent = torch.full((2, 16, 3, 2, 2), 7.0)
    y = with_mask(latent, first_frames_mask(9, 2, 2))
    assert y.shape == (2, 20, 3, 2, 2)
    assert y[:, :4, 0].eq(1).all() and y[:, :4, 1:].eq(0).all() and y[:, 4:].eq(7).all()


def test_latent_handoff_exact():
    anchor = torch.full((2, 1, 1, 1), 1.0)
    motion = torch.full((2, 1, 1, 1), 2.0)
    y = latent_handoff(anchor, motion, 4)
    assert y.shape == (6, 4, 1, 1)
    assert y[4, :, 0, 0].tolist() == [1, 2, 0, 0]  # anchor, previous tail, literal zeros
    assert y[:4, :, 0, 0].T.tolist() == [[1] * 4, [0] * 4, [0] * 4, [0] * 4]
    first = latent_handoff(anchor, None, 4)
    assert first[4, :, 0, 0].tolist() == [1, 0, 0, 0]
    two = latent_handoff(anchor[None], torch.tensor([2.0, 3.0]).view(1, 1, 2, 1, 1).expand(1, 2, 2, 1, 1), 5)
    assert two[0, 4, :, 0, 0].tolist() == [1, 2, 3, 0, 0] and two[0, 5, :, 0, 0].tolist() == [1, 2, 3, 0, 0]


def test_latent_handoff_needs_room():
    with pytest.raises(ValueError, match="room"):
        latent_handoff(torch.zeros(2, 1, 1, 1), torch.zeros(2, 3, 1, 1), 4)


def test_frames_per_clip_rule():
    check_frames_per_clip(81)
    check_frames_per_clip(1)
    with pytest.raises(ValueError, match="4k\\+1"):
        check_frames_per_clip(80)


def _latents(values, c=2, h=1, w=2):
    """[c, len(values), h, w] latents whose frame i is filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, None].expand(c, -1, h, w).clone()


def test_pro_training_pair_exact():
    window = _latents([10.0, 11.0, 12.0, 13.0, 14.0])
    anchor = _latents([-1.0])
    motion = _latents([0.5])  # the window's latent 1, from augmented frames
    x0, held = pro_training_pair(window, anchor, motion)
    assert x0[0, :, 0, 0].tolist() == [-1.0, 11.0, 12.0, 13.0, 14.0]  # latent 0 = anchor, then the window's own
    assert held[0, :, 0, 0].tolist() == [-1.0, 0.5]
    y = held_y(held, 5)
    assert y.shape == (4 + 2, 5, 1, 2)
    assert y[:4, :, 0, 0].tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]] * 4  # only latent 0 marked
    assert y[4, :, 0, 0].tolist() == [-1.0, 0.5, 0.0, 0.0, 0.0]  # literal zeros after the held latents
    # clip 0 (no motion): the window itself, held = its first latent
    x0, held = pro_training_pair(window, anchor, None)
    assert torch.equal(x0, window) and held[0, :, 0, 0].tolist() == [10.0]
    # batched, two motion latents
    batch = [t[None].repeat(2, 1, 1, 1, 1) for t in (window, anchor, _latents([0.5, 0.75]))]
    x0, held = pro_training_pair(*batch)
    assert x0.shape == (2, 2, 5, 1, 2) and held[1, 0, :, 0, 0].tolist() == [-1.0, 0.5, 0.75]


def test_replace_held_and_held_timesteps_exact():
    x = _latents([1.0, 2.0, 3.0, 4.0])[None]
    out = replace_held(x, _latents([-1.0, -2.0]))
    assert out[0, 0, :, 0, 0].tolist() == [-1.0, -2.0, 3.0, 4.0] and x[0, 0, 0, 0, 0] == 1.0  # not in place
    with pytest.raises(ValueError, match="leave room"):
        replace_held(x, _latents([0.0] * 4))
    # 3 latent frames of 4x6 latents, patch (1, 2, 2): 6 tokens per frame; first 2 frames held
    t = held_timesteps(torch.tensor([700.0, 300.0]), (3, 4, 6), 2, (1, 2, 2))
    assert t.shape == (2, 18)
    assert t[0].tolist() == [0.0] * 12 + [700.0] * 6 and t[1].tolist() == [0.0] * 12 + [300.0] * 6
