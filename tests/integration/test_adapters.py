import json

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from svi_infer.adapters import (
    AdapterError,
    AdapterMeta,
    load_adapter,
    lora_modules,
    parse_lora_state_dict,
    read_meta,
    save_adapter,
    set_strength,
)
from svi_infer.model import build_model
from svi_infer.pose import PoseEncoder, attach_pose, find_pose_encoder, pose_state_dict, set_pose
from svi_infer.spec import get_spec
from tests.helpers import TINY21, TINY22, assert_same_outputs, dit_inputs

pytestmark = pytest.mark.numerics  # compared across instances and loaders: rerun on AVX2 kernels

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
# diffusers -> Wan original names, to write files the way SVI / ComfyUI ship them
_TO_ORIGINAL = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def _trained(model, rank=4, alpha=4.0, name="default"):
    """Give the transformer a LoRA with random (non-zero) weights, as if trained."""
    model.transformers[0].add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False), adapter_name=name
    )
    return get_peft_model_state_dict(model.transformers[0], adapter_name=name)


def _original_name(key):
    block, rest = key.split(".", 2)[1], key.split(".", 2)[2]
    module, tail = rest.rsplit(".lora_", 1)
    return f"blocks.{block}.{_TO_ORIGINAL[module]}", "lora_" + tail


def _out(model, index=0):
    return model.transformers[index](**dit_inputs(model.spec.id))[0]


def test_adapter_directory_round_trip(tmp_path):
    trained = build_model(get_spec(TINY21))
    _trained(trained, rank=4, alpha=8.0)
    reference = _out(trained)
    meta = AdapterMeta.for_spec(trained.spec, defaults={"ref_pad_num": 0}, provenance={"steps": 3})
    save_adapter(trained.transformers[0], tmp_path / "adapter", meta)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "svi.json",
    ]
    fresh = build_model(get_spec(TINY21))
    base = _out(fresh)
    loaded_meta = load_adapter(fresh, tmp_path / "adapter")
    assert loaded_meta.defaults == {"ref_pad_num": 0} and loaded_meta.provenance == {"steps": 3}
    assert_same_outputs(_out(fresh), reference)
    assert not torch.allclose(base, reference)
    assert len(lora_modules(fresh.transformers[0])) == 20


def test_saving_over_an_existing_adapter_replaces_it(tmp_path):
    model = build_model(get_spec(TINY21))
    _trained(model)
    save_adapter(model.transformers[0], tmp_path / "a", AdapterMeta.for_spec(model.spec))
    save_adapter(model.transformers[0], tmp_path / "a", AdapterMeta.for_spec(model.spec, defaults={"fps": 8}))
    assert read_meta(tmp_path / "a").defaults == {"fps": 8}
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.mark.parametrize("style", ["svi_v1", "svi_v2", "comfy_ab", "comfy_updown", "diffusers"])
def test_official_and_community_formats_give_identical_outputs(tmp_path, style):
    trained = build_model(get_spec(TINY21))
    state = _trained(trained, rank=4, alpha=8.0 if style.startswith("comfy") else 4.0)
    reference = _out(trained)
    file = {}
    for key, value in state.items():
        module, kind = _original_name(key)
        if style == "svi_v1":
            file[f"pipe.dit.{module}.{kind.replace('.weight', '.default.weight')}"] = value
        elif style == "svi_v2":
            file[f"{module}.{kind.replace('.weight', '.default.weight')}"] = value
        elif style == "diffusers":
            file[f"transformer.{key}"] = value
        else:
            kind = kind.replace("lora_A", "lora_down").replace("lora_B", "lora_up") if style == "comfy_updown" else kind
            file[f"diffusion_model.{module}.{kind}"] = value
            file[f"diffusion_model.{module}.alpha"] = torch.tensor(8.0)
    save_file(file, str(tmp_path / "lora.safetensors"))
    fresh = build_model(get_spec(TINY21))
    assert load_adapter(fresh, tmp_path / "lora.safetensors") is None
    assert_same_outputs(_out(fresh), reference)


def test_module_mapping_agrees_with_diffusers_converter():
    sd = {}
    for i in range(2):
        for name in [
            "self_attn.q",
            "self_attn.o",
            "cross_attn.k",
            "cross_attn.k_img",
            "cross_attn.v_img",
            "ffn.0",
            "ffn.2",
        ]:
            sd[f"diffusion_model.blocks.{i}.{name}.lora_A.weight"] = torch.zeros(2, 4)
            sd[f"diffusion_model.blocks.{i}.{name}.lora_B.weight"] = torch.zeros(4, 2)
    for name in ["head.head", "text_embedding.0", "time_embedding.2", "img_emb.proj.1"]:
        sd[f"diffusion_model.{name}.lora_A.weight"] = torch.zeros(2, 4)
        sd[f"diffusion_model.{name}.lora_B.weight"] = torch.zeros(4, 2)
    theirs = {
        k.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        for k in _convert_non_diffusers_wan_lora_to_diffusers(dict(sd))
    }
    ours, not_lora = parse_lora_state_dict(sd)
    assert not not_lora and set(ours) == theirs


