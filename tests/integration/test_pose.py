"""SVI-Dance pose conditioning: the UniAnimate pose encoder, its hook on the DiT, checkpoints, the pose stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from torch import nn

from svi_infer.pose import (
    PoseEncoder,
    attach_pose,
    detach_pose,
    find_pose_encoder,
    fit_pose,
    letterbox,
    load_pose_encoder,
    pose_frames_for_clip,
    pose_state_dict,
    pose_video_tensor,
    read_pose_video,
    save_pose_encoder,
    set_pose,
    side_by_side,
)
from svi_infer.spec import get_spec
from svi_infer.tiny import tiny_transformer
from svi_infer.video_io import crop_box, write_mp4
from tests.helpers import TINY21, assert_same_outputs, dit_inputs

pytestmark = pytest.mark.numerics  # compared across instances and loaders: rerun on AVX2 kernels

SVI_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
CONVS = [0, 2, 4, 6, 8, 10, 12]  # nn.Sequential indices of the convolutions (SiLUs between them)
EXPECTED_KEYS = [f"dwpose_embedding.{i}.{p}" for i in CONVS for p in ("weight", "bias")]


def _encoder(dim: int = 24, seed: int = 1) -> PoseEncoder:
    torch.manual_seed(seed)
    return PoseEncoder(dim)


def _pose(frames: int = 9, height: int = 48, width: int = 80, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (3, frames, height, width) if batch is None else (batch, 3, frames, height, width)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _run(transformer: nn.Module, **overrides) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**{**dit_inputs(TINY21), **overrides})[0]


@pytest.fixture
def dit():
    return tiny_transformer(get_spec(TINY21))


# -- the encoder --------------------------------------------------------------------------------------------------


def test_encoder_layers_and_names_match_unianimate():
    enc = PoseEncoder(5120, zero_init=False).to("meta")
    assert ["dwpose_embedding." + k for k in enc.state_dict()] == EXPECTED_KEYS
    convs = [enc[i] for i in CONVS]
    assert all(isinstance(enc[i], nn.SiLU) for i in range(1, 12, 2)) and len(enc) == 13
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16)] + [(16, 16)] * 5 + [(16, 5120)]
    assert [c.kernel_size for c in convs] == [(3, 3, 3)] * 6 + [(1, 2, 2)]
    assert [c.stride for c in convs] == [(1, 1, 1)] * 3 + [(1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert [c.padding for c in convs] == [(1, 1, 1)] * 6 + [(0, 0, 0)]


@pytest.mark.parametrize(
    ("spec_id", "frames", "height", "width"),
    [
        ("wan2.1-i2v-14b-480p", 81, 480, 832),
        ("wan2.1-i2v-14b-720p", 81, 720, 1280),
        ("wan2.1-i2v-14b-480p", 81, 832, 480),
        (TINY21, 9, 48, 80),
        (TINY21, 5, 48, 80),
        (TINY21, 1, 48, 80),
    ],
)
def test_encoder_output_is_the_patch_embedding_shape(spec_id, frames, height, width):
    """Shapes on the meta device: the pose tokens must line up with the latents' patch tokens exactly."""
    spec = get_spec(spec_id)
    with torch.device("meta"):
        enc = PoseEncoder(spec.dim)
        patch = nn.Conv3d(spec.in_channels, spec.dim, spec.patch_size, stride=spec.patch_size)
        pose = torch.zeros(3, frames, height, width, dtype=torch.uint8)
        latents = torch.zeros(1, spec.in_channels, spec.latent_frames(frames), height // 8, width // 8)
        tokens = patch(latents)
        out = enc(pose)
    assert out.shape == tokens.shape
    assert out.shape[2:] == PoseEncoder.output_shape(frames, height, width)
    if spec.dim == 5120 and (height, width) == (480, 832):
        assert tuple(out.shape) == (1, 5120, 21, 30, 52)


def test_encoder_repeats_the_first_pose_frame_three_times_and_scales_by_255():
    enc = _encoder()
    pose = _pose(frames=5)
    seen = {}
    enc[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        enc(pose)
    x = seen["x"]
    assert x.shape == (1, 3, 8, 48, 80)
    expected = torch.cat([pose[:, :1]] * 3 + [pose], dim=1).float() / 255.0
    torch.testing.assert_close(x[0], expected, rtol=0, atol=0)


def test_encoder_rejects_bad_pose_sizes():
    enc = _encoder()
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        enc(_pose(frames=8))
    with pytest.raises(ValueError, match="multiples of 16"):
        enc(_pose(height=40))
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        enc(torch.zeros(9, 48, 80, 3, dtype=torch.uint8))


def test_zero_init_encoder_outputs_zeros():
    with torch.no_grad():
        out = PoseEncoder(24, zero_init=True)(_pose())
    assert out.abs().max() == 0


# -- the hook on the transformer ----------------------------------------------------------------------------------


def test_no_pose_is_bit_identical(dit):
    plain = _run(dit)
    enc = attach_pose(dit, _encoder())
    assert dit.dwpose_embedding is enc and find_pose_encoder(dit) is enc
    assert torch.equal(_run(dit), plain)
    set_pose(dit, _pose())
    assert not torch.equal(_run(dit), plain)
    set_pose(dit, None)
    assert torch.equal(_run(dit), plain)
    set_pose(dit, _pose())
    assert detach_pose(dit) is enc
    assert not hasattr(dit, "dwpose_embedding") and find_pose_encoder(dit) is None
    assert torch.equal(_run(dit), plain)


def test_pose_is_added_to_the_patch_tokens(dit):
    enc, pose = _encoder(), _pose()
    with torch.no_grad():
        tokens = enc(pose)
    handle = dit.patch_embedding.register_forward_hook(lambda m, a, out: out + tokens)
    expected = _run(dit)
    handle.remove()
    attach_pose(dit, enc)
    set_pose(dit, pose)
    torch.testing.assert_close(_run(dit), expected, rtol=0, atol=0)


def test_pose_persists_and_numpy_frames_are_accepted(dit):
    attach_pose(dit, _encoder())
    pose = _pose()
    set_pose(dit, pose)
    first = _run(dit)
    assert torch.equal(_run(dit), first)  # stays set between forwards
    set_pose(dit, pose.permute(1, 2, 3, 0).numpy())  # [F, H, W, 3] frames as read_pose_video returns them
    assert torch.equal(_run(dit), first)
    assert torch.equal(pose_video_tensor(pose.permute(1, 2, 3, 0).numpy())[0], pose)


def test_batch_broadcast_and_per_sample_poses(dit):
    attach_pose(dit, _encoder())
    base = dit_inputs(TINY21)
    batched = {
        k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and k != "timestep" else v) for k, v in base.items()
    }
    batched["hidden_states"] = torch.cat([base["hidden_states"], base["hidden_states"].flip(0) * 0.5])
    pose_a, pose_b = _pose(seed=1), _pose(seed=2)

    def single(i: int, pose: torch.Tensor) -> torch.Tensor:
        set_pose(dit, pose)
        return _run(dit, hidden_states=batched["hidden_states"][i : i + 1])

    set_pose(dit, pose_a)  # one pose for the whole batch (CFG: pose in cond and uncond)
    both = _run(dit, **batched)
    torch.testing.assert_close(both[0:1], single(0, pose_a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:2], single(1, pose_a), rtol=1e-5, atol=1e-5)
    set_pose(dit, torch.stack([pose_a, pose_b]))
    per_sample = _run(dit, **batched)
    torch.testing.assert_close(per_sample[1:2], single(1, pose_b), rtol=1e-5, atol=1e-5)
    set_pose(dit, _pose(batch=3))
    with pytest.raises(ValueError, match="pose batch 3"):
        _run(dit, **batched)


def test_wrong_pose_size_names_the_expected_clip(dit):
    attach_pose(dit, _encoder())
    set_pose(dit, _pose(frames=13))
    with pytest.raises(ValueError, match="must have 9 frames of 48x80"):
        _run(dit)
    with pytest.raises(ValueError, match="4k\\+1"):
        set_pose(dit, _pose(frames=10))


def test_attach_errors(dit):
    with pytest.raises(ValueError, match="attach_pose first"):
        set_pose(dit, _pose())
    with pytest.raises(ValueError, match="outputs 32 channels"):
        attach_pose(dit, PoseEncoder(32))
    with pytest.raises(ValueError, match="patch_embedding"):
        attach_pose(nn.Linear(2, 2), _encoder())


def test_reattach_replaces_the_encoder(dit):
    first = attach_pose(dit, _encoder(seed=1))
    second = attach_pose(dit, _encoder(seed=2))
    assert dit.dwpose_embedding is second and first not in list(dit.modules())
    assert len(dit.patch_embedding._forward_hooks) == 1
    set_pose(dit, _pose())
    only_second = _run(dit)
    detach_pose(dit)
    attach_pose(dit, second)
    set_pose(dit, _pose())
    assert torch.equal(_run(dit), only_second)


def test_pose_encoded_once_without_grad_and_again_after_a_weight_change(dit):
    enc = attach_pose(dit, _encoder())
    calls = []
    enc.register_forward_pre_hook(lambda m, a: calls.append(1))
    set_pose(dit, _pose())
    first = _run(dit)
    _run(dit)
    assert len(calls) == 1
    with torch.no_grad():
        enc[12].bias.add_(1.0)  # an optimizer step or a load changes the weights in place
    assert not torch.equal(_run(dit), first) and len(calls) == 2
    set_pose(dit, _pose(seed=5))
    _run(dit)
    assert len(calls) == 3


def test_gradients_reach_encoder_and_lora_under_gradient_checkpointing(dit):
    dit.requires_grad_(False)
    dit.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=SVI_TARGETS, init_lora_weights="gaussian"), "svi")
    enc = attach_pose(dit, _encoder())  # after add_adapter: peft freezes every non-LoRA parameter it sees
    dit.enable_gradient_checkpointing()
    dit.train()
    set_pose(dit, _pose())
    calls = []
    enc.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = dit(**dit_inputs(TINY21))[0]
    out.square().mean().backward()
    assert len(calls) == 1  # re-encoded on a training forward (not cached)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    lora = [p for n, p in dit.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    # the LoRA targets never wrap the encoder's layers, and peft's adapter state leaves it out
    assert all(type(enc[i]) is nn.Conv3d for i in CONVS)
    assert not any("dwpose" in n for n, _ in dit.named_modules() if "lora" in n)
    assert not any("dwpose" in k for k in get_peft_model_state_dict(dit, adapter_name="svi"))


