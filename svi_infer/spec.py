"""Model specs: what each supported Wan base looks like, so every part of the project agrees on shapes.

A spec is data only. Real weights come from a local diffusers-layout folder; every spec has a ``tiny``
twin whose random-weight components are built in code (see :mod:`svi_infer.tiny`), for tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

WAN21_I2V = "wan2.1-i2v"
WAN22_I2V_A14B = "wan2.2-i2v-a14b"
WAN22_TI2V_5B = "wan2.2-ti2v-5b"
FAMILIES = (WAN21_I2V, WAN22_I2V_A14B, WAN22_TI2V_5B)

HIGH_NOISE = "high_noise"
LOW_NOISE = "low_noise"

# Wan's default negative prompt, in English: what SVI's Wan 2.1 scripts pass (reference/svi.md §4.1).
NEGATIVE_PROMPT_EN = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)
# Wan's own default (Wan2.2 wan/configs/shared_config.py ``sample_neg_prompt``), the one SVI's Wan 2.2 scripts pass.
NEGATIVE_PROMPT_ZH = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and defaults of one Wan image-to-video base model.

    ``experts`` names the transformers in sampling order: one for Wan 2.1 and TI2V-5B, two for Wan 2.2
    A14B (the high-noise expert runs while ``t >= boundary_ratio * 1000``). ``negative_prompt``: the default
    ``variant.negative_prompt``, the one the reference passes for this base.
    """

    id: str
    family: str
    dim: int
    num_layers: int
    num_heads: int
    in_channels: int
    latent_channels: int
    text_dim: int
    image_dim: int | None  # CLIP hidden size; None = no image encoder (Wan 2.2)
    image_tokens: int = 257  # CLIP tokens per image (ViT-H/14 at 224: 16 x 16 patches + class token)
    ffn_dim: int = 13824
    freq_dim: int = 256
    experts: tuple[str, ...] = ("main",)
    boundary_ratio: float | None = None
    vae_temporal: int = 4
    vae_spatial: int = 8
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    height: int = 480
    width: int = 832
    frames_per_clip: int = 81
    fps: int = 16
    steps: int = 50
    shift: float = 5.0
    cfg_scale: float = 5.0
    tiny: bool = False
    bundled: str | None = None  # folder under svi_infer/ holding this model's committed, trained weights
    negative_prompt: str = NEGATIVE_PROMPT_EN

    @property
    def needs_path(self) -> bool:
        """True where ``model.path`` must be given: not a tiny twin (built in code) nor a bundled model."""
        return not (self.tiny or self.bundled)

    @property
    def has_image_encoder(self) -> bool:
        return self.image_dim is not None

    @property
    def conditioning_by_concat(self) -> bool:
        """True where ``y`` (mask + conditioning latents) is concatenated to the DiT input channels."""
        return self.in_channels == self.latent_channels + 4 + self.latent_channels

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x patch size)."""
        return self.vae_spatial * self.patch_size[1]

    def transformer_config(self) -> dict:
        """diffusers ``WanTransformer3DModel`` config of this spec (what original Wan DiT files are loaded into)."""
        return dict(
            patch_size=self.patch_size,
            num_attention_heads=self.num_heads,
            attention_head_dim=self.dim // self.num_heads,
            in_channels=self.in_channels,
            out_channels=self.latent_channels,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            qk_norm="rms_norm_across_heads",
            cross_attn_norm=True,
            eps=1e-6,
            image_dim=self.image_dim,
            added_kv_proj_dim=self.dim if self.has_image_encoder else None,
        )

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_temporal + 1

    def expert_for_timestep(self, t: float) -> int:
        """Index into ``experts`` for timestep ``t`` (0..1000): the high-noise expert at or above the boundary."""
        if len(self.experts) == 1 or self.boundary_ratio is None:
            return 0
        return 0 if t >= self.boundary_ratio * 1000.0 else 1


_WAN14B = dict(dim=5120, num_layers=40, num_heads=40, text_dim=4096, in_channels=36, latent_channels=16)
_REAL = (
    ModelSpec("wan2.1-i2v-14b-480p", WAN21_I2V, image_dim=1280, **_WAN14B),
    ModelSpec("wan2.1-i2v-14b-720p", WAN21_I2V, image_dim=1280, height=720, width=1280, **_WAN14B),
    ModelSpec(
        "wan2.2-i2v-a14b",
        WAN22_I2V_A14B,
        image_dim=None,
        experts=(HIGH_NOISE, LOW_NOISE),
        boundary_ratio=0.875,  # SVI's switch_DiT_boundary (diffusers' default is 0.9)
        negative_prompt=NEGATIVE_PROMPT_ZH,
        **_WAN14B,
    ),
    ModelSpec(
        "wan2.2-ti2v-5b",
        WAN22_TI2V_5B,
        dim=3072,
        num_layers=30,
        num_heads=24,
        text_dim=4096,
        ffn_dim=14336,
        in_channels=48,
        latent_channels=48,
        image_dim=None,
        vae_spatial=16,
        height=704,
        width=1280,
        frames_per_clip=121,
        fps=24,
        negative_prompt=NEGATIVE_PROMPT_ZH,
    ),
)


def _tiny_twin(spec: ModelSpec) -> ModelSpec:
    """Same family, channels, experts and VAE factors; a 2-layer, 24-wide DiT and a tiny default size."""
    return replace(
        spec,
        id=f"tiny-{spec.family}",
        dim=24,
        num_layers=2,
        num_heads=2,
        text_dim=32,
        ffn_dim=32,
        freq_dim=32,
        image_dim=4 if spec.has_image_encoder else None,
        image_tokens=32 * 32 + 1,  # the tiny CLIP: 32 x 32 one-pixel patches + class token
        height=3 * spec.spatial_multiple,
        width=5 * spec.spatial_multiple,
        steps=8,
        tiny=True,
    )


# The toy world's base model (data_tools/toy_world.py): a Wan 2.1-style I2V DiT (mask + y concatenated, a small
# text path, no CLIP branch) and a small Wan VAE, both trained from scratch on the world (svi_infer/toy_model).
TOY_WAN21_I2V = ModelSpec(
    "toy-wan2.1-i2v",
    WAN21_I2V,
    dim=192,
    num_layers=4,
    num_heads=6,
    in_channels=36,
    latent_channels=16,
    text_dim=32,
    text_len=64,
    image_dim=None,
    ffn_dim=768,
    freq_dim=64,
    height=64,
    width=64,
    frames_per_clip=17,
    fps=8,
    steps=20,
    bundled="toy_model",
)

_TWINS = {spec.family: _tiny_twin(spec) for spec in reversed(_REAL)}  # 2.1's twin from the 480p spec
SPECS: dict[str, ModelSpec] = {s.id: s for s in (*_REAL, *_TWINS.values(), TOY_WAN21_I2V)}


def get_spec(spec_id: str) -> ModelSpec:
    """Look a spec up by id, with a message listing the known ids."""
    try:
        return SPECS[spec_id]
    except KeyError:
        known = ", ".join(sorted(SPECS))
        raise ValueError(f"unknown model spec {spec_id!r}; known specs: {known}") from None


def check_frames_per_clip(num_frames: int, temporal_factor: int = 4) -> None:
    """Wan clips are ``temporal_factor * k + 1`` frames long (the VAE keeps frame 0 on its own)."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"frames_per_clip must be {temporal_factor}k+1 (e.g. 81, 49, 17), got {num_frames}")
