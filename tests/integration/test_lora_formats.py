"""The LoRA files people share, each checked against a direct merge (W += alpha / r * B @ A, W += diff) on the tiny
model: this project's exports (peft directory, diffusers export, ComfyUI file) in svi_infer and in diffusers' own
loader, kohya / musubi-tuner keys, LightX2V-style ``diff`` / ``diff_b`` deltas, and Dance exports whose pose encoder
sits in a file of its own so that the LoRA file loads in diffusers too."""

import json

import pytest
import torch
from diffusers import WanImageToVideoPipeline
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from svi_infer.adapter_files import META_FORMAT
from svi_infer.adapters import AdapterError, AdapterMeta, load_adapter, lora_modules, set_strength
from svi_infer.model import build_model
from svi_infer.pose import PoseEncoder, attach_pose, detach_pose, pose_state_dict, set_pose
from svi_infer.spec import get_spec
from svi_train.export import export
from tests.helpers import TINY21, assert_same_outputs, dit_inputs

pytestmark = pytest.mark.numerics  # compared across instances and loaders: rerun on AVX2 kernels

RANK, ALPHA = 4, 8.0
# what training targets (and diffusers' converter maps in ComfyUI files): the blocks' linear layers
BLOCK = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "attn2.add_k_proj",
    "attn2.add_v_proj",
    "ffn.net.0.proj",
    "ffn.net.2",
]
EXPORTED = [f"blocks.{i}.{m}" for i in range(2) for m in BLOCK]
# kohya / musubi-tuner names (Wan's original names, "." -> "_") of every mapped module, with their diffusers names
ORIGINAL = ["self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o", "cross_attn_q", "cross_attn_k"]
ORIGINAL += ["cross_attn_v", "cross_attn_o", "cross_attn_k_img", "cross_attn_v_img", "ffn_0", "ffn_2"]
KOHYA = {
    **{f"blocks_{i}_{o}": f"blocks.{i}.{d}" for i in range(2) for o, d in zip(ORIGINAL, BLOCK, strict=True)},
    "head_head": "proj_out",
    "text_embedding_0": "condition_embedder.text_embedder.linear_1",
    "text_embedding_2": "condition_embedder.text_embedder.linear_2",
    "time_embedding_0": "condition_embedder.time_embedder.linear_1",
    "time_projection_1": "condition_embedder.time_proj",
    "img_emb_proj_1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb_proj_3": "condition_embedder.image_embedder.ff.net.2",
}
# LightX2V-style deltas: (key as the file names it, diffusers parameter name)
DELTAS = [
    ("diffusion_model.blocks.0.norm3.diff", "blocks.0.norm2.weight"),  # Wan's norm3 is diffusers' norm2
    ("diffusion_model.blocks.0.norm3.diff_b", "blocks.0.norm2.bias"),
    ("diffusion_model.blocks.1.self_attn.norm_q.diff", "blocks.1.attn1.norm_q.weight"),
    ("diffusion_model.blocks.0.cross_attn.norm_k_img.diff", "blocks.0.attn2.norm_added_k.weight"),
    ("diffusion_model.blocks.0.self_attn.q.diff_b", "blocks.0.attn1.to_q.bias"),  # on a LoRA module too
    ("diffusion_model.head.head.diff", "proj_out.weight"),
    ("diffusion_model.patch_embedding.diff_b", "patch_embedding.bias"),
    ("transformer.blocks.1.ffn.net.2.diff", "blocks.1.ffn.net.2.weight"),  # diffusers names
    ("lora_unet_blocks_1_cross_attn_v_img.diff_b", "blocks.1.attn2.add_v_proj.bias"),  # kohya names
]


def _out(model):
    return model.transformers[0](**dit_inputs(TINY21))[0]


def _weights(model):
    """Every parameter of the transformer with its LoRAs merged (peft's delta at the scale set), by diffusers name."""
    out = {}
    for name, module in model.transformers[0].named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
            base = module.base_layer
            out[f"{name}.weight"] = base.weight + sum(module.get_delta_weight(a) for a in module.lora_A)
            if base.bias is not None:
                out[f"{name}.bias"] = base.bias
        else:
            out |= {f"{name}.{k}" if name else k: v for k, v in module.named_parameters(recurse=False)}
    return {k: v for k, v in out.items() if ".lora_" not in k and ".base_layer." not in k}


