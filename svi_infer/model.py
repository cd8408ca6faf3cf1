"""Building the Wan components of a spec: tiny (random, in code) or from a local diffusers-layout folder.

The components live in a diffusers ``WanImageToVideoPipeline`` used as a container and for its prompt
and image encoders; sampling itself is ours (:mod:`svi_infer.sampler`), on SVI's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from svi_infer.original_files import load_original_transformer, load_original_vae, original_transformer_files
from svi_infer.spec import WAN22_TI2V_5B, ModelSpec


class ModelFolderError(ValueError):
    """A model folder is missing components or holds a different model than the spec."""


@dataclass(frozen=True)
class OriginalFiles:
    """Components to read from Wan's original files instead of the diffusers folder.

    ``transformer`` / ``transformer_2``: DiT shards or the folder holding them (for Wan 2.2 A14B the
    ``high_noise_model`` and ``low_noise_model`` folders); ``vae``: ``Wan2.1_VAE.pth`` or a safetensors copy.
    """

    transformer: tuple[Path, ...] = field(default_factory=tuple)
    transformer_2: tuple[Path, ...] = field(default_factory=tuple)
    vae: Path | None = None

    @staticmethod
    def from_paths(transformer=None, transformer_2=None, vae=None) -> OriginalFiles:
        def shards(value) -> tuple[Path, ...]:
            if not value:
                return ()
            paths = [Path(v).expanduser() for v in ([value] if isinstance(value, (str, Path)) else value)]
            if len(paths) == 1 and paths[0].is_dir():
                return tuple(original_transformer_files(paths[0]))
            for p in paths:
                if not p.is_file():
                    raise FileNotFoundError(f"original Wan file {p} does not exist")
            return tuple(paths)

        vae_path = Path(vae).expanduser() if vae else None
        if vae_path is not None and not vae_path.is_file():
            raise FileNotFoundError(f"original Wan VAE file {vae_path} does not exist")
        return OriginalFiles(shards(transformer), shards(transformer_2), vae_path)

    def replaced(self) -> set[str]:
        """Names of the diffusers sub-folders these files stand in for."""
        names = {"transformer": self.transformer, "transformer_2": self.transformer_2, "vae": self.vae}
        return {n for n, v in names.items() if v}


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

    def to(self, device: str | torch.device) -> WanModel:
        """Move every component (e.g. the encoders, for previews on the training GPU)."""
        self.device = torch.device(device)
        for module in (self.pipe.text_encoder, self.pipe.vae, self.pipe.image_encoder, *self.transformers):
            if module is not None:
                module.to(self.device)
        return self

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


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA when present (bf16 there, fp32 on CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return torch.device(device), getattr(torch, dtype)


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


def _original_components(
    spec: ModelSpec, original: OriginalFiles, dtype: torch.dtype
) -> dict[str, AutoencoderKLWan | WanTransformer3DModel]:
    if spec.latent_channels != 16 and original.vae:
        raise ModelFolderError(f"{spec.id}: only the Wan 2.1 VAE file layout can be read (diffusers has no converter)")
    if original.transformer_2 and len(spec.experts) == 1:
        raise ModelFolderError(f"{spec.id} has one transformer; model.transformer_2_files is for Wan 2.2 A14B")
    out: dict[str, AutoencoderKLWan | WanTransformer3DModel] = {}
    for name in ("transformer", "transformer_2"):
        if getattr(original, name):
            out[name] = load_original_transformer(list(getattr(original, name)), spec.transformer_config(), dtype)
    if original.vae:
        out["vae"] = load_original_vae(original.vae, {}, torch.float32)  # the Wan 2.1 VAE = diffusers' defaults
    return out


def load_pipeline(
    spec: ModelSpec, path: str | Path, dtype: torch.dtype, original: OriginalFiles | None = None
) -> WanImageToVideoPipeline:
    """Load a diffusers-layout folder (e.g. ``Wan2.1-I2V-14B-480P-Diffusers``) and check it fits the spec.

    Components given as original Wan files (``original``) are read from those files instead.
    """
    original = original or OriginalFiles()
    replaced = _original_components(spec, original, dtype)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist; give model.path=<folder with the weights>")
    missing = [n for n in required_folders(spec) if n not in replaced and not (root / n).is_dir()]
    if missing:
        raise ModelFolderError(
            f"model folder {root} lacks {', '.join(missing)}: a {spec.id} folder in diffusers layout has "
            f"{', '.join(required_folders(spec))}"
        )
    names = ["transformer", "transformer_2"][: len(spec.experts)]
    transformers = [
        replaced.get(n) or WanTransformer3DModel.from_pretrained(root / n, torch_dtype=dtype) for n in names
    ]
    for name, transformer in zip(names, transformers, strict=True):
        _check_transformer(spec, transformer, root / name)
    image_encoder = image_processor = None
    if spec.has_image_encoder:
        image_encoder = CLIPVisionModel.from_pretrained(root / "image_encoder", torch_dtype=torch.float32)
        image_processor = CLIPImageProcessorPil.from_pretrained(root / "image_processor")
    return _pipeline(
        spec,
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype),
        vae=replaced.get("vae") or AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32),
        image_encoder=image_encoder,
        image_processor=image_processor,
        transformer=transformers[0],
        transformer_2=transformers[1] if len(transformers) == 2 else None,
    )


def bundled_folder(spec: ModelSpec) -> Path:
    """The diffusers-layout folder of a spec's committed weights (``svi_infer/<spec.bundled>``)."""
    root = Path(__file__).parent / str(spec.bundled)
    if not (root / "model_index.json").is_file():
        raise ModelFolderError(
            f"{spec.id}'s bundled weights are missing from {root}: reinstall the package, or rebuild them (README, "
            "'The toy world')"
        )
    return root


def build_model(
    spec: ModelSpec,
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    original: OriginalFiles | None = None,
) -> WanModel:
    """Tiny random components when ``path`` is None (tiny specs; a bundled spec loads its committed folder), else
    the folder's weights.

    ``original`` names components to read from Wan's original files instead (with a tiny spec they replace
    the random ones, which is how that path is tested).
    """
    if path is None and spec.bundled:
        path = bundled_folder(spec)
    if path is None:
        pipe = build_tiny_pipeline(spec)
        pipe.register_modules(**_original_components(spec, original or OriginalFiles(), dtype))
    else:
        pipe = load_pipeline(spec, path, dtype, original)
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
