"""LoRA adapters: the project's adapter directory, and official SVI / ComfyUI / diffusers LoRA files.

An adapter directory holds ``adapter_model.safetensors`` (peft keys on diffusers module names),
``adapter_config.json`` (the peft ``LoraConfig``) and ``svi.json`` (base spec, expert, the variant's
inference defaults, provenance). Inference needs nothing else. For Wan 2.2 A14B a *split* adapter directory holds
no weights of its own but ``high_noise/`` and/or ``low_noise/`` sub-directories, each a normal adapter (or a
diffusers export) loaded into its expert (:func:`expert_dirs`). The layout and the record of the base (``svi.json``,
or the ``"svi"`` safetensors metadata of an exported file) are read torch-free by :mod:`svi_infer.adapter_files`.

Single files are read in the formats found in the wild (reference/peers.md §4): peft/diffusers names
(optionally ``transformer.``-prefixed), Wan's original names with peft's ``.default`` segment (optionally
``pipe.dit.``-prefixed, as SVI ships them), and ComfyUI's ``diffusion_model.`` + ``lora_A/lora_B`` or
``lora_down/lora_up`` + ``.alpha``. Loading is strict: a key that matches no module is reported by name.

SVI-Dance adapters also carry the trained pose encoder as ``dwpose_embedding.<i>.weight`` / ``.bias`` (under any
prefix, as SVI's ``svi-dance.safetensors`` and UniAnimate-DiT ship it): loading one attaches a
:class:`~svi_infer.pose.PoseEncoder` to the transformer(s) with exactly those weights.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from svi_infer.adapter_files import (  # noqa: F401  (re-exported: what an adapter says about itself, torch-free)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DIFFUSERS_METADATA,
    DIFFUSERS_WEIGHTS,
    META_FORMAT,
    SVI_FILE_METADATA,
    SVI_META,
    AdapterError,
    AdapterMeta,
    expert_dirs,
    file_metadata,
    read_meta,
    weights_file,
)
from svi_infer.atomic import atomic_dir
from svi_infer.model import WanModel
from svi_infer.pose import POSE_KEY, PoseEncoder, attach_pose, find_pose_encoder, load_pose_encoder, pose_state_dict
from svi_infer.spec import ModelSpec

_PREFIXES = ("base_model.model.", "pipe.dit.", "diffusion_model.", "transformer.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_]+)?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
# Wan's original module names -> diffusers' WanTransformer3DModel names (reference/svi.md §5.3).
_BLOCK_NAMES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_TOP_NAMES = {
    "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}


@dataclass
class LoraWeights:
    """One module's LoRA: ``down`` [r, in], ``up`` [out, r] and the alpha the file gives (None: alpha = r)."""

    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)  # the file's own key names, for error messages


