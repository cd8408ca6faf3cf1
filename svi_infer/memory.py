"""Where the Wan weights live and in which dtype, in training and in inference: float8 storage of the DiT, group
offload of its layers or blocks to the CPU, and model offload of whole components. Thin wrappers over diffusers'
hooks (``enable_layerwise_casting``, ``apply_group_offloading``) and accelerate's ``cpu_offload_with_hook``; the
choices and their order are what this module adds.

Order matters:

* float8 storage is applied to the base before peft injects a training LoRA (so only the base's layers carry the
  cast hooks), and after an inference adapter is loaded: peft's LoRA layers are left out by name in both cases, and
  full-weight ``diff`` deltas must be added to the weights before they are rounded to float8.
* In training the base's ``nn.Linear`` layers are offloaded one by one (diffusers' leaf-level hook on each), not
  by block: a block-level group moves its whole block, the LoRA and its gradients included, and its norms' weights
  are saved for the backward as themselves, so the backward would find them on the CPU. A linear layer saves a
  transposed view of its weight, which keeps the GPU copy alive until its backward; gradient checkpointing then
  limits those copies to one block's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from svi_infer.model import WanModel

FP8 = torch.float8_e4m3fn
# modules never stored in float8 besides diffusers' own (norms, patch embedding, condition embedder, the fp32
# modules): peft's adapter layers (their names, as diffusers skips them when it picks the patterns itself), the pose
# encoder (float32 compute, like the reference) and Talk's audio modules
_KEEP = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "dwpose_embedding")
_KEEP += ("audio_proj", "audio_cross_attn")
_GROUP_OFFLOADING = "group_offloading"  # diffusers' hook name (diffusers.hooks.group_offloading._GROUP_OFFLOADING)


def store_float8(transformer: nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep ``transformer``'s linear and conv weights in float8 (e4m3) and compute each layer in ``compute_dtype``
    (diffusers' layerwise casting: a layer is upcast for its forward only), halving a bf16 base's memory.

    The norms, patch embedding, condition embedder and diffusers' float32 modules keep their dtype; so do peft's
    LoRA layers, the pose encoder and Talk's modules."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    transformer.enable_layerwise_casting(
        storage_dtype=FP8, compute_dtype=compute_dtype, skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + _KEEP
    )


def lora_to_float32(transformer: nn.Module) -> int:
    """Upcast a trained LoRA to float32 after ``add_adapter`` on a bf16 or float8 base; returns how many weights.

    peft moves a new adapter to its base layer's dtype (float8 included) and diffusers' ``add_adapter``, unlike
    ``get_peft_model``, does not upcast it back; AdamW on bf16 or float8 weights would lose most updates. peft's own
    ``cast_adapter_dtype`` replaces the Parameter objects, which would untie ``experts.shared_lora``'s weights; this
    changes their data in place. The initial ``lora_A`` keeps that dtype's rounding (``lora_B`` starts at zero).
    """
    upcast = 0
    for name, param in transformer.named_parameters():
        if ".lora_" in name and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
            upcast += 1
    return upcast


def base_linears(transformer: nn.Module) -> list[nn.Linear]:
    """The base's ``nn.Linear`` layers inside the transformer blocks (nearly all of a Wan DiT's weights), without
    peft's LoRA layers (``lora_A`` / ``lora_B`` are ``nn.Linear`` too)."""
    return [
        module
        for name, module in transformer.blocks.named_modules()
        if isinstance(module, nn.Linear) and not any(part.startswith("lora_") for part in name.split("."))
    ]


def offload_layers(transformer: nn.Module, onload_device: torch.device) -> int:
    """Training: each base linear layer of the blocks lives on the CPU and comes to ``onload_device`` for its own
    forward (diffusers' leaf-level group offload, applied to each layer alone); returns the number of layers.

    Everything else stays where the module is moved (the LoRA, its gradients and optimizer state, norms,
    embeddings, the pose encoder). Without CUDA streams: diffusers' stream prefetching follows the forward order,
    which gradient checkpointing's recompute breaks (SimpleTuner #1975)."""
    from diffusers.hooks import apply_group_offloading

    layers = base_linears(transformer)
    for layer in layers:
        apply_group_offloading(layer, onload_device=onload_device, offload_type="leaf_level", use_stream=False)
    return len(layers)