def test_pose_dropout_by_none_matches_a_zeroed_pose_embedding(dit):
    plain = _run(dit)
    attach_pose(dit, PoseEncoder(24, zero_init=True))
    set_pose(dit, _pose())
    assert torch.equal(_run(dit), plain)


def test_encoder_in_float32_on_a_bfloat16_transformer(dit):
    dit.to(torch.bfloat16)
    enc = attach_pose(dit, _encoder())
    assert enc[0].weight.dtype == torch.float32
    set_pose(dit, _pose())
    inputs = {
        k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in dit_inputs(TINY21).items()
    }
    with torch.no_grad():
        out = dit(**inputs)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# -- checkpoints --------------------------------------------------------------------------------------------------


def test_state_dict_layout_and_safetensors_round_trip(dit, tmp_path):
    enc = attach_pose(dit, _encoder(seed=3))
    state = pose_state_dict(dit)
    assert list(state) == EXPECTED_KEYS
    assert all(v.device.type == "cpu" for v in state.values())
    path = tmp_path / "pose.safetensors"
    save_pose_encoder(dit, path)
    set_pose(dit, _pose())
    expected = _run(dit)

    fresh = tiny_transformer(get_spec(TINY21))
    loaded = load_pose_encoder(attach_pose(fresh, _encoder(seed=4)), path)
    assert loaded is fresh.dwpose_embedding
    for (k, a), b in zip(enc.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    set_pose(fresh, _pose())
    assert_same_outputs(_run(fresh), expected)


@pytest.mark.parametrize("prefix", ["", "model.", "module.", "_orig_mod.", "pipe.", "base_model.model."])
def test_loads_prefixed_keys_among_lora_and_other_modules(prefix):
    src = _encoder(seed=5)
    state = {prefix + k: v for k, v in pose_state_dict(src).items()}
    state["pipe.dit.blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(4, 24)
    state["randomref_embedding_pose.0.weight"] = torch.zeros(16, 3, 3, 3)  # UniAnimate-DiT's reference-pose branch
    dst = load_pose_encoder(_encoder(seed=6), state)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))


