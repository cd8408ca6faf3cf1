"""The video's size and the image fit (SVI's sizing by default), the pose video fitted like the image, and each
model's default negative prompt (issue #16, items 1 and 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import svi_infer.longvideo.plan as app
from svi_infer.errors import USER_ERRORS
from svi_infer.longvideo.generator import LongVideoGenerator
from svi_infer.pose import fit_pose
from svi_infer.settings import GenerationSettings, reference_size
from svi_infer.spec import NEGATIVE_PROMPT_EN, NEGATIVE_PROMPT_ZH, get_spec
from svi_infer.variants import make_conditioning
from svi_infer.video_io import fit_image, read_video, write_mp4
from tests.helpers import TINY21, TINY22, compose_infer

WAN21 = get_spec("wan2.1-i2v-14b-480p")


def _same_aspect(size: tuple[int, int], height: int, width: int, step: int = 16) -> bool:
    """A scale s exists with |width - s w| < step and |height - s h| < step: the aspect kept within one step."""
    w, h = size
    low = max(width / w, height / h)
    high = min((width + step) / w, (height + step) / h)
    return low < high


# -- the size ------------------------------------------------------------------------------------------------------


def test_reference_size_is_svis_formula():
    # SVI's calculate_dimensions: cap the width (height int(max_width * h / w)), never upscale, floor both to /16
    assert reference_size(1000, 700, 832) == (576, 832)  # 582.4 -> 576
    assert reference_size(832, 480, 832) == (480, 832)
    assert reference_size(500, 300, 832) == (288, 496)  # narrower than max_width: its own size, floored
    assert reference_size(720, 1280, 640) == (1136, 640)  # portrait, Talk/Dance cap
    assert reference_size(2150, 1210, 832) == (464, 832)
    assert reference_size(100, 100, 832, multiple=32) == (96, 96)  # TI2V-5B's /32
    assert reference_size(15, 100, 832) == (96, 0)


@pytest.mark.parametrize("size", [(1200, 800), (720, 1280), (900, 900), (333, 517)], ids=["land", "port", "sq", "odd"])
def test_default_fit_keeps_the_aspect_and_crop_the_model_size(size):
    for max_width in (832, 640):
        s = GenerationSettings(max_width=max_width).resolve(WAN21, size)
        assert s.width <= max_width and s.height % 16 == 0 and s.width % 16 == 0
        assert _same_aspect(size, s.height, s.width)
        assert (s.height, s.width) == reference_size(*size, max_width)
        fitted = fit_image(Image.new("RGB", size), s.height, s.width)
        assert fitted.size == (s.width, s.height)
    crop = GenerationSettings(fit="crop").resolve(WAN21, size)
    assert (crop.height, crop.width) == (480, 832)  # the model's size, centre-cropped: the old default
    explicit = GenerationSettings(height=512, width=512).resolve(WAN21, size)
    assert (explicit.height, explicit.width) == (512, 512)  # given sizes are kept whatever the fit


def test_resolve_fills_the_models_defaults_and_is_idempotent():
    s = GenerationSettings().resolve(WAN21, (1000, 700))
    assert (s.height, s.width, s.max_width, s.fit) == (576, 832, 832, "reference")  # max_width: the model's width
    assert s.negative_prompt == NEGATIVE_PROMPT_EN
    assert s.resolve(WAN21, (1000, 700)) == s
    tiny = GenerationSettings().resolve(get_spec(TINY21), (320, 200))
    assert (tiny.height, tiny.width) == (48, 80)  # the tiny model's width caps it
    ti2v = GenerationSettings().resolve(get_spec("wan2.2-ti2v-5b"), (1920, 1080))
    assert (ti2v.height, ti2v.width) == (704, 1280)  # 720 floored to /32
    crop = GenerationSettings(fit="crop", height=256).resolve(WAN21, (10, 10))
    assert (crop.height, crop.width) == (256, 832)  # crop takes the missing side from the model, as before


def test_bad_sizes_are_refused_in_one_line():
    with pytest.raises(ValueError, match="at least 16 pixels each side"):
        GenerationSettings().resolve(WAN21, (15, 400))
    with pytest.raises(ValueError, match="give both height and width or neither"):
        GenerationSettings(height=480).resolve(WAN21, (100, 100))
    with pytest.raises(ValueError, match="give both height and width or neither"):
        GenerationSettings(width=480).validate(WAN21)
    with pytest.raises(ValueError, match="fit must be one of"):
        GenerationSettings(fit="stretch").validate(WAN21)
    with pytest.raises(ValueError, match="max_width must be at least 16"):
        GenerationSettings(max_width=8).validate(WAN21)
    GenerationSettings(fit="crop", width=480).validate(WAN21)


# -- the pose video fitted like the image ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [None, (48, 80), (96, 48)], ids=["reference", "crop-wide", "crop-tall"])
def test_pose_and_image_align_pixel_for_pixel(target):
    """An image and a pose video of the same odd size with a marker at a known pixel: after fitting, the marker is at
    the same output pixels in both (the pose nearest-neighbour, the image bicubic, thresholded)."""
    h, w = 67, 101
    marker = (slice(30, 41), slice(58, 71))  # rows 30..40, columns 58..70
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    canvas[marker] = 255
    if target is None:
        height, width = reference_size(w, h, 80)
    else:
        height, width = target
    image = np.asarray(fit_image(Image.fromarray(canvas), height, width))
    pose = fit_pose(canvas[None], height, width)[0]
    assert pose.shape == image.shape == (height, width, 3)
    on_pose, on_image = pose[..., 0] == 255, image[..., 0] >= 128  # bicubic halves a step at its edge
    assert on_pose.any()
    for axis in (0, 1):  # the same rows and columns (a bicubic corner pixel may dip below half: compare extents)
        assert np.array_equal(on_pose.any(axis=axis), on_image.any(axis=axis))
    assert (on_pose != on_image).sum() <= 4  # at most the four corner pixels differ


def test_dance_reads_the_pose_video_at_the_resolved_size(tmp_path):
    spec = get_spec(TINY21)
    pose = tmp_path / "pose.mp4"
    write_mp4(pose, np.zeros((5, 120, 70, 3), dtype=np.uint8), fps=25)  # drawn over a 70x120 image
    settings = GenerationSettings(conditioning="pose", fps=25).resolve(spec, (70, 120))
    dance = make_conditioning("pose")
    inputs = dance.plan_inputs({"pose": pose}, settings, spec)
    dance.prepare(inputs, settings)
    assert dance.poses.shape == (5, 112, 64, 3)  # the image's size: 120x70 -> 112x64
    with pytest.raises(ValueError, match="resolved size"):
        dance.prepare(inputs, GenerationSettings(conditioning="pose", fps=25))


# -- the generator and the CLI agree, and record the resolved size ------------------------------------------------


def test_generator_and_plan_size_a_portrait_video_alike(tiny21, tmp_path):
    portrait = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 70, 3), dtype=np.uint8))
    image_file = tmp_path / "portrait.png"
    portrait.save(image_file)
    planned = app.plan(compose_infer(["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a"])).settings
    assert (planned.height, planned.width, planned.fit, planned.max_width) == (112, 64, "reference", 80)
    small = dict(frames_per_clip=5, steps=1, num_clips=1)
    generator = LongVideoGenerator(tiny21, GenerationSettings(**small))
    result = generator.generate(portrait, ["a"], tmp_path / "v.mp4", progress=False)
    assert read_video(result.video).shape == (5, 112, 64, 3)
    recorded = json.loads(result.sidecar.read_text())["settings"]
    assert (recorded["height"], recorded["width"], recorded["fit"], recorded["max_width"]) == (112, 64, "reference", 80)
    assert recorded["negative_prompt"] == NEGATIVE_PROMPT_EN
    assert generator.requested.height is None  # the next image is sized afresh
    cropped = LongVideoGenerator(tiny21, GenerationSettings(**small, fit="crop"))
    video = cropped.generate(portrait, ["a"], tmp_path / "c.mp4", progress=False).video
    assert read_video(video).shape[1:3] == (48, 80)


def test_cli_fit_overrides(image_file):
    base = ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a"]
    s = app.plan(compose_infer([*base, "variant.fit=crop", "height=32", "width=32"])).settings
    assert (s.height, s.width, s.fit) == (32, 32, "crop")
    for experiment, width in (("talk", 640), ("dance", 640), ("shot", None)):
        cfg = compose_infer([*base, f"+experiment={experiment}"])
        assert cfg.variant.max_width == width
    with pytest.raises(USER_ERRORS, match="give both height and width"):
        app.plan(compose_infer([*base, "height=32"]))
    tiny_image = image_file.with_name("dot.png")
    Image.new("RGB", (8, 8)).save(tiny_image)
    with pytest.raises(USER_ERRORS, match="at least 16 pixels"):
        app.plan(compose_infer(["model=tiny_wan21_i2v", f"image={tiny_image}", "prompts=a"]))


# -- each model's negative prompt ----------------------------------------------------------------------------------


def test_each_model_has_the_references_negative_prompt():
    assert NEGATIVE_PROMPT_ZH.startswith("色调艳丽，过曝，静态") and NEGATIVE_PROMPT_ZH.endswith("背景人很多，倒着走")
    for spec_id in ("wan2.2-i2v-a14b", "wan2.2-ti2v-5b", TINY22, "tiny-wan2.2-ti2v-5b"):
        assert get_spec(spec_id).negative_prompt == NEGATIVE_PROMPT_ZH  # SVI's Wan 2.2 scripts: Wan's own
    for spec_id in ("wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", TINY21, "toy-wan2.1-i2v"):
        assert get_spec(spec_id).negative_prompt == NEGATIVE_PROMPT_EN  # SVI's Wan 2.1 scripts: the English one


def test_resolve_settings_takes_the_models_negative_prompt(image_file):
    base = [f"image={image_file}", "prompts=a"]
    models = (("tiny_wan22_i2v_a14b", TINY22, NEGATIVE_PROMPT_ZH), ("tiny_wan21_i2v", TINY21, NEGATIVE_PROMPT_EN))
    for model, spec_id, expected in models:
        cfg = compose_infer([f"model={model}", *base])
        spec = get_spec(spec_id)
        assert app.resolve_settings(cfg, spec, {}).negative_prompt == expected
        assert app.resolve_settings(cfg, spec, {"negative_prompt": "blurry"}).negative_prompt == "blurry"  # svi.json
        cfg = compose_infer([f"model={model}", *base, "variant.negative_prompt=ugly"])
        assert app.resolve_settings(cfg, spec, {"negative_prompt": "blurry"}).negative_prompt == "ugly"  # the user's
    assert GenerationSettings().resolve(get_spec(TINY22), (80, 48)).negative_prompt == NEGATIVE_PROMPT_ZH  # direct API
