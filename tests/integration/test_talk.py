import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from svi_infer.audio import AudioEncoder
from svi_infer.spec import get_spec
from svi_infer.talk import (
    AudioCrossAttention,
    AudioProjModel,
    AudioWindows,
    TalkConfig,
    attach_talk,
    audio_windows,
    detach_talk,
    get_talk,
    latent_windows,
    load_multitalk,
    multitalk_state_dict,
    set_audio,
)
from svi_infer.tiny import tiny_transformer
from tests.helpers import TINY21, assert_same_outputs, dit_inputs

pytestmark = pytest.mark.numerics  # compared across instances and loaders: rerun on AVX2 kernels

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
NUM_FRAMES = 9  # video frames of dit_inputs' 3 latent frames


def _talk_transformer(seed: int = 1):
    transformer = tiny_transformer(get_spec(TINY21))
    torch.manual_seed(seed)  # the audio modules' random init
    attach_talk(transformer, TalkConfig.tiny(transformer))
    return transformer


def _windows(seed: int = 2, num_frames: int = NUM_FRAMES) -> AudioWindows:
    g = torch.Generator().manual_seed(seed)
    return audio_windows(torch.randn(num_frames, 2, 16, generator=g))


def _forward(transformer, inputs=None):
    return transformer(**(inputs or dit_inputs()))[0]


# --- windows -------------------------------------------------------------------------------------------------


def _frame_index_features(length: int) -> torch.Tensor:
    """Features whose value is their frame index, so windows can be read back as indices."""
    return torch.arange(length, dtype=torch.float32)[:, None, None].expand(length, 2, 3).clone()


def _indices(windows: AudioWindows) -> tuple[list, list]:
    assert torch.equal(windows.first, windows.first[..., :1, :1].expand_as(windows.first))
    return windows.first[..., 0, 0].long().tolist(), windows.later[..., 0, 0].long().tolist()


def test_window_indices_exact():
    first, later = _indices(audio_windows(_frame_index_features(9)))
    assert first == [[0, 0, 0, 1, 2]]  # frame 0's window, clamped at the start
    # frames 1-4: frame 1's [-2..0] of (−1, 0, 1), centres of 2 and 3, frame 4's [0..+2]; frames 5-8 likewise
    assert later == [[0, 0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 8, 8]]


def test_window_indices_start_and_end_clamp():
    first, later = _indices(audio_windows(_frame_index_features(16), num_frames=9, start=12))
    assert first == [[10, 11, 12, 13, 14]]
    assert later == [[11, 12, 13, 14, 15, 15, 15, 15], [15] * 8]  # frames past the track take its last feature


def test_window_indices_match_per_frame_windows_at_real_size():
    features = _frame_index_features(100)
    windows = audio_windows(features, num_frames=81, start=7)
    first, later = _indices(windows)
    assert windows.first.shape == (1, 5, 2, 3) and windows.later.shape == (20, 8, 2, 3)
    per_frame = [[min(max(c + d, 0), 99) for d in range(-2, 3)] for c in range(7, 88)]  # ±2 around each frame
    assert first == [per_frame[0]]
    for g, got in enumerate(later):
        a, b, c, d = per_frame[1 + 4 * g : 5 + 4 * g]
        assert got == a[:3] + b[2:3] + c[2:3] + d[2:]


def test_latent_windows_pick_frame_and_offset():
    frames, offsets = torch.meshgrid(torch.arange(9), torch.arange(5), indexing="ij")
    code = (10 * frames + offsets).float()[:, :, None, None].expand(9, 5, 2, 3)  # value = 10 * frame + offset
    windows = latent_windows(code)
    assert windows.first[:, :, 0, 0].long().tolist() == [[0, 1, 2, 3, 4]]
    # later frame g: frame 4g+1 offsets 0-2, frames 4g+2 / 4g+3 offset 2, frame 4g+4 offsets 2-4
    assert windows.later[:, :, 0, 0].long().tolist() == [
        [10, 11, 12, 22, 32, 42, 43, 44],
        [50, 51, 52, 62, 72, 82, 83, 84],
    ]
    batched = latent_windows(torch.stack([code, -code]))
    assert torch.equal(batched.first, torch.stack([windows.first, -windows.first]))
    assert torch.equal(batched.later, torch.stack([windows.later, -windows.later]))
    assert windows.num_latent_frames == 3


