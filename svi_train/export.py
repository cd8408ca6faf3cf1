"""``python -m svi_train.export SOURCE --format peft|diffusers|comfyui --output DEST``: convert a trained adapter.

SOURCE is an adapter directory (what training exports) or a Lightning checkpoint (``.ckpt``; a DeepSpeed
checkpoint directory is consolidated first). Formats:

* ``peft``: an adapter directory (``adapter_model.safetensors`` + ``adapter_config.json`` + ``svi.json``);
* ``diffusers``: ``pytorch_lora_weights.safetensors`` with ``transformer.`` keys and the LoRA config as
  metadata (so alpha survives; diffusers' ``load_lora_weights`` reads it);
* ``comfyui``: one ``.safetensors`` with ``diffusion_model.`` + Wan's original module names,
  ``lora_A`` / ``lora_B`` and a ``.alpha`` per module.

Wan 2.2 A14B runs that train a LoRA per expert export one adapter per expert, split as SVI ships them: SOURCE is
then the run's adapter directory holding ``high_noise/`` and ``low_noise/`` (or its checkpoint), and the output
is ``DEST/high_noise`` + ``DEST/low_noise`` (peft, diffusers) or ``<DEST stem>_high_noise.safetensors`` +
``<DEST stem>_low_noise.safetensors`` (comfyui). svi_infer takes either (``adapter.path=DEST``, or
``adapter.high_noise=... adapter.low_noise=...``).

A Dance adapter's pose encoder (``dwpose_embedding.<i>.weight`` / ``.bias``, unprefixed) goes into every format in a
file of its own beside the LoRA, so that the LoRA file loads in diffusers (``load_lora_weights`` refuses non-LoRA
keys) and ComfyUI: ``pose_encoder.safetensors`` in the ``peft`` and ``diffusers`` directories,
``<DEST stem>.pose_encoder.safetensors`` beside the ``comfyui`` file. ``svi_infer.adapters.load_adapter`` reads it
back from each (and SVI's ``svi-dance.safetensors``, which holds it inside the LoRA file).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from svi_infer.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    POSE_WEIGHTS,
    SVI_META,
    AdapterError,
    pose_sibling,
    pose_weights_file,
)
from svi_infer.atomic import atomic_dir, atomic_path
from svi_infer.errors import USER_ERRORS, exit_with
from svi_infer.spec import HIGH_NOISE, LOW_NOISE
from svi_train.checkpoints import check_checkpoint

if TYPE_CHECKING:
    from torch import Tensor

FORMATS = ("peft", "diffusers", "comfyui")
CHECKPOINT_KEY = "svi_adapter"  # what SVILitModule stores in its checkpoints beside the weights
EXPERTS = (HIGH_NOISE, LOW_NOISE)


def _alpha_for(name: str, config: dict) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", name):
            return float(alpha)
    return float(config["lora_alpha"])


Adapter = tuple[dict[str, "Tensor"], dict, dict]  # weights with peft keys, LoraConfig dict, svi.json dict


def _read_directory(source: Path) -> Adapter:
    from safetensors.torch import load_file

    weights = load_file(str(source / ADAPTER_WEIGHTS))
    if (source / POSE_WEIGHTS).is_file():  # a Dance adapter's pose encoder (older ones hold it in the LoRA file)
        weights |= load_file(str(source / POSE_WEIGHTS))
    config = json.loads((source / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    meta = json.loads((source / SVI_META).read_text(encoding="utf-8"))
    return weights, config, meta


def read_adapters(source: str | Path) -> dict[str | None, Adapter]:
    """The adapters of an adapter dir, a per-expert (split) adapter dir or a checkpoint, by the expert each is for
    (None: a one-expert base, or a LoRA shared by both experts)."""
    source = Path(source).expanduser()
    if not source.is_dir():  # a missing file, a png or a truncated .ckpt is named before torch loads
        check_checkpoint(source, "SOURCE (an adapter directory or a checkpoint)")
    import torch  # torch, safetensors, peft and diffusers load only once SOURCE is known good: seconds saved

    from svi_infer.adapters import is_pose_key

    if source.is_dir() and (source / ADAPTER_WEIGHTS).is_file():
        adapter = _read_directory(source)
        return {adapter[2].get("expert"): adapter}
    split = {e: source / e for e in EXPERTS if (source / e / ADAPTER_WEIGHTS).is_file()}
    if source.is_dir() and split:
        return {e: _read_directory(path) for e, path in split.items()}
    if source.is_dir():  # a DeepSpeed checkpoint directory
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(str(source), f"{tmp}/consolidated.ckpt")
            checkpoint = torch.load(f"{tmp}/consolidated.ckpt", map_location="cpu", weights_only=True)
    else:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    if CHECKPOINT_KEY not in checkpoint:
        raise AdapterError(f"{source} is not a checkpoint written by svi_train (no {CHECKPOINT_KEY!r} entry)")
    info = checkpoint[CHECKPOINT_KEY]
    name = info["adapter_name"]
    out = {}
    for target in info.get("adapters", [{"expert": None, "prefix": "transformer"}]):  # older: one, "transformer."
        prefix = target["prefix"] + "."
        weights = {
            k.removeprefix(prefix).replace(f".{name}.", "."): v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(prefix) and (".lora_" in k or is_pose_key(k))
        }
        out[target["expert"]] = (weights, info["lora_config"], {**info["meta"], "expert": target["expert"]})
    return out


def split_output(output: Path, fmt: str, expert: str | None) -> Path:
    """Where the adapter of ``expert`` goes: ``output`` itself for an adapter of all experts, else
    ``output/<expert>`` (peft, diffusers) or ``<output stem>_<expert>.safetensors`` (comfyui, SVI's naming)."""
    if expert is None:
        return output
    if fmt == "comfyui":
        return output.with_name(f"{output.stem}_{expert}{output.suffix or '.safetensors'}")
    return output / expert


def to_comfyui(weights: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """``diffusion_model.<original name>.lora_A/lora_B.weight`` + ``.alpha`` per module (LoRA weights only: the
    pose encoder goes to its own file)."""
    import torch

    from svi_infer.adapters import original_module_name

    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        module, tail = key.rsplit(".lora_", 1)
        name = original_module_name(module)
        out[f"diffusion_model.{name}.lora_{tail}"] = value
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(_alpha_for(module, config))
    return out


def export(source: str | Path, fmt: str, output: str | Path) -> list[Path]:
    """Convert ``source`` to ``fmt`` at ``output`` (a directory for peft/diffusers, a file for comfyui); an adapter
    per expert goes where :func:`split_output` says. Returns the paths written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    output = Path(output).expanduser()
    adapters = read_adapters(source)
    return [_write(*adapters[e], fmt, split_output(output, fmt, e)) for e in sorted(adapters, key=str)]


def _write(weights: dict[str, Tensor], config: dict, meta: dict, fmt: str, output: Path) -> Path:
    from safetensors.torch import load, save_file

    from svi_infer.adapter_files import DIFFUSERS_WEIGHTS, SVI_FILE_METADATA, file_metadata
    from svi_infer.adapters import split_pose

    weights, pose = split_pose(weights)  # the pose encoder (Dance) goes to its own file: the LoRA file stays pure
    # the single files carry svi.json's record (the base they were made for) in their metadata, for svi_infer
    record = {SVI_FILE_METADATA: json.dumps(meta)}
    if fmt == "comfyui":
        sibling = pose_sibling(output)
        if pose:
            with atomic_path(sibling) as tmp:
                save_file(pose, str(tmp), metadata={"format": "pt"})
        else:  # one left by an earlier export to the same name would be loaded with this LoRA
            sibling.unlink(missing_ok=True)
        with atomic_path(output) as tmp:
            save_file(to_comfyui(weights, config), str(tmp), metadata=record)
        return output
    with atomic_dir(output) as tmp:
        if pose:
            save_file(pose, str(tmp / POSE_WEIGHTS), metadata={"format": "pt"})
        if fmt == "peft":
            from peft import LoraConfig

            save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}).save_pretrained(
                str(tmp)
            )
        else:
            from diffusers import WanImageToVideoPipeline

            WanImageToVideoPipeline.save_lora_weights(
                str(tmp), transformer_lora_layers=weights, transformer_lora_adapter_metadata=config
            )
            file = tmp / DIFFUSERS_WEIGHTS  # diffusers takes no extra metadata: re-save it with ours beside its own
            save_file(load(file.read_bytes()), str(file), metadata={**file_metadata(file), **record})
        (tmp / SVI_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m svi_train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="adapter directory, Lightning .ckpt, or DeepSpeed checkpoint directory")
    parser.add_argument("--format", choices=FORMATS, default="comfyui")
    parser.add_argument("--output", required=True, help="directory (peft, diffusers) or .safetensors file (comfyui)")
    args = parser.parse_args(argv)
    try:
        paths = export(args.source, args.format, args.output)
    except USER_ERRORS as err:
        exit_with("svi_train.export", err, 2)
    for path in paths:
        print(f"{args.format}: {path}")
        pose = pose_weights_file(path)
        if pose is not None:
            print(f"pose encoder: {pose}")


if __name__ == "__main__":
    main()
