"""Building the Wan components of a spec: tiny (random, in code) or from a local diffusers-layout folder.

The components live in a diffusers ``WanImageToVideoPipeline`` used as a container and for its prompt
and image encoders; sampling itself is ours (:mod:`svi_infer.sampler`), on SVI's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel, UMT5EncoderModel

from svi_infer import tiny
from svi_infer.spec import WAN22_TI2V_5B, ModelSpec


class ModelFolderError(ValueError):
    """A model folder is missing components or holds a different model than the spec."""


@dataclass
class WanModel:
    """The components of one spec, on one device; ``transformers`` is ordered like ``spec.experts``."""

    spec: ModelSpec
    pipe: WanImageToVideoPipeline
    device: torch.device
    dtype: torch.dtype

    @property
    def transformers(self) -> list[WanTransformer3DModel]:
        return _transformers(self.pipe)

    @property
    def vae(self) -> AutoencoderKLWan:
        return self.pipe.vae

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """UMT5 embeddings ``[B, 512, D]``, zero after each prompt's real length (as Wan 2.1 I2V needs)."""
        embeds, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.spec.text_len,
            device=self.device,
            dtype=self.dtype,
        )
        return embeds

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> Tensor | None:
        """CLIP penultimate hidden states ``[1, 257, 1280]`` (Wan 2.1); None for bases without CLIP."""
        if self.pipe.image_encoder is None:
            return None
        return self.pipe.encode_image(image, device=self.device).to(self.dtype)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_video(self, video: Tensor) -> Tensor:
        """Normalised latents ``(z - mean) / std`` of a ``[B, 3, F, H, W]`` video in [-1, 1] (fp32 VAE)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(video.to(self.device, vae_dtype)).latent_dist.mode().float()
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """The ``[B, 3, F, H, W]`` video in [-1, 1] for normalised latents."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.float()
        mean, std = self._latent_stats(z)
        video = self.vae.decode((z * std + mean).to(vae_dtype)).sample
        return video.float().clamp(-1.0, 1.0)


def _transformers(pipe: WanImageToVideoPipeline) -> list[WanTransformer3DModel]:
    return [t for t in (pipe.transformer, pipe.transformer_2) if t is not None]


def _pipeline(spec: ModelSpec, **components) -> WanImageToVideoPipeline:
    return WanImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.shift),
        boundary_ratio=spec.boundary_ratio,
        expand_timesteps=spec.family == WAN22_TI2V_5B,
        **components,
    )


def build_tiny_pipeline(spec: ModelSpec) -> WanImageToVideoPipeline:
    """Random-weight components for a tiny spec (identical in every process)."""
    if not spec.tiny:
        raise ValueError(f"spec {spec.id} is a real model: give model.path, the folder with its weights")
    tokenizer = tiny.tiny_tokenizer()
    image_encoder, image_processor = tiny.tiny_image_encoder(spec) if spec.has_image_encoder else (None, None)
    return _pipeline(
        spec,
        tokenizer=tokenizer,
        text_encoder=tiny.tiny_text_encoder(spec, len(tokenizer)),
        vae=tiny.tiny_vae(spec),
        image_encoder=image_encoder,
        image_processor=image_processor,
        transformer=tiny.tiny_transformer(spec),
        transformer_2=tiny.tiny_transformer(spec, seed_offset=1) if len(spec.experts) == 2 else None,
    )


def required_folders(spec: ModelSpec) -> list[str]:
    """Sub-folders a diffusers-layout model folder must have for this spec."""
    names = ["transformer", "vae", "text_encoder", "tokenizer"]
    if len(spec.experts) == 2:
        names.append("transformer_2")
    if spec.has_image_encoder:
        names += ["image_encoder", "image_processor"]
    return names


def _check_transformer(spec: ModelSpec, transformer: WanTransformer3DModel, where: Path) -> None:
    cfg = transformer.config
    found = {
        "dim": cfg.num_attention_heads * cfg.attention_head_dim,
        "num_layers": cfg.num_layers,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.out_channels,
        "image_dim": cfg.image_dim,
    }
    wrong = {k: v for k, v in found.items() if getattr(spec, k) != v}
    if wrong:
        detail = ", ".join(f"{k}={v} (spec expects {getattr(spec, k)})" for k, v in wrong.items())
        raise ModelFolderError(
            f"{where} does not hold a {spec.id} transformer: {detail}. Pick the model config that matches the folder."
        )


def load_pipeline(spec: ModelSpec, path: str | Path, dtype: torch.dtype) -> WanImageToVideoPipeline:
    """Load a diffusers-layout folder (e.g. ``Wan2.1-I2V-14B-480P-Diffusers``) and check it fits the spec."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist; give model.path=<folder with the weights>")
    missing = [n for n in required_folders(spec) if not (root / n).is_dir()]
    if missing:
        raise ModelFolderError(
            f"model folder {root} lacks {', '.join(missing)}: a {spec.id} folder in diffusers layout has "
            f"{', '.join(required_folders(spec))}"
        )
    transformers = [WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype)]
    if len(spec.experts) == 2:
        transformers.append(WanTransformer3DModel.from_pretrained(root / "transformer_2", torch_dtype=dtype))
    for name, transformer in zip(("transformer", "transformer_2"), transformers, strict=False):
        _check_transformer(spec, transformer, root / name)
    image_encoder = image_processor = None
    if spec.has_image_encoder:
        image_encoder = CLIPVisionModel.from_pretrained(root / "image_encoder", torch_dtype=torch.float32)
        image_processor = CLIPImageProcessorPil.from_pretrained(root / "image_processor")
    return _pipeline(
        spec,
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype),
        vae=AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32),
        image_encoder=image_encoder,
        image_processor=image_processor,
        transformer=transformers[0],
        transformer_2=transformers[1] if len(transformers) == 2 else None,
    )


def build_model(
    spec: ModelSpec,
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanModel:
    """Tiny random components when ``path`` is None (tiny specs only), else the folder's weights."""
    pipe = build_tiny_pipeline(spec) if path is None else load_pipeline(spec, path, dtype)
    device = torch.device(device)
    for module in (pipe.text_encoder, pipe.transformer, pipe.transformer_2, pipe.vae, pipe.image_encoder):
        if module is None:
            continue
        module.to(device).eval().requires_grad_(False)
        if path is None and dtype != torch.float32 and module in (pipe.text_encoder, *_transformers(pipe)):
            module.to(dtype)  # tiny twins are built in fp32; the VAE and CLIP stay fp32 as in SVI
    return WanModel(spec=spec, pipe=pipe, device=device, dtype=dtype)


def save_model(model: WanModel, path: str | Path) -> Path:
    """Write the components in diffusers layout (what :func:`load_pipeline` reads)."""
    model.pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
