"""Reading the *original* Wan checkpoint files (as Wan-AI ships them) into diffusers models, offline.

Wan-AI's folders hold the DiT as safetensors shards with Wan's own key names (``blocks.0.self_attn.q.weight``,
``head.head.weight``, ``img_emb.proj.1.weight`` ...) and the VAE as ``Wan2.1_VAE.pth``. diffusers can rename those
keys itself (``convert_wan_transformer_to_diffusers`` / ``convert_wan_vae_to_diffusers`` in
``diffusers.loaders.single_file_utils``), but its ``from_single_file`` is a poor fit here: without ``config=`` it
fetches the model config from the Hub, ``config=`` only takes a repo id or folder (not a dict), it reads one file
(shards must be merged into a dict first), and it loads non-strictly (a missing weight stays on the meta device and
fails later with "Cannot copy out of meta tensor"). So we build the model from the caller's diffusers config dict,
rename with diffusers' converters and load strictly, naming any missing key.

``write_original_*`` do the inverse, for tests: diffusers weights saved under Wan's key names.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

_SAFETENSORS = {".safetensors"}
_TORCH_PICKLES = {".pth", ".pt", ".ckpt", ".bin"}  # read with weights_only=True: tensors and plain containers only


def read_state_dict(files: Iterable[str | Path]) -> dict[str, Tensor]:
    """One state dict from one or more checkpoint files (DiT shards are disjoint; a repeated key is an error).

    ``.pth``-like files go through ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
    """
    state: dict[str, Tensor] = {}
    paths = [Path(f).expanduser() for f in files]
    if not paths:
        raise ValueError("no checkpoint files given")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix in _SAFETENSORS:
            part = load_file(str(path), device="cpu")
        elif suffix in _TORCH_PICKLES:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(f"{path} holds more than tensors; refusing to unpickle it: {err}") from None
            while isinstance(part, dict) and isinstance(part.get("state_dict"), dict):
                part = part["state_dict"]  # some trainers nest the weights, as diffusers also accepts
        else:
            raise ValueError(f"{path}: unknown checkpoint format {suffix!r} (expected .safetensors or .pth)")
        if not isinstance(part, dict) or not all(isinstance(v, Tensor) for v in part.values()):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        repeated = sorted(state.keys() & part.keys())
        if repeated:
            raise ValueError(f"{path} repeats keys from an earlier file: {', '.join(repeated[:5])}")
        state.update(part)
    return state


def original_transformer_files(folder: str | Path) -> list[Path]:
    """The DiT shards of an original Wan folder (``diffusion_pytorch_model*.safetensors``), in name order.

    For Wan 2.2 A14B give ``high_noise_model`` or ``low_noise_model``, each one expert.
    """
    files = sorted(Path(folder).expanduser().glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no diffusion_pytorch_model*.safetensors files")
    return files


def _load_strict(
    model: nn.Module, state: dict[str, Tensor], source: str, to_original: Callable[[str], str] | None = None
) -> None:
    """Load ``state`` into an empty-weights model, raising ``ValueError`` naming missing/unexpected keys."""
    expected = model.state_dict().keys()
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:

        def named(keys: list[str], with_original: bool) -> str:
            shown = [f"{k} (original {to_original(k)})" if with_original and to_original else k for k in keys[:10]]
            return ", ".join(shown) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {named(missing, True)}")
        if unexpected:
            parts.append(f"unexpected keys (after conversion): {named(unexpected, False)}")
        raise ValueError(f"{source} does not match the given {type(model).__name__} config; " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches: same names, other sizes
        raise ValueError(f"{source} does not match the given {type(model).__name__} config: {err}") from None


def _config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def load_original_transformer(
    files: list[Path], config: Mapping[str, Any], dtype: torch.dtype | None = None
) -> WanTransformer3DModel:
    """A ``WanTransformer3DModel`` from original Wan DiT shards, built from a diffusers transformer ``config``.

    Weights keep the file's dtype unless ``dtype`` is given. The model is made with empty weights first, so a 14B
    model needs memory for its weights once, not twice.
    """
    checkpoint = read_state_dict(files)
    converted = convert_wan_transformer_to_diffusers(checkpoint)
    with init_empty_weights():  # parameters on "meta"; the (non-persistent) RoPE buffers are built for real
        model = WanTransformer3DModel.from_config(_config(config))
    source = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more shards)"
    _load_strict(model, converted, source, _transformer_key_to_original)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _check_vae_topology(config: Mapping[str, Any]) -> None:
    """diffusers 0.42's ``convert_wan_vae_to_diffusers`` hard-codes the Wan 2.1 VAE decoder layout.

    It maps ``decoder.upsamples.{0-2,4-6,8-10,12-14}`` to resnets, ``{3,7,11}`` to upsamplers and a shortcut only
    at index 4: that is ``num_res_blocks=2`` with ``dim_mult=[1, 2, 4, 4]`` and no attention, and not the Wan 2.2
    (TI2V-5B) residual VAE. Other shapes would load as a wall of key errors, so say so up front.
    """
    if config.get("is_residual", False):
        raise ValueError(
            "the Wan 2.2 residual VAE (Wan2.2_VAE.pth) has its own key layout, which diffusers' "
            "convert_wan_vae_to_diffusers does not handle; use a diffusers-layout vae folder"
        )
    layout = (config.get("num_res_blocks", 2), list(config.get("dim_mult", [1, 2, 4, 4])), config.get("attn_scales"))
    if layout[0] != 2 or layout[1] != [1, 2, 4, 4] or layout[2]:
        raise ValueError(
            "diffusers' convert_wan_vae_to_diffusers only handles the Wan 2.1 VAE layout (num_res_blocks=2, "
            f"dim_mult=[1, 2, 4, 4], no attn_scales); this config has num_res_blocks={layout[0]}, "
            f"dim_mult={layout[1]}, attn_scales={layout[2]}"
        )


def load_original_vae(file: Path, config: Mapping[str, Any], dtype: torch.dtype | None = None) -> AutoencoderKLWan:
    """An ``AutoencoderKLWan`` from an original Wan 2.1 VAE file (``Wan2.1_VAE.pth`` or a safetensors copy)."""
    cfg = _config(config)
    _check_vae_topology(cfg)
    converted = convert_wan_vae_to_diffusers(read_state_dict([file]))
    with init_empty_weights():
        model = AutoencoderKLWan.from_config(cfg)
    _load_strict(model, converted, str(file), lambda k: _vae_key_to_original(k, cfg.get("num_res_blocks", 2)))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# --- inverse mappings (tests): diffusers key names -> Wan's, the converters above read in reverse ---------------

_DIT_TO_ORIGINAL = (  # applied in order, as substring replacements
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    (".norm2.", ".norm3."),  # the cross-attention norm: diffusers' norm2 is Wan's norm3
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
)


def _transformer_key_to_original(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key.removeprefix("proj_out.")
    for new, old in _DIT_TO_ORIGINAL:
        key = key.replace(new, old)
    return key


_VAE_LEAF = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
_VAE_LEAF["conv_shortcut"] = "shortcut"
_VAE_ENDS = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2."}


def _vae_key_to_original(key: str, num_res_blocks: int) -> str:
    """Wan's ``Encoder3d``/``Decoder3d`` layout: flat ``downsamples``/``upsamples`` lists, ``middle`` = res-attn-res.

    Each decoder stage holds ``num_res_blocks + 1`` residual blocks and then (but the last) one resample block.
    """
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return ("conv2." if key.startswith("post") else "conv1.") + key.split(".", 1)[1]
    side, rest = key.split(".", 1)
    stage = num_res_blocks + 2
    rest = re.sub(r"^mid_block\.resnets\.(\d+)\.", lambda m: f"middle.{2 * int(m[1])}.", rest)
    rest = rest.replace("mid_block.attentions.0.", "middle.1.")
    rest = re.sub(r"^down_blocks\.", "downsamples.", rest)
    rest = re.sub(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"upsamples.{int(m[1]) * stage + int(m[2])}.", rest)
    rest = re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"upsamples.{int(m[1]) * stage + stage - 1}.", rest)
    for new, old in _VAE_ENDS.items():
        if rest.startswith(new):
            rest = old + rest.removeprefix(new)
    rest = re.sub(r"\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(\w+)$", lambda m: f".{_VAE_LEAF[m[1]]}.{m[2]}", rest)
    return f"{side}.{rest}"


def original_transformer_state_dict(model: WanTransformer3DModel) -> dict[str, Tensor]:
    """The DiT weights under Wan's key names (what Wan-AI's shards hold)."""
    return {_transformer_key_to_original(k): v for k, v in model.state_dict().items()}


def original_vae_state_dict(model: AutoencoderKLWan) -> dict[str, Tensor]:
    """The VAE weights under Wan's key names (what ``Wan2.1_VAE.pth`` holds)."""
    if model.config.is_residual:
        raise ValueError("writing the Wan 2.2 residual VAE in original layout is not supported")
    n = model.config.num_res_blocks
    return {_vae_key_to_original(k, n): v for k, v in model.state_dict().items()}


def _save(state: dict[str, Tensor], path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in _SAFETENSORS:
        save_file(state, str(path))
    else:
        torch.save(state, path)


def write_original_transformer(model: WanTransformer3DModel, path: str | Path, shards: int = 1) -> list[Path]:
    """Save the DiT in Wan's layout; with ``shards > 1`` as ``<stem>-0000i-of-0000n.safetensors`` like Wan-AI."""
    path = Path(path)
    state = original_transformer_state_dict(model)
    if shards <= 1:
        _save(state, path)
        return [path]
    keys = list(state)
    size = -(-len(keys) // shards)
    files = []
    for i in range(shards):
        file = path.with_name(f"{path.stem}-{i + 1:05d}-of-{shards:05d}{path.suffix}")
        _save({k: state[k] for k in keys[i * size : (i + 1) * size]}, file)
        files.append(file)
    return files


def write_original_vae(model: AutoencoderKLWan, path: str | Path) -> Path:
    """Save the VAE in Wan's layout (``.pth`` via ``torch.save`` of plain tensors, or ``.safetensors``)."""
    path = Path(path)
    _save(original_vae_state_dict(model), path)
    return path
