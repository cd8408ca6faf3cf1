"""Memory predicted without loading a weight: the tools training's planner shares, and generation's plan.

Models are built on torch's ``meta`` device from their real configs (sizes, no storage: a 14B model costs
nothing) and stored as the run stores them (:func:`svi_infer.memory.store_float8` included). Activations are
*measured*: the meta model runs under :class:`LiveBytes`, which adds up the bytes of every tensor storage while it
lives. Attention runs as the fused kernel CPUs and GPUs use (:func:`fused_attention`); no ``S x S`` matrix is kept.
How the figures were checked against measured peaks: docs/benchmarks.md, "Memory planner".
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from svi_infer.spec import ModelSpec

GiB = 1024**3
FP8 = torch.float8_e4m3fn
RESERVE_GIB = 1.5  # beyond the plan's tensors: CUDA context, cuBLAS workspace, caching-allocator fragmentation
# Wan's UMT5-XXL text encoder and open-clip ViT-H/14 image encoder (their diffusers folders' configs)
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16)


def size(nbytes: float) -> str:
    """Bytes in GiB, or MiB below a tenth of a GiB (the tiny models)."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def fits(nbytes: int, gpu_gib: float) -> bool:
    """Whether a peak of ``nbytes``, plus what CUDA itself takes (:data:`RESERVE_GIB`), fits a GPU."""
    return nbytes + RESERVE_GIB * GiB <= gpu_gib * GiB


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor storage created under it while the storage lives; ``peak`` is the most
    at once. Outputs that alias an input (views, in-place results) allocate nothing and are not counted."""

    def __init__(self, existing: nn.Module | None = None) -> None:
        """``existing``: a module whose parameters may be re-stored under the mode (layerwise casting swaps each
        weight's storage around every forward): freeing their storages counts, so a swap adds nothing."""
        super().__init__()
        self._live: dict[int, int] = {}
        self.now = self.peak = 0
        if existing is not None:
            for tensor in [*existing.parameters(), *existing.buffers()]:
                self._track(tensor.untyped_storage())
        self.now = 0
        self.peak = 0

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key not in self._live:
            self._live[key] = storage.nbytes()
            self.now += self._live[key]
            weakref.finalize(storage, self._freed, key)
            self.peak = max(self.peak, self.now)

    def _freed(self, key: int) -> None:
        self.now -= self._live.pop(key, 0)

    def exclude(self, tensor: torch.Tensor) -> None:
        """Stop counting ``tensor``'s storage from now on (gradients, which the plans count apart)."""
        key = id(tensor.untyped_storage())
        if key in self._live:
            self.now -= self._live[key]
            self._live[key] = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(result.alias_info is not None for result in func._schema.returns):
            return out
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as the fused (flash) kernel, whose meta implementation stores what the CPU and GPU kernels store."""
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out[0]


@contextmanager
def fused_attention() -> Iterator[None]:
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", FP8: "fp8"}.get(dtype, str(dtype))


def bytes_by_dtype(tensors: list[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for tensor in tensors:
        name = dtype_name(tensor.dtype)
        out[name] = out.get(name, 0) + tensor.numel() * tensor.element_size()
    return out


def frozen_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of a module's frozen parameters and its buffers, by storage dtype."""
    return bytes_by_dtype([p for p in module.parameters() if not p.requires_grad] + list(module.buffers()))


def meta_transformer(
    spec: ModelSpec, storage: str, compute: torch.dtype, layers: int | None = None, lora=None
) -> nn.Module:
    """The spec's DiT on the meta device, stored as a run stores it: ``storage`` fp32 | bf16 (the modules diffusers
    keeps in fp32 stay so) | fp8 (:func:`svi_infer.memory.store_float8`, the rest in ``compute``); ``lora``: a
    ``LoraSettings`` to inject, its weights in ``compute`` (as autocast runs them)."""
    from diffusers import WanTransformer3DModel

    from svi_infer.memory import store_float8

    if layers is not None:
        spec = replace(spec, num_layers=layers)
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**spec.transformer_config())
    transformer.requires_grad_(False)
    dtype = torch.bfloat16 if storage == "bf16" else compute
    keep = set(transformer._keep_in_fp32_modules or [])
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if dtype != torch.float32 and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    if storage == "fp8":
        store_float8(transformer, compute)
    if lora is not None:
        from peft import LoraConfig

        config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), init_lora_weights=False
        )
        transformer.add_adapter(config)
        for parameter in transformer.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(compute)
    return transformer


