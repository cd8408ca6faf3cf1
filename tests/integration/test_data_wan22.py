"""data_tools for Wan 2.2 and SVI 2.0 Pro: latent hand-off members, first-frame augmentation, bucket presets,
VAE tiling, TI2V-5B end to end, and the schema of both hand-off layouts."""

import json
import random

import decord
import pytest
import torch
import webdataset as wds

import data_tools.stages as stages
from data_tools.app import _model, run, settings_from
from data_tools.augment import AugmentParams, AugmentSettings, apply_params, augment_frames, draw_params
from data_tools.encode import configure_vae
from data_tools.synthetic import make_dataset, write_clip
from data_tools.windows import crop_resize, read_frames
from svi_infer.model import build_model
from svi_infer.schema import SCHEMA_VERSION, SchemaError, from_members, to_members, validate
from svi_infer.spec import get_spec
from svi_infer.video_io import frames_to_tensor
from tests.helpers import changed_sample, compose_data

A14B = "tiny-wan2.2-i2v-a14b"
SMALL = ["buckets=[[48,80]]", "progress=false"]
PRO = [
    "model=tiny_wan22_i2v_a14b",
    "frames_per_clip=17",
    "handoff=latent",
    "motion_latents=[1,2]",
    "pro_motion=window",
    *SMALL,
]


