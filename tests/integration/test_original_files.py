"""Original Wan checkpoint files (Wan-AI's key names) round-trip through diffusers' own converters."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from svi_infer import tiny
from svi_infer.original_files import (
    load_original_transformer,
    load_original_vae,
    original_transformer_files,
    original_transformer_state_dict,
    original_vae_state_dict,
    write_original_transformer,
    write_original_vae,
)
from svi_infer.spec import get_spec
from tests.helpers import TINY21, TINY22, assert_same_outputs, dit_inputs

pytestmark = pytest.mark.numerics  # compared across instances and loaders: rerun on AVX2 kernels

DIT_SPECS = [TINY21, TINY22]


def wan21_layout_vae() -> AutoencoderKLWan:
    """A small VAE with the real Wan 2.1 VAE's block layout (the one diffusers' VAE converter is written for)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.TINY_SEED + 5)
        return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2).eval()


@pytest.mark.parametrize("spec_id", DIT_SPECS)
def test_transformer_key_names_invert_diffusers_converter(spec_id):
    model = tiny.tiny_transformer(get_spec(spec_id))
    original = original_transformer_state_dict(model)
    assert "blocks.0.self_attn.q.weight" in original and "head.head.weight" in original
    assert "blocks.0.norm3.weight" in original and "head.modulation" in original
    assert ("img_emb.proj.1.weight" in original) == get_spec(spec_id).has_image_encoder
    back = convert_wan_transformer_to_diffusers(dict(original))
    state = model.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("spec_id", DIT_SPECS)
@pytest.mark.parametrize("shards", [1, 2])
def test_transformer_round_trip(tmp_path, spec_id, shards):
    model = tiny.tiny_transformer(get_spec(spec_id))
    files = write_original_transformer(model, tmp_path / "diffusion_pytorch_model.safetensors", shards=shards)
    assert len(files) == shards
    assert original_transformer_files(tmp_path) == files
    loaded = load_original_transformer(files, dict(model.config))
    inputs = dit_inputs(spec_id)
    with torch.no_grad():
        expected = model(**inputs)[0]
        got = loaded(**inputs)[0]
    assert got.shape == (1, 16, 3, 6, 10)
    assert_same_outputs(got, expected)


def test_transformer_dtype_is_applied(tmp_path):
    model = tiny.tiny_transformer(get_spec(TINY22))
    files = write_original_transformer(model, tmp_path / "dit.safetensors")
    loaded = load_original_transformer(files, dict(model.config), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())


def test_transformer_missing_key_is_named(tmp_path):
    model = tiny.tiny_transformer(get_spec(TINY21))
    files = write_original_transformer(model, tmp_path / "diffusion_pytorch_model.safetensors", shards=2)
    shard = load_file(str(files[0]))
    shard.pop("blocks.0.self_attn.q.weight")
    save_file(shard, str(files[0]))
    with pytest.raises(
        ValueError, match=r"missing keys: blocks\.0\.attn1\.to_q\.weight \(original blocks\.0\.self_attn"
    ):
        load_original_transformer(files, dict(model.config))


def test_transformer_config_mismatch_is_a_value_error(tmp_path):
    model = tiny.tiny_transformer(get_spec(TINY21))
    files = write_original_transformer(model, tmp_path / "dit.safetensors")
    other = tiny.tiny_transformer(get_spec(TINY22))  # no image branch
    with pytest.raises(ValueError, match=r"unexpected keys .*add_k_proj"):
        load_original_transformer(files, dict(other.config))


def test_repeated_keys_across_shards_are_refused(tmp_path):
    model = tiny.tiny_transformer(get_spec(TINY22))
    files = write_original_transformer(model, tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="repeats keys"):
        load_original_transformer([files[0], files[0]], dict(model.config))


def test_vae_key_names_invert_diffusers_converter():
    model = wan21_layout_vae()
    original = original_vae_state_dict(model)
    for key in ("decoder.middle.0.residual.0.gamma", "decoder.upsamples.4.shortcut.weight", "conv1.weight"):
        assert key in original
    back = convert_wan_vae_to_diffusers(original)
    state = model.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vae_round_trip(tmp_path, suffix):
    model = wan21_layout_vae()
    file = write_original_vae(model, tmp_path / f"Wan2.1_VAE{suffix}")
    loaded = load_original_vae(file, dict(model.config))
    video = torch.rand(1, 3, 5, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = model.encode(video).latent_dist.mode()
        got = loaded.encode(video).latent_dist.mode()
    assert got.shape == (1, 16, 2, 6, 10)
    assert_same_outputs(got, expected)


def test_vae_missing_key_is_named(tmp_path):
    model = wan21_layout_vae()
    state = original_vae_state_dict(model)
    state.pop("decoder.upsamples.4.shortcut.weight")
    file = tmp_path / "Wan2.1_VAE.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.weight"):
        load_original_vae(file, dict(model.config))


def test_pth_is_read_with_weights_only(tmp_path):
    model = wan21_layout_vae()
    file = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"weights": original_vae_state_dict(model), "note": object()}, file)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_original_vae(file, dict(model.config))


@pytest.mark.parametrize("spec_id", DIT_SPECS)
def test_project_tiny_vae_layout_is_refused_clearly(tmp_path, spec_id):
    """The project's tiny VAE has one res block per stage; diffusers' converter only knows Wan 2.1's two."""
    model = tiny.tiny_vae(get_spec(spec_id))
    file = write_original_vae(model, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match=r"only handles the Wan 2\.1 VAE layout .*num_res_blocks=1"):
        load_original_vae(file, dict(model.config))


def test_build_model_reads_original_dit_shards(tmp_path):
    """model.transformer_files: the tiny spec's transformer replaced by original-layout shards of another net."""
    from svi_infer.model import OriginalFiles, build_model

    source = tiny.tiny_transformer(get_spec(TINY21), seed_offset=5)
    write_original_transformer(source, tmp_path / "dit" / "diffusion_pytorch_model.safetensors", shards=2)
    model = build_model(get_spec(TINY21), original=OriginalFiles.from_paths(transformer=tmp_path / "dit"))
    inputs = dit_inputs(TINY21)
    assert_same_outputs(model.transformers[0](**inputs)[0], source(**inputs)[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OriginalFiles.from_paths(vae=tmp_path / "none.pth")