@dataclass(frozen=True)
class Clip:
    """One generated clip's size."""

    frames: int
    height: int
    width: int

    def latent(self, spec: ModelSpec, channels: int | None = None) -> tuple[int, ...]:
        frames = spec.latent_frames(self.frames)
        h, w = self.height // spec.vae_spatial, self.width // spec.vae_spatial
        return (1, channels or spec.latent_channels, frames, h, w)


def dit_inputs(spec: ModelSpec, clip: Clip, dtype: torch.dtype, batch: int = 1) -> dict[str, torch.Tensor | None]:
    """A DiT forward's inputs on the meta device."""
    latent = clip.latent(spec, spec.in_channels)
    image = None
    if spec.image_dim:
        image = torch.empty(batch, spec.image_tokens, spec.image_dim, dtype=dtype, device="meta")
    return dict(
        hidden_states=torch.empty((batch, *latent[1:]), dtype=dtype, device="meta"),
        timestep=torch.empty(batch, device="meta"),
        encoder_hidden_states=torch.empty(batch, spec.text_len, spec.text_dim, dtype=dtype, device="meta"),
        encoder_hidden_states_image=image,
    )


@cache
def forward_bytes(spec: ModelSpec, storage: str, compute: torch.dtype, clip: Clip) -> int:
    """The peak a no-grad DiT forward allocates beyond its weights (one guidance pass: the sampler runs them one
    after the other), measured at 2 and 3 blocks and extrapolated to the spec's depth."""
    peaks = {}
    for layers in (2, 3):
        transformer = meta_transformer(spec, storage, compute, layers)
        with torch.no_grad(), fused_attention(), LiveBytes(existing=transformer) as live:
            transformer(**dit_inputs(spec, clip, compute), return_dict=False)
        peaks[layers] = live.peak
    return max(0, peaks[2] + (peaks[3] - peaks[2]) * (spec.num_layers - 2))


@dataclass(frozen=True)
class Component:
    """One model component in generation: its weights and the peak of one call beyond them."""

    name: str
    weights: int
    peak: int


def _meta_vae(spec: ModelSpec, model_path: str | None) -> nn.Module | None:
    from diffusers import AutoencoderKLWan

    from svi_infer.spec import WAN22_TI2V_5B

    with torch.device("meta"):
        if model_path is not None:
            return AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(model_path, subfolder="vae"))
        if spec.family == WAN22_TI2V_5B:
            return None  # the Wan 2.2 VAE's config comes with its folder (model.path)
        return AutoencoderKLWan()  # diffusers' defaults are the Wan 2.1 VAE's


@cache
def vae_component(spec: ModelSpec, clip: Clip, model_path: str | None) -> Component | None:
    """The VAE in fp32 (as SVI runs it): its weights and the larger of encoding a clip and decoding it."""
    if spec.tiny or spec.bundled:
        return None
    vae = _meta_vae(spec, model_path)
    if vae is None:
        return None
    vae.requires_grad_(False)
    peaks = []
    with torch.no_grad():
        with LiveBytes() as live:
            vae.decode(torch.empty(clip.latent(spec), device="meta"))
        peaks.append(live.peak)
        with LiveBytes() as live:
            vae.encode(torch.empty(1, 3, clip.frames, clip.height, clip.width, device="meta"))
        peaks.append(live.peak)
    return Component("VAE", _numel_bytes(vae), max(peaks))


