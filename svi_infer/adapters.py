"""LoRA adapters: the project's adapter directory, and official SVI / ComfyUI / diffusers / kohya LoRA files.

An adapter directory holds ``adapter_model.safetensors`` (peft keys on diffusers module names),
``adapter_config.json`` (the peft ``LoraConfig``) and ``svi.json`` (base spec, expert, the variant's
inference defaults, provenance). Inference needs nothing else. For Wan 2.2 A14B a *split* adapter directory holds
no weights of its own but ``high_noise/`` and/or ``low_noise/`` sub-directories, each a normal adapter (or a
diffusers export) loaded into its expert (:func:`expert_dirs`). The layout and the record of the base (``svi.json``,
or the ``"svi"`` safetensors metadata of an exported file) are read torch-free by :mod:`svi_infer.adapter_files`.

Single files are read in the formats found in the wild (reference/peers.md §4): peft/diffusers names
(optionally ``transformer.``-prefixed), Wan's original names with peft's ``.default`` segment (optionally
``pipe.dit.``-prefixed, as SVI ships them), ComfyUI's ``diffusion_model.`` + ``lora_A/lora_B`` or
``lora_down/lora_up`` + ``.alpha``, and kohya / musubi-tuner's ``lora_unet_<name with _ for .>`` +
``lora_down/lora_up`` + ``.alpha`` (the underscore name is resolved against the known Wan and diffusers module
names, never split blindly). A LoRA scales by ``alpha / rank`` (alpha = rank when the file gives none).
Loading is strict: a key that matches no module is reported by name.

Full-weight deltas (LightX2V and its kind: ``<module>.diff`` for the weight, ``<module>.diff_b`` for the bias, any
prefix and naming above, on any module with that parameter: linear layers, norms, the patch embedding) are not
LoRA and peft cannot hold them: :func:`load_adapter` adds them to the base parameters themselves, at strength 1
(W += diff, b += diff_b), and records the parameter's value from before plus each adapter's delta on the
transformer. :func:`set_strength` then recomputes W = W_before + strength * diff for every recorded parameter (it
never adds on top of what was added), so a delta is applied once, scales with the peft LoRA of the same file,
and strength 0 gives back the base weights exactly. The record costs a CPU copy of each changed parameter and its
delta (small for LightX2V files: norms, biases, the head). Deltas are not written back by :func:`save_adapter`.

SVI-Dance adapters also carry the trained pose encoder (``dwpose_embedding.<i>.weight`` / ``.bias``): written by
this project beside the LoRA (``pose_encoder.safetensors`` in an adapter directory or diffusers export,
``<stem>.pose_encoder.safetensors`` beside a single file, :func:`~svi_infer.adapter_files.pose_weights_file`),
so that the LoRA file loads in diffusers and ComfyUI; SVI's ``svi-dance.safetensors`` and UniAnimate-DiT hold it
inside the LoRA file (under any prefix), which is read too. Loading one attaches a
:class:`~svi_infer.pose.PoseEncoder` to the transformer(s) with exactly those weights.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
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
    POSE_WEIGHTS,
    SVI_FILE_METADATA,
    SVI_META,
    AdapterError,
    AdapterMeta,
    expert_dirs,
    file_metadata,
    pose_sibling,
    pose_weights_file,
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
_DIFF_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>diff|diff_b)$")
_KOHYA_PREFIX = "lora_unet_"
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
# modules that only full-weight deltas (``.diff``) reach; Wan's norm3 (the cross-attention norm) is diffusers' norm2
# (diffusers' own norm3 has no weights, so no file names it)
_BLOCK_NORMS = {
    "norm3": "norm2",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
}
_TOP_NORMS = {
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_ALL_BLOCK_NAMES = {**_BLOCK_NAMES, **_BLOCK_NORMS}
_ALL_TOP_NAMES = {**_TOP_NAMES, **_TOP_NORMS}
# kohya's underscore names -> dotted names, for every known module in either naming
_KOHYA_BLOCK = {n.replace(".", "_"): n for n in (*_ALL_BLOCK_NAMES, *_ALL_BLOCK_NAMES.values())}
_KOHYA_TOP = {n.replace(".", "_"): n for n in (*_ALL_TOP_NAMES, *_ALL_TOP_NAMES.values(), "patch_embedding")}


@dataclass
class LoraWeights:
    """One module's LoRA: ``down`` [r, in], ``up`` [out, r] and the alpha the file gives (None: alpha = r)."""

    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    diff: Tensor | None = None  # a full weight delta (``.diff``), added to the weight
    diff_b: Tensor | None = None  # a bias delta (``.diff_b``), added to the bias
    keys: list[str] = field(default_factory=list)  # the file's own key names, for error messages

    @property
    def is_lora(self) -> bool:
        """Whether it has a LoRA part (an alpha alone counts: it asks for matrices that are missing)."""
        return self.down is not None or self.up is not None or (self.alpha is not None and not self.has_delta)

    @property
    def has_delta(self) -> bool:
        return self.diff is not None or self.diff_b is not None


