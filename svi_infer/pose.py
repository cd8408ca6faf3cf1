"""SVI-Dance pose conditioning on a diffusers ``WanTransformer3DModel``.

SVI-Dance conditions Wan 2.1 I2V on a DWPose skeleton video through UniAnimate-DiT's ``dwpose_embedding``: a
small Conv3d stack that turns the pose clip into one token per DiT patch, added to the patchified latents
before the blocks. Here that encoder is :class:`PoseEncoder`, attached to a transformer by a forward hook on
``patch_embedding`` (:func:`attach_pose`, :func:`set_pose`), so the diffusers model itself is left unchanged.

Checkpoints keep UniAnimate-DiT's names (``dwpose_embedding.<i>.weight`` / ``.bias``, ``<i>`` the
``nn.Sequential`` index), so UniAnimate-DiT's ``.ckpt`` and SVI's ``svi-dance.safetensors`` load as they are.

Long videos loop the pose stream (:func:`pose_frames_for_clip`); pose videos of another size are fitted to the
generation size by the image's own rule (centre crop to its aspect, then resize: :func:`fit_pose`), so a pose
video drawn over the image lines up with it pixel for pixel (:func:`read_pose_video`).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from svi_infer.adapter_files import POSE_WEIGHTS
from svi_infer.atomic import write_with

POSE_KEY = "dwpose_embedding"
LEAD_FRAMES = 3  # the pose clip's first frame is repeated this often in front (81 -> 84 frames)
SPATIAL_FACTOR = 16  # VAE /8 x patch /2
TEMPORAL_FACTOR = 4  # VAE /4 (the 3 lead frames make the first pose frame its own latent frame)
_HIDDEN = 16  # UniAnimate's ``concat_dim * 4``
_BARE_MAX_KEYS = 64  # a safetensors file without pose keys is read whole only if this small (a bare encoder)
_READ_CHUNK = 64  # frames decoded and resized at a time, so long pose videos never sit full-size in memory


class PoseEncoder(nn.Sequential):
    """UniAnimate-DiT's ``dwpose_embedding``: pose video ``[B, 3, F, H, W]`` -> ``[B, dim, (F-1)/4+1, H/16, W/16]``.

    A ``nn.Sequential`` so that parameter names are the checkpoint's (``0.weight`` ... ``12.bias``). The output
    has exactly the shape of ``transformer.patch_embedding``'s output for the latents of the same clip. Its
    pose state (set by :func:`set_pose`) lives here, so every transformer it is attached to sees the same pose.

    ``zero_init`` zeroes the last convolution, so a freshly attached encoder leaves the model's output unchanged
    until trained (UniAnimate-DiT and SVI use PyTorch's default init; that is the default here too).
    """

    def __init__(self, dim: int = 5120, *, zero_init: bool = False) -> None:
        c = _HIDDEN
        super().__init__(
            nn.Conv3d(3, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv3d(c, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv3d(c, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv3d(c, c, 3, stride=(1, 2, 2), padding=1),
            nn.SiLU(),
            nn.Conv3d(c, c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv3d(c, c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv3d(c, dim, (1, 2, 2), stride=(1, 2, 2)),
        )
        self.dim = dim
        if zero_init:
            nn.init.zeros_(self[-1].weight)
            nn.init.zeros_(self[-1].bias)
        self._pose: Tensor | None = None  # [B, 3, F, H, W], values 0..255
        self._cache: tuple[tuple, Tensor] | None = None

    def forward(self, pose: Tensor) -> Tensor:
        """Encode a pose video with values 0..255 (uint8 or float), ``[3, F, H, W]`` or ``[B, 3, F, H, W]``."""
        pose = _check_pose(pose)
        weight = self[0].weight
        video = pose.to(device=weight.device, dtype=weight.dtype) / 255.0
        video = torch.cat([video[:, :, :1].expand(-1, -1, LEAD_FRAMES, -1, -1), video], dim=2)
        return super().forward(video)

    @staticmethod
    def output_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``(latent frames, H/16, W/16)`` for a pose clip of that size: the DiT's token grid for the clip."""
        return (num_frames - 1) // TEMPORAL_FACTOR + 1, height // SPATIAL_FACTOR, width // SPATIAL_FACTOR

    # -- the forward hook on ``patch_embedding`` ---------------------------------------------------------------

    def _add_pose(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Add the pose tokens to the patch embedding (UniAnimate's ``add_condition``); no pose -> untouched."""
        if self._pose is None:
            return None
        embedding = self._embedding(output.device, output.dtype)
        if embedding.shape[2:] != output.shape[2:]:
            f, h, w = output.shape[2:]
            raise ValueError(
                f"pose tokens {tuple(embedding.shape[2:])} do not match the latent tokens {(f, h, w)}: the pose clip "
                f"must have {(f - 1) * TEMPORAL_FACTOR + 1} frames of {h * SPATIAL_FACTOR}x{w * SPATIAL_FACTOR} "
                f"(got {tuple(self._pose.shape[2:])} as frames, height, width)"
            )
        if embedding.shape[0] not in (1, output.shape[0]):
            raise ValueError(f"pose batch {embedding.shape[0]} does not fit the model batch {output.shape[0]}")
        return output + embedding

    def _embedding(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The encoded pose, recomputed while the encoder trains, else computed once and kept until it changes."""
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self(self._pose).to(device=device, dtype=dtype)
        try:  # parameter versions change on every in-place update (optimizer steps, load_state_dict)
            versions = tuple(p._version for p in params)
        except RuntimeError:  # inference-mode parameters have no version counter: don't cache
            with torch.no_grad():
                return self(self._pose).to(device=device, dtype=dtype)
        key = (device, dtype, torch.is_inference_mode_enabled(), versions, tuple(p.data_ptr() for p in params))
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            with torch.no_grad():
                self._cache = (key, self(self._pose).to(device=device, dtype=dtype))
        return self._cache[1]

    def _set(self, pose: Tensor | None) -> None:
        self._pose, self._cache = pose, None


def _check_pose(pose: Tensor) -> Tensor:
    if pose.ndim == 4:
        pose = pose.unsqueeze(0)
    if pose.ndim != 5 or pose.shape[1] != 3:
        raise ValueError(f"a pose video is [3, F, H, W] or [B, 3, F, H, W] with values 0..255; got {tuple(pose.shape)}")
    f, h, w = pose.shape[2:]
    if f < 1 or (f - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"a pose clip has 4k+1 frames (one per video frame of the clip, e.g. 81); got {f}")
    if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR or not h or not w:
        raise ValueError(f"pose height and width must be multiples of {SPATIAL_FACTOR}; got {h}x{w}")
    return pose


def pose_video_tensor(frames: np.ndarray | Tensor) -> Tensor:
    """``[F, H, W, 3]`` / ``[B, F, H, W, 3]`` uint8 frames (as videos are read here) to a ``[B, 3, F, H, W]`` pose."""
    video = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, Tensor) else frames
    if video.ndim == 4:
        video = video.unsqueeze(0)
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"pose frames are [F, H, W, 3] or [B, F, H, W, 3]; got {tuple(video.shape)}")
    return video.permute(0, 4, 1, 2, 3)


# -- attaching to a transformer ----------------------------------------------------------------------------------


def find_pose_encoder(transformer: nn.Module) -> PoseEncoder | None:
    """The pose encoder attached to ``transformer`` (also through a peft wrapper), or None."""
    return next((m for m in transformer.modules() if isinstance(m, PoseEncoder)), None)


def _patch_embedding(transformer: nn.Module) -> nn.Conv3d:
    patch = getattr(transformer, "patch_embedding", None)
    if not isinstance(patch, nn.Conv3d):
        raise ValueError(f"{type(transformer).__name__} has no Conv3d patch_embedding; pose needs a Wan transformer")
    return patch


def _remove_pose_hooks(patch: nn.Module) -> None:
    # found by owner, not by a stored handle, so that deep copies of the transformer stay independent
    for hook_id, hook in list(patch._forward_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), PoseEncoder):
            del patch._forward_hooks[hook_id]


def attach_pose(transformer: nn.Module, encoder: PoseEncoder) -> PoseEncoder:
    """Register ``encoder`` as ``transformer.dwpose_embedding`` and hook it onto ``patch_embedding``.

    Replaces an encoder attached before. The encoder keeps its dtype (run it in float32 like the reference by
    attaching after ``transformer.to(dtype)``) and is moved to the transformer's device. Parameters keep their
    ``requires_grad``: peft's ``add_adapter`` freezes every non-LoRA parameter, so attach after adding the LoRA
    (LoRA ``target_modules`` never match the encoder's Conv3d layers, so peft leaves them unwrapped).
    One encoder may be attached to several transformers (Wan 2.2's two experts); they share its pose.
    """
    patch = _patch_embedding(transformer)
    if encoder.dim != patch.out_channels:
        raise ValueError(
            f"pose encoder outputs {encoder.dim} channels but the transformer's tokens have {patch.out_channels}"
        )
    current = getattr(transformer, POSE_KEY, None)
    if current is not None and not isinstance(current, PoseEncoder):
        raise ValueError(f"the transformer already has a {POSE_KEY!r} attribute that is not a pose encoder")
    detach_pose(transformer)
    encoder.to(device=patch.weight.device)
    transformer.add_module(POSE_KEY, encoder)
    patch.register_forward_hook(encoder._add_pose)
    return encoder


def detach_pose(transformer: nn.Module) -> PoseEncoder | None:
    """Remove the pose hook and the ``dwpose_embedding`` submodule; returns the encoder that was attached."""
    encoder = getattr(transformer, POSE_KEY, None)
    _remove_pose_hooks(_patch_embedding(transformer))
    if isinstance(encoder, PoseEncoder):
        delattr(transformer, POSE_KEY)
        return encoder
    return None


def set_pose(transformer: nn.Module, pose: Tensor | np.ndarray | None) -> None:
    """Condition every following forward of ``transformer`` on ``pose`` (None: plain, bit-identical output).

    ``pose``: a tensor ``[3, F, H, W]`` / ``[B, 3, F, H, W]`` or uint8 frames ``[F, H, W, 3]`` / ``[B, F, H, W, 3]``
    (numpy, as :func:`read_pose_video` returns), values 0..255, with the clip's frame count and the
    generation size. A pose batch of 1 is shared by the whole model batch (e.g. CFG's cond + uncond). The pose
    stays until changed, so recomputation under gradient checkpointing sees the same pose; while the encoder
    trains it is re-encoded on every forward (gradients reach it), otherwise encoded once and reused.
    For SVI's pose dropout, pass None for that step (the reference zeroes the encoded pose: the same output).
    """
    encoder = find_pose_encoder(transformer)
    if encoder is None:
        raise ValueError("no pose encoder is attached to this transformer; call attach_pose first")
    if pose is None:
        encoder._set(None)
        return
    video = pose_video_tensor(pose) if isinstance(pose, np.ndarray) else pose
    encoder._set(_check_pose(video))


# -- checkpoints in UniAnimate-DiT's layout ---------------------------------------------------------------------


def _as_encoder(target: PoseEncoder | nn.Module) -> PoseEncoder:
    encoder = target if isinstance(target, PoseEncoder) else find_pose_encoder(target)
    if encoder is None:
        raise ValueError("no pose encoder is attached to this transformer; call attach_pose first")
    return encoder


def pose_state_dict(target: PoseEncoder | nn.Module, prefix: str = POSE_KEY + ".") -> dict[str, Tensor]:
    """The encoder's weights as ``dwpose_embedding.<i>.weight`` / ``.bias`` (CPU copies), UniAnimate-DiT's layout.

    Merge them into a LoRA file to make one SVI-Dance checkpoint, as SVI's ``svi-dance.safetensors`` does.
    """
    state = _as_encoder(target).state_dict()
    return {prefix + k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_pose_encoder(target: PoseEncoder | nn.Module, path: str | Path) -> None:
    """Write :func:`pose_state_dict` to a safetensors file, atomically."""
    from safetensors.torch import save_file

    state = pose_state_dict(target)
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    """Tensors of one checkpoint file; from safetensors only the pose keys are read (SVI files hold the LoRA too)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                wanted = [k for k in keys if POSE_KEY + "." in k]
                if not wanted and len(keys) > _BARE_MAX_KEYS:  # not a bare encoder file: don't read it all
                    sample = ", ".join(sorted(keys)[:5])
                    raise ValueError(f"{path} holds no {POSE_KEY}.* weights (found: {sample}, ...)")
                return {k: handle.get_tensor(k) for k in wanted or keys}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read pose encoder checkpoint {path}: {err}") from None
    try:
        # UniAnimate-DiT ships a pickled Lightning .ckpt; weights_only=True never runs code from the file
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"cannot read pose encoder checkpoint {path} with torch.load(weights_only=True) "
            f"(pickled checkpoints are only loaded that way; convert it to safetensors otherwise): {err}"
        ) from None
    for wrapper in ("state_dict", "module"):  # Lightning / DeepSpeed wrap the weights in one of these
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"pose encoder checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _read_source(source: str | Path | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    if isinstance(source, Mapping):
        return dict(source), "the given state dict"
    path = Path(source).expanduser()
    if path.is_dir() and (path / POSE_WEIGHTS).is_file():  # an adapter directory: its pose encoder file
        files = [path / POSE_WEIGHTS]
    elif path.is_dir():  # SVI keeps extra modules as a folder of safetensors shards
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"pose encoder folder {path} holds no .safetensors files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"pose encoder checkpoint {path} does not exist")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(_read_checkpoint(file))
    return state, str(path)


def _pose_entries(state: Mapping[str, Tensor], expected: set[str], where: str) -> dict[str, Tensor]:
    """Map ``<any prefix>dwpose_embedding.<name>`` (or bare ``<name>``) to the encoder's ``<name>``."""
    marker = POSE_KEY + "."
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if marker in key:
            prefix, _, name = key.rpartition(marker)
            groups.setdefault(prefix + marker, {})[name] = value
    if not groups:
        if state and set(state) <= expected:  # a bare encoder state dict
            return dict(state)
        sample = ", ".join(sorted(state)[:5]) or "nothing"
        raise ValueError(f"{where} holds no {marker}* weights (found: {sample})")
    if len(groups) > 1:
        prefixes = ", ".join(sorted(groups))
        raise ValueError(f"{where} holds several pose encoders ({prefixes}); pass a state dict with only one")
    return next(iter(groups.values()))


def load_pose_encoder(target: PoseEncoder | nn.Module, source: str | Path | Mapping[str, Tensor]) -> PoseEncoder:
    """Load UniAnimate-DiT / SVI-Dance pose encoder weights into ``target`` (an encoder, or a transformer with one).

    ``source``: a ``.safetensors`` file, a folder of them, a pickled ``.ckpt`` / ``.pth`` (UniAnimate-DiT's
    format; read only with ``torch.load(weights_only=True)``), or a state dict. Keys are
    ``dwpose_embedding.<i>.weight`` / ``.bias`` under any prefix (``model.``, ``module.``, ``pipe.`` ...; other
    keys such as the LoRA or UniAnimate's ``randomref_embedding_pose`` are ignored), or the bare encoder's own.
    Strict: one ValueError names every missing, unexpected and wrong-shaped key. Values are cast to the encoder's
    dtype. Returns the encoder.
    """
    encoder = _as_encoder(target)
    state, where = _read_source(source)
    own = encoder.state_dict()
    entries = _pose_entries(state, set(own), where)
    missing = sorted(set(own) - set(entries), key=_layer_order)
    unexpected = sorted(set(entries) - set(own), key=_layer_order)
    wrong = [
        f"{POSE_KEY}.{k} {tuple(entries[k].shape)} (expected {tuple(own[k].shape)})"
        for k in sorted(set(own) & set(entries), key=_layer_order)
        if entries[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"cannot load the pose encoder from {where}:"]
        if missing:
            parts.append("missing " + ", ".join(f"{POSE_KEY}.{k}" for k in missing))
        if unexpected:
            parts.append("unexpected " + ", ".join(f"{POSE_KEY}.{k}" for k in unexpected))
        if wrong:
            parts.append("wrong shape " + ", ".join(wrong))
        last = f"{len(encoder) - 1}.weight"
        if last in entries and entries[last].ndim == 5 and entries[last].shape[0] != encoder.dim:
            parts.append(
                f"(the checkpoint's encoder feeds a {entries[last].shape[0]}-wide transformer, this one {encoder.dim})"
            )
        raise ValueError("; ".join(parts[:1]) + " " + "; ".join(parts[1:]))
    with torch.no_grad():
        encoder.load_state_dict(entries, strict=True)
    return encoder


def _layer_order(name: str) -> tuple:
    head, _, rest = name.partition(".")
    return (int(head), rest) if head.isdigit() else (1 << 30, name)


# -- the pose stream ---------------------------------------------------------------------------------------------


def pose_frames_for_clip(num_pose_frames: int, clip_index: int, frames_per_clip: int, overlap: int) -> list[int]:
    """Indices into the pose video for clip ``clip_index``, looping the pose video cyclically.

    Clips after the first start with ``overlap`` frames that repeat the previous clip's tail, so clip k covers
    the output's frames ``s_k .. s_k + F - 1`` with ``s_k = k * (F - overlap)``, and frame g takes pose
    ``g mod num_pose_frames``. As in SVI's ``test_svi_dance.py``, a clip's window is the previous clip's last
    ``overlap`` poses followed by the next ones; the reference resumes one pose early (it repeats pose F-1 once
    after the first clip and runs one frame behind from then on), which this strictly aligned mapping does not.
    """
    if num_pose_frames < 1:
        raise ValueError(f"the pose video has no frames (num_pose_frames={num_pose_frames})")
    if frames_per_clip < 1 or not 0 <= overlap < frames_per_clip:
        raise ValueError(
            f"need frames_per_clip >= 1 and 0 <= overlap < frames_per_clip; got {frames_per_clip}, {overlap}"
        )
    if clip_index < 0:
        raise ValueError(f"clip_index must be >= 0; got {clip_index}")
    start = clip_index * (frames_per_clip - overlap)
    return [(start + i) % num_pose_frames for i in range(frames_per_clip)]


def letterbox(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``[F, h, w, 3]`` frames to fit ``height x width`` keeping the aspect ratio, centred on black.

    Nearest-neighbour, as SVI's ``resize_and_pad_to_target`` for pose videos: skeleton colours stay exact.
    """
    f, h, w, c = frames.shape
    if (h, w) == (height, width):
        return np.ascontiguousarray(frames, dtype=np.uint8)
    scale = min(height / h, width / w)
    nh, nw = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    out = np.zeros((f, height, width, c), dtype=np.uint8)
    if f == 0:
        return out
    resized = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)).permute(0, 3, 1, 2),
        size=(nh, nw),
        mode="nearest-exact",
    )
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, top : top + nh, left : left + nw] = resized.permute(0, 2, 3, 1).numpy()
    return out


def fit_pose(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit ``[F, h, w, 3]`` frames to ``height x width`` as :func:`svi_infer.video_io.fit_image` fits the image:
    the same centred crop box (:func:`~svi_infer.video_io.crop_box`), resized to the size.

    A pose video of the image's size (or aspect) thus lands on the person pixel for pixel; one of another aspect
    is cropped like the image (SVI letterboxes pose videos instead; with a pose video made for the image the two
    differ by at most the rounding of the size). Nearest-neighbour sampling of each output pixel's centre, as
    PIL's resize maps it, so skeleton colours stay exact and land where the image's pixels do.
    """
    from svi_infer.video_io import crop_box

    f, h, w, c = frames.shape
    if (h, w) == (height, width):
        return np.ascontiguousarray(frames, dtype=np.uint8)
    left, top, right, bottom = crop_box((w, h), height, width)
    rows = top + np.floor((np.arange(height) + 0.5) * (bottom - top) / height).astype(np.int64)
    cols = left + np.floor((np.arange(width) + 0.5) * (right - left) / width).astype(np.int64)
    frames = np.asarray(frames, dtype=np.uint8)
    return np.ascontiguousarray(frames[:, rows.clip(0, h - 1)][:, :, cols.clip(0, w - 1)])


def read_pose_video(path: str | Path, height: int, width: int) -> np.ndarray:
    """All frames of a pose video as ``[F, height, width, 3]`` uint8, fitted like the image by :func:`fit_pose`.

    Any frame count works: the generator loops the pose video (:func:`pose_frames_for_clip`), so a short
    one repeats and a long one is used as far as the video goes. Any size works: cropped to the generation
    size's aspect and resized, exactly as the image is. Decoded by ffmpeg as a
    stream, a chunk at a time, so a long high-resolution pose video never sits full-size in memory (and
    decord, which rejects some frame widths such as 48 or 96, is not needed).
    """
    import imageio_ffmpeg

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pose video {path} does not exist")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    chunks, chunk = [], []
    try:
        w, h = next(reader)["size"]
        for raw in reader:
            chunk.append(np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3))
            if len(chunk) == _READ_CHUNK:
                chunks.append(fit_pose(np.stack(chunk), height, width))
                chunk = []
    except (OSError, RuntimeError, ValueError, StopIteration) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"cannot read pose video {path}: {lines[-1] if lines else type(err).__name__}") from None
    finally:
        reader.close()
    if chunk:
        chunks.append(fit_pose(np.stack(chunk), height, width))
    if not chunks:
        raise ValueError(f"pose video {path} has no frames")
    return np.concatenate(chunks)


def side_by_side(reference: Image.Image | np.ndarray, pose: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """The ``(reference | pose | generated)`` video, ``[F, H, 3W, 3]`` uint8, as SVI-Dance's output shows it.

    The reference image is resized (bilinear) to the generated size; pose frames of another size are fitted
    with :func:`letterbox`. ``pose`` and ``generated`` must have the same number of frames.
    """
    generated = np.asarray(generated, dtype=np.uint8)
    if generated.ndim != 4 or generated.shape[-1] != 3:
        raise ValueError(f"generated frames are [F, H, W, 3]; got {generated.shape}")
    f, h, w, _ = generated.shape
    pose = np.asarray(pose, dtype=np.uint8)
    if pose.ndim != 4 or pose.shape[-1] != 3 or pose.shape[0] != f:
        raise ValueError(f"pose frames must be [{f}, H, W, 3] like the generated ones; got {pose.shape}")
    pose = letterbox(pose, h, w)
    image = reference if isinstance(reference, Image.Image) else Image.fromarray(np.asarray(reference, np.uint8))
    image = image.convert("RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    ref = np.broadcast_to(np.asarray(image, dtype=np.uint8), (f, h, w, 3))
    return np.concatenate([ref, pose, generated], axis=2)