def _samples(output):
    index = json.loads((output / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        url = str(output / "shards" / shard["name"])
        out += [from_members(raw) for raw in wds.WebDataset(url, shardshuffle=False, empty_check=False)]
    return index, out


def _frames(root, output, sample, indices=None, count=None):
    """The cropped uint8 frames ``prepare`` encoded for ``sample`` (its window, or the given source indices)."""
    manifest = json.loads((output / "work" / "manifest.json").read_text())
    [window] = [w for v in manifest["videos"] for w in v["windows"] if w["key"] == sample.key]
    reader = decord.VideoReader(str(root / sample.meta["source"]), ctx=decord.cpu(0))
    indices = tuple(indices if indices is not None else window["source_indices"][:count])
    return crop_resize(
        read_frames(reader, indices), tuple(sample.meta["crop"]), sample.meta["height"], sample.meta["width"]
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips22")
    make_dataset(root, num_clips=4, fps=16, size=(96, 64), seconds=1.5)  # 24 frames: one 17-frame window + room
    return root


@pytest.fixture(scope="module")
def pro(clips, tmp_path_factory):
    """Latent hand-off shards of the tiny Wan 2.2 A14B, without and with augmentation (same crops and anchors)."""
    out = tmp_path_factory.mktemp("pro")
    run(compose_data([f"input={clips}", f"output={out / 'off'}", *PRO]))
    run(compose_data([f"input={clips}", f"output={out / 'on'}", *PRO, "augment.strength=1.0"]))
    return out


@pytest.fixture(scope="module")
def a14b():
    return build_model(get_spec(A14B))


# -- augmentation ----------------------------------------------------------------------------------
def _video(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 40), indexing="ij")
    base = torch.stack([torch.sin(4 * x), torch.cos(3 * y), x * y])  # smooth, coloured
    frames = torch.stack([torch.roll(base, shifts=j, dims=-1) for j in range(k)], dim=1)
    return (0.8 * frames + 0.1 * torch.randn(frames.shape, generator=g)).clamp(-1, 1)


def test_augment_off_is_the_identity_and_draws_nothing():
    video, rng = _video(), random.Random(3)
    state = rng.getstate()
    out, params = augment_frames(video, AugmentSettings(), rng)
    assert params is None and torch.equal(out, video) and out is not video
    assert rng.getstate() == state  # off: the per-sample rng stream (crops, anchors) is what it always was
    assert draw_params(AugmentSettings(strength=1.0, p=0.0), rng) is None


def test_augment_changes_frames_deterministically_and_stays_in_range():
    video, settings = _video(k=4), AugmentSettings(strength=1.0)
    out, params = augment_frames(video, settings, random.Random("0:clip-w0000"))
    again, params_again = augment_frames(video, settings, random.Random("0:clip-w0000"))
    other, _ = augment_frames(video, settings, random.Random("0:clip-w0001"))
    assert params.applied and params == params_again and torch.equal(out, again)
    assert not torch.equal(out, other)
    assert out.shape == video.shape and out.dtype == video.dtype
    assert out.min() >= -1 and out.max() <= 1 and (out - video).abs().mean() > 0.02
    assert json.loads(json.dumps(params.to_dict())) == params.to_dict()  # recorded in the sample metadata
    assert not draw_params(AugmentSettings(strength=1.0, p=1e-9), random.Random(0)).applied


def test_augment_applies_the_same_parameters_to_every_frame():
    still = _video(k=1).expand(3, 5, 24, 40).contiguous()  # five identical frames
    params = draw_params(AugmentSettings(strength=1.0, noise=0.0), random.Random(7))
    out = apply_params(still, params)
    assert all(torch.equal(out[:, 0], out[:, j]) for j in range(1, 5)) and not torch.equal(out, still)
    # with noise (drawn frame by frame) the first k frames do not depend on how many follow
    noisy = draw_params(AugmentSettings(strength=1.0), random.Random(7))
    video = _video(k=5)
    assert torch.equal(apply_params(video[:, :2], noisy), apply_params(video, noisy)[:, :2])


@pytest.mark.parametrize(
    "knob, value",
    [
        ("blur_sigma", 2.0),
        ("downscale", 4.0),
        ("brightness", 0.3),
        ("contrast", 0.5),
        ("saturation", 0.5),
        ("noise", 0.1),
    ],
)
def test_each_augment_knob_acts_alone(knob, value):
    zero = dict(blur_sigma=0.0, downscale=1.0, brightness=0.0, contrast=0.0, saturation=0.0, noise=0.0)
    video = _video()
    assert torch.equal(augment_frames(video, AugmentSettings(strength=1.0, **zero), random.Random(1))[0], video)
    out, params = augment_frames(video, AugmentSettings(strength=1.0, **{**zero, knob: value}), random.Random(1))
    assert (out - video).abs().max() > 1e-3 and out.min() >= -1 and out.max() <= 1
    neutral = AugmentParams(applied=True)
    assert [getattr(params, k) != getattr(neutral, k) for k in zero] == [k == knob for k in zero]


def test_augment_settings_are_checked():
    with pytest.raises(ValueError, match=r"unknown keys \['sigma'\]; known keys: strength, p, blur_sigma"):
        AugmentSettings.from_dict({"sigma": 1.0})
    with pytest.raises(ValueError, match="downscale=0.5 must be >= 1"):
        AugmentSettings.from_dict({"downscale": 0.5})
    assert AugmentSettings.from_dict(None) == AugmentSettings() and not AugmentSettings().enabled


# -- latent hand-off (SVI 2.0 Pro) -----------------------------------------------------------------
def test_latent_handoff_members_and_causal_motion(pro):
    index, samples = _samples(pro / "off")
    variant = index["variant"]
    assert variant["handoff"] == "latent" and variant["motion_latents"] == [1, 2] and variant["motion_frames"] == []
    assert index["spec"] == A14B and index["samples"] == len(samples) == 4
    for s in samples:
        t = s.tensors
        assert sorted(t) == ["anchor", "latents", "motion.n1", "motion.n2", "text"]
        assert t["latents"].shape == (16, 5, 6, 10) and t["anchor"].shape == (16, 1, 6, 10)
        assert t["motion.n1"].shape == (16, 1, 6, 10) and t["motion.n2"].shape == (16, 2, 6, 10)
        assert all(v.dtype == torch.bfloat16 for v in t.values())
        assert s.meta["handoff"] == "latent" and s.meta["motion_latents"] == [1, 2] and s.meta["augment"] is None
        # the Wan VAE is causal in time: latents 1..n of the first 1+4n frames are the window's own
        for n in (1, 2):
            torch.testing.assert_close(t[f"motion.n{n}"].float(), t["latents"][:, 1 : 1 + n].float(), atol=1e-2, rtol=0)


def test_anchor_latent_is_the_anchor_frame_alone_from_outside_the_window(pro, clips, a14b):
    _, samples = _samples(pro / "off")
    manifest = json.loads((pro / "off" / "work" / "manifest.json").read_text())
    windows = {w["key"]: w["source_indices"] for v in manifest["videos"] for w in v["windows"]}
    for s in samples[:2]:
        idx = s.meta["anchor_frame"]
        assert idx is not None and not min(windows[s.key]) <= idx <= max(windows[s.key])  # anchor=outside
        anchor = frames_to_tensor(_frames(clips, pro / "off", s, indices=[idx]))  # [3, 1, H, W]
        expected = a14b.encode_video(anchor[None])[0].to(torch.bfloat16)
        torch.testing.assert_close(s.tensors["anchor"], expected)


def test_augmentation_degrades_only_the_motion_frames(pro, clips, a14b):
    _, off = _samples(pro / "off")
    index, on = _samples(pro / "on")
    assert index["augment"]["strength"] == 1.0
    for a, b in zip(off, on, strict=True):
        assert a.key == b.key and b.meta["augment"]["applied"]
        assert torch.equal(a.tensors["latents"], b.tensors["latents"])  # the target is never augmented
        assert torch.equal(a.tensors["anchor"], b.tensors["anchor"])  # nor the anchor
        assert not torch.equal(a.tensors["motion.n2"], b.tensors["motion.n2"])
    # motion.n<n> = latents 1..n of the augmented first 1+4n frames, with the parameters in the metadata
    s = on[0]
    head = frames_to_tensor(_frames(clips, pro / "on", s, count=9))
    params = AugmentParams(**s.meta["augment"])
    expected = a14b.encode_video(apply_params(head, params)[None])[0, :, 1:3].to(torch.bfloat16)
    torch.testing.assert_close(s.tensors["motion.n2"], expected)
    expected = a14b.encode_video(apply_params(head[:, :5], params)[None])[0, :, 1:2].to(torch.bfloat16)
    torch.testing.assert_close(s.tensors["motion.n1"], expected)  # from the first 1 + 4 frames alone


def test_a14b_pixel_handoff_with_augmentation(clips, tmp_path):
    base = [f"input={clips}", "model=tiny_wan22_i2v_a14b", "frames_per_clip=9", "stride=16", "motion_frames=[1,5]"]
    base += SMALL  # one 9-frame window per clip
    run(compose_data([*base, f"output={tmp_path / 'off'}"]))
    run(compose_data([*base, f"output={tmp_path / 'on'}", "augment.strength=0.8"]))
    index, off = _samples(tmp_path / "off")
    variant = index["variant"]
    assert variant["handoff"] == "pixel" and variant["motion_latents"] == [] and variant["motion_frames"] == [1, 5]
    _, on = _samples(tmp_path / "on")
    for a, b in zip(off, on, strict=True):
        assert sorted(b.tensors) == ["cond.m1", "cond.m5", "latents", "text"]
        assert b.meta["handoff"] == "pixel" and b.meta["motion_latents"] == [] and a.meta["augment"] is None
        assert b.meta["augment"]["applied"] and a.meta["anchor_frame"] == b.meta["anchor_frame"]
        assert torch.equal(a.tensors["latents"], b.tensors["latents"])
        assert not torch.equal(a.tensors["cond.m1"], b.tensors["cond.m1"])


def test_ti2v_5b_latent_handoff_end_to_end(clips, tmp_path):
    out = tmp_path / "5b"
    overrides = ["model=tiny_wan22_ti2v_5b", "frames_per_clip=9", "fps=16", "stride=8", "buckets=[[64,96]]"]
    overrides += ["progress=false"]
    run(compose_data([f"input={clips}", f"output={out}", *overrides, "handoff=latent", "augment.strength=1.0"]))
    index, samples = _samples(out)
    assert index["spec"] == "tiny-wan2.2-ti2v-5b" and index["resolutions"] == [[64, 96]] and len(samples) == 4
    for s in samples:
        assert sorted(s.tensors) == ["anchor", "latents", "motion.n1", "text"]  # no CLIP on Wan 2.2
        assert s.tensors["latents"].shape == (48, 3, 4, 6)  # 16x spatial VAE, 48 channels
        assert s.tensors["anchor"].shape == s.tensors["motion.n1"].shape == (48, 1, 4, 6)


def test_resumed_latent_prepare_with_augmentation_is_byte_identical(clips, tmp_path, monkeypatch):
    args = [f"input={clips}", "frames_per_clip=9", "stride=8", "handoff=latent", "crop=random", *SMALL]
    args += ["augment.strength=1.0"]
    run(compose_data([*args, f"output={tmp_path / 'full'}"]))
    original, calls = stages.encode_window, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(stages, "encode_window", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(compose_data([*args, f"output={tmp_path / 'resumed'}"]))
    run(compose_data([*args, f"output={tmp_path / 'resumed'}"]))
    full = sorted((tmp_path / "full" / "shards").iterdir())
    resumed = sorted((tmp_path / "resumed" / "shards").iterdir())
    assert [p.name for p in full] == [p.name for p in resumed]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(full, resumed, strict=True))
    _, samples = _samples(tmp_path / "full")
    assert len({json.dumps(s.meta["augment"]) for s in samples}) == len(samples)  # drawn per sample


def test_handoff_settings_are_checked():
    with pytest.raises(ValueError, match="handoff must be one of"):
        settings_from(compose_data(["handoff=lat"]), get_spec(A14B))
    with pytest.raises(ValueError, match=r"motion_latents must be counts n >= 1 .* \(n < 2; frames_per_clip=9\)"):
        settings_from(compose_data(["handoff=latent", "frames_per_clip=9", "motion_latents=[2]"]), get_spec(A14B))
    settings = settings_from(compose_data(["handoff=latent", "motion_latents=[3,1]"]), get_spec(A14B))
    assert settings.motion_latents == (1, 3) and settings.encode_settings().needs_anchor


def test_older_manifest_without_the_new_settings_still_loads(clips, tmp_path):
    base = [f"input={clips}", f"output={tmp_path}", "command=scan", "frames_per_clip=17", *SMALL]
    cfg = compose_data(base)
    run(cfg)
    path = tmp_path / "work" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("handoff", "motion_latents", "augment", "vae_tiling", "vae_tile_size", "vae_tile_stride"):
        del manifest["settings"][key]
    path.write_text(json.dumps(manifest))
    spec = get_spec("tiny-wan2.1-i2v")
    assert stages.load_manifest(tmp_path, settings_from(cfg, spec))["videos"]
    with pytest.raises(ValueError, match="other settings"):
        stages.load_manifest(tmp_path, settings_from(compose_data([*base, "handoff=latent"]), spec))


# -- schema ----------------------------------------------------------------------------------------
def _sample(handoff="latent", spec="tiny-wan2.2-i2v-a14b", c=16, h=6, w=10, **changes):
    meta = {
        "schema_version": SCHEMA_VERSION,
        "key": "clip-w0000",
        "caption": "a boat",
        "source": "clip.mp4",
        "source_fps": 16.0,
        "fps": 16.0,
        "start_frame": 0,
        "num_frames": 17,
        "window_index": 0,
        "spec": spec,
        "height": 48 if spec != "tiny-wan2.2-ti2v-5b" else 64,
        "width": 80 if spec != "tiny-wan2.2-ti2v-5b" else 96,
        "latent_channels": c,
        "motion_frames": [] if handoff == "latent" else [1],
        "ref_pad_num": -1,
        "handoff": handoff,
        "motion_latents": [1, 2] if handoff == "latent" else [],
        "text_len": 4,
    }
    bf16 = torch.bfloat16
    tensors = {"latents": torch.zeros(c, 5, h, w, dtype=bf16), "text": torch.ones(4, 32, dtype=bf16)}
    if handoff == "latent":
        tensors |= {"anchor": torch.zeros(c, 1, h, w, dtype=bf16), "motion.n1": torch.zeros(c, 1, h, w, dtype=bf16)}
        tensors["motion.n2"] = torch.zeros(c, 2, h, w, dtype=bf16)
    else:
        tensors["cond.m1"] = torch.zeros(c, 5, h, w, dtype=bf16)
    return changed_sample(meta, tensors, changes)


def test_schema_accepts_both_layouts_and_older_pixel_samples():
    latent = from_members(to_members(_sample()))
    assert sorted(latent.tensors) == ["anchor", "latents", "motion.n1", "motion.n2", "text"]
    assert sorted(to_members(_sample())) == [
        "__key__",
        "anchor.safetensors",
        "json",
        "latents.safetensors",
        "motion.safetensors",
        "text.safetensors",
    ]
    validate(_sample("pixel"))
    older = _sample("pixel")
    del older.meta["handoff"], older.meta["motion_latents"]  # shards written before the keys existed
    assert sorted(from_members(to_members(older)).tensors) == ["cond.m1", "latents", "text"]
    # TI2V-5B: 48 channels and the 16x VAE (64x96 -> 4x6 latents)
    validate(_sample(spec="tiny-wan2.2-ti2v-5b", c=48, h=4, w=6))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(**{"motion.n1": None}), "no latent hand-off tensor 'motion.n1'"),
        (dict(anchor=None), "no latent hand-off tensor 'anchor'"),
        (dict(anchor=torch.zeros(16, 1, 6, 10)), r"anchor is float32 \(16, 1, 6, 10\), expected bfloat16"),
        (dict(**{"motion.n2": torch.zeros(16, 1, 6, 10, dtype=torch.bfloat16)}), r"motion.n2 is bfloat16 \(16, 1"),
        (dict(anchor=torch.full((16, 1, 6, 10), float("inf"), dtype=torch.bfloat16)), "anchor has non-finite"),
        (dict(**{"cond.m1": torch.zeros(16, 5, 6, 10, dtype=torch.bfloat16)}), r"unexpected tensors \['cond.m1'\]"),
        (dict(**{"motion.n3": torch.zeros(16, 3, 6, 10, dtype=torch.bfloat16)}), r"unexpected tensors \['motion.n3'"),
        (dict(motion_latents=[]), "needs metadata 'motion_latents'"),
        (dict(motion_latents=[1, 2, 4]), "count 4 must be in 1..3"),
        (dict(motion_frames=[1]), "lists motion_frames"),
        (dict(handoff="both"), "handoff 'both' must be one of"),
        (dict(motion_latents=["1"]), "must list integer counts"),
    ],
)
def test_schema_refuses_broken_latent_samples(changes, message):
    with pytest.raises(SchemaError, match=message):
        validate(_sample(**changes))
    with pytest.raises(SchemaError):
        to_members(_sample(**changes))


