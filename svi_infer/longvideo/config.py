"""The typed schema of ``conf/infer.yaml``, registered with Hydra so a misspelt key or a wrong type fails when the
config is composed, before anything is loaded (:func:`svi_infer.errors.run_hydra_app` says such a failure in one
line).

The classes carry the types only; every default and what each key means is in ``conf/infer.yaml``. ``variant.*``
is derived from :class:`~svi_infer.settings.GenerationSettings`, so a setting is declared once. Experiment files
(``conf/experiment/*.yaml``) are shared with svi_train and carry its keys too: :func:`register` lets them in, and
svi_infer ignores them. Hydra itself is imported only by :func:`register` (svi_infer's core never needs it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

from omegaconf import MISSING, OmegaConf

from svi_infer.settings import TOP_LEVEL_SETTINGS, GenerationSettings

SCHEMA_NAME = "infer_schema"  # the first entry of conf/infer.yaml's defaults


def _variant_config() -> type:
    """``variant.*``: every ``GenerationSettings`` field that is not a top-level key, optional (null: the
    adapter's ``svi.json``, else the built-in default)."""
    hints = get_type_hints(GenerationSettings)
    names = [f.name for f in fields(GenerationSettings) if f.name not in TOP_LEVEL_SETTINGS]
    return make_dataclass("VariantConfig", [(name, hints[name] | None, None) for name in names])


VariantConfig = _variant_config()


@dataclass
class ModelConfig:
    """``model.*``: a ``conf/model/*.yaml`` file (shared with svi_train and data_tools)."""

    spec: str = MISSING
    path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    transformer_files: Any = None  # a path or a list of paths
    transformer_2_files: Any = None
    vae_file: str | None = None
    multitalk: str | None = None
    audio_encoder: str | None = None


@dataclass
class AdapterConfig:
    path: str | None = MISSING
    high_noise: str | None = MISSING
    low_noise: str | None = MISSING
    strength: float = MISSING
    ignore_unmatched: bool = MISSING
    extra: Any = MISSING  # a list of {path, strength}: LoRAs stacked on the SVI adapter


@dataclass
class MemoryConfig:
    """``memory.*``: where the weights live and in which dtype (:mod:`svi_infer.memory`)."""

    weights_dtype: str = MISSING
    offload: str = MISSING
    blocks_per_group: int = MISSING


@dataclass
class InferConfig:
    """The keys of ``conf/infer.yaml`` and their types."""

    image: str = MISSING
    prompts: Any = MISSING  # a file, a prompt, or a list of prompts
    output: str = MISSING
    overwrite: bool = MISSING
    num_clips: int | None = MISSING
    frames_per_clip: int | None = MISSING
    height: int | None = MISSING
    width: int | None = MISSING
    seed: int = MISSING
    seed_policy: str = MISSING
    resume: bool = MISSING
    progress: bool = MISSING
    audio: str | None = MISSING
    pose: str | None = MISSING
    side_by_side: bool = MISSING
    variant: VariantConfig = field(default_factory=VariantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


def register() -> None:
    """Store the schema as ``infer_schema`` for ``conf/infer.yaml`` to build on (call before composing it).

    Its top level stays open to keys it does not declare: the experiment files, shared with svi_train, set its keys
    there too (``recycling``, ``data``, ``lora``, ...), which svi_infer ignores. Hydra closes it before applying
    the command line, so a misspelt override still fails; ``variant``, ``adapter``, ``model`` and ``memory`` are
    closed always.
    """
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.structured(InferConfig)
    OmegaConf.set_struct(node, False)
    for name in ("variant", "adapter", "model", "memory"):
        OmegaConf.set_struct(node[name], True)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=node)
