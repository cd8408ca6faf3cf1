"""The shard sample contract between data_tools (writer) and svi_train (reader), validated on both sides.

A sample is a JSON metadata member plus safetensors members (never pickle):

=====================  ==========================================================================
member                 tensors
=====================  ==========================================================================
``latents``            ``latents`` [C, T, h, w] clean video latents (normalised), bf16
``cond``               pixel hand-off: ``cond.m<m>`` [C, T, h, w] latents of the conditioning video for m
                       motion frames, one per count in the metadata's ``motion_frames``
``anchor``             latent hand-off: ``anchor`` [C, 1, h, w] bf16 latent of the anchor image alone
``motion``             latent hand-off: ``motion.n<n>`` [C, n, h, w] bf16 latents 1..n of the window's first
                       1 + 4n frames (first-frame augmented when asked), one per count in ``motion_latents``
``text``               ``text`` [L, D] UMT5 embedding at its real length L (padded to 512 on load)
``image``              ``image`` [257, 1280] CLIP embedding of the first frame (Wan 2.1 only)
``audio``              ``audio`` [F + 2c, layers, dim] wav2vec2 features per video frame (Talk): the clip's F frames and
                       ``c = meta["audio_context"]`` frames either side (0 in shards from before it was stored)
``pose``               ``pose`` [3, F, H, W] uint8 pose frames (Dance)
=====================  ==========================================================================

In the tar, members are named ``<key>.<member>.safetensors`` and ``<key>.json``.

The metadata's ``handoff`` says which conditioning layout a sample has: ``pixel`` (SVI 1.0 / 2.0: ``cond``;
``motion_latents`` is ``[]``) or ``latent`` (SVI 2.0 Pro: ``anchor`` + ``motion``; ``motion_frames`` is ``[]``).
Samples written before the key existed lack it and are ``pixel``. Latent sizes follow the spec's VAE factors
(``h = height / 8`` for Wan 2.1 and 2.2 A14B, ``height / 16`` for TI2V-5B).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from svi_infer.spec import SPECS
from svi_infer.variants import HANDOFFS

SCHEMA_VERSION = 1
TEXT_LEN = 512
MEMBERS = ("latents", "cond", "anchor", "motion", "text", "image", "audio", "pose")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots: webdataset splits member names at the first dot
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "key": str,
    "caption": str,
    "source": str,
    "source_fps": (int, float),
    "fps": (int, float),
    "start_frame": int,
    "num_frames": int,
    "window_index": int,
    "spec": str,
    "height": int,
    "width": int,
    "latent_channels": int,
    "motion_frames": list,
    "ref_pad_num": int,
    "text_len": int,
}
_OPTIONAL_META_TYPES: dict[str, type] = {"handoff": str, "motion_latents": list}  # absent: pixel hand-off


class SchemaError(ValueError):
    """A sample breaks the shard contract; the message lists every problem."""


@dataclass
class Sample:
    key: str
    meta: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)


def _member_of(name: str) -> str:
    return name.split(".", 1)[0]


def _counts(value: list) -> bool:
    return all(isinstance(n, int) and not isinstance(n, bool) for n in value)


def validate(sample: Sample, temporal: int | None = None, spatial: int | None = None) -> None:
    """Check metadata fields and types, tensor presence, shapes, dtypes and finiteness. The VAE factors default
    to those of the metadata's spec (4 and 8 for a spec this code does not know)."""
    meta, t = sample.meta, sample.tensors
    problems = []
    for name, kind in _META_TYPES.items():
        if name not in meta:
            problems.append(f"metadata lacks {name!r}")
        elif not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            problems.append(f"metadata {name!r} has type {type(meta[name]).__name__}")
    for name, kind in _OPTIONAL_META_TYPES.items():
        if name in meta and not isinstance(meta[name], kind):
            problems.append(f"metadata {name!r} has type {type(meta[name]).__name__}")
    for name in ("motion_frames", "motion_latents"):
        if isinstance(meta.get(name), list) and not _counts(meta[name]):
            problems.append(f"metadata {name!r} must list integer counts, got {meta[name]}")
    if problems:
        raise SchemaError(f"sample {sample.key}: " + "; ".join(problems))
    if meta["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {meta['schema_version']} (this code reads {SCHEMA_VERSION})")
    if meta["key"] != sample.key or not KEY_PATTERN.match(sample.key):
        problems.append(f"key {sample.key!r} must match the metadata and use letters, digits, '_' and '-' only")
    unknown = sorted(n for n in t if _member_of(n) not in MEMBERS)
    if unknown:
        problems.append(f"unknown tensors {unknown}")
    spec = SPECS.get(meta["spec"])
    temporal = temporal or (spec.vae_temporal if spec else 4)
    spatial = spatial or (spec.vae_spatial if spec else 8)
    expected = (
        meta["latent_channels"],
        (meta["num_frames"] - 1) // temporal + 1,
        meta["height"] // spatial,
        meta["width"] // spatial,
    )
    if "latents" not in t:
        problems.append("no 'latents' tensor")
    elif tuple(t["latents"].shape) != expected:
        problems.append(f"latents shape {tuple(t['latents'].shape)}, expected {expected}")
    handoff = meta.get("handoff", "pixel")
    if handoff not in HANDOFFS:
        problems.append(f"handoff {handoff!r} must be one of {HANDOFFS}")
    elif handoff == "pixel":
        problems += _pixel_problems(meta, t, expected)
    else:
        problems += _latent_problems(meta, t, expected)
    text = t.get("text")
    if text is None or text.ndim != 2 or text.shape[0] != meta["text_len"] or not 0 < text.shape[0] <= TEXT_LEN:
        problems.append(f"text must be [text_len={meta['text_len']} (1..{TEXT_LEN}), D]")
    rows = meta["num_frames"] + 2 * meta.get("audio_context", 0)  # the clip's frames and the context either side
    if "audio" in t and (t["audio"].ndim != 3 or t["audio"].shape[0] != rows):
        problems.append(f"audio must be [num_frames + 2 x audio_context = {rows}, layers, dim]")
    if "pose" in t:
        want = (3, meta["num_frames"], meta["height"], meta["width"])
        if tuple(t["pose"].shape) != want or t["pose"].dtype != torch.uint8:
            problems.append(f"pose must be uint8 {want}")
    for name, tensor in t.items():
        if tensor.is_floating_point() and not _finite(tensor):
            problems.append(f"{name} has non-finite values")
    if problems:
        raise SchemaError(f"sample {sample.key}: " + "; ".join(problems))