def test_schema_refuses_latent_members_in_a_pixel_sample_and_checks_on_read():
    with pytest.raises(SchemaError, match=r"holds latent hand-off tensors \['anchor'\]"):
        validate(_sample("pixel", anchor=torch.zeros(16, 1, 6, 10, dtype=torch.bfloat16)))
    with pytest.raises(SchemaError, match="lists motion_latents"):
        validate(_sample("pixel", motion_latents=[1]))
    members = to_members(_sample())
    members["json"] = members["json"].replace(b'"motion_latents": [1, 2]', b'"motion_latents": [1, 2, 3]')
    with pytest.raises(SchemaError, match="no latent hand-off tensor 'motion.n3'"):
        from_members(members)


# -- buckets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, preset, expected",
    [
        ("tiny_wan21_i2v", "480p", ((480, 832), (832, 480), (624, 624))),
        ("wan22_i2v_a14b", "720p", ((720, 1280), (1280, 720), (960, 960))),
        ("wan22_ti2v_5b", "720p", ((704, 1280), (1280, 704), (960, 960))),  # multiples of 32
        ("tiny_wan22_ti2v_5b", "480p", ((480, 832), (832, 480), (608, 608))),
    ],
)
def test_bucket_presets_round_to_the_model(model, preset, expected):
    cfg = compose_data([f"model={model}", f"buckets={preset}", "frames_per_clip=81"])
    assert settings_from(cfg, get_spec(cfg.model.spec)).buckets == expected