def test_window_errors():
    with pytest.raises(ValueError, match="4k\\+1"):
        audio_windows(torch.zeros(8, 2, 3))
    with pytest.raises(ValueError, match="frames, layers, dim"):
        audio_windows(torch.zeros(9, 3))


def test_tiny_config_fits_tiny_audio_encoder():
    encoder = AudioEncoder.tiny()
    samples = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    features, _ = encoder.features(samples)  # [T, layers, dim]
    transformer = _talk_transformer()
    set_audio(transformer, audio_windows(features[:NUM_FRAMES]))
    assert _forward(transformer).shape == (1, 16, 3, 6, 10)
    assert get_talk(transformer).tokens.shape == (1, 3, 4, 12)  # projected at the forward pass


# --- modules -------------------------------------------------------------------------------------------------


def test_audio_proj_order_of_operations():
    torch.manual_seed(0)
    config = TalkConfig(dim=24, num_heads=2, audio_layers=2, audio_dim=3, context_tokens=4, intermediate_dim=6)
    proj = AudioProjModel(config)
    for p in proj.norm.parameters():
        torch.nn.init.normal_(p)
    first, later = torch.randn(2, 1, 5, 2, 3), torch.randn(2, 3, 8, 2, 3)
    tokens = proj(first, later)
    assert tokens.shape == (2, 4, 4, 768)

    def by_hand(window, layer1):
        h = torch.relu(layer1(window.reshape(-1)))  # window x layers x dim, flattened row-major
        h = proj.proj3(torch.relu(proj.proj2(h))).view(4, 768)
        return torch.nn.functional.layer_norm(h, (768,), proj.norm.weight, proj.norm.bias, 1e-5)

    for b in range(2):
        torch.testing.assert_close(tokens[b, 0], by_hand(first[b, 0], proj.proj1))
        for f in range(3):
            torch.testing.assert_close(tokens[b, f + 1], by_hand(later[b, f], proj.proj1_vf))
    zero = proj(torch.zeros_like(first), torch.zeros_like(later))
    assert zero.abs().sum() > 0  # zeroed audio still yields tokens (from the biases), as in the reference


def test_audio_cross_attention_matches_per_frame_attention():
    torch.manual_seed(0)
    attn = AudioCrossAttention(dim=8, token_dim=6, num_heads=2)
    frames, seq, count = 3, 5, 4
    x, tokens = torch.randn(2, frames * seq, 8), torch.randn(2, frames, count, 6)
    out = attn(x, tokens)
    expected = torch.empty_like(out)
    for b in range(2):
        for f in range(frames):
            rows = slice(f * seq, (f + 1) * seq)
            q = attn.q_linear(x[b, rows])
            k, v = attn.kv_linear(tokens[b, f]).split(8, dim=-1)  # keys first, then values
            heads = []
            for h in range(2):
                cols = slice(4 * h, 4 * h + 4)
                weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(4), dim=-1)
                heads.append(weights @ v[:, cols])
            expected[b, rows] = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, expected)


def test_audio_attention_is_local_to_its_frame():
    torch.manual_seed(0)
    attn = AudioCrossAttention(dim=8, token_dim=6, num_heads=2)
    x, tokens = torch.randn(1, 3 * 5, 8), torch.randn(1, 3, 4, 6)
    changed = tokens.clone()
    changed[:, 1] += 1.0
    diff = (attn(x, changed) - attn(x, tokens)).abs().sum(-1)[0]
    assert torch.all(diff[5:10] > 0)
    assert torch.all(diff[:5] == 0) and torch.all(diff[10:] == 0)


# --- attaching -----------------------------------------------------------------------------------------------