def encoder_components(spec: ModelSpec, dtype: torch.dtype) -> list[Component]:
    """The text encoder (``dtype``) and, for Wan 2.1, the CLIP image encoder (fp32); their activations are small
    next to their weights (512 text tokens, one 224 x 224 image) and are measured too."""
    if spec.tiny or spec.bundled:
        return []
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    out = []
    with torch.device("meta"):
        text = UMT5EncoderModel(UMT5Config(**UMT5_XXL, feed_forward_proj="gated-gelu")).to(dtype)
    with torch.no_grad(), LiveBytes() as live:
        text(input_ids=torch.zeros(1, spec.text_len, dtype=torch.long, device="meta"))
    out.append(Component("text encoder", _numel_bytes(text), live.peak))
    if spec.image_dim:
        with torch.device("meta"):
            image = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H, image_size=224, patch_size=14))
        with torch.no_grad(), LiveBytes() as live:
            image(pixel_values=torch.empty(1, 3, 224, 224, device="meta"), output_hidden_states=True)
        out.append(Component("image encoder", _numel_bytes(image), live.peak))
    return out


def _numel_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass(frozen=True)
class GenerationPlan:
    """Peak GPU memory of one long-video run: the DiT(s) as stored and placed, the other components, and the
    largest call."""

    weights_dtype: str
    offload: str
    dit: dict[str, int]  # the DiT(s) on the GPU at once, by dtype
    dit_host: int  # offloaded to the host
    dit_forward: int
    components: tuple[Component, ...]
    gpu: int

    def line(self) -> str:
        dit = " + ".join(f"{size(n)} {dtype}" for dtype, n in self.dit.items() if n)
        others = ", ".join(f"{c.name} {size(c.weights)} (+{size(c.peak)})" for c in self.components) or "none"
        return (
            f"memory plan: {size(self.gpu)} on the device at the peak (DiT {dit} + {size(self.dit_forward)} per "
            f"forward; {others}; host {size(self.dit_host)}); memory.weights_dtype={self.weights_dtype} "
            f"memory.offload={self.offload}"
        )


def plan_generation(
    spec: ModelSpec,
    clip: Clip,
    weights_dtype: str,
    offload: str,
    blocks_per_group: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    model_path: str | None = None,
    stream: bool = True,
) -> GenerationPlan:
    """Predict a generation run's peak GPU memory.

    ``offload``: ``none`` keeps every component on the GPU; ``model`` one component at a time; ``group`` the DiT's
    non-block weights and ``blocks_per_group`` blocks (twice that with a CUDA stream prefetching the next group)
    plus one other component at a time (:func:`svi_infer.memory.arrange`). Adapters are left out (an SVI LoRA adds
    about 1.2 GB in bf16 to a 14B DiT).
    """
    storage = "fp8" if weights_dtype == "fp8" else dtype_name(dtype)
    full = meta_transformer(spec, storage, dtype)
    per_dit = frozen_bytes(full)
    experts = len(spec.experts)
    forward = forward_bytes(spec, storage, dtype, clip)
    components = [*encoder_components(spec, dtype)]
    vae = vae_component(spec, clip, model_path)
    if vae is not None:
        components.append(vae)
    dit = {k: v * experts for k, v in per_dit.items()}
    host = 0
    if offload == "model":
        dit = dict(per_dit)  # one expert at a time
        host = sum(per_dit.values()) * (experts - 1)
    elif offload == "group":
        block = frozen_bytes(full.blocks[0])
        kept = min(spec.num_layers, blocks_per_group * (2 if stream and blocks_per_group == 1 else 1))
        dit = {}
        for name, n in per_dit.items():
            offloaded = block.get(name, 0) * (spec.num_layers - kept)
            dit[name] = n - offloaded
            host += offloaded * experts
        # the other expert's non-block weights wait on the host too
        host += sum(dit.values()) * (experts - 1)
    dit_gpu = sum(dit.values())
    if offload == "none":
        everything = dit_gpu + sum(c.weights for c in components)
        gpu = everything + max([forward, *(c.peak for c in components)])
    else:
        gpu = max([dit_gpu + forward, *(c.weights + c.peak for c in components)])
    return GenerationPlan(weights_dtype, offload, dit, host, forward, tuple(components), gpu)