def test_unknown_bucket_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown bucket preset '1080p'; presets: 480p = 480x832, 832x480, 624x624"):
        settings_from(compose_data(["buckets=1080p"]), get_spec("tiny-wan2.1-i2v"))


def test_portrait_and_square_videos_go_to_their_preset_buckets(tmp_path):
    root = tmp_path / "in"
    for name, size in (("land", (96, 64)), ("port", (64, 96)), ("square", (64, 64))):
        write_clip(root / f"{name}.mp4", seconds=0.8, fps=16, size=size)
        (root / f"{name}.txt").write_text(f"a {name} clip", encoding="utf-8")
    run(
        compose_data(
            [f"input={root}", f"output={tmp_path / 'out'}", "command=scan", "buckets=480p", "frames_per_clip=9"]
        )
    )
    manifest = json.loads((tmp_path / "out" / "work" / "manifest.json").read_text())
    assert {v["source"]: v["bucket"] for v in manifest["videos"]} == {
        "land.mp4": [480, 832],
        "port.mp4": [832, 480],
        "square.mp4": [624, 624],
    }


# -- VAE tiling ------------------------------------------------------------------------------------
def test_vae_tiling_is_on_and_close_to_untiled(tmp_path):
    cfg = compose_data(["vae_tiling=true", "vae_tile_size=48", "vae_tile_stride=32", f"output={tmp_path}"])
    spec = get_spec("tiny-wan2.1-i2v")
    settings = settings_from(cfg, spec)
    model = _model(cfg, spec, settings)
    vae = model.vae
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (48, 32)
    video = _video(k=9).repeat(1, 1, 2, 2)[:, :, :48, :80]  # [3, 9, 48, 80]
    tiled = model.encode_video(video[None])
    configure_vae(model, False)
    assert not vae.use_tiling
    plain = model.encode_video(video[None])
    rel = ((tiled - plain).norm() / plain.norm()).item()
    assert 1e-4 < rel < 0.1  # measured 0.03 for 48/32 tiles on 48x80 (the tiny VAE's receptive field is small)
    assert not _model(compose_data([]), spec, settings_from(compose_data([]), spec)).vae.use_tiling
    with pytest.raises(ValueError, match="multiples of 8"):
        settings_from(compose_data(["vae_tiling=true", "vae_tile_size=50"]), spec)