def _free_name(transformers: list[nn.Module], name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... if a transformer already has an adapter of that name."""
    taken = set().union(*(set(getattr(t, "peft_config", None) or {}) | _delta_adapters(t) for t in transformers))
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
    if name in _ALL_TOP_NAMES:
        return _ALL_TOP_NAMES[name]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in _ALL_BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{_ALL_BLOCK_NAMES[match.group(2)]}"
    return name


def kohya_module_name(name: str) -> str | None:
    """The dotted module name of a kohya / musubi-tuner name (``blocks_0_self_attn_q``, ``lora_unet_`` removed).

    Underscores are ambiguous (``self_attn_q`` vs ``k_img``), so the name is looked up among the known Wan and
    diffusers module names instead of split; None if it is none of them."""
    match = re.fullmatch(r"blocks_(\d+)_(.+)", name)
    if match:
        inner = _KOHYA_BLOCK.get(match.group(2))
        return f"blocks.{match.group(1)}.{inner}" if inner else None
    return _KOHYA_TOP.get(name)


def _module_name(raw: str) -> str:
    """The diffusers module name of a key's module part, in any supported naming (unknown names pass through,
    to be reported as unmatched)."""
    if raw.startswith(_KOHYA_PREFIX):
        raw = kohya_module_name(raw[len(_KOHYA_PREFIX) :]) or raw
    return diffusers_module_name(raw)


def parse_lora_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, LoraWeights], list[str]]:
    """Group a LoRA state dict of any supported format by diffusers module name.

    Returns the per-module weights (LoRA matrices, alpha, ``diff`` / ``diff_b`` deltas) and the keys that are none
    of these (pose encoder weights among them).
    """
    modules: dict[str, LoraWeights] = {}
    not_lora: list[str] = []
    for key, tensor in state_dict.items():
        bare = _strip_prefixes(key)
        if match := _LORA_KEY.match(bare):
            entry = modules.setdefault(_module_name(match.group("module")), LoraWeights())
            entry.keys.append(key)
            if match.group("kind") in ("lora_A", "lora_down"):
                entry.down = tensor
            else:
                entry.up = tensor
        elif match := _ALPHA_KEY.match(bare):
            entry = modules.setdefault(_module_name(match.group("module")), LoraWeights())
            entry.alpha = float(tensor)
            entry.keys.append(key)
        elif match := _DIFF_KEY.match(bare):
            entry = modules.setdefault(_module_name(match.group("module")), LoraWeights())
            setattr(entry, match.group("kind"), tensor)
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
    """Split modules into those that fit the transformer and the keys that match nothing."""
    targets = dict(transformer.named_modules())
    fitting: dict[str, LoraWeights] = {}
    unmatched = list(not_lora)
    for name, w in modules.items():
        module = targets.get(name)
        base = getattr(module, "base_layer", module)  # a module another adapter already wrapped
        if module is None or (w.is_lora and not isinstance(base, nn.Linear)):
            unmatched.extend(w.keys)
            continue
        if w.is_lora:
            if w.down is None or w.up is None:
                raise AdapterError(f"adapter {source}: module {name} has only one of its two LoRA matrices")
            rank = w.down.shape[0]
            if w.down.shape != (rank, base.in_features) or w.up.shape != (base.out_features, rank):
                raise AdapterError(
                    f"adapter {source} does not fit {spec.id}: {name} is {base.in_features}->{base.out_features} "
                    f"but the LoRA is {tuple(w.down.shape)} / {tuple(w.up.shape)}; it was made for another base"
                )
        for kind, attr in (("weight", "diff"), ("bias", "diff_b")):
            param, delta = getattr(base, kind, None), getattr(w, attr)
            if delta is None:
                continue
            if not isinstance(param, nn.Parameter):  # e.g. a norm without affine weights: skip it
                unmatched.extend(k for k in w.keys if k.endswith(f".{attr}"))
                w = replace(w, **{attr: None})
            elif param.shape != delta.shape:
                raise AdapterError(
                    f"adapter {source} does not fit {spec.id}: {name}.{kind} is {tuple(param.shape)} but its delta is "
                    f"{tuple(delta.shape)}; it was made for another base"
                )
        if w.is_lora or w.has_delta:
            fitting[name] = w
    return fitting, unmatched


@dataclass
class _Delta:
    """A base parameter changed by full-weight deltas: its value before them, and each adapter's delta and strength."""

    param: nn.Parameter
    before: Tensor
    deltas: dict[str, Tensor] = field(default_factory=dict)
    strengths: dict[str, float] = field(default_factory=dict)

    def apply(self) -> None:
        """param = before + sum(strength * delta), computed in float32 from the saved value (never accumulated)."""
        device = self.param.device
        total = self.before.to(device, torch.float32)
        for adapter, delta in self.deltas.items():
            total = total + self.strengths[adapter] * delta.to(device, torch.float32)
        with torch.no_grad():
            self.param.copy_(total.to(self.param.dtype))