def _close(model, reference):
    """The weights agree to 1e-6 with the directly merged reference, and so do the outputs up to float rounding."""
    ours, theirs = _weights(model), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-6, msg=name)
    assert_same_outputs(_out(model), _out(reference))


def _random_lora(names, seed=0):
    """{diffusers module name: (A [r, in], B [out, r])} with non-zero weights, as if trained."""
    modules = dict(build_model(get_spec(TINY21)).transformers[0].named_modules())
    g = torch.Generator().manual_seed(seed)
    return {
        n: (
            0.3 * torch.randn(RANK, modules[n].in_features, generator=g),
            0.3 * torch.randn(modules[n].out_features, RANK, generator=g),
        )
        for n in names
    }


def _merged(lora, deltas=None, strength=1.0):
    """The reference: a fresh model with every LoRA and delta merged into its weights directly."""
    model = build_model(get_spec(TINY21))
    transformer = model.transformers[0]
    with torch.no_grad():
        for name, (a, b) in lora.items():
            transformer.get_submodule(name).weight += strength * ALPHA / RANK * (b @ a)
        for name, delta in (deltas or {}).items():
            transformer.get_parameter(name).add_(strength * delta)
    return model


def _peft_dir(path, lora, pose=None):
    """An adapter directory as training writes it (pose encoder beside the LoRA)."""
    path.mkdir()
    weights = {f"{n}.lora_A.weight": a for n, (a, _) in lora.items()}
    weights |= {f"{n}.lora_B.weight": b for n, (_, b) in lora.items()}
    save_file(weights, str(path / "adapter_model.safetensors"))
    if pose is not None:
        save_file(pose, str(path / "pose_encoder.safetensors"))
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(lora)).save_pretrained(str(path))
    meta = AdapterMeta.for_spec(get_spec(TINY21), defaults={"conditioning": "pose"} if pose else {})
    record = {"format": META_FORMAT, "base": meta.base, "expert": None, "variant": None}
    (path / "svi.json").write_text(json.dumps(record | {"defaults": meta.defaults, "provenance": {}}))
    return path


def _exported(tmp_path, fmt, lora, pose=None):
    source = _peft_dir(tmp_path / "source", lora, pose)
    (out,) = export(source, fmt, tmp_path / ("lora.safetensors" if fmt == "comfyui" else fmt))
    return out


def _diffusers_load(path):
    """Load an export with diffusers' own pipeline loader (``load_lora_weights``) into a fresh tiny transformer."""
    model = build_model(get_spec(TINY21))
    pipe = WanImageToVideoPipeline(None, None, None, None, None, None, model.transformers[0])
    if path.is_dir():
        pipe.load_lora_weights(str(path), adapter_name="exported")
    else:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="exported")
    return model


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "comfyui"])
def test_exports_load_in_svi_infer_as_the_merged_weights(tmp_path, fmt):
    lora = _random_lora(EXPORTED)
    model = build_model(get_spec(TINY21))
    base = _out(model)
    load_adapter(model, _exported(tmp_path, fmt, lora))
    _close(model, _merged(lora))
    assert (_out(model) - base).abs().max() > 1e-2


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_exports_load_in_diffusers_as_the_merged_weights(tmp_path, fmt):
    lora = _random_lora(EXPORTED)
    model = _diffusers_load(_exported(tmp_path, fmt, lora))
    assert len(lora_modules(model.transformers[0])) == len(EXPORTED)
    _close(model, _merged(lora))


def test_kohya_keys_load_as_the_merged_weights(tmp_path):
    lora = _random_lora(KOHYA.values())
    file = {}
    for kohya, name in KOHYA.items():
        a, b = lora[name]
        file |= {f"lora_unet_{kohya}.lora_down.weight": a, f"lora_unet_{kohya}.lora_up.weight": b}
        file[f"lora_unet_{kohya}.alpha"] = torch.tensor(ALPHA)  # scale = alpha / rank, as kohya
    save_file(file, str(tmp_path / "musubi.safetensors"))
    model = build_model(get_spec(TINY21))
    load_adapter(model, tmp_path / "musubi.safetensors")
    assert lora_modules(model.transformers[0]) == sorted(KOHYA.values())
    _close(model, _merged(lora))


