"""Shared fixtures: tiny models, a synthetic first frame, Hydra composition of the apps' configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from PIL import Image  # noqa: E402

from svi_infer.model import build_model  # noqa: E402
from svi_infer.spec import get_spec  # noqa: E402

TINY21 = "tiny-wan2.1-i2v"
TINY22 = "tiny-wan2.2-i2v-a14b"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(16)


@pytest.fixture
def tiny21():
    return build_model(get_spec(TINY21))


@pytest.fixture
def tiny22():
    return build_model(get_spec(TINY22))


@pytest.fixture(scope="session")
def first_frame() -> Image.Image:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:48, 0:80]
    img = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 20, (48, 80, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture
def image_file(tmp_path, first_frame):
    path = tmp_path / "first.png"
    first_frame.save(path)
    return path


def compose_infer(overrides: list[str]):
    """``conf/infer.yaml`` composed as ``python -m svi_infer <overrides>`` would."""
    with initialize_config_module("conf", version_base="1.3"):
        return compose("infer", overrides=overrides)


def dit_inputs(spec_id: str = TINY21) -> dict:
    """A fixed input for one forward of a tiny transformer."""
    g = torch.Generator().manual_seed(0)
    spec = get_spec(spec_id)
    return dict(
        hidden_states=torch.randn(1, spec.in_channels, 3, 6, 10, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, spec.text_dim, generator=g),
        encoder_hidden_states_image=torch.randn(1, 1025, spec.image_dim, generator=g) if spec.image_dim else None,
        return_dict=False,
    )


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Tiny shards (4 synthetic clips, 9-frame windows at 48x80, motion frames 1 and 5) for training tests."""
    from data_tools.app import run as prepare
    from data_tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("train_data")
    make_dataset(root / "clips", num_clips=4, fps=16, size=(96, 64), seconds=1.5)
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose(
            "data",
            overrides=[f"input={root / 'clips'}", f"output={root / 'ds'}", "frames_per_clip=9", "buckets=[[48,80]]"]
            + ["motion_frames=[1,5]", "progress=false"],
        )
    prepare(cfg)
    return root / "ds"
