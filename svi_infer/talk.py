"""SVI-Talk's audio path: MultiTalk's audio projector and per-block audio cross-attention on diffusers' Wan DiT.

SVI-Talk (reference/svi.md §3.4) runs Wan 2.1 I2V with MultiTalk's frozen audio modules. This module adds them
to a diffusers ``WanTransformer3DModel`` without copying its block code:

* ``transformer.audio_proj`` (:class:`AudioProjModel`) turns per-latent-frame windows of wav2vec2 features into
  ``context_tokens`` audio tokens per latent frame.
* every ``transformer.blocks[i]`` gets ``audio_cross_attn`` (:class:`AudioCrossAttention`) and ``norm_x``; after
  the text/image cross-attention the block computes ``x = x + audio_cross_attn(norm_x(x), tokens)`` where the
  visual tokens of latent frame ``f`` attend only to frame ``f``'s audio tokens.

The block computation is injected with two hooks per block (see :func:`attach_talk`), so module names (and with
them peft LoRA targets such as ``attn2.to_q``) stay those of diffusers. The audio is set with :func:`set_audio`
and stays until changed; each forward pass projects it to tokens, which gradient-checkpointing recomputation
reuses. Video features become per-latent-frame windows with :func:`audio_windows` / :func:`latent_windows`.

Weights load from MultiTalk's ``multitalk.safetensors`` (:func:`load_multitalk`); its key names are the module
names used here (``audio_proj.proj1.weight``, ``blocks.0.audio_cross_attn.q_linear.weight``,
``blocks.0.norm_x.weight``, ...), so the mapping is the identity on those keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.normalization import FP32LayerNorm
from safetensors import safe_open
from torch import Tensor, nn

_STATE_ATTR = "_svi_talk"
AUDIO_CONTEXT = 2  # audio frames shards keep either side of a clip: MultiTalk's window of 5 reaches 2 frames out
_AUDIO_KEY = re.compile(r"^(audio_proj\.|blocks\.\d+\.(audio_cross_attn|norm_x)\.)")


@dataclass(frozen=True)
class TalkConfig:
    """Sizes of MultiTalk's audio modules; the defaults are the released ones (Wan 2.1 I2V 14B).

    ``audio_layers`` x ``audio_dim`` is the wav2vec2 feature of one video frame (12 x 768 for
    chinese-wav2vec2-base); ``window`` video frames around each frame are used (±2), and each later latent frame
    covers ``vae_scale`` video frames, giving ``window + vae_scale - 1`` = 8 feature frames per later latent frame.
    ``token_dim`` is the width of the audio tokens, which the cross-attention projects to keys and values.
    """

    dim: int = 5120
    num_heads: int = 40
    audio_layers: int = 12
    audio_dim: int = 768
    context_tokens: int = 32
    intermediate_dim: int = 512
    token_dim: int = 768
    window: int = 5
    vae_scale: int = 4
    eps: float = 1e-6  # norm_x; audio_proj.norm keeps torch's default 1e-5 as in MultiTalk

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"TalkConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"TalkConfig: window must be odd and positive, got {self.window}")
        if self.vae_scale < 2:
            raise ValueError(f"TalkConfig: vae_scale must be at least 2, got {self.vae_scale}")

    @property
    def window_later(self) -> int:
        """Feature frames per later latent frame: first frame's left half, middle centres, last frame's right half."""
        return self.window + self.vae_scale - 1

    @classmethod
    def for_transformer(cls, transformer: nn.Module, **overrides: Any) -> TalkConfig:
        """The released audio sizes with ``dim`` and ``num_heads`` read from a diffusers Wan transformer."""
        config = transformer.config
        sizes = dict(dim=config.num_attention_heads * config.attention_head_dim, num_heads=config.num_attention_heads)
        return cls(**{**sizes, **overrides})

    @classmethod
    def tiny(cls, transformer: nn.Module) -> TalkConfig:
        """Small sizes for tests: fits the tiny transformer and ``AudioEncoder.tiny`` features (2 layers x 16)."""
        return cls.for_transformer(
            transformer, audio_layers=2, audio_dim=16, context_tokens=4, intermediate_dim=20, token_dim=12
        )


class AudioWindows(NamedTuple):
    """Audio feature windows of one clip: ``first`` ``[(B,) 1, window, L, D]`` for latent frame 0 and ``later``
    ``[(B,) F_lat - 1, window_later, L, D]`` for the others. Without the batch dimension from
    :func:`audio_windows`; :func:`set_audio` accepts both."""

    first: Tensor
    later: Tensor

    def zeros_like(self) -> AudioWindows:
        """Zeroed windows: the "no audio" input of unconditional passes and audio dropout (still goes through
        ``audio_proj``, so its biases give the tokens, as in MultiTalk and SVI)."""
        return AudioWindows(torch.zeros_like(self.first), torch.zeros_like(self.later))

    @staticmethod
    def stack(items: list[AudioWindows]) -> AudioWindows:
        """Unbatched windows stacked along a new batch dimension (e.g. the audio of batched CFG passes)."""
        return AudioWindows(torch.stack([w.first for w in items]), torch.stack([w.later for w in items]))

    @property
    def num_latent_frames(self) -> int:
        return self.first.shape[-4] + self.later.shape[-4]


def audio_windows(
    features: Tensor, num_frames: int | None = None, start: int = 0, *, window: int = 5, vae_scale: int = 4
) -> AudioWindows:
    """Per-latent-frame audio windows of the video frames ``start .. start + num_frames - 1``.

    ``features`` are per-video-frame features ``[T, L, D]`` of the whole track (same frame rate as the video).
    Each video frame takes the ``window`` feature frames centred on it, indices clamped to ``[0, T - 1]`` (as
    MultiTalk and SVI clamp at the track's ends; pad the track with zero rows first to get silence past its end
    instead), then :func:`latent_windows` groups them. ``num_frames`` (default ``T - start``) must be
    ``vae_scale * k + 1``.
    """
    if features.ndim != 3 or features.shape[0] == 0:
        raise ValueError(f"audio features must be [frames, layers, dim] (1+ frames), got {tuple(features.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and positive, got {window}")
    num_frames = features.shape[0] - start if num_frames is None else num_frames
    half = window // 2
    centres = torch.arange(start, start + max(num_frames, 0))
    index = (centres[:, None] + torch.arange(-half, half + 1)[None]).clamp(0, features.shape[0] - 1)
    return latent_windows(features[index.to(features.device)], vae_scale)


def latent_windows(frame_windows: Tensor, vae_scale: int = 4) -> AudioWindows:
    """Group per-video-frame windows ``[(B,) F_pix, window, L, D]`` into per-latent-frame windows.

    This is the regrouping MultiTalk does inside its model. Latent frame 0 is video frame 0 and takes its whole
    window; each later latent frame covers ``vae_scale`` video frames and takes the first one's window up to its
    centre, the middle ones' centres and the last one's window from its centre (3 + 1 + 1 + 3 = 8 for ±2 windows),
    so it sees the audio of its own frames plus the context before and after them.
    """
    if frame_windows.ndim not in (4, 5):
        raise ValueError(f"frame windows must be [(B,) frames, window, layers, dim], got {tuple(frame_windows.shape)}")
    frames, window = frame_windows.shape[-4:-2]
    if frames < 1 or (frames - 1) % vae_scale:
        raise ValueError(f"num_frames must be {vae_scale}k+1 video frames (e.g. 81), got {frames}")
    if window % 2 == 0:
        raise ValueError(f"windows must have an odd length (centred on their frame), got {window}")
    half = window // 2
    groups = frame_windows[..., 1:, :, :, :].unflatten(-4, (-1, vae_scale))  # [(B,) G, vae_scale, window, L, D]
    later = torch.cat(
        [groups[..., 0, : half + 1, :, :], groups[..., 1:-1, half, :, :], groups[..., -1, half:, :, :]], dim=-3
    )
    return AudioWindows(frame_windows[..., :1, :, :, :], later)


class AudioProjModel(nn.Module):
    """MultiTalk's audio projector: a window of wav2vec2 features per latent frame -> ``context_tokens`` tokens.

    Latent frame 0 (one video frame) and later latent frames (``vae_scale`` video frames) have their own first
    layer (``proj1`` / ``proj1_vf``); ``proj2``, ``proj3`` and the LayerNorm ``norm`` are shared.
    """

    def __init__(self, config: TalkConfig):
        super().__init__()
        self.context_tokens = config.context_tokens
        self.token_dim = config.token_dim
        per_frame = config.audio_layers * config.audio_dim
        self.proj1 = nn.Linear(config.window * per_frame, config.intermediate_dim)
        self.proj1_vf = nn.Linear(config.window_later * per_frame, config.intermediate_dim)
        self.proj2 = nn.Linear(config.intermediate_dim, config.intermediate_dim)
        self.proj3 = nn.Linear(config.intermediate_dim, config.context_tokens * config.token_dim)
        self.norm = FP32LayerNorm(config.token_dim)  # MultiTalk normalises under fp32 autocast

    def forward(self, first: Tensor, later: Tensor) -> Tensor:
        """``first`` ``[B, 1, window, L, D]`` and ``later`` ``[B, F-1, window_later, L, D]`` -> ``[B, F, T, C]``."""
        h_first = torch.relu(self.proj1(first.flatten(2)))  # a frame's window x layers x dim, flattened in that order
        h_later = torch.relu(self.proj1_vf(later.flatten(2)))
        h = torch.relu(self.proj2(torch.cat([h_first, h_later], dim=1)))
        tokens = self.proj3(h).unflatten(-1, (self.context_tokens, self.token_dim))
        return self.norm(tokens)


class AudioCrossAttention(nn.Module):
    """Cross-attention from visual tokens to the audio tokens of their own latent frame.

    MultiTalk's ``SingleStreamMutiAttention`` for one speaker (``human_num == 1`` takes its parent's plain path:
    qkv bias, no q/k norm, no rotary embedding; the ``class_range``/``class_interval`` rotary labelling only
    serves two or more speakers and has no weights). Hidden states are ``[B, F * S, C]`` with the frame as the
    outer index, as diffusers patchifies ``(f, h, w)``; attention runs per ``(B * F)`` group of ``S`` queries.
    """

    def __init__(self, dim: int, token_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(token_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        """``x`` ``[B, F * S, C]``, ``tokens`` ``[B, F, T, token_dim]`` -> ``[B, F * S, C]``."""
        batch, seq, dim = x.shape
        frames = tokens.shape[1]
        heads = self.num_heads
        q = self.q_linear(x).view(batch * frames, seq // frames, heads, dim // heads).transpose(1, 2)
        kv = self.kv_linear(tokens.flatten(0, 1)).unflatten(-1, (2, heads, dim // heads))  # [B*F, T, 2, H, d]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B*F, H, T, d] each
        out = F.scaled_dot_product_attention(q, k, v)  # [B*F, H, S, d]
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))


@dataclass
class TalkModules:
    """What :func:`attach_talk` added: the projector, one cross-attention and norm per block, and the hooks."""

    config: TalkConfig
    audio_proj: AudioProjModel
    cross_attns: list[AudioCrossAttention]
    norms: list[FP32LayerNorm]
    audio: AudioWindows | Tensor | None = field(default=None, repr=False)  # as set (windows batched)
    tokens: Tensor | None = field(default=None, repr=False)  # the audio tokens of the latest forward pass
    hooks: list[Any] = field(default_factory=list, repr=False)


def attach_talk(transformer: nn.Module, config: TalkConfig | None = None) -> TalkModules:
    """Add MultiTalk's frozen audio modules to a diffusers Wan transformer and hook them into its blocks.

    diffusers' ``WanTransformerBlock`` computes ``x = x + attn2(norm2(x))`` and then the feed-forward. A forward
    pre-hook on ``norm2`` keeps ``x``; a forward hook on ``attn2`` returns
    ``a + audio_cross_attn(norm_x(x + a), tokens)`` for attn2's output ``a``, so the block computes
    ``x + a + audio``, i.e. MultiTalk's ``x += cross_attn(...)``, ``x += audio_cross_attn(norm_x(x))``. The only
    difference is where floating point rounds: ``x + (a + audio)`` instead of ``(x + a) + audio``.
    A forward pre-hook on the transformer projects the audio set with :func:`set_audio` into ``tokens`` at each
    forward pass (so weights loaded or moved after ``set_audio`` are used). With no audio set (``None``, the
    initial state) the hooks do nothing.
    Modules get the transformer's dtype and device and ``requires_grad=False``; they appear in its
    ``state_dict`` under MultiTalk's names (``audio_proj.*``, ``blocks.N.audio_cross_attn.*``, ``blocks.N.norm_x.*``).
    """
    if get_talk(transformer) is not None:
        raise ValueError("this transformer already has the Talk audio modules (attach_talk was called before)")
    config = config or TalkConfig.for_transformer(transformer)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if config.dim != width:
        raise ValueError(f"TalkConfig.dim {config.dim} does not match the transformer width {width}")
    param = next(transformer.parameters())
    audio_proj = AudioProjModel(config)
    transformer.audio_proj = audio_proj
    talk = TalkModules(config, audio_proj, [], [])
    for block in transformer.blocks:
        block.audio_cross_attn = AudioCrossAttention(config.dim, config.token_dim, config.num_heads)
        block.norm_x = FP32LayerNorm(config.dim, config.eps, elementwise_affine=True)
        talk.cross_attns.append(block.audio_cross_attn)
        talk.norms.append(block.norm_x)
        talk.hooks += _hook_block(block, talk)
    talk.hooks.append(transformer.register_forward_pre_hook(lambda _module, _args: _project(talk)))
    for module in (audio_proj, *talk.cross_attns, *talk.norms):
        module.to(device=param.device, dtype=param.dtype).requires_grad_(False)
    object.__setattr__(transformer, _STATE_ATTR, talk)
    return talk


def _hook_block(block: nn.Module, talk: TalkModules) -> list[Any]:
    kept: dict[str, Tensor] = {}

    def keep_input(_module: nn.Module, args: tuple) -> None:
        if talk.tokens is not None:
            kept["x"] = args[0]  # the block passes hidden_states.float()

    def add_audio(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        x = kept.pop("x", None)
        if talk.tokens is None or x is None:  # no audio, or attn2 called outside its block
            return None
        hidden = x.to(out.dtype) + out  # the block's x + attn2(...), exact while x had out's dtype
        tokens = _tokens_for(talk.tokens, hidden).to(device=out.device, dtype=out.dtype)
        return out + block.audio_cross_attn(block.norm_x(hidden), tokens).to(out.dtype)

    return [block.norm2.register_forward_pre_hook(keep_input), block.attn2.register_forward_hook(add_audio)]


def _project(talk: TalkModules) -> None:
    """The tokens of this forward pass: windows through ``audio_proj`` (zeroed windows included), or as given."""
    audio = talk.audio
    if isinstance(audio, AudioWindows):
        weight = talk.audio_proj.proj1.weight
        audio = talk.audio_proj(*(t.to(device=weight.device, dtype=weight.dtype) for t in audio))
    talk.tokens = audio


def _tokens_for(tokens: Tensor, hidden: Tensor) -> Tensor:
    batch, seq = hidden.shape[:2]
    if tokens.shape[0] not in (1, batch) or seq % tokens.shape[1]:
        raise ValueError(
            f"audio tokens {tuple(tokens.shape)} do not fit hidden states {tuple(hidden.shape)}: the batch must be 1 "
            f"or {batch} and the {seq} visual tokens must split into {tokens.shape[1]} latent frames; set audio "
            "windows for the clip being denoised (set_audio)"
        )
    return tokens.expand(batch, *tokens.shape[1:])


def get_talk(transformer: nn.Module) -> TalkModules | None:
    """The Talk modules attached to ``transformer``, or None."""
    return transformer.__dict__.get(_STATE_ATTR)


def _require_talk(transformer: nn.Module) -> TalkModules:
    talk = get_talk(transformer)
    if talk is None:
        raise ValueError("this transformer has no Talk audio modules; call attach_talk(transformer, config) first")
    return talk


def detach_talk(transformer: nn.Module) -> None:
    """Remove the hooks and audio modules again (the transformer is then the plain diffusers one)."""
    talk = _require_talk(transformer)
    for hook in talk.hooks:
        hook.remove()
    del transformer.audio_proj
    for block in transformer.blocks:
        del block.audio_cross_attn, block.norm_x
    del transformer.__dict__[_STATE_ATTR]


def set_audio(transformer: nn.Module, audio: AudioWindows | Tensor | None) -> None:
    """Set the audio of the following forward passes; it stays until set again.

    ``audio`` is :class:`AudioWindows` (batched or not; ``audio_proj`` projects them at each forward pass), ready
    tokens ``[B, F_lat, tokens, token_dim]``, or None to switch the audio path off (the output is then exactly the
    plain transformer's). A batch of 1 is shared by all samples of a batched forward. Gradient-checkpointing
    recomputation uses the tokens of the latest forward pass, so run a pass's backward before the next forward.
    """
    talk = _require_talk(transformer)
    config = talk.config
    if isinstance(audio, AudioWindows):
        first, later = audio
        if first.ndim == 4:
            first, later = first[None], later[None]
        want_first = (1, config.window, config.audio_layers, config.audio_dim)
        want_later = (config.window_later, config.audio_layers, config.audio_dim)
        if first.ndim != 5 or tuple(first.shape[1:]) != want_first or tuple(later.shape[2:]) != want_later:
            raise ValueError(
                f"audio windows {tuple(first.shape)} / {tuple(later.shape)} do not fit the Talk modules: expected "
                f"[B, {', '.join(map(str, want_first))}] / [B, F-1, {', '.join(map(str, want_later))}] (TalkConfig "
                "audio_layers/audio_dim must match the wav2vec2 encoder)"
            )
        audio = AudioWindows(first, later)
    elif audio is not None and (audio.ndim != 4 or tuple(audio.shape[2:]) != (config.context_tokens, config.token_dim)):
        raise ValueError(
            f"audio tokens must be [B, F_lat, {config.context_tokens}, {config.token_dim}], got {tuple(audio.shape)}"
        )
    talk.audio = audio


def _named_modules(talk: TalkModules) -> list[tuple[str, nn.Module]]:
    """The audio modules under their MultiTalk key prefixes."""
    named: list[tuple[str, nn.Module]] = [("audio_proj.", talk.audio_proj)]
    for i, (attn, norm) in enumerate(zip(talk.cross_attns, talk.norms, strict=True)):
        named += [(f"blocks.{i}.audio_cross_attn.", attn), (f"blocks.{i}.norm_x.", norm)]
    return named


def multitalk_state_dict(transformer: nn.Module) -> dict[str, Tensor]:
    """The audio weights in MultiTalk's key layout (what ``multitalk.safetensors`` holds), ready for ``save_file``."""
    talk = _require_talk(transformer)
    return {
        prefix + key: value.detach().contiguous()
        for prefix, module in _named_modules(talk)
        for key, value in module.state_dict().items()
    }


def load_multitalk(transformer: nn.Module, source: str | Path | Mapping[str, Tensor]) -> None:
    """Load MultiTalk's audio weights (a ``.safetensors`` file or a state dict) into the attached Talk modules.

    Only audio keys are read (``audio_proj.*``, ``blocks.N.audio_cross_attn.*``, ``blocks.N.norm_x.*``); other
    keys, such as a base DiT's, are ignored. The audio keys must match exactly: a missing, unexpected or
    wrongly-shaped audio key raises one ValueError that names them. Tensors are cast to the modules' dtype.
    """
    talk = _require_talk(transformer)
    expected = {k: tuple(v.shape) for k, v in multitalk_state_dict(transformer).items()}
    if isinstance(source, Mapping):
        found = {k: tuple(v.shape) for k, v in source.items() if _AUDIO_KEY.match(k)}
        _check_keys("the given state dict", expected, found, talk.config)
        _load_modules(talk, source.__getitem__)
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MultiTalk weights file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"MultiTalk weights must be a .safetensors file (pickles are not read), got {path}")
    with safe_open(str(path), "pt", device="cpu") as handle:
        keys = [k for k in handle.keys() if _AUDIO_KEY.match(k)]  # noqa: SIM118 (safe_open is not iterable)
        found = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
        _check_keys(str(path), expected, found, talk.config)
        _load_modules(talk, handle.get_tensor)


def _load_modules(talk: TalkModules, read: Callable[[str], Tensor]) -> None:
    """Module by module, so only one module's tensors (not the whole ~10 GB file) are in memory at a time."""
    for prefix, module in _named_modules(talk):
        state = {key: read(prefix + key) for key in module.state_dict()}
        module.load_state_dict(state, strict=True)


def _check_keys(name: str, expected: dict[str, tuple], found: dict[str, tuple], config: TalkConfig) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(expected) & set(found))
    wrong = [f"{k} {found[k]} (model {expected[k]})" for k in common if found[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    if not found:
        problems = ["it holds no MultiTalk audio keys (audio_proj.*, blocks.N.audio_cross_attn.*, blocks.N.norm_x.*)"]
    else:
        problems = [
            f"{label} {len(keys)}: {_names(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
    raise ValueError(
        f"MultiTalk weights in {name} do not fit this transformer's Talk modules ({config}): {'; '.join(problems)}. "
        "Use MultiTalk's multitalk.safetensors for the same base model (Wan 2.1 I2V 14B: 40 blocks, dim 5120) and a "
        "TalkConfig whose audio sizes match it (12 wav2vec2 layers x 768)."
    )


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