def test_unknown_kohya_names_are_reported_by_name(tmp_path):
    a, b = _random_lora(["blocks.0.attn1.to_q"])["blocks.0.attn1.to_q"]
    file = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": a, "lora_unet_blocks_0_self_attn_q.lora_up.weight": b}
    file["lora_unet_blocks_0_self_attn_qq.lora_down.weight"] = a.clone()
    save_file(file, str(tmp_path / "k.safetensors"))
    with pytest.raises(AdapterError, match=r"1 entries .*: lora_unet_blocks_0_self_attn_qq.lora_down.weight\."):
        load_adapter(build_model(get_spec(TINY21)), tmp_path / "k.safetensors")


def _delta_file(tmp_path, lora, with_lora=True):
    g = torch.Generator().manual_seed(7)
    params = dict(build_model(get_spec(TINY21)).transformers[0].named_parameters())
    deltas = {name: 0.2 * torch.randn(params[name].shape, generator=g) for _, name in DELTAS}
    file = {key: deltas[name] for key, name in DELTAS}
    if with_lora:
        for name, (a, b) in lora.items():
            file |= {f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b}
            file[f"transformer.{name}.alpha"] = torch.tensor(ALPHA)
    save_file(file, str(tmp_path / "lightx2v.safetensors"))
    return tmp_path / "lightx2v.safetensors", deltas


def test_diff_and_diff_b_are_added_to_the_weights_once_and_follow_the_strength(tmp_path):
    lora = _random_lora(EXPORTED[:4])
    file, deltas = _delta_file(tmp_path, lora)
    model = build_model(get_spec(TINY21))
    base = {k: v.clone() for k, v in model.transformers[0].named_parameters()}
    base_out = _out(model)
    load_adapter(model, file)
    _close(model, _merged(lora, deltas))
    set_strength(model, 1.0)  # recomputed from the weights before the deltas: not added a second time
    _close(model, _merged(lora, deltas))
    set_strength(model, 0.5)
    _close(model, _merged(lora, deltas, strength=0.5))
    set_strength(model, 0.0)
    weights = _weights(model)
    assert all(torch.equal(weights[name], base[name]) for _, name in DELTAS)  # exactly the base weights again
    assert_same_outputs(_out(model), base_out)


def test_a_file_of_deltas_alone_loads(tmp_path):
    file, deltas = _delta_file(tmp_path, {}, with_lora=False)
    model = build_model(get_spec(TINY21))
    load_adapter(model, file)
    assert not lora_modules(model.transformers[0])
    _close(model, _merged({}, deltas))


def test_a_delta_of_the_wrong_shape_is_refused(tmp_path):
    save_file({"diffusion_model.blocks.0.norm3.diff": torch.zeros(5120)}, str(tmp_path / "big.safetensors"))
    with pytest.raises(AdapterError, match=r"blocks.0.norm2.weight is \(24,\) but its delta is \(5120,\)"):
        load_adapter(build_model(get_spec(TINY21)), tmp_path / "big.safetensors")


# -- Dance: the pose encoder in a file of its own, beside the LoRA, in every export -----------------------------------


def _pose():
    return torch.randint(0, 256, (1, 3, 9, 48, 80), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "comfyui"])
