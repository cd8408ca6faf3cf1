import pytest
import torch

from svi_infer.conditioning import (
    check_frames_per_clip,
    conditioning_video,
    first_frames_mask,
    latent_handoff,
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
