"""What an adapter says about itself on disk: its layout, and the base model it was made for.

Torch-free on purpose (JSON and safetensors headers only): ``python -m svi_infer`` finds every adapter and refuses
one made for another base before torch starts up. Loading the weights into a model is :mod:`svi_infer.adapters`.

The record of the base (``svi.json``'s contents) is beside the weights in an adapter directory, and inside the
safetensors metadata under ``"svi"`` in the single files ``svi_train.export`` writes (ComfyUI and diffusers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from svi_infer.spec import HIGH_NOISE, LOW_NOISE, ModelSpec
from svi_infer.variants import RENAMED_KEYS, VariantSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SVI_META = "svi.json"
SVI_FILE_METADATA = "svi"  # the safetensors metadata key holding svi.json's contents in a single exported file
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"
POSE_WEIGHTS = "pose_encoder.safetensors"  # a Dance adapter's pose encoder, beside its LoRA (not inside: see below)
META_FORMAT = 1


class AdapterError(ValueError):
    """An adapter cannot be loaded: wrong base, unmatched keys, or a malformed file."""


@dataclass(frozen=True)
class AdapterMeta:
    """The contents of ``svi.json``: the base it was made for, the variant it was trained on (``variant``: a
    :class:`~svi_infer.variants.VariantSpec` record; None for adapters from before it was recorded), the generation
    defaults it suggests, and how it was trained."""

    base: dict[str, Any]
    expert: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    variant: dict[str, Any] | None = None

    @staticmethod
    def for_spec(
        spec: ModelSpec, expert: str | None = None, defaults=None, provenance=None, variant: VariantSpec | None = None
    ) -> AdapterMeta:
        base = {
            "spec": spec.id,
            "family": spec.family,
            "dim": spec.dim,
            "num_layers": spec.num_layers,
            "in_channels": spec.in_channels,
        }
        record = variant.to_record() if variant is not None else None
        return AdapterMeta(base, expert, dict(defaults or {}), dict(provenance or {}), record)

    @staticmethod
    def from_record(data: dict[str, Any]) -> AdapterMeta:
        """Read a record; older adapters' defaults are read under today's names (``motion_frames`` is
        ``motion_frames``, a null conditioning is ``text``)."""
        defaults = {RENAMED_KEYS.get(k, k): v for k, v in data.get("defaults", {}).items()}
        if "conditioning" in defaults and defaults["conditioning"] is None:
            defaults["conditioning"] = "text"
        return AdapterMeta(data["base"], data.get("expert"), defaults, data.get("provenance", {}), data.get("variant"))

    def trained_variant(self, source: Path) -> VariantSpec | None:
        """The variant it was trained on, None if it does not say."""
        return None if self.variant is None else VariantSpec.from_record(self.variant, str(source))

    def check_base(self, spec: ModelSpec, source: Path) -> None:
        """Refuse an adapter trained for another base (family or dimensions differ)."""
        mine = AdapterMeta.for_spec(spec).base
        wrong = [k for k in ("family", "dim", "num_layers", "in_channels") if self.base.get(k) != mine[k]]
        if wrong:
            theirs = ", ".join(f"{k}={self.base.get(k)}" for k in wrong)
            ours = ", ".join(f"{k}={mine[k]}" for k in wrong)
            raise AdapterError(
                f"adapter {source} was trained for {self.base.get('spec')} ({theirs}) and cannot load into "
                f"{spec.id} ({ours}); choose the matching model"
            )


def weights_file(path: Path) -> Path:
    """The safetensors file of an adapter: ``path`` itself, or the weights an adapter directory holds."""
    if path.is_file():
        return path
    if not path.exists():
        raise AdapterError(f"adapter {path} does not exist")
    for name in (ADAPTER_WEIGHTS, DIFFUSERS_WEIGHTS):
        if (path / name).is_file():
            return path / name
    raise AdapterError(
        f"adapter directory {path} holds neither {ADAPTER_WEIGHTS} nor {DIFFUSERS_WEIGHTS} "
        f"(nor {HIGH_NOISE}/ or {LOW_NOISE}/ sub-directories of a Wan 2.2 A14B adapter)"
    )


def pose_sibling(file: Path) -> Path:
    """Where a single LoRA file's pose encoder goes: ``<stem>.pose_encoder.safetensors`` beside it.

    The pose encoder is kept out of the LoRA file so that diffusers' ``load_lora_weights`` and ComfyUI's LoRA
    loader, which refuse or choke on non-LoRA keys, take the LoRA file as it is."""
    return file.with_name(f"{file.stem}.{POSE_WEIGHTS}")


def pose_weights_file(path: str | Path) -> Path | None:
    """The pose encoder file beside an adapter's LoRA: ``pose_encoder.safetensors`` in an adapter directory (peft or
    diffusers export), :func:`pose_sibling` of a single file; None when there is none (not a Dance adapter, or an
    SVI file holding its ``dwpose_embedding.*`` weights inside)."""
    path = Path(path).expanduser()
    if path.is_file() and path.name in (ADAPTER_WEIGHTS, DIFFUSERS_WEIGHTS):  # the weights of a directory, named
        path = path.parent
    candidate = path / POSE_WEIGHTS if path.is_dir() else pose_sibling(path)
    return candidate if candidate.is_file() else None


def file_metadata(file: Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header (no tensor is read)."""
    try:
        with safe_open(str(file), framework="np") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a damaged or foreign file
        raise AdapterError(f"cannot read LoRA file {file}: {err}; give a .safetensors LoRA") from None


def read_meta(path: str | Path) -> AdapterMeta | None:
    """An adapter's record of its base: ``svi.json`` beside the weights, else the ``"svi"`` entry of the weights
    file's safetensors metadata (ComfyUI and diffusers exports); None when it carries neither (made elsewhere)."""
    path = Path(path)
    if (path / SVI_META).is_file():
        return AdapterMeta.from_record(json.loads((path / SVI_META).read_text(encoding="utf-8")))
    record = file_metadata(weights_file(path)).get(SVI_FILE_METADATA)
    return AdapterMeta.from_record(json.loads(record)) if record else None


def expert_dirs(path: str | Path, spec: ModelSpec | None = None) -> dict[str, Path]:
    """The per-expert sub-directories of a split Wan 2.2 A14B adapter directory, ``{expert: <path>/<expert>}``.

    A split directory holds ``high_noise/`` and/or ``low_noise/`` and no weights of its own (what training and
    ``svi_train.export`` write for two experts). Anything else (a file, a normal adapter directory) gives ``{}``.
    With ``spec``, a split directory is refused for a base with one transformer.
    """
    path = Path(path).expanduser()
    if not path.is_dir() or any((path / name).is_file() for name in (ADAPTER_WEIGHTS, DIFFUSERS_WEIGHTS)):
        return {}
    found = {expert: path / expert for expert in (HIGH_NOISE, LOW_NOISE) if (path / expert).is_dir()}
    if found and spec is not None and not set(found) <= set(spec.experts):
        raise AdapterError(
            f"adapter {path} holds a LoRA per Wan 2.2 A14B expert ({', '.join(f'{e}/' for e in found)}) but "
            f"{spec.id} has one transformer: choose a Wan 2.2 A14B model (e.g. model=wan22_i2v_a14b) or an "
            f"adapter made for {spec.id}"
        )
    return found