def _free_name(transformers: list[nn.Module], name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... if a transformer already has an adapter of that name."""
    taken = set().union(*(set(getattr(t, "peft_config", None) or {}) for t in transformers))
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def original_module_name(name: str) -> str:
    """Map a diffusers module name back to Wan's original layout (for ComfyUI files); others pass through."""
    for original, diffusers in _TOP_NAMES.items():
        if name == diffusers:
            return original
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match:
        for original, diffusers in _BLOCK_NAMES.items():
            if match.group(2) == diffusers:
                return f"blocks.{match.group(1)}.{original}"
    return name


def diffusers_module_name(name: str) -> str:
    """Map a module name in Wan's original layout to diffusers' (diffusers names pass through)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return name


def parse_lora_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, LoraWeights], list[str]]:
    """Group a LoRA state dict of any supported format by diffusers module name.

    Returns the per-module weights and the keys that are not LoRA weights or alphas.
    """
    modules: dict[str, LoraWeights] = {}
    not_lora: list[str] = []
    for key, tensor in state_dict.items():
        bare = _strip_prefixes(key)
        if match := _LORA_KEY.match(bare):
            entry = modules.setdefault(diffusers_module_name(match.group("module")), LoraWeights())
            entry.keys.append(key)
            if match.group("kind") in ("lora_A", "lora_down"):
                entry.down = tensor
            else:
                entry.up = tensor
        elif match := _ALPHA_KEY.match(bare):
            entry = modules.setdefault(diffusers_module_name(match.group("module")), LoraWeights())
            entry.alpha = float(tensor)
            entry.keys.append(key)
        else:
            not_lora.append(key)
    return modules, not_lora


def _peft_config(path: Path, file: Path) -> dict | None:
    """The peft ``LoraConfig`` saved with the weights: ``adapter_config.json`` beside them, or the
    ``lora_adapter_metadata`` diffusers writes into the safetensors header."""
    cfg_path = (path if path.is_dir() else path.parent) / ADAPTER_CONFIG
    if cfg_path.is_file():
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    raw = file_metadata(file).get(DIFFUSERS_METADATA)
    if raw:
        return {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    return None


def _fill_alphas(config: dict | None, modules: dict[str, LoraWeights]) -> None:
    """Alphas the file does not carry come from its peft config (lora_alpha / alpha_pattern), else alpha = r."""
    if config is None:
        return
    pattern = config.get("alpha_pattern") or {}
    for name, weights in modules.items():
        if weights.alpha is None and weights.down is not None:
            hit = next((v for k, v in pattern.items() if re.fullmatch(rf"(.*\.)?{k}", name)), None)
            weights.alpha = float(hit if hit is not None else config.get("lora_alpha", weights.down.shape[0]))


def _check_against(
    transformer: nn.Module,
    modules: dict[str, LoraWeights],
    not_lora: list[str],
    source: Path,
    spec: ModelSpec,
) -> tuple[dict[str, LoraWeights], list[str]]:
    """Split modules into those that fit the transformer and the names that match nothing."""
    targets = dict(transformer.named_modules())
    fitting: dict[str, LoraWeights] = {}
    unmatched = list(not_lora)
    for name, w in modules.items():
        module = targets.get(name)
        if not isinstance(module, nn.Linear):
            unmatched.extend(w.keys)
            continue
        if w.down is None or w.up is None:
            raise AdapterError(f"adapter {source}: module {name} has only one of its two LoRA matrices")
        rank = w.down.shape[0]
        if w.down.shape != (rank, module.in_features) or w.up.shape != (module.out_features, rank):
            raise AdapterError(
                f"adapter {source} does not fit {spec.id}: {name} is {module.in_features}->{module.out_features} "
                f"but the LoRA is {tuple(w.down.shape)} / {tuple(w.up.shape)}; it was made for another base"
            )
        fitting[name] = w
    return fitting, unmatched


def _inject(transformer: nn.Module, modules: dict[str, LoraWeights], adapter_name: str) -> None:
    ranks = {name: w.down.shape[0] for name, w in modules.items()}
    alphas = {name: w.alpha if w.alpha is not None else float(ranks[name]) for name, w in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={n: r for n, r in ranks.items() if r != rank},
        alpha_pattern={n: a for n, a in alphas.items() if a != alpha},
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    dtype = next(transformer.parameters()).dtype
    state = {}
    for name, w in modules.items():
        state[f"{name}.lora_A.weight"] = w.down.to(dtype)
        state[f"{name}.lora_B.weight"] = w.up.to(dtype)
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise AdapterError(f"peft did not place {result.unexpected_keys[:5]} (adapter {adapter_name})")


def is_pose_key(key: str) -> bool:
    """A pose encoder weight (``dwpose_embedding.<i>.*`` under any prefix), not a LoRA weight."""
    return f"{POSE_KEY}." in key


def _pose_encoder(transformers: list[nn.Module], state_dict: dict[str, Tensor], file: Path) -> PoseEncoder:
    """A pose encoder for ``transformers`` holding the file's pose weights, loaded strictly."""
    widths = {t.patch_embedding.out_channels for t in transformers}
    if len(widths) != 1:
        raise AdapterError(f"{file}: the transformers have different widths {sorted(widths)}; load per expert")
    encoder = PoseEncoder(widths.pop())
    try:
        load_pose_encoder(encoder, {k: v for k, v in state_dict.items() if is_pose_key(k)})
    except ValueError as err:
        raise AdapterError(f"adapter {file}: {err}") from None
    return encoder


def load_adapter(
    model: WanModel,
    path: str | Path,
    expert: str | None = None,
    adapter_name: str | None = None,
    ignore_unmatched: bool = False,
) -> AdapterMeta | None:
    """Load an adapter directory or LoRA file into the model's transformer(s).

    Args:
        expert: for Wan 2.2 A14B, the expert to load into (``high_noise`` / ``low_noise``); defaults to
            the expert named in ``svi.json``, else both (a LoRA shared by the two experts).
        ignore_unmatched: load what matches and skip keys that match no module, instead of refusing.

    A file with pose encoder weights (``dwpose_embedding.*``, SVI-Dance) also attaches a
    :class:`~svi_infer.pose.PoseEncoder` holding them to the transformer(s) loaded into (one encoder, shared;
    float32 like the reference); condition it with :func:`svi_infer.pose.set_pose`.

    A split Wan 2.2 A14B directory (``high_noise/`` and/or ``low_noise/``, :func:`expert_dirs`) loads each
    sub-directory into its expert (only ``expert``'s with ``expert`` given); refused for one-transformer bases.

    Returns:
        The adapter's ``svi.json`` contents (a split directory: its first sub-directory's), or None for a bare file.
    """
    path = Path(path).expanduser()
    spec = model.spec
    split = expert_dirs(path, spec)
    if split:
        if expert is not None and expert not in split:
            raise AdapterError(f"adapter {path} holds no {expert}/ sub-directory (it has {', '.join(split)})")
        metas = [
            load_adapter(model, sub, expert=name, adapter_name=adapter_name, ignore_unmatched=ignore_unmatched)
            for name, sub in split.items()
            if expert is None or name == expert
        ]
        return metas[0]
    meta = read_meta(path)
    if meta is not None:
        meta.check_base(spec, path)
        if expert is not None and meta.expert is not None and expert != meta.expert:
            raise AdapterError(f"adapter {path} is for the {meta.expert} expert, not {expert}")
        expert = expert or meta.expert
    if expert is not None and expert not in spec.experts:
        raise AdapterError(f"{spec.id} has no expert {expert!r} (its experts: {', '.join(spec.experts)})")
    file = weights_file(path)
    try:
        state_dict = load_file(str(file))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise AdapterError(f"cannot read LoRA file {file}: {err}") from None
    modules, not_lora = parse_lora_state_dict(state_dict)
    pose_keys = [k for k in not_lora if is_pose_key(k)]
    not_lora = [k for k in not_lora if not is_pose_key(k)]
    _fill_alphas(_peft_config(path, file), modules)
    indices = [spec.experts.index(expert)] if expert else range(len(spec.experts))
    targets = [model.transformers[i] for i in indices]
    name = adapter_name or _free_name(targets, re.sub(r"\W", "_", path.stem if path.is_file() else path.name))
    pose = _pose_encoder(targets, state_dict, file) if pose_keys else None  # checked before any change
    for transformer in targets:
        fitting, unmatched = _check_against(transformer, modules, not_lora, path, spec)
        if unmatched and not ignore_unmatched:
            shown = ", ".join(unmatched[:12]) + (f" (+{len(unmatched) - 12} more)" if len(unmatched) > 12 else "")
            raise AdapterError(
                f"{len(unmatched)} entries of {file} match no module of the {spec.id} transformer: {shown}. "
                "Is it an adapter for another base? Set adapter.ignore_unmatched=true to load the rest anyway."
            )
        if not fitting:
            raise AdapterError(f"{file} holds no LoRA weight for any module of {spec.id}")
        _inject(transformer, fitting, name)
    for transformer in targets if pose is not None else ():
        attach_pose(transformer, pose)
    return meta


def set_strength(model: WanModel, strength: float) -> None:
    """Scale every loaded adapter (SVI's test-time ``lora_alpha``; keep 1.0 for SVI adapters)."""
    for transformer in model.transformers:
        names = list(getattr(transformer, "peft_config", {}) or {})
        if names:
            transformer.set_adapters(names, weights=[strength] * len(names))


def save_adapter(
    transformer: nn.Module,
    directory: str | Path,
    meta: AdapterMeta,
    adapter_name: str = "default",
    weights: dict[str, Tensor] | None = None,
) -> Path:
    """Write an adapter directory atomically (a temporary sibling directory renamed into place).

    ``weights`` (peft keys) replaces reading them from ``transformer``, for weights gathered from shards. Read
    from ``transformer``, an attached pose encoder's weights are saved beside the LoRA (``dwpose_embedding.*``);
    ``weights`` must then hold them itself (``svi_train.strategies.lora_state_dict`` does).
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        if weights is None:
            weights = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
            if find_pose_encoder(transformer) is not None:
                weights = {**weights, **pose_state_dict(transformer)}
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        transformer.peft_config[adapter_name].save_pretrained(str(tmp))
        record = {"format": META_FORMAT, "base": meta.base, "expert": meta.expert, "variant": meta.variant}
        record |= {"defaults": meta.defaults, "provenance": meta.provenance}
        (tmp / SVI_META).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return directory


def lora_modules(transformer: nn.Module) -> list[str]:
    """Names of the modules carrying a LoRA (for reports and tests)."""
    return sorted({k.rsplit(".lora_A", 1)[0] for k, _ in transformer.named_parameters() if ".lora_A." in k})
