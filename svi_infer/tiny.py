"""Random-weight *tiny* twins of the Wan components, built in code (no downloads), for tests and the demo.

Weights are drawn under a fixed seed in a forked RNG, so every process builds bit-identical models.
Dimensions follow reference/feasibility.md §2 (configs measured to work with diffusers/transformers).
"""

from __future__ import annotations

import math
import string

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from svi_infer.spec import ModelSpec

TINY_SEED = 20251009
_WORDS = ["a", "the", "person", "is", "talking", "dancing", "cat", "walks", "boat", "sea", "sky", "camera"]


def tiny_tokenizer(words: tuple[str, ...] = ()) -> T5Tokenizer:
    """A UMT5-like unigram tokenizer with an in-code vocabulary (pad=0, eos=1, ``</s>`` appended). ``words`` get a
    piece each (a small model's captions then take a few tokens instead of one per character)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    extra = [w for w in dict.fromkeys(words) if w not in _WORDS]
    pieces += [(f"\u2581{w}", -2.0) for w in [*_WORDS, *extra]] + [("\u2581", -3.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_transformer(spec: ModelSpec, seed_offset: int = 0) -> WanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1 + seed_offset)
        return WanTransformer3DModel(**spec.transformer_config()).eval()


def tiny_vae(spec: ModelSpec) -> AutoencoderKLWan:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 2)
        if spec.latent_channels == 48:  # Wan 2.2 TI2V-5B residual VAE, 16x spatial
            return AutoencoderKLWan(
                base_dim=8,
                decoder_base_dim=8,
                z_dim=48,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_spatial=16,
                latents_mean=[0.0] * 48,
                latents_std=[1.0] * 48,
            ).eval()
        return AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()


def tiny_text_encoder(spec: ModelSpec, vocab_size: int) -> UMT5EncoderModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 3)
        config = UMT5Config(
            vocab_size=vocab_size,
            d_model=spec.text_dim,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
        )
        return UMT5EncoderModel(config).eval()


def tiny_image_encoder(spec: ModelSpec) -> tuple[CLIPVisionModel, CLIPImageProcessorPil]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 4)
        config = CLIPVisionConfig(
            hidden_size=spec.image_dim,
            projection_dim=spec.image_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=math.isqrt(spec.image_tokens - 1),  # one-pixel patches
            intermediate_size=16,
            patch_size=1,
        )
        model = CLIPVisionModel(config).eval()
    side = math.isqrt(spec.image_tokens - 1)
    return model, CLIPImageProcessorPil(crop_size=side, size=side)