def _pixel_problems(meta: dict, t: dict[str, Tensor], expected: tuple[int, ...]) -> list[str]:
    """``cond.m<m>`` per motion count; no latent hand-off members."""
    problems = []
    for m in meta["motion_frames"]:
        cond = t.get(f"cond.m{m}")
        if cond is None:
            problems.append(f"no conditioning latents 'cond.m{m}'")
        elif tuple(cond.shape) != expected:
            problems.append(f"cond.m{m} shape {tuple(cond.shape)}, expected {expected}")
    if meta.get("motion_latents"):
        problems.append(f"a pixel hand-off sample lists motion_latents {meta['motion_latents']} (must be [])")
    stray = sorted(n for n in t if _member_of(n) in ("anchor", "motion"))
    if stray:
        problems.append(f"a pixel hand-off sample holds latent hand-off tensors {stray}")
    return problems


def _latent_problems(meta: dict, t: dict[str, Tensor], expected: tuple[int, ...]) -> list[str]:
    """``anchor`` [C, 1, h, w] and ``motion.n<n>`` [C, n, h, w] per motion-latent count, bf16; no ``cond``."""
    problems = []
    c, frames, h, w = expected
    counts = meta.get("motion_latents") or []
    if not counts:
        problems.append("a latent hand-off sample needs metadata 'motion_latents' (a non-empty list of counts)")
    if meta["motion_frames"]:
        problems.append(f"a latent hand-off sample lists motion_frames {meta['motion_frames']} (must be [])")
    wanted = {"anchor": (c, 1, h, w)}
    for n in counts:
        if not 1 <= n < frames - 1:
            problems.append(f"motion latent count {n} must be in 1..{frames - 2} for a {frames}-latent clip")
        wanted[f"motion.n{n}"] = (c, n, h, w)
    for name, shape in wanted.items():
        tensor = t.get(name)
        if tensor is None:
            problems.append(f"no latent hand-off tensor {name!r}")
        elif tuple(tensor.shape) != shape or tensor.dtype != torch.bfloat16:
            problems.append(
                f"{name} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, expected bfloat16 {shape}"
            )
    stray = sorted(
        n for n in t if (_member_of(n) in ("anchor", "motion") and n not in wanted) or _member_of(n) == "cond"
    )
    if stray:
        problems.append(f"unexpected tensors {stray} in a latent hand-off sample")
    return problems


def _finite(tensor: Tensor) -> bool:
    """No NaN or inf. ``aminmax`` (NaN propagates into it) reads the tensor once; ``isfinite().all()`` writes
    four full-size temporaries and made validation 4x slower than reading the shard (bench/data_throughput)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def to_members(sample: Sample) -> dict[str, bytes | str]:
    """Validated sample -> webdataset members (``__key__``, ``json``, ``<member>.safetensors``)."""
    validate(sample)
    members: dict[str, bytes | str] = {"__key__": sample.key}
    members["json"] = json.dumps(sample.meta, sort_keys=True).encode("utf-8")
    for member in MEMBERS:
        group = {k: v.contiguous() for k, v in sorted(sample.tensors.items()) if _member_of(k) == member}
        if group:
            members[f"{member}.safetensors"] = save_safetensors(group)
    return members


def from_members(members: dict[str, Any]) -> Sample:
    """webdataset members (raw bytes) -> validated sample. Members other than JSON and safetensors (a
    ``.pth`` or ``.pickle`` one would need unpickling) make the sample invalid: pickle is never read."""
    foreign = sorted(n for n in members if not n.startswith("__") and n != "json" and not n.endswith(".safetensors"))
    if foreign:
        raise SchemaError(f"sample {members.get('__key__')}: members {foreign} are neither JSON nor safetensors")
    try:
        meta = json.loads(members["json"])
        tensors: dict[str, Tensor] = {}
        for name, data in members.items():
            if name.endswith(".safetensors"):
                tensors.update(load_safetensors(data))
    except (KeyError, ValueError, json.JSONDecodeError) as err:
        raise SchemaError(f"sample {members.get('__key__')}: unreadable members ({err})") from None
    sample = Sample(str(members.get("__key__", meta.get("key"))), meta, tensors)
    validate(sample)
    return sample


def padded_text(text: Tensor, length: int = TEXT_LEN) -> Tensor:
    """``[L, D]`` -> ``[length, D]`` with zeros after the real tokens (what Wan 2.1 I2V expects); longer text is cut
    to ``length``, as the prompt encoder cuts it."""
    text = text[:length]
    return torch.cat([text, text.new_zeros(length - text.shape[0], text.shape[1])])


def approx_bytes(sample: Sample) -> int:
    """Payload size of a sample's tensors, for shard size caps."""
    return sum(t.numel() * t.element_size() for t in sample.tensors.values()) + 1024