def offload_blocks(transformer: nn.Module, onload_device: torch.device, blocks_per_group: int) -> None:
    """Inference: the DiT's blocks live on the CPU, ``blocks_per_group`` at a time on ``onload_device`` (the rest
    of the DiT, its adapters and attached modules with it, comes for each forward). On CUDA with one block per group,
    the next block is copied in on a side stream while the current one runs."""
    stream = onload_device.type == "cuda" and blocks_per_group == 1
    transformer.enable_group_offload(
        onload_device=onload_device,
        offload_type="block_level",
        num_blocks_per_group=blocks_per_group,
        use_stream=stream,
    )


def offloaded_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers diffusers' group offload hooks move, read from the hooks' groups."""
    seen: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is None:
            continue
        group = hook.group
        for member in group.modules:
            seen.update((id(t), t) for t in (*member.parameters(), *member.buffers()))
        seen.update((id(t), t) for t in (*group.parameters, *group.buffers))
    return list(seen.values())


@contextmanager
def parked(module: nn.Module) -> Iterator[None]:
    """Inside the block, the group-offloaded tensors of ``module`` hold empty placeholders, so that a whole-module
    ``to(device)`` / ``cuda()`` / dtype cast leaves them where diffusers' hooks put them; their data is restored on
    exit. Lightning moves the whole LightningModule to the GPU in its strategy setup (``nn.Module.to`` recurses with
    ``_apply``, past diffusers' ``ModelMixin.to`` guard): without this, an offloaded base would land on the GPU whole
    before the first step."""
    tensors = offloaded_tensors(module)
    real = [t.data for t in tensors]
    for t in tensors:
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    try:
        yield
    finally:
        for t, data in zip(tensors, real, strict=True):
            t.data = data


def offload_components(modules: list[nn.Module | None], device: torch.device) -> list:
    """Model offload: each module of ``modules`` (in the order they run) on ``device`` only from its forward until
    the next one's, on the CPU otherwise (accelerate's ``cpu_offload_with_hook``, chained in a ring: the first one
    offloads the last, as the clip loop starts over). Returns the hooks; ``None`` entries are skipped."""
    from accelerate import cpu_offload_with_hook

    hooks = []
    for module in (m for m in modules if m is not None):
        _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hooks[-1] if hooks else None)
        hooks.append(hook)
    if len(hooks) > 1:
        hooks[0].hook.prev_module_hook = hooks[-1]
    return hooks


def release_before(transformer: nn.Module, hooks: list) -> None:
    """Group offload with model-offloaded encoders: before each forward of ``transformer``, every hooked component
    still on the GPU (the text encoder, which nothing after it in the ring would offload before the VAE) goes back
    to the CPU."""

    def release(_module: nn.Module, _args: tuple) -> None:
        for hook in hooks:
            if next(hook.model.parameters()).device.type != "cpu":
                hook.offload()

    transformer.register_forward_pre_hook(release)


def arrange(model: WanModel, weights_dtype: str, offload: str, blocks_per_group: int, device: torch.device) -> None:
    """Inference: store and place a model built on the CPU, once its adapters are loaded and their strength set
    (full-weight deltas are then in the weights before they are rounded to float8, and peft's LoRA layers, left out
    by name, keep ``model.dtype``).

    ``weights_dtype``: ``auto`` keeps ``model.dtype``; ``fp8`` stores the DiT(s) in float8, computed in
    ``model.dtype``. ``offload``: ``none`` moves everything to ``device``; ``model`` keeps each component there only
    while it runs (in the generator's order: CLIP, text encoder, DiT(s), VAE); ``group`` moves the DiT(s) a group of
    blocks at a time and model-offloads the rest. On the CPU the moves are no-ops, so every path runs (and is tested)
    there. ``model.device`` becomes ``device``: where inputs are made and everything computes."""
    if weights_dtype == "fp8":
        for transformer in model.transformers:
            store_float8(transformer, compute_dtype=model.dtype)
    model.device = torch.device(device)
    pipe = model.pipe
    if offload == "none":
        model.to(device)
    elif offload == "model":
        offload_components([pipe.image_encoder, pipe.text_encoder, *model.transformers, pipe.vae], model.device)
    elif offload == "group":
        hooks = offload_components([pipe.image_encoder, pipe.text_encoder, pipe.vae], model.device)
        for transformer in model.transformers:
            offload_blocks(transformer, model.device, blocks_per_group)
            release_before(transformer, hooks)
    else:
        raise ValueError(f"memory.offload must be none, model or group, got {offload!r}")