def test_attach_registers_frozen_modules_under_multitalk_names():
    transformer = _talk_transformer()
    names = [k for k in transformer.state_dict() if "audio" in k or "norm_x" in k]
    assert "audio_proj.proj1.weight" in names and "audio_proj.proj1_vf.weight" in names
    assert "audio_proj.norm.weight" in names and "blocks.1.norm_x.bias" in names
    assert "blocks.0.audio_cross_attn.q_linear.weight" in names
    assert "blocks.0.audio_cross_attn.kv_linear.bias" in names and "blocks.1.audio_cross_attn.proj.weight" in names
    assert sorted(names) == sorted(multitalk_state_dict(transformer))
    assert len(names) == 10 + 2 * 8
    for name, p in transformer.named_parameters():
        if "audio" in name or "norm_x" in name:
            assert not p.requires_grad
    assert transformer.blocks[0].audio_cross_attn.kv_linear.weight.shape == (48, 12)
    with pytest.raises(ValueError, match="already"):
        attach_talk(transformer, TalkConfig.tiny(transformer))


def test_attach_follows_dtype():
    transformer = tiny_transformer(get_spec(TINY21)).to(torch.bfloat16)
    talk = attach_talk(transformer, TalkConfig.tiny(transformer))
    assert talk.audio_proj.proj1.weight.dtype == torch.bfloat16
    assert transformer.blocks[1].norm_x.weight.dtype == torch.bfloat16
    set_audio(transformer, _windows())
    inputs = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in dit_inputs().items()
    }
    out = _forward(transformer, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_no_audio_is_the_plain_transformer():
    plain = _forward(tiny_transformer(get_spec(TINY21)))
    transformer = _talk_transformer()
    assert torch.equal(_forward(transformer), plain)
    set_audio(transformer, _windows())
    assert not torch.allclose(_forward(transformer), plain)
    set_audio(transformer, None)
    assert torch.equal(_forward(transformer), plain)
    detach_talk(transformer)
    assert not any("audio" in k or "norm_x" in k for k in transformer.state_dict())
    assert torch.equal(_forward(transformer), plain)


def test_block_output_is_x_plus_text_plus_audio():
    transformer = _talk_transformer()
    set_audio(transformer, _windows())
    block = transformer.blocks[1]
    seen = {}
    handle = block.register_forward_hook(lambda _m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        _forward(transformer)
    handle.remove()
    talk = get_talk(transformer)
    tokens, talk.tokens = talk.tokens, None  # no audio in this pass: the hooks stay out of the hand computation
    hidden, context, temb, rope = seen["args"]
    with torch.no_grad():
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        h = (block.norm1(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        x = (hidden.float() + block.attn1(h, None, None, rope) * gate).type_as(hidden)
        x = x + block.attn2(block.norm2(x.float()).type_as(x), context, None, None)
        x = x + block.audio_cross_attn(block.norm_x(x), tokens)  # MultiTalk: x += audio_cross_attn(norm_x(x))
        h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        expected = (x.float() + block.ffn(h).float() * c_gate).type_as(x)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)


def test_batched_audio_equals_separate_passes():
    transformer = _talk_transformer()
    cond, other = _windows(2), _windows(3)
    single = dit_inputs()
    outs = []
    for windows in (cond, other.zeros_like()):
        set_audio(transformer, windows)
        outs.append(_forward(transformer))
    batched = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in single.items()}
    set_audio(transformer, AudioWindows.stack([cond, other.zeros_like()]))
    torch.testing.assert_close(_forward(transformer, batched), torch.cat(outs), rtol=1e-5, atol=1e-6)
    set_audio(transformer, cond)  # batch 1 is shared by every sample
    torch.testing.assert_close(_forward(transformer, batched), torch.cat([outs[0], outs[0]]), rtol=1e-5, atol=1e-6)


def test_audio_errors():
    transformer = _talk_transformer()
    with pytest.raises(ValueError, match="attach_talk"):
        set_audio(tiny_transformer(get_spec(TINY21)), _windows())
    with pytest.raises(ValueError, match="audio_layers"):
        set_audio(transformer, audio_windows(torch.zeros(9, 12, 16)))
    with pytest.raises(ValueError, match="tokens must be"):
        set_audio(transformer, torch.zeros(1, 3, 5, 12))
    set_audio(transformer, _windows(num_frames=5))  # 2 latent frames for a 3-frame input
    with pytest.raises(ValueError, match="latent frames"):
        _forward(transformer)


def test_gradient_checkpointing_gives_same_output_and_gradients():
    transformer = _talk_transformer()
    set_audio(transformer, _windows())
    inputs = dit_inputs()

    def run():
        transformer.zero_grad()
        out = _forward(transformer, inputs)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    out, grads = run()
    transformer.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys() and "blocks.1.attn2.to_q.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)
    set_audio(transformer, None)  # the gradients do depend on the audio
    _, grads_silent = run()
    assert not torch.allclose(grads_silent["blocks.0.attn2.to_q.weight"], grads["blocks.0.attn2.to_q.weight"])


def test_lora_leaves_audio_modules_alone():
    transformer = _talk_transformer()
    set_audio(transformer, _windows())
    before = _forward(transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    wrapped = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A")}
    assert "blocks.0.attn2.to_q" in wrapped and "blocks.1.ffn.net.2" in wrapped
    assert not any("audio" in n or "norm_x" in n for n in wrapped)
    assert "blocks.0.audio_cross_attn.q_linear.weight" in multitalk_state_dict(transformer)
    torch.testing.assert_close(_forward(transformer), before)  # LoRA B starts at zero; the hooks still run


# --- MultiTalk weights ---------------------------------------------------------------------------------------


def test_multitalk_weights_round_trip(tmp_path):
    source = _talk_transformer(seed=1)
    path = tmp_path / "multitalk.safetensors"
    save_file({**multitalk_state_dict(source), "blocks.0.attn1.to_q.weight": torch.zeros(24, 24)}, str(path))
    target = _talk_transformer(seed=5)
    for transformer in (source, target):
        set_audio(transformer, _windows())
    assert not torch.equal(_forward(target), _forward(source))
    load_multitalk(target, path)  # the base DiT key in the file is ignored
    assert_same_outputs(_forward(target), _forward(source))
    assert torch.equal(target.blocks[0].attn1.to_q.weight, source.blocks[0].attn1.to_q.weight)
    again = _talk_transformer(seed=6)
    load_multitalk(again, multitalk_state_dict(source))
    set_audio(again, _windows())
    assert_same_outputs(_forward(again), _forward(source))


def test_weights_loaded_after_set_audio_are_used():
    source, target = _talk_transformer(seed=1), _talk_transformer(seed=5)
    for transformer in (source, target):
        set_audio(transformer, _windows())
    load_multitalk(target, multitalk_state_dict(source))  # after set_audio: the tokens follow the new weights
    assert_same_outputs(_forward(target), _forward(source))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda sd: sd.pop("blocks.1.norm_x.bias"), ["missing 1", "blocks.1.norm_x.bias"]),
        (lambda sd: sd.update({"blocks.2.norm_x.weight": torch.ones(24)}), ["unexpected 1", "blocks.2.norm_x.weight"]),
        (
            lambda sd: sd.update({"audio_proj.proj1.weight": torch.zeros(20, 99)}),
            ["wrong shape 1", "audio_proj.proj1.weight (20, 99) (model (20, 160))"],
        ),
        (lambda sd: sd.clear(), ["no MultiTalk audio keys"]),
    ],
)
def test_bad_multitalk_file_is_reported(tmp_path, edit, words):
    state = multitalk_state_dict(_talk_transformer(seed=1))
    edit(state)
    path = tmp_path / "multitalk.safetensors"
    save_file({**state, "patch_embedding.bias": torch.zeros(24)}, str(path))
    target = _talk_transformer(seed=5)
    before = multitalk_state_dict(target)
    before = {k: v.clone() for k, v in before.items()}
    with pytest.raises(ValueError) as info:
        load_multitalk(target, path)
    message = str(info.value)
    for word in [*words, "multitalk.safetensors", "TalkConfig"]:
        assert word in message
    after = multitalk_state_dict(target)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded from a bad file


def test_multitalk_file_must_be_safetensors(tmp_path):
    pickle = tmp_path / "multitalk.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        load_multitalk(_talk_transformer(), pickle)
    with pytest.raises(FileNotFoundError):
        load_multitalk(_talk_transformer(), tmp_path / "absent.safetensors")
