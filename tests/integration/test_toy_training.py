"""Making the toy base model: the VAE recipe (svi_train.toy_vae) and base pretraining (svi_train.pretrain)."""

import hashlib
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLWan

from data_tools.toy_world import make_world, render, write_world
from svi_infer.model import build_model
from svi_infer.spec import get_spec
from svi_infer.tiny import tiny_tokenizer
from svi_train.pretrain import caption_words, init_folder, train
from svi_train.toy_vae import PcaCodec, to_video, train_vae

TOY = get_spec("toy-wan2.1-i2v")


def test_pca_codec_has_the_vae_latent_shape_and_unit_scale():
    clips = to_video(torch.stack([torch.from_numpy(render(make_world(s), 9)) for s in range(6)]).numpy())
    codec = PcaCodec.fit(clips, 16)
    z = codec.encode(clips)
    assert z.shape == (6, 16, 3, 8, 8)
    per_channel = z[:, :, 0].transpose(0, 1).reshape(16, -1).std(dim=1)
    assert torch.allclose(per_channel, torch.ones(16), atol=0.02)  # the first frame's coefficients, unit std


def test_vae_recipe_writes_a_loadable_wan_vae(tmp_path):
    quality = train_vae(tmp_path / "vae", frames_minutes=0.02, clips_minutes=0.02, videos=2)
    vae = AutoencoderKLWan.from_pretrained(tmp_path / "vae")
    assert 0 < quality < 60
    assert len(vae.config.latents_std) == 16 and min(vae.config.latents_std) > 0
    assert vae.config.latents_mean != [0.0] * 16  # measured on training clips
    assert not list(tmp_path.glob(".*"))  # written through a temporary folder


def test_caption_words_give_tokenizer_pieces(tmp_path):
    write_world(tmp_path, "train", videos=3, seconds=0.5)
    words = caption_words(tmp_path)
    assert {"sprites", "background", "stripes"} <= set(words)
    caption = (tmp_path / "train_000000.txt").read_text().strip()
    plain, rich = tiny_tokenizer(), tiny_tokenizer(words)
    assert len(rich(caption).input_ids) < len(plain(caption).input_ids) / 2
    assert plain("a cat").input_ids == rich("a cat").input_ids  # the built-in pieces keep their ids


@pytest.mark.slow
def test_pretraining_writes_a_base_model_folder(tmp_path):
    vae = tmp_path / "vae"
    AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(vae)  # fmt: skip
    write_world(tmp_path / "world", "train", videos=2, seconds=3.0)
    init = init_folder(TOY, vae, tmp_path / "init", words=caption_words(tmp_path / "world"))
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "data_tools", "prepare", f"input={tmp_path / 'world'}", f"output={shards}",
           "model=toy_wan21_i2v", f"model.path={init}", "ref_pad_num=0", "stride=8", "progress=false"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    result = train(shards, init, tmp_path / "base", TOY, minutes=0.15, batch_size=2)
    assert result["steps"] > 0
    base = tmp_path / "base"
    for line in (base / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((base / name).read_bytes()).hexdigest() == digest
    before, after = build_model(TOY, init).transformers[0], build_model(TOY, base).transformers[0]
    assert after.config.num_layers == TOY.num_layers
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))