def test_unmatched_keys_are_named_and_refused(tmp_path):
    state = _trained(build_model(get_spec(TINY21)))
    state = {f"diffusion_model.{'.'.join(_original_name(k))}": v for k, v in state.items()}
    state["diffusion_model.blocks.0.self_attn.q_bogus.lora_A.weight"] = torch.zeros(4, 24)
    state["diffusion_model.head.modulation"] = torch.zeros(3)
    save_file(state, str(tmp_path / "lora.safetensors"))
    with pytest.raises(AdapterError, match=r"2 entries .*: diffusion_model.head.modulation, ") as err:
        load_adapter(build_model(get_spec(TINY21)), tmp_path / "lora.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q_bogus.lora_A.weight" in str(err.value)
    model = build_model(get_spec(TINY21))
    load_adapter(model, tmp_path / "lora.safetensors", ignore_unmatched=True)
    assert len(lora_modules(model.transformers[0])) == 20


def test_adapter_for_another_base_is_refused(tmp_path):
    model22 = build_model(get_spec(TINY22))
    model22.transformers[0].add_adapter(LoraConfig(r=2, target_modules=TARGETS), adapter_name="default")
    save_adapter(model22.transformers[0], tmp_path / "a22", AdapterMeta.for_spec(model22.spec, expert="high_noise"))
    with pytest.raises(AdapterError, match="trained for tiny-wan2.2-i2v-a14b"):
        load_adapter(build_model(get_spec(TINY21)), tmp_path / "a22")
    # a bare file with the wrong dimensions: the shapes give it away
    save_file(
        {
            "blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 5120),
            "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(5120, 2),
        },
        str(tmp_path / "big.safetensors"),
    )
    with pytest.raises(AdapterError, match="made for another base"):
        load_adapter(build_model(get_spec(TINY21)), tmp_path / "big.safetensors")


def test_wan22_expert_routing(tmp_path):
    source = build_model(get_spec(TINY22))
    source.transformers[0].add_adapter(LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    save_adapter(source.transformers[0], tmp_path / "high", AdapterMeta.for_spec(source.spec, expert="high_noise"))
    model = build_model(get_spec(TINY22))
    low_before = _out(model, 1)
    load_adapter(model, tmp_path / "high")
    assert lora_modules(model.transformers[0]) and not lora_modules(model.transformers[1])
    assert torch.equal(_out(model, 1), low_before)
    assert_same_outputs(_out(model, 0), _out(source, 0))
    with pytest.raises(AdapterError, match="high_noise expert, not low_noise"):
        load_adapter(build_model(get_spec(TINY22)), tmp_path / "high", expert="low_noise")
    shared = build_model(get_spec(TINY22))
    save_file(
        {f"transformer.{k}": v for k, v in get_peft_model_state_dict(source.transformers[0]).items()},
        str(tmp_path / "s.safetensors"),
    )
    load_adapter(shared, tmp_path / "s.safetensors")
    assert lora_modules(shared.transformers[0]) == lora_modules(shared.transformers[1])


def test_strength_zero_is_the_base_model(tmp_path):
    trained = build_model(get_spec(TINY21))
    _trained(trained)
    save_adapter(trained.transformers[0], tmp_path / "a", AdapterMeta.for_spec(trained.spec))
    model = build_model(get_spec(TINY21))
    base = _out(model)
    load_adapter(model, tmp_path / "a")
    set_strength(model, 0.0)
    assert_same_outputs(_out(model), base)


def test_svi_json_is_plain_json(tmp_path):
    model = build_model(get_spec(TINY21))
    _trained(model)
    save_adapter(model.transformers[0], tmp_path / "a", AdapterMeta.for_spec(model.spec, defaults={"cfg_scale": 5.0}))
    data = json.loads((tmp_path / "a" / "svi.json").read_text())
    assert data["base"]["spec"] == TINY21 and data["defaults"] == {"cfg_scale": 5.0} and data["expert"] is None


# -- SVI-Dance: the pose encoder travels with the LoRA ---------------------------------------------------------------


def _pose():
    return torch.randint(0, 256, (1, 3, 9, 48, 80), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _dance(model):
    """A trained-looking Dance transformer: random LoRA + random pose encoder, posed."""
    state = _trained(model)
    torch.manual_seed(4)
    attach_pose(model.transformers[0], PoseEncoder(24))
    set_pose(model.transformers[0], _pose())
    return state, pose_state_dict(model.transformers[0])


def _same_pose(model, pose_weights):
    encoder = find_pose_encoder(model.transformers[0])
    assert isinstance(encoder, PoseEncoder) and encoder[0].weight.dtype == torch.float32
    loaded = pose_state_dict(encoder)
    return loaded.keys() == pose_weights.keys() and all(torch.equal(loaded[k], v) for k, v in pose_weights.items())


def test_dance_adapter_directory_carries_and_restores_the_pose_encoder(tmp_path):
    trained = build_model(get_spec(TINY21))
    _, pose = _dance(trained)
    reference = _out(trained)
    meta = AdapterMeta.for_spec(trained.spec, defaults={"conditioning": "pose"})
    save_adapter(trained.transformers[0], tmp_path / "dance", meta)
    # the pose encoder has its own file, so the LoRA file holds nothing but the LoRA
    assert not any("dwpose" in k for k in load_file(str(tmp_path / "dance" / "adapter_model.safetensors")))
    assert sorted(load_file(str(tmp_path / "dance" / "pose_encoder.safetensors"))) == sorted(pose)
    fresh = build_model(get_spec(TINY21))
    assert load_adapter(fresh, tmp_path / "dance").defaults == {"conditioning": "pose"}
    assert _same_pose(fresh, pose)
    set_pose(fresh.transformers[0], _pose())
    assert_same_outputs(_out(fresh), reference)


@pytest.mark.parametrize("style", ["svi_v1", "svi_v2", "comfy"])
def test_official_dance_files_attach_the_pose_encoder(tmp_path, style):
    trained = build_model(get_spec(TINY21))
    state, pose = _dance(trained)
    reference = _out(trained)
    file = {}
    for key, value in state.items():
        module, kind = _original_name(key)
        if style == "comfy":
            file[f"diffusion_model.{module}.{kind}"] = value
            file[f"diffusion_model.{module}.alpha"] = torch.tensor(4.0)
        else:
            prefix = "pipe.dit." if style == "svi_v1" else ""
            file[f"{prefix}{module}.{kind.replace('.weight', '.default.weight')}"] = value
    pose_prefix = {"svi_v1": "", "svi_v2": "pipe.", "comfy": "diffusion_model."}[style]
    file |= {pose_prefix + k: v for k, v in pose.items()}
    save_file(file, str(tmp_path / "svi-dance.safetensors"))
    fresh = build_model(get_spec(TINY21))
    load_adapter(fresh, tmp_path / "svi-dance.safetensors")
    assert _same_pose(fresh, pose)
    set_pose(fresh.transformers[0], _pose())
    assert_same_outputs(_out(fresh), reference)


def test_broken_pose_weights_are_refused_before_anything_loads(tmp_path):
    trained = build_model(get_spec(TINY21))
    state, pose = _dance(trained)
    del pose["dwpose_embedding.12.bias"]
    pose["dwpose_embedding.0.weight"] = pose["dwpose_embedding.0.weight"][:8]
    save_file({**state, **pose}, str(tmp_path / "broken.safetensors"))
    model = build_model(get_spec(TINY21))
    with pytest.raises(AdapterError, match=r"missing dwpose_embedding.12.bias.*wrong shape dwpose_embedding.0.weight"):
        load_adapter(model, tmp_path / "broken.safetensors")
    assert not lora_modules(model.transformers[0]) and find_pose_encoder(model.transformers[0]) is None


def test_a_shared_dance_lora_gives_both_wan22_experts_one_encoder(tmp_path):
    source = build_model(get_spec(TINY22))
    source.transformers[0].add_adapter(LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    attach_pose(source.transformers[0], PoseEncoder(source.transformers[0].patch_embedding.out_channels))
    weights = get_peft_model_state_dict(source.transformers[0]) | pose_state_dict(source.transformers[0])
    save_file(weights, str(tmp_path / "shared.safetensors"))
    model = build_model(get_spec(TINY22))
    load_adapter(model, tmp_path / "shared.safetensors")
    high, low = (find_pose_encoder(t) for t in model.transformers)
    assert high is low is not None
    model = build_model(get_spec(TINY22))
    load_adapter(model, tmp_path / "shared.safetensors", expert="low_noise")
    assert find_pose_encoder(model.transformers[0]) is None and find_pose_encoder(model.transformers[1]) is not None
