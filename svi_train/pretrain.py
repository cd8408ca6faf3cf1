"""Pretrain a base image-to-video DiT from scratch: plain flow matching on prepared shards, no LoRA, no recycling.

This is how the toy world's base model is made (README, "The toy world"); it trains the whole transformer of a
one-transformer spec without a CLIP branch on the shards of ``python -m data_tools prepare`` (prepared with
``ref_pad_num=0``: y = the first frame's latent then zeros, Wan I2V's own conditioning). Two commands:

    python -m svi_train.pretrain init OUTPUT --spec toy-wan2.1-i2v --vae VAE_FOLDER
        a model folder (diffusers layout) with a seeded random DiT, the spec's tiny text encoder and the given VAE:
        what ``data_tools prepare model.path=OUTPUT`` encodes with
    python -m svi_train.pretrain train DATASET INIT_FOLDER OUTPUT --spec toy-wan2.1-i2v [--minutes 40]
        trains INIT_FOLDER's transformer on DATASET's shards and writes the model folder OUTPUT with the EMA
        weights, plus SHA256SUMS (check it with ``sha256sum -c SHA256SUMS``)

Text is dropped (the empty prompt's embedding) for 10% of the samples, so classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from svi_infer.conditioning import first_frames_mask, with_mask
from svi_infer.flow import add_noise, velocity_target
from svi_infer.model import _pipeline, build_model
from svi_infer.spec import ModelSpec, get_spec

STORE_DTYPE = torch.bfloat16  # the committed transformer (halves the file; it is loaded in the run's dtype)


def _save_atomic(pipe, output: Path, transformer_dtype: torch.dtype | None = None) -> None:
    """Write ``pipe`` in diffusers layout to ``output`` (temporary folder, then rename), with SHA256SUMS."""
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if transformer_dtype is not None:
        pipe.transformer.to(transformer_dtype)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if transformer_dtype is not None:
        pipe.transformer.float()
    sums = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(tmp).as_posix()}\n"
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    ]
    (tmp / "SHA256SUMS").write_text("".join(sums), encoding="utf-8")
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


def caption_words(folder: Path) -> tuple[str, ...]:
    """The words of the ``*.txt`` captions under ``folder``, in first-seen order."""
    words: dict[str, None] = {}
    for path in sorted(folder.rglob("*.txt")):
        words.update(dict.fromkeys(re.findall(r"[a-z]+", path.read_text(encoding="utf-8").lower())))
    return tuple(words)


def init_folder(spec: ModelSpec, vae_folder: Path, output: Path, seed: int = 0, words: tuple[str, ...] = ()) -> Path:
    """A starting model folder: seeded random DiT, the spec's tiny text encoder and a tokenizer with a piece for each
    of ``words`` (the captions' words), the trained VAE."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from svi_infer import tiny

    torch.manual_seed(seed)
    tokenizer = tiny.tiny_tokenizer(words)
    pipe = _pipeline(
        spec,
        tokenizer=tokenizer,
        text_encoder=tiny.tiny_text_encoder(spec, len(tokenizer)),
        vae=AutoencoderKLWan.from_pretrained(vae_folder),
        image_encoder=None,
        image_processor=None,
        transformer=WanTransformer3DModel(**spec.transformer_config()),
        transformer_2=None,
    )
    _save_atomic(pipe, output)
    return output


def _batches(dataset: Path, batch_size: int, seed: int, text_len: int):
    """Endless shuffled batches of the shards (bad samples skipped and counted, as in training)."""
    from svi_train.config import DataConfig
    from svi_train.data import WdsDataModule

    index = json.loads((dataset / "index.json").read_text(encoding="utf-8"))
    shards = [str(dataset / "shards" / s["name"]) for s in index["shards"]]
    epoch = 0
    while True:
        config = DataConfig(path=str(dataset), batch_size=batch_size, shuffle_buffer=512)
        yield from WdsDataModule(config, shards, seed=seed + epoch, text_len=text_len).pipeline()
        epoch += 1


def train(
    dataset: Path,
    init: Path,
    output: Path,
    spec: ModelSpec,
    minutes: float = 40.0,
    batch_size: int = 8,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    p_drop_text: float = 0.1,
) -> dict:
    """Flow matching on the shards for ``minutes`` (warm-up, then cosine learning rate); write OUTPUT with EMA."""
    from svi_train.recycling.timesteps import TimestepSampler

    torch.manual_seed(seed)
    model = build_model(spec, init)
    transformer = model.transformers[0].float().train().requires_grad_(True)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    empty = model.encode_text([""])[0]
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    sampler = TimestepSampler(shift=spec.shift)
    g = torch.Generator().manual_seed(seed)
    budget, warmup = minutes * 60.0, 200
    start, step, ema_loss = time.monotonic(), 0, None
    for batch in _batches(dataset, batch_size, seed, spec.text_len):
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            break
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x0 = batch["latents"].float()
        h, w = x0.shape[-2:]
        y = with_mask(batch["cond"][1].float(), first_frames_mask(batch["num_frames"], h, w, marked=1))
        text = batch["text"].float()
        drop = torch.rand(x0.shape[0], generator=g) < p_drop_text
        text[drop] = empty
        draw = sampler.sample(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g)
        sigma = draw.sigma.view(-1, 1, 1, 1, 1)
        x_t = add_noise(x0, noise, sigma)
        pred = transformer(
            hidden_states=torch.cat([x_t, y], dim=1),
            timestep=draw.timestep,
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
        per_sample = (pred - velocity_target(x0, noise)).pow(2).mean(dim=(1, 2, 3, 4))
        loss = (per_sample * draw.weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        step += 1
        value = loss.item()
        ema_loss = value if ema_loss is None else 0.99 * ema_loss + 0.01 * value
        if step % 250 == 0:
            print(f"step {step} ({elapsed / 60:.1f}/{minutes:g} min): loss {ema_loss:.4f}", flush=True)
    model.pipe.transformer = ema
    _save_atomic(model.pipe, output, STORE_DTYPE)
    return {"steps": step, "loss": ema_loss, "minutes": (time.monotonic() - start) / 60}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svi_train.pretrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init", help="a starting model folder (random DiT, tiny text encoder, given VAE)")
    p_init.add_argument("output", type=Path)
    p_init.add_argument("--vae", type=Path, required=True, help="AutoencoderKLWan folder (python -m svi_train.toy_vae)")
    p_init.add_argument("--captions", type=Path, help="folder of *.txt captions: each word gets a tokenizer piece")
    p_train = sub.add_parser("train", help="train the folder's transformer on prepared shards")
    p_train.add_argument("dataset", type=Path, help="data_tools prepare output (index.json, shards/)")
    p_train.add_argument("init", type=Path, help="the model folder to start from")
    p_train.add_argument("output", type=Path)
    p_train.add_argument("--minutes", type=float, default=40.0)
    p_train.add_argument("--batch-size", type=int, default=8)
    p_train.add_argument("--lr", type=float, default=1e-3)
    for p in (p_init, p_train):
        p.add_argument("--spec", default="toy-wan2.1-i2v", help="model spec id (default toy-wan2.1-i2v)")
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        spec = get_spec(args.spec)
    except ValueError as err:
        parser.error(str(err))
    if args.command == "init":
        if not (args.vae / "config.json").is_file():
            print(f"{parser.prog}: error: {args.vae} holds no AutoencoderKLWan (config.json)", file=sys.stderr)
            return 2
        words = caption_words(args.captions) if args.captions else ()
        print(f"initial model folder written to {init_folder(spec, args.vae, args.output, args.seed, words)}")
        return 0
    if not (args.dataset / "index.json").is_file():
        print(f"{parser.prog}: error: {args.dataset} has no index.json (give a data_tools output)", file=sys.stderr)
        return 2
    result = train(args.dataset, args.init, args.output, spec, args.minutes, args.batch_size, args.lr, seed=args.seed)
    print(f"base model written to {args.output}: {result['steps']} steps in {result['minutes']:.1f} min")
    print(f"pretrain_steps={result['steps']} pretrain_loss={result['loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
