"""The variant contract (VariantSpec) and the strategy objects' pure parts: exact values on small inputs."""

from __future__ import annotations

import pytest
import torch

from svi_infer.adapter_files import AdapterMeta
from svi_infer.settings import GenerationSettings
from svi_infer.spec import get_spec
from svi_infer.variants import VariantSpec, make_conditioning, make_handoff, renamed_key_message
from svi_infer.variants.base import Dropped
from svi_infer.variants.handoff import draw_count

FILM_SHARDS = VariantSpec("text", "pixel", 0, (5, 1))
PRO_SHARDS = VariantSpec("text", "latent", -1, (), (2, 1))


def test_spec_is_checked_sorted_and_round_trips():
    assert FILM_SHARDS.motion_frames == (1, 5)
    assert VariantSpec.from_record(FILM_SHARDS.to_record(), "x") == FILM_SHARDS
    assert FILM_SHARDS.to_record() == {
        "conditioning": "text",
        "handoff": "pixel",
        "ref_pad_num": 0,
        "motion_frames": [1, 5],
        "motion_latents": [],
    }
    for bad, message in (
        ({"conditioning": "speech"}, "conditioning must be one of"),
        ({"handoff": "frames"}, "handoff must be one of"),
        ({"ref_pad_num": -2}, "ref_pad_num must be"),
    ):
        with pytest.raises(ValueError, match=message):
            VariantSpec(**bad)
    with pytest.raises(ValueError, match="index.json holds a variant this version cannot read"):
        VariantSpec.from_record({**FILM_SHARDS.to_record(), "colour": "red"}, "index.json")


def test_carried_only_keeps_the_hand_offs_own_counts():
    assert VariantSpec("text", "pixel", 0, (1, 5), (0, 1)).carried_only() == VariantSpec("text", "pixel", 0, (1, 5), ())
    assert VariantSpec("text", "latent", 0, (1, 5), (0, 1)).carried_only() == VariantSpec(
        "text", "latent", 0, (), (0, 1)
    )


def test_contradictions_between_a_training_run_and_its_shards():
    assert FILM_SHARDS.contradictions(VariantSpec("text", "pixel", 0, (1, 5))) == []
    assert FILM_SHARDS.contradictions(VariantSpec("text", "pixel", 0, (5,))) == []  # a subset trains
    assert FILM_SHARDS.contradictions(VariantSpec("text", "pixel", -1, (1, 3))) == [
        "ref_pad_num=-1 (the shards were prepared with 0)",
        "motion_frames [3] (the shards were prepared with [1, 5])",
    ]
    assert FILM_SHARDS.contradictions(VariantSpec("audio", "latent", -1, (), (1,))) == [
        "conditioning=audio (the shards were prepared for text)",
        "handoff=latent (the shards were prepared with handoff=pixel)",
    ]
    # text trains on Talk shards; 0 motion latents (a clip-0 sample) needs no member; padding means nothing to latents
    talk = VariantSpec("audio", "pixel", -1, (1,))
    assert talk.contradictions(VariantSpec("text", "pixel", -1, (1,))) == []
    assert PRO_SHARDS.contradictions(VariantSpec("text", "latent", 0, (), (0, 2))) == []
    assert PRO_SHARDS.contradictions(VariantSpec("text", "latent", 0, (), (0, 3))) == [
        "motion_latents [3] (the shards were prepared with [1, 2])"
    ]


def test_refusals_of_generation_settings_an_adapter_was_not_trained_for():
    trained = FILM_SHARDS
    assert trained.refusals(GenerationSettings(ref_pad_num=0, motion_frames=5)) == []
    assert trained.refusals(GenerationSettings(ref_pad_num=-1, motion_frames=3, conditioning="pose")) == [
        "conditioning=pose (it was trained with text)",
        "ref_pad_num=-1 (it was trained with 0)",
        "motion_frames [3] (it was trained with [1, 5])",
    ]
    assert trained.refusals(GenerationSettings(handoff="latent")) == [
        "handoff=latent (it was trained with handoff=pixel)"
    ]
    assert PRO_SHARDS.refusals(GenerationSettings(handoff="latent", motion_latents=2, ref_pad_num=5)) == []


def test_prepare_command_names_every_setting_of_the_variant():
    assert (
        FILM_SHARDS.prepare_command()
        == "python -m data_tools prepare handoff=pixel ref_pad_num=0 motion_frames=[1,5] ..."
    )
    talk = VariantSpec("audio", "pixel", -1, (1,))
    assert talk.prepare_command() == (
        "python -m data_tools prepare audio=true fps=25 handoff=pixel ref_pad_num=-1 motion_frames=[1] ..."
    )
    pro = VariantSpec("pose", "latent", -1, (), (0, 1))
    assert pro.prepare_command() == "python -m data_tools prepare pose=true handoff=latent motion_latents=[1] ..."


def test_renamed_keys_name_the_new_key():
    assert renamed_key_message("variant.num_motion_frames") == (
        "variant.num_motion_frames is now called variant.motion_frames (one name per concept; see CHANGELOG.md)"
    )
    assert renamed_key_message("num_motion_latents").startswith("num_motion_latents is now called motion_latents")
    assert renamed_key_message("variant.motion_frames") is None