_DELTAS = "_svi_weight_deltas"  # the transformer attribute holding {parameter name: _Delta}


def _deltas(transformer: nn.Module) -> dict[str, _Delta]:
    return transformer.__dict__.setdefault(_DELTAS, {})


def _delta_adapters(transformer: nn.Module) -> set[str]:
    return {a for d in transformer.__dict__.get(_DELTAS, {}).values() for a in d.deltas}


def _apply_deltas(transformer: nn.Module, modules: dict[str, LoraWeights], adapter_name: str) -> None:
    """Add the ``diff`` / ``diff_b`` deltas to the base parameters at strength 1, recorded for :func:`set_strength`."""
    targets = dict(transformer.named_modules())
    registry = _deltas(transformer)
    for name, w in modules.items():
        base = getattr(targets[name], "base_layer", targets[name])
        for kind, delta in (("weight", w.diff), ("bias", w.diff_b)):
            if delta is None:
                continue
            param = getattr(base, kind)
            entry = registry.get(f"{name}.{kind}")
            if entry is None:
                # the value before any delta, kept on the CPU: set_strength recomputes from it
                entry = registry[f"{name}.{kind}"] = _Delta(param, param.detach().to("cpu", copy=True))
            entry.deltas[adapter_name] = delta.detach().to(torch.float32).clone()
            entry.strengths[adapter_name] = 1.0
            entry.apply()


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