def test_dance_exports_keep_the_pose_encoder_beside_a_pure_lora_file(tmp_path, fmt):
    lora = _random_lora(EXPORTED)
    torch.manual_seed(4)
    encoder = PoseEncoder(24)
    pose_weights = pose_state_dict(encoder)
    out = _exported(tmp_path, fmt, lora, pose_weights)
    lora_file = {
        "peft": out / "adapter_model.safetensors",
        "diffusers": out / "pytorch_lora_weights.safetensors",
        "comfyui": out,
    }[fmt]
    pose_file = tmp_path / "lora.pose_encoder.safetensors" if fmt == "comfyui" else out / "pose_encoder.safetensors"
    assert not any("dwpose" in k for k in load_file(str(lora_file)))
    saved = load_file(str(pose_file))
    assert saved.keys() == pose_weights.keys() and all(torch.equal(saved[k], v) for k, v in pose_weights.items())
    # svi_infer: the LoRA and the pose encoder, as the merged reference with the same encoder attached
    reference = _merged(lora)
    attach_pose(reference.transformers[0], encoder)
    set_pose(reference.transformers[0], _pose())
    model = build_model(get_spec(TINY21))
    load_adapter(model, out)
    set_pose(model.transformers[0], _pose())
    _close(model, reference)
    named = build_model(get_spec(TINY21))  # the LoRA file named itself finds the pose encoder beside it too
    load_adapter(named, lora_file)
    assert pose_state_dict(named.transformers[0]).keys() == pose_weights.keys()
    # diffusers: the LoRA file loads with load_lora_weights (it used to fail: "Invalid LoRA checkpoint")
    if fmt != "peft":
        detach_pose(reference.transformers[0])
        _close(_diffusers_load(out), reference)


def test_a_pose_encoder_both_inside_and_beside_the_lora_is_refused(tmp_path):
    lora = _random_lora(EXPORTED[:2])
    pose = pose_state_dict(PoseEncoder(24))
    source = _peft_dir(tmp_path / "a", lora, pose)
    save_file(load_file(str(source / "adapter_model.safetensors")) | pose, str(source / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="holds a pose encoder and so does .*pose_encoder.safetensors"):
        load_adapter(build_model(get_spec(TINY21)), source)


def test_an_older_dance_adapter_directory_exports_with_the_pose_encoder_split_off(tmp_path):
    """Adapter directories written before the split hold the pose encoder inside adapter_model.safetensors."""
    lora = _random_lora(EXPORTED[:2])
    pose = pose_state_dict(PoseEncoder(24))
    source = _peft_dir(tmp_path / "old", lora)
    save_file(load_file(str(source / "adapter_model.safetensors")) | pose, str(source / "adapter_model.safetensors"))
    (out,) = export(source, "diffusers", tmp_path / "exported")
    assert sorted(load_file(str(out / "pose_encoder.safetensors"))) == sorted(pose)
    _close(_diffusers_load(out), _merged(lora))


def test_stacked_loras_equal_the_direct_merge_of_both(tmp_path):
    """The SVI adapter plus a stacked LoRA (``adapter.extra``), each at its own strength, equal the direct merge
    W += s1 * alpha / r * B1 A1 + s2 * alpha / r * B2 A2."""
    first, second = _random_lora(EXPORTED[:6], seed=1), _random_lora(EXPORTED[3:9], seed=2)
    _peft_dir(tmp_path / "svi", first)
    _peft_dir(tmp_path / "style", second)
    model = build_model(get_spec(TINY21))
    load_adapter(model, tmp_path / "svi")
    load_adapter(model, tmp_path / "style", adapter_name="extra_0")
    set_strength(model, 0.8, {"extra_0": 0.5})
    reference = build_model(get_spec(TINY21))
    transformer = reference.transformers[0]
    with torch.no_grad():
        for lora, strength in ((first, 0.8), (second, 0.5)):
            for name, (a, b) in lora.items():
                transformer.get_submodule(name).weight += strength * ALPHA / RANK * (b @ a)
    _close(model, reference)


def test_adapter_extra_is_planned_and_checked(tmp_path, image_file):
    import svi_infer.longvideo.plan as app
    from tests.helpers import compose_infer

    _peft_dir(tmp_path / "style", _random_lora(EXPORTED[:2]))
    base = ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a"]
    p = app.plan(compose_infer([*base, f"adapter.extra=[{{path:{tmp_path / 'style'},strength:0.5}}]"]))
    assert p.extras == [(tmp_path / "style", 0.5)]
    for extra, message in (
        ("[{path:/no/such.safetensors}]", r"check adapter.extra\[0\].path"),
        (f"[{{path:{tmp_path / 'style'},strength:strong}}]", r"adapter.extra\[0\].strength must be a number"),
        ("[{strength:1.0}]", r"adapter.extra\[0\] must be \{path"),
        ("lightx2v.safetensors", "adapter.extra must be a list"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            app.plan(compose_infer([*base, f"adapter.extra={extra}"]))