def test_pro_continuation_samples_hand_on_the_previous_clips_last_latents(tmp_path, a14b):
    """pro_motion=continuation (the default): each sample continues the clip that ends 4n frames into it, its
    motion latents are that clip's last n latents encoded as one clip, and the anchor comes from before it."""
    root = tmp_path / "long"
    make_dataset(root, num_clips=4, fps=16, size=(96, 64), seconds=2.5)  # 40 frames: windows at 0, 13, 26
    out = tmp_path / "ds"
    run(compose_data([f"input={root}", f"output={out}", "model=tiny_wan22_i2v_a14b", "frames_per_clip=13", *SMALL]
                     + ["handoff=latent", "motion_latents=[1,2]"]))  # fmt: skip
    index, samples = _samples(out)
    assert index["pro_motion"] == "continuation"
    # a window at s continues the clip at s - 12 + 4n: windows at 13 and 26 (0 has nothing before it)
    starts = {}
    for s in samples:
        starts.setdefault(s.meta["source"], []).append(s.meta["start_frame"])
    assert len(starts) == 4 and all(sorted(v) == [13, 26] for v in starts.values())
    assert all(s.meta["pro_motion"] == "continuation" for s in samples)
    for s in samples:
        start = s.meta["start_frame"]
        assert s.meta["anchor_frame"] < start - 12 + 4  # before the earliest previous clip (n = 1)
        for n in (1, 2):
            clip = _frames(root, out, s, indices=range(start - 12 + 4 * n, start + 4 * n + 1))
            expected = a14b.encode_video(frames_to_tensor(clip)[None])[0][:, -n:]
            stored = s.tensors[f"motion.n{n}"].float()  # bf16: within its rounding of the float encode
            torch.testing.assert_close(stored, expected, rtol=1e-2, atol=1e-2)
            own = _frames(root, out, s, count=1 + 4 * n)  # the earlier layout: the window's own first frames
            copied = a14b.encode_video(frames_to_tensor(own)[None])[0][:, 1 : 1 + n]
            assert (stored - copied).abs().max() > 0.1  # the tolerance tells the two layouts apart


def test_pro_continuation_skips_a_video_too_short_for_two_windows(clips, tmp_path):
    out = tmp_path / "short"
    args = [f"input={clips}", f"output={out}", "model=tiny_wan22_i2v_a14b", "frames_per_clip=17", "handoff=latent"]
    with pytest.raises(Exception, match="no usable sample"):
        run(compose_data([*args, *SMALL]))
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_by_reason"] == {"too_short": 4}
    assert "continue a previous clip" in report["skipped"][0]["detail"]