def split_pose(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The LoRA weights and the pose encoder weights (``dwpose_embedding.*``) of a state dict, as contiguous CPU
    tensors ready to save, each to its own file."""
    lora, pose = {}, {}
    for key, value in weights.items():
        (pose if is_pose_key(key) else lora)[key] = value.detach().contiguous().cpu()
    return lora, pose


def _pose_encoder(transformers: list[nn.Module], source: dict[str, Tensor] | Path, file: Path) -> PoseEncoder:
    """A pose encoder for ``transformers`` holding the pose weights of ``source`` (a state dict, or the pose
    encoder file beside ``file``), loaded strictly."""
    widths = {t.patch_embedding.out_channels for t in transformers}
    if len(widths) != 1:
        raise AdapterError(f"{file}: the transformers have different widths {sorted(widths)}; load per expert")
    encoder = PoseEncoder(widths.pop())
    try:
        load_pose_encoder(encoder, source)
    except (ValueError, OSError) as err:
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

    ``diff`` / ``diff_b`` deltas are added to the base parameters at strength 1 (see the module docstring).

    Pose encoder weights (``dwpose_embedding.*``, SVI-Dance), in the LoRA file or in the pose encoder file beside
    it (:func:`~svi_infer.adapter_files.pose_weights_file`), also attach a :class:`~svi_infer.pose.PoseEncoder`
    holding them to the transformer(s) loaded into (one encoder, shared; float32 like the reference); condition it
    with :func:`svi_infer.pose.set_pose`.

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
    pose_file = pose_weights_file(path)
    if pose_file is not None and pose_keys:
        raise AdapterError(f"{file} holds a pose encoder and so does {pose_file} beside it; remove one of them")
    pose_source = pose_file or {k: state_dict[k] for k in pose_keys}
    pose = _pose_encoder(targets, pose_source, file) if pose_source else None  # checked before any change
    checked = []
    for transformer in targets:
        fitting, unmatched = _check_against(transformer, modules, not_lora, path, spec)
        if unmatched and not ignore_unmatched:
            shown = ", ".join(unmatched[:12]) + (f" (+{len(unmatched) - 12} more)" if len(unmatched) > 12 else "")
            raise AdapterError(
                f"{len(unmatched)} entries of {file} match no module of the {spec.id} transformer: {shown}. "
                "Is it an adapter for another base? Set adapter.ignore_unmatched=true to load the rest anyway."
            )
        if not fitting:
            raise AdapterError(f"{file} holds no LoRA weight or weight delta for any module of {spec.id}")
        checked.append(fitting)
    for transformer, fitting in zip(targets, checked, strict=True):
        lora = {n: w for n, w in fitting.items() if w.is_lora}
        if lora:
            _inject(transformer, lora, name)
        _apply_deltas(transformer, {n: w for n, w in fitting.items() if w.has_delta}, name)
    for transformer in targets if pose is not None else ():
        attach_pose(transformer, pose)
    return meta


def set_strength(model: WanModel, strength: float, per_adapter: Mapping[str, float] | None = None) -> None:
    """Scale every loaded adapter (SVI's test-time ``lora_alpha``; keep 1.0 for SVI adapters): the peft LoRAs'
    scale, and the ``diff`` / ``diff_b`` deltas recomputed from the parameters' values before them.
    ``per_adapter``: strengths of named adapters (stacked ones, e.g. a step-distill LoRA), the rest ``strength``."""
    chosen = dict(per_adapter or {})
    for transformer in model.transformers:
        names = list(getattr(transformer, "peft_config", {}) or {})
        if names:
            transformer.set_adapters(names, weights=[chosen.get(n, strength) for n in names])
        for entry in transformer.__dict__.get(_DELTAS, {}).values():
            entry.strengths = {n: chosen.get(n, strength) for n in entry.deltas}
            entry.apply()


def save_adapter(
    transformer: nn.Module,
    directory: str | Path,
    meta: AdapterMeta,
    adapter_name: str = "default",
    weights: dict[str, Tensor] | None = None,
) -> Path:
    """Write an adapter directory atomically (a temporary sibling directory renamed into place).

    ``weights`` (peft keys) replaces reading them from ``transformer``, for weights gathered from shards. Read
    from ``transformer``, an attached pose encoder's weights are saved too; ``weights`` must then hold them itself
    (``svi_train.strategies.lora_state_dict`` does). They go to their own file, ``pose_encoder.safetensors``
    (``dwpose_embedding.*`` keys), so that ``adapter_model.safetensors`` holds nothing but the LoRA.
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        if weights is None:
            weights = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
            if find_pose_encoder(transformer) is not None:
                weights = {**weights, **pose_state_dict(transformer)}
        lora, pose = split_pose(weights)
        save_file(lora, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if pose:
            save_file(pose, str(tmp / POSE_WEIGHTS), metadata={"format": "pt"})
        transformer.peft_config[adapter_name].save_pretrained(str(tmp))
        record = {"format": META_FORMAT, "base": meta.base, "expert": meta.expert, "variant": meta.variant}
        record |= {"defaults": meta.defaults, "provenance": meta.provenance}
        (tmp / SVI_META).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return directory


def lora_modules(transformer: nn.Module) -> list[str]:
    """Names of the modules carrying a LoRA (for reports and tests)."""
    return sorted({k.rsplit(".lora_A", 1)[0] for k, _ in transformer.named_parameters() if ".lora_A." in k})