def test_loads_a_bare_encoder_state_dict_and_casts_dtype():
    src = _encoder(seed=7).to(torch.bfloat16)
    dst = load_pose_encoder(_encoder(seed=8), src.state_dict())
    assert dst[0].weight.dtype == torch.float32
    assert torch.equal(dst[0].weight, src[0].weight.float())


def test_loads_pickled_unianimate_style_ckpt_with_weights_only(tmp_path):
    """UniAnimate-DiT ships a Lightning ``.ckpt``: a flat dict of the trainable tensors (or under state_dict)."""
    src = _encoder(seed=9)
    flat = {**pose_state_dict(src), "pipe.dit.blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(24, 4)}
    torch.save(flat, tmp_path / "flat.ckpt")
    torch.save({"state_dict": flat, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("flat.ckpt", "wrapped.pth"):
        dst = load_pose_encoder(_encoder(seed=10), tmp_path / name)
        assert torch.equal(dst[12].weight, src[12].weight)


class _NotATensor:
    pass


def test_refuses_pickles_that_need_code(tmp_path):
    torch.save({"dwpose_embedding.0.weight": _NotATensor()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_pose_encoder(_encoder(), tmp_path / "evil.ckpt")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_pose_encoder(_encoder(), tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="cannot read"):
        load_pose_encoder(_encoder(), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_pose_encoder(_encoder(), tmp_path / "missing.safetensors")


def test_loads_a_folder_of_safetensors_shards(tmp_path):
    from safetensors.torch import save_file

    src = _encoder(seed=11)
    state = pose_state_dict(src)
    keys = list(state)
    save_file({k: state[k] for k in keys[:6]}, str(tmp_path / "lora_weights_01_of_02.safetensors"))
    save_file({k: state[k] for k in keys[6:]}, str(tmp_path / "lora_weights_02_of_02.safetensors"))
    dst = load_pose_encoder(_encoder(seed=12), tmp_path)
    assert torch.equal(dst[12].bias, src[12].bias)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        load_pose_encoder(_encoder(), tmp_path / "empty")


def test_strict_loading_names_every_bad_key():
    state = pose_state_dict(_encoder())
    del state["dwpose_embedding.4.bias"]
    state["dwpose_embedding.14.weight"] = torch.zeros(1)
    state["dwpose_embedding.12.weight"] = torch.zeros(5120, 16, 1, 2, 2)
    state["dwpose_embedding.12.bias"] = torch.zeros(5120)
    with pytest.raises(ValueError) as err:
        load_pose_encoder(_encoder(), state)
    msg = str(err.value)
    assert "missing dwpose_embedding.4.bias" in msg
    assert "unexpected dwpose_embedding.14.weight" in msg
    assert "dwpose_embedding.12.weight (5120, 16, 1, 2, 2) (expected (24, 16, 1, 2, 2))" in msg
    assert "5120-wide transformer, this one 24" in msg


def test_loading_errors_for_no_or_ambiguous_pose_keys(dit):
    with pytest.raises(ValueError, match="no dwpose_embedding"):
        load_pose_encoder(_encoder(), {"blocks.0.attn1.to_q.weight": torch.zeros(2)})
    state = pose_state_dict(_encoder())
    two = {**{"a." + k: v for k, v in state.items()}, **{"b." + k: v for k, v in state.items()}}
    with pytest.raises(ValueError, match="several pose encoders"):
        load_pose_encoder(_encoder(), two)
    with pytest.raises(ValueError, match="attach_pose first"):
        load_pose_encoder(dit, state)


# -- the pose stream ----------------------------------------------------------------------------------------------


def test_pose_frames_for_clip_exact_indices():
    assert pose_frames_for_clip(200, 0, 81, 1) == list(range(81))
    assert pose_frames_for_clip(200, 1, 81, 1) == list(range(80, 161))
    assert pose_frames_for_clip(200, 2, 81, 1) == list(range(160, 200)) + list(range(41))
    assert pose_frames_for_clip(5, 0, 4, 1) == [0, 1, 2, 3]
    assert pose_frames_for_clip(5, 1, 4, 1) == [3, 4, 0, 1]
    assert pose_frames_for_clip(5, 2, 4, 1) == [1, 2, 3, 4]
    assert pose_frames_for_clip(3, 4, 9, 5) == [1, 2, 0, 1, 2, 0, 1, 2, 0]  # s_4 = 16
    assert pose_frames_for_clip(7, 3, 5, 0) == [1, 2, 3, 4, 5]  # no overlap: back-to-back clips
    assert pose_frames_for_clip(1, 9, 5, 1) == [0] * 5


@pytest.mark.parametrize(("n", "f", "overlap"), [(100, 81, 1), (30, 81, 5), (81, 81, 1), (7, 9, 4)])
def test_pose_windows_follow_the_output_timeline(n, f, overlap):
    """The kept frames of all clips take poses 0, 1, 2, ... mod n; a clip's overlap repeats the previous tail."""
    timeline = []
    for k in range(6):
        window = pose_frames_for_clip(n, k, f, overlap)
        if k:
            assert window[:overlap] == pose_frames_for_clip(n, k - 1, f, overlap)[f - overlap :]
        timeline += window if k == 0 else window[overlap:]
    assert timeline == [i % n for i in range(len(timeline))]


def _reference_windows(n: int, f: int, m: int, clips: int) -> list[list[int]]:
    """SVI's test_svi_dance.py pose windows, re-derived: last m poses, then the next ones from index f-1, looping."""
    windows = [[i % n for i in range(f)]]
    cursor = f - 1
    for _ in range(clips - 1):
        window = windows[-1][-m:]
        for _ in range(m, f):
            window.append(cursor % n)
            cursor += 1
        windows.append(window)
    return windows


@pytest.mark.parametrize("m", [1, 5])
def test_windows_match_the_reference_up_to_its_one_frame_resume_offset(m):
    n, f = 100, 81
    ref = _reference_windows(n, f, m, 4)
    ours = [pose_frames_for_clip(n, k, f, m) for k in range(4)]
    assert ref[0] == ours[0] and ref[1][:m] == ours[1][:m]
    for k in range(1, 4):
        assert ref[k][m:] == [(i - 1) % n for i in ours[k][m:]]  # the reference resumes one pose early


def test_pose_frames_for_clip_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no frames"):
        pose_frames_for_clip(0, 0, 81, 1)
    with pytest.raises(ValueError, match="overlap"):
        pose_frames_for_clip(10, 0, 81, 81)
    with pytest.raises(ValueError, match="clip_index"):
        pose_frames_for_clip(10, -1, 81, 1)


# -- reading and showing ------------------------------------------------------------------------------------------


def test_letterbox_keeps_aspect_and_pads_black():
    frames = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3) + 1
    block = frames.repeat(2, axis=1).repeat(2, axis=2)  # nearest x2: each pixel a 2x2 block
    wide = letterbox(frames, 4, 12)  # 2x3 -> 4x6, 3 black columns each side
    assert wide.shape == (2, 4, 12, 3) and wide.dtype == np.uint8
    assert (wide[:, :, :3] == 0).all() and (wide[:, :, 9:] == 0).all()
    assert np.array_equal(wide[:, :, 3:9], block)
    tall = letterbox(frames, 8, 6)  # 2x3 -> 4x6, 2 black rows above and below
    assert (tall[:, :2] == 0).all() and (tall[:, 6:] == 0).all()
    assert np.array_equal(tall[:, 2:6], block)
    assert np.array_equal(letterbox(frames, 2, 3), frames)


def _write_pose_video(path, frames: int = 7, height: int = 32, width: int = 48) -> np.ndarray:
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        video[i, 8:24, 4 + 4 * i : 12 + 4 * i] = (255, 64, 0)  # a moving orange block on black
    write_mp4(path, video, fps=16)
    return video


def test_read_pose_video_fits_like_the_image(tmp_path, monkeypatch):
    path = tmp_path / "pose.mp4"
    video = _write_pose_video(path)
    monkeypatch.setattr("svi_infer.pose._READ_CHUNK", 3)  # exercise chunked decoding
    frames = read_pose_video(path, 48, 80)
    assert frames.shape == (7, 48, 80, 3) and frames.dtype == np.uint8
    # 32x48 -> 48x80: the image's rule, the centred 29x48 rows 1..29 scaled by 5/3 (no black bars)
    assert crop_box((48, 32), 48, 80) == (0, 1, 48, 30)
    rows = 1 + ((np.arange(48) + 0.5) * 29 / 48).astype(int)  # each output pixel's centre, nearest source pixel
    cols = ((np.arange(80) + 0.5) * 48 / 80).astype(int)
    expected = fit_pose(video, 48, 80)
    assert np.array_equal(expected, video[:, rows][:, :, cols])
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 8  # only codec loss
    same = read_pose_video(path, 32, 48)
    assert same.shape == (7, 32, 48, 3)


def test_read_pose_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_pose_video(tmp_path / "missing.mp4", 48, 80)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read pose video"):
        read_pose_video(tmp_path / "empty.mp4", 48, 80)
    (tmp_path / "junk.mp4").write_bytes(b"definitely not a video" * 50)
    with pytest.raises(ValueError, match="cannot read pose video"):
        read_pose_video(tmp_path / "junk.mp4", 48, 80)


def test_side_by_side_panels():
    rng = np.random.default_rng(0)
    gen = rng.integers(0, 256, (5, 48, 80, 3), dtype=np.uint8)
    pose = rng.integers(0, 256, (5, 48, 80, 3), dtype=np.uint8)
    ref = Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8))
    out = side_by_side(ref, pose, gen)
    assert out.shape == (5, 48, 240, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 80:160], pose) and np.array_equal(out[:, :, 160:], gen)
    resized = np.asarray(ref.resize((80, 48), Image.BILINEAR))
    assert all(np.array_equal(out[i, :, :80], resized) for i in range(5))
    same_size_ref = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    assert np.array_equal(side_by_side(same_size_ref, pose, gen)[3, :, :80], same_size_ref)
    small_pose = side_by_side(ref, pose[:, ::2, ::2], gen)[:, :, 80:160]  # fitted by letterbox
    assert np.array_equal(small_pose, letterbox(pose[:, ::2, ::2], 48, 80))
    with pytest.raises(ValueError, match="same number of frames|like the generated"):
        side_by_side(ref, pose[:4], gen)


def test_pose_encoder_loads_from_an_adapter_directory_with_its_pose_file(tmp_path):
    """``conditioning.pose_encoder=<exported Dance adapter directory>``: the pose file beside the LoRA is read, not
    every safetensors file of the folder (the LoRA file holds no pose weights)."""
    from safetensors.torch import save_file

    from svi_infer.adapter_files import POSE_WEIGHTS
    from svi_infer.pose import PoseEncoder, load_pose_encoder, pose_state_dict, save_pose_encoder

    trained = PoseEncoder(24)
    save_pose_encoder(trained, tmp_path / POSE_WEIGHTS)
    lora = {f"blocks.{i}.attn1.to_q.lora_A.weight": torch.zeros(2, 24) for i in range(80)}  # > 64 keys, no pose
    save_file(lora, str(tmp_path / "adapter_model.safetensors"))
    loaded = load_pose_encoder(PoseEncoder(24), tmp_path)
    assert all(torch.equal(v, pose_state_dict(trained)[k]) for k, v in pose_state_dict(loaded).items())
