"""Fixtures shared by every tier: tiny models, a synthetic first frame, tiny training shards.

Helper functions and constants are in tests/helpers.py (``from tests.helpers import ...``).
"""

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
from tests.helpers import TINY21, TINY22  # noqa: E402


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


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Tiny shards (4 synthetic clips, 9-frame windows at 48x80, motion frames 1 and 5) for training tests."""
    from data_tools.app import run as prepare
    from data_tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("train_data")
    make_dataset(root / "clips", num_clips=4, fps=16, size=(96, 64), seconds=1.5)
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose(
            "data_tools",
            overrides=[f"input={root / 'clips'}", f"output={root / 'ds'}", "frames_per_clip=9", "buckets=[[48,80]]"]
            + ["motion_frames=[1,5]", "progress=false"],
        )
    prepare(cfg)
    return root / "ds"
