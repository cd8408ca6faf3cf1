import pytest
import torch

from svi_infer.model import ModelFolderError, build_model, save_model
from svi_infer.spec import SPECS, get_spec
from tests.helpers import TINY21, TINY22, assert_same_outputs, dit_inputs

pytestmark = pytest.mark.numerics  # compared across instances and loaders: rerun on AVX2 kernels


def test_every_spec_has_a_tiny_twin_of_its_family():
    real = {s.family for s in SPECS.values() if not s.tiny}
    tiny = {s.family for s in SPECS.values() if s.tiny}
    assert real == tiny


def test_unknown_spec_lists_known_ones():
    with pytest.raises(ValueError, match="tiny-wan2.1-i2v"):
        get_spec("wan9")


@pytest.mark.parametrize("spec_id", [TINY21, TINY22, "tiny-wan2.2-ti2v-5b"])
def test_tiny_builds_are_identical_across_calls(spec_id):
    a, b = build_model(get_spec(spec_id)), build_model(get_spec(spec_id))
    assert len(a.transformers) == len(get_spec(spec_id).experts)
    for ta, tb in zip(a.transformers, b.transformers, strict=True):
        for (na, pa), (_, pb) in zip(ta.state_dict().items(), tb.state_dict().items(), strict=True):
            assert torch.equal(pa, pb), na
    if len(a.transformers) == 2:  # the two experts are different networks
        assert not torch.equal(a.transformers[0].proj_out.weight, a.transformers[1].proj_out.weight)


def test_real_spec_without_path_is_refused():
    with pytest.raises(ValueError, match="model.path"):
        build_model(get_spec("wan2.1-i2v-14b-480p"))


@pytest.mark.parametrize("spec_id", [TINY21, TINY22])
def test_save_and_load_diffusers_layout_round_trip(tmp_path, spec_id):
    spec = get_spec(spec_id)
    model = build_model(spec)
    save_model(model, tmp_path / "weights")
    loaded = build_model(spec, tmp_path / "weights")
    inputs = dit_inputs(spec_id)
    for t_saved, t_loaded in zip(model.transformers, loaded.transformers, strict=True):
        assert_same_outputs(t_loaded(**inputs)[0], t_saved(**inputs)[0])
    assert_same_outputs(loaded.encode_text(["a cat walks"]), model.encode_text(["a cat walks"]))
    video = torch.rand(1, 3, 5, 48, 80) * 2 - 1
    assert_same_outputs(loaded.encode_video(video), model.encode_video(video))


def test_missing_components_are_named(tmp_path):
    save_model(build_model(get_spec(TINY22)), tmp_path / "w22")
    with pytest.raises(ModelFolderError, match="lacks image_encoder, image_processor"):
        build_model(get_spec(TINY21), tmp_path / "w22")
    with pytest.raises(ModelFolderError, match="does not exist"):
        build_model(get_spec(TINY21), tmp_path / "nowhere")


def test_mismatched_folder_is_refused(tmp_path):
    save_model(build_model(get_spec(TINY21)), tmp_path / "w21")
    with pytest.raises(ModelFolderError, match=r"dim=24 \(spec expects 5120\)"):
        build_model(get_spec("wan2.1-i2v-14b-480p"), tmp_path / "w21")


def test_text_embeddings_are_padded_to_512_with_zeros(tiny21):
    emb = tiny21.encode_text(["a cat walks", "the boat"])
    assert emb.shape == (2, 512, 32)
    n = len(tiny21.pipe.tokenizer("a cat walks").input_ids)
    assert emb[0, n:].abs().sum() == 0 and emb[0, :n].abs().sum() > 0


def test_video_latent_round_trip_shapes(tiny21):
    video = torch.rand(1, 3, 9, 48, 80) * 2 - 1
    latents = tiny21.encode_video(video)
    assert latents.shape == (1, 16, 3, 6, 10)
    assert tiny21.decode_latents(latents).shape == (1, 3, 9, 48, 80)