def test_old_adapter_records_are_read_under_todays_names():
    old = {"base": {"spec": "x"}, "defaults": {"num_motion_frames": 5, "conditioning": None, "cfg_scale": 4.0}}
    meta = AdapterMeta.from_record(old)
    assert meta.defaults == {"motion_frames": 5, "conditioning": "text", "cfg_scale": 4.0}
    assert meta.variant is None and meta.trained_variant("x") is None
    new = AdapterMeta.for_spec(get_spec("tiny-wan2.1-i2v"), variant=FILM_SHARDS)
    assert new.trained_variant("svi.json") == FILM_SHARDS


def test_factories_refuse_unknown_names():
    with pytest.raises(ValueError, match="variant.conditioning must be one of"):
        make_conditioning("depth")
    with pytest.raises(ValueError, match="variant.handoff must be one of"):
        make_handoff("frames")
    assert [make_conditioning(n).name for n in ("text", "audio", "pose")] == ["text", "audio", "pose"]


def test_overlap_and_checks_of_the_hand_offs():
    assert GenerationSettings(handoff="pixel", motion_frames=5).overlap_frames == 5
    assert GenerationSettings(handoff="latent", motion_latents=2).overlap_frames == 9
    spec, ti2v = get_spec("tiny-wan2.1-i2v"), get_spec("tiny-wan2.2-ti2v-5b")
    assert make_handoff("pixel").problems(GenerationSettings(frames_per_clip=9, motion_frames=9), spec) == [
        "motion_frames must be >= 1 and < frames_per_clip (9), got 9"
    ]
    assert make_handoff("latent").problems(GenerationSettings(frames_per_clip=9, motion_latents=2), spec) == [
        "motion_latents must be >= 1 and leave room after the anchor latent in a 3-latent clip, got 2"
    ]
    with pytest.raises(ValueError, match="use variant.handoff=latent"):
        make_handoff("pixel").check_base(ti2v)
    make_handoff("latent").check_base(ti2v)


def test_conditioning_checks_of_the_base_and_the_inputs():
    a14b = get_spec("tiny-wan2.2-i2v-a14b")
    with pytest.raises(ValueError, match="made for Wan 2.1 I2V"):
        make_conditioning("audio").check_base(a14b, training=False)
    make_conditioning("pose").check_base(a14b, training=False)  # Dance generates on A14B with its adapters
    with pytest.raises(ValueError, match="trains on Wan 2.1 I2V only"):
        make_conditioning("pose").check_base(a14b, training=True)
    with pytest.raises(ValueError, match=r"pose= is for Dance .* this run's conditioning is audio"):
        make_conditioning("audio").plan_inputs({"pose": "p.mp4"}, GenerationSettings(), a14b)
    with pytest.raises(ValueError, match="needs the Dance adapter"):
        make_conditioning("pose").check_adapters([])


def test_draw_count_takes_the_largest_with_p_more():
    options = {1: "one", 5: "five"}
    g, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = [draw_count(options, (1, 5), 0.9, g)[0] for _ in range(200)]
    expected = [5 if u < 0.9 else 1 for u in torch.rand(200, generator=twin).tolist()]
    assert drawn == expected
    state = g.get_state()
    assert draw_count(options, (5, 7), 0.9, g) == (5, "five")  # one count held: no draw
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match="training asks for"):
        draw_count(options, (3,), 0.9, g)


def test_text_conditioning_draws_nothing_and_drops_nothing():
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert make_conditioning("text", audio_dropout=1.0).draw_dropout(g) == Dropped()
    assert torch.equal(g.get_state(), state)


def _latent_batch(pro_motion: str | None) -> dict:
    g = torch.Generator().manual_seed(4)
    return {
        "key": ["a"],
        "latents": torch.randn(1, 16, 5, 2, 3, generator=g),
        "anchor": torch.randn(1, 16, 1, 2, 3, generator=g),
        "motion": {1: torch.randn(1, 16, 1, 2, 3, generator=g)},
        "pro_motion": pro_motion,
    }


def test_latent_training_inputs_follow_how_the_samples_were_made():
    handoff, g = make_handoff("latent"), torch.Generator().manual_seed(0)
    batch = _latent_batch("continuation")
    x0, y, held, n = handoff.training_inputs(batch, (1,), 0.9, g)
    # the authors' recipe: the target is the window as it is; y = mask, anchor, the previous clip's last latent, 0
    assert n == 1 and held == 2 and torch.equal(x0, batch["latents"])
    assert torch.equal(y[:, 4:, 0:1], batch["anchor"]) and torch.equal(y[:, 4:, 1:2], batch["motion"][1])
    assert not y[:, 4:, 2:].any() and y[:, :4, 0].eq(1).all() and not y[:, :4, 1:].any()
    batch = _latent_batch("window")  # the earlier layout: latent 0 of the target is the anchor
    x0, y, held, n = handoff.training_inputs(batch, (1,), 0.9, g)
    assert torch.equal(x0[:, :, :1], batch["anchor"]) and torch.equal(x0[:, :, 1:], batch["latents"][:, :, 1:])
    with pytest.raises(ValueError, match="prepare the shards again"):
        handoff.training_inputs(_latent_batch(None), (1,), 0.9, g)
