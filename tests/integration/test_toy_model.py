"""The toy world's bundled base model (svi_infer/toy_model): intact, loaded like any model folder, and trained."""

import hashlib

import pytest
import torch

from data_tools.toy_world import HELDOUT_SEED0, make_world, render, truth
from svi_infer.evaluate.world import clip_metrics
from svi_infer.model import build_model, bundled_folder
from svi_infer.spec import get_spec

TOY = get_spec("toy-wan2.1-i2v")
FOLDER = bundled_folder(TOY)
# The base model's first clip from a held-out frame keeps the true background above this PSNR: measured 28.4-34.4 dB
# over 8 held-out scenes x 2 seeds (28.4 dB on the scene tested here), against 15.7-20.5 dB with a random-weight DiT
# in the same pipeline (15.7 dB here); 6 dB of room either side, far above any CPU's float differences.
BACKGROUND_PSNR_FLOOR_DB = 22.0


def test_bundled_weights_match_their_checksums():
    listed = {}
    for line in (FOLDER / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    present = {p.relative_to(FOLDER).as_posix() for p in FOLDER.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest, name
    assert sum((FOLDER / n).stat().st_size for n in listed) <= 10 * 1024**2


def test_bundled_model_loads_through_the_folder_path():
    model = build_model(TOY)  # model.path=null: the bundled folder, read by the diffusers-folder loader
    transformer = model.transformers[0]
    assert transformer.config.num_layers == TOY.num_layers
    assert transformer.config.in_channels == TOY.in_channels
    assert next(transformer.parameters()).dtype == torch.float32
    assert model.pipe.image_encoder is None
    stds = torch.tensor(model.vae.config.latents_std)
    assert stds.shape == (16,) and not torch.allclose(stds, torch.ones(16))  # measured latent scale, not defaults
    same = build_model(TOY, FOLDER)
    for a, b in zip(transformer.parameters(), same.transformers[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_missing_bundled_folder_is_named(monkeypatch):
    from dataclasses import replace

    from svi_infer.model import ModelFolderError

    with pytest.raises(ModelFolderError, match="bundled weights are missing"):
        build_model(replace(TOY, bundled="no_such_folder"))


@pytest.mark.slow
def test_base_model_first_clip_keeps_the_world(tmp_path):
    from PIL import Image

    from svi_infer.longvideo.generator import LongVideoGenerator
    from svi_infer.settings import GenerationSettings
    from svi_infer.video_io import read_video

    world = make_world(HELDOUT_SEED0)
    image = Image.fromarray(render(world, 1)[0])
    settings = GenerationSettings(
        num_clips=1, frames_per_clip=TOY.frames_per_clip, steps=TOY.steps, height=64, width=64, fps=TOY.fps,
        ref_pad_num=0, cfg_scale=1.0, seed=0,
    )  # fmt: skip

    def background_psnr(model) -> float:
        out = tmp_path / f"{id(model)}.mp4"
        LongVideoGenerator(model, settings).generate(image, [world.caption], out, resume=False, progress=False)
        frames = read_video(out)
        return clip_metrics(frames, render(world, len(frames)), truth(world, len(frames)))["bg_psnr"]

    trained = build_model(TOY)
    assert background_psnr(trained) >= BACKGROUND_PSNR_FLOOR_DB
    random = build_model(TOY)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for p in random.transformers[0].parameters():
            torch.nn.init.normal_(p, std=0.02)
    assert background_psnr(random) < BACKGROUND_PSNR_FLOOR_DB
