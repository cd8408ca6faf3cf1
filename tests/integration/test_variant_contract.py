"""The variant contract from shards to adapter to generation: index.json's variant, the training config checked
against it, svi.json's variant, and generation settings checked against that; renamed keys name the new ones."""

from __future__ import annotations

import json

import pytest
from hydra.errors import ConfigCompositionException

import svi_infer.longvideo.plan as app
from svi_infer.adapter_files import AdapterError
from svi_infer.errors import UserError, config_error
from svi_infer.variants import VariantSpec
from svi_train.plan import plan
from tests.helpers import compose_infer, compose_train, train_tiny


def _plan(shards, tmp_path, *overrides):
    return plan(compose_train(["+experiment=tiny", f"data.path={shards}", f"output_dir={tmp_path}", *overrides]))


def test_shards_record_their_variant(shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["variant"] == {
        "conditioning": "text",
        "handoff": "pixel",
        "ref_pad_num": -1,
        "motion_frames": [1, 5],
        "motion_latents": [],
    }
    assert "handoff" not in index and "motion_frames" not in index  # one place for them


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["variant.ref_pad_num=0"],
            r"asks for ref_pad_num=0 \(the shards were prepared with -1\): prepare the shards with "
            r"`python -m data_tools prepare handoff=pixel ref_pad_num=0 motion_frames=\[1\] \.\.\.`",
        ),
        (["data.motion_frames=[1,3]", "variant.motion_frames=3"], r"motion_frames \[3\] \(the shards were prepared"),
        (["variant.motion_frames=5"], r"variant.motion_frames=5 .* is not among the counts this run trains"),
        (["+variant.conditioning=pose"], r"conditioning=pose \(the shards were prepared for text\).*pose=true"),
        (["+variant.cfg_scal=3"], "unknown key variant.cfg_scal: variant takes"),
        (["+variant.num_motion_frames=1"], "variant.num_motion_frames is now called variant.motion_frames"),
    ],
)
def test_training_refuses_a_config_the_shards_contradict(shards, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _plan(shards, tmp_path, *overrides)


def test_training_takes_what_the_shards_hold(shards, tmp_path):
    checked = _plan(shards, tmp_path, "data.motion_frames=[1,5]", "variant.motion_frames=5")
    assert checked.variant == VariantSpec("text", "pixel", -1, (1, 5), ())
    assert checked.defaults["motion_frames"] == 5 and checked.handoff.name == "pixel"


def test_renamed_keys_on_the_command_line_name_the_new_key():
    for compose, prog in ((compose_infer, "svi_infer"), (compose_train, "svi_train")):
        with pytest.raises(ConfigCompositionException) as err:
            compose(["model=tiny_wan21_i2v", "variant.num_motion_frames=2"])
        assert config_error(err.value, prog, "conf/x.yaml") == (
            "variant.num_motion_frames=2: variant.num_motion_frames is now called variant.motion_frames (one name "
            "per concept; see CHANGELOG.md)"
        )


@pytest.fixture(scope="module")
def adapter(shards, tmp_path_factory):
    return train_tiny(shards, tmp_path_factory.mktemp("contract_run"), "trainer.max_steps=2")


def test_adapter_records_its_variant_and_generation_follows_it(adapter, image_file):
    meta = json.loads((adapter / "svi.json").read_text())
    assert meta["variant"] == {
        "conditioning": "text",
        "handoff": "pixel",
        "ref_pad_num": -1,
        "motion_frames": [1],
        "motion_latents": [],
    }
    base = ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a", f"adapter.path={adapter}"]
    assert app.plan(compose_infer(base)).settings.motion_frames == 1
    for override, problem in (
        ("variant.ref_pad_num=0", "ref_pad_num=0 (it was trained with -1)"),
        ("variant.motion_frames=5", "motion_frames [5] (it was trained with [1])"),
        ("variant.handoff=latent", "handoff=latent (it was trained with handoff=pixel)"),
    ):
        with pytest.raises(AdapterError, match="was not trained for") as err:
            app.plan(compose_infer([*base, override]))
        assert problem in str(err.value)


def test_latent_shards_from_before_the_authors_recipe_are_refused(shards, tmp_path):

    from svi_train.shards import check_trained_variant

    latent = VariantSpec("text", "latent", -1, (), (0, 1))
    index = json.loads((shards / "index.json").read_text())
    old = {k: v for k, v in index.items() if k != "pro_motion"}
    with pytest.raises(UserError, match="earlier SVI 2.0 Pro layout .* pro_motion=window to keep"):
        check_trained_variant(VariantSpec("text", "latent", -1, (), (1,)), latent, tmp_path, old)
    check_trained_variant(
        VariantSpec("text", "latent", -1, (), (1,)), latent, tmp_path, {**old, "pro_motion": "window"}
    )
