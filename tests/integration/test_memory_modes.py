"""memory.* on the tiny model: float8 base weights, group offload and 8-bit AdamW, in training and in inference
(svi_infer.memory). On the CPU the offload moves are no-ops, so offloaded runs must equal plain ones exactly; what
the GPU would see is checked through the hooks' own records: which tensors they move, and which of those the
backward reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning import Callback
from peft import LoraConfig
from safetensors.torch import save_file

from svi_infer.longvideo.generator import LongVideoGenerator
from svi_infer.memory import (
    FP8,
    arrange,
    base_linears,
    lora_to_float32,
    offload_layers,
    offloaded_tensors,
    store_float8,
)
from svi_infer.model import build_model
from svi_infer.settings import GenerationSettings
from svi_infer.spec import get_spec
from svi_infer.video_io import read_video
from svi_train.config import SVI_TARGETS
from svi_train.strategies import make_optimizer
from tests.helpers import TINY21, compose_infer, dit_inputs, train_tiny

CPU = torch.device("cpu")
# float8 (e4m3: 3 mantissa bits) against bf16 weights: relative L2 error of the tiny DiT's output and of its LoRA
# gradients, measured 0.0243-0.0245 and 0.0337-0.0338 on AVX-512, AVX2 and baseline kernels; ~2.5x and ~3x room
FP8_OUTPUT_RTOL = 0.06
FP8_GRAD_RTOL = 0.1


def _with_lora(transformer: torch.nn.Module) -> torch.nn.Module:
    """``transformer`` frozen with a rank-4 SVI LoRA whose B is off zero (so the LoRA reaches the output), the
    same in every call."""
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(SVI_TARGETS)))
    lora_to_float32(transformer)
    g = torch.Generator().manual_seed(1)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data.copy_(torch.randn(param.shape, generator=g) * 0.1)  # in place: keeps the dtype given
    return transformer


def _inputs(dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if k != "timestep" and torch.is_tensor(v) else v for k, v in dit_inputs().items()}


def _forward_backward(transformer, dtype=torch.float32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = transformer(**_inputs(dtype))[0]
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    return out.detach().float(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- float8 storage ---------------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_fp8_base_stores_float8_and_keeps_the_lora_float32():
    spec = get_spec(TINY21)
    reference = _with_lora(build_model(spec, dtype=torch.bfloat16).transformers[0])
    ref_out, ref_grads = _forward_backward(reference, torch.bfloat16)

    transformer = build_model(spec, dtype=torch.bfloat16).transformers[0]
    store_float8(transformer, compute_dtype=torch.bfloat16)  # before peft, as svi_train does
    _with_lora(transformer)
    linears = base_linears(transformer)
    assert len(linears) == 2 * 12 and all(layer.weight.dtype == FP8 for layer in linears)
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 10 * 2 and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    # diffusers' skip patterns keep the patch embedding, condition embedder and norms in their dtype
    for kept in (transformer.patch_embedding, transformer.condition_embedder.text_embedder.linear_1):
        assert kept.weight.dtype == torch.bfloat16
    assert transformer.blocks[0].norm2.weight.dtype == torch.bfloat16

    out, grads = _forward_backward(transformer, torch.bfloat16)
    assert all(layer.weight.dtype == FP8 for layer in linears)  # back to float8 after the forward
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    error = _relative(out, ref_out)
    assert 1e-3 < error < FP8_OUTPUT_RTOL, error  # rounded (so float8 is used), and close
    assert set(grads) == set(ref_grads) == set(lora)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, ref_grads))
    assert _relative(flat, ref_flat) < FP8_GRAD_RTOL, _relative(flat, ref_flat)


class _Probe(Callback):
    """Records what the module holds before its first optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if hasattr(self, "optimizer"):
            return
        transformer = pl_module.transformer
        self.optimizer = type(optimizer).__name__
        self.base = {layer.weight.dtype for layer in base_linears(transformer)}
        self.hooked = sum(_group_hooked(layer) for layer in base_linears(transformer))
        lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
        self.lora = {p.dtype for p in lora}
        self.grads = {p.grad.dtype for p in lora if p.grad is not None}
        self.finite = all(torch.isfinite(p.grad).all() for p in lora if p.grad is not None)
        self.offloaded = {id(t) for t in offloaded_tensors(transformer)}
        self.lora_ids = {id(p) for p in lora}


def _group_hooked(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


def test_fp8_base_and_adamw8bit_train_end_to_end(shards, tmp_path):
    probe = _Probe()
    adapter = train_tiny(
        shards,
        tmp_path / "run",
        "trainer.max_steps=2",
        "memory.base_dtype=fp8",
        "optim.optimizer=adamw8bit",
        callbacks=[probe],
    )
    assert probe.optimizer == "AdamW8bit"
    assert probe.base == {FP8} and probe.lora == {torch.float32} and probe.grads == {torch.float32}
    assert probe.finite and probe.hooked == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}  # the LoRA only, float32
    assert json.loads((adapter / "svi.json").read_text())["provenance"]["step"] == 2


# --- group offload in training ----------------------------------------------------------------------------------


def _saved_as_themselves(transformer, tensors) -> set[str]:
    """Names of ``tensors`` that autograd saves, for the backward, as the very tensor object: a hook that moves its
    data to the CPU after the forward would hand the backward a CPU tensor on a GPU run."""
    ids = {id(t) for t in tensors}
    names = {id(p): n for n, p in transformer.named_parameters()}
    saved = set()

    def pack(t):
        if id(t) in ids:
            saved.add(names.get(id(t), "?"))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = transformer(**dit_inputs())[0]
    out.square().mean().backward()
    return saved


def test_group_offload_in_training_moves_only_base_linears_and_equals_no_offload():
    spec = get_spec(TINY21)
    reference = _with_lora(build_model(spec).transformers[0])
    reference.enable_gradient_checkpointing()
    ref_out, ref_grads = _forward_backward(reference)

    transformer = _with_lora(build_model(spec).transformers[0])
    transformer.enable_gradient_checkpointing()
    assert offload_layers(transformer, CPU) == 2 * 12  # after peft, as svi_train does (in setup)
    linears = base_linears(transformer)
    assert all(_group_hooked(layer) for layer in linears)
    moved = offloaded_tensors(transformer)
    expected = {id(t) for layer in linears for t in layer.parameters()}
    assert {id(t) for t in moved} == expected  # no LoRA weight, norm or embedding among them

    out, grads = _forward_backward(transformer)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the moves are no-ops on the CPU
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)
    # the GPU case: the backward never reads an offloaded weight itself (a linear layer saves a transposed view,
    # which keeps the GPU copy alive until its backward); seen without checkpointing, whose own saved-tensor hooks
    # would hide the blocks' saves from ours (the recompute saves the same tensors)
    transformer.disable_gradient_checkpointing()
    assert _saved_as_themselves(transformer, moved) == set()


def test_block_level_offload_would_move_the_lora_and_the_norms():
    """Why training does not use diffusers' block-level offload: the block's LoRA is among what it moves (with
    its gradients, away from the optimizer on the GPU), and the norms' weights are saved for the backward as
    themselves (the backward would find them on the CPU)."""
    transformer = _with_lora(build_model(get_spec(TINY21)).transformers[0])
    transformer.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
    moved = offloaded_tensors(transformer)
    names = {id(p): n for n, p in transformer.named_parameters()}
    assert any("lora_" in names.get(id(t), "") for t in moved)
    assert any(".norm" in name for name in _saved_as_themselves(transformer, moved))


def test_lightning_moves_leave_offloaded_layers_alone():
    """SVILitModule._apply parks the offloaded weights: a whole-module move or cast (Lightning's ``to(device)``)
    leaves them where the hooks keep them and moves the rest, the LoRA included."""
    from svi_train.config import LoraSettings, OptimSettings
    from svi_train.module import SVILitModule
    from svi_train.recycling import RecyclingConfig

    module = SVILitModule(get_spec(TINY21), None, LoraSettings(rank=4, alpha=4.0), RecyclingConfig(), OptimSettings())
    transformer = module.transformer
    offload_layers(transformer, CPU)
    module.double()  # a cast stands in for the device move: the CPU has one device
    assert {layer.weight.dtype for layer in base_linears(transformer)} == {torch.float32}
    assert {p.dtype for n, p in transformer.named_parameters() if "lora_" in n} == {torch.float64}
    assert transformer.blocks[0].norm2.weight.dtype == torch.float64


def _adapter_weights(adapter) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize("base_dtype", ["auto", "fp8"])
def test_group_offload_trains_like_no_offload(shards, tmp_path, base_dtype):
    """Two steps through ``svi_train.run`` (Lightning's moves and hooks included), with and without the offload:
    the same LoRA, to the bit (on the float8 base too, where each layer carries both hooks)."""
    probe = _Probe()
    common = ("trainer.max_steps=2", "optim.gradient_checkpointing=true", f"memory.base_dtype={base_dtype}")
    plain = _adapter_weights(train_tiny(shards, tmp_path / "plain", *common))
    group = train_tiny(shards, tmp_path / "group", *common, "memory.offload=group", callbacks=[probe])
    offloaded = _adapter_weights(group)
    assert probe.hooked == 2 * 12 and not probe.offloaded & probe.lora_ids
    assert set(plain) == set(offloaded)
    for name, weight in plain.items():
        torch.testing.assert_close(offloaded[name], weight, rtol=0, atol=0, msg=name)


# --- 8-bit AdamW ------------------------------------------------------------------------------------------------


def _toy_losses(kind: str, steps: int = 30) -> tuple[list[float], torch.optim.Optimizer]:
    """A 128x128 least-squares fit (16,384 weights: above bitsandbytes' 4,096-value threshold for 8-bit moments)."""
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(256, 128, generator=g), torch.randn(256, 128, generator=g)
    layer = torch.nn.Linear(128, 128, bias=False)
    layer.weight.data = torch.randn(128, 128, generator=g) * 0.05
    optimizer = make_optimizer(layer.parameters(), None, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, kind=kind)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, optimizer


@pytest.mark.numerics
def test_adamw8bit_is_bitsandbytes_with_8bit_state_and_descends_like_adamw():
    from bitsandbytes.optim import AdamW8bit

    reference, _ = _toy_losses("adamw")
    losses, optimizer = _toy_losses("adamw8bit")
    assert isinstance(optimizer, AdamW8bit)
    state = next(iter(optimizer.state.values()))
    for key in ("state1", "state2"):  # the two moments, a byte per value
        assert state[key].dtype == torch.uint8 and state[key].shape == (128, 128)
    assert losses[-1] < 0.5 * losses[0]
    # measured: the curves differ by at most 0.07% (relative) over the 30 steps, on native, avx2 and default kernels
    np.testing.assert_allclose(losses, reference, rtol=0.02)


# --- inference --------------------------------------------------------------------------------------------------

SMALL = dict(frames_per_clip=13, steps=2, height=48, width=80, num_clips=2)


def _video(model, image, out) -> np.ndarray:
    settings = GenerationSettings(**SMALL)
    result = LongVideoGenerator(model, settings).generate(image, ["a boat"], out, progress=False)
    return read_video(result.video)


@pytest.fixture(scope="module")
def plain_video(first_frame, tmp_path_factory) -> np.ndarray:
    torch.manual_seed(16)
    return _video(build_model(get_spec(TINY21)), first_frame, tmp_path_factory.mktemp("plain") / "v.mp4")


@pytest.mark.parametrize("offload", ["model", "group"])
def test_inference_offload_is_wired_and_changes_nothing(first_frame, tmp_path, offload, plain_video):
    """Two clips (the component ring comes round again) equal to the plain run's, frame for frame."""
    model = build_model(get_spec(TINY21))
    arrange(model, "auto", offload, 1, CPU)
    for transformer in model.transformers:
        if offload == "group":
            assert all(_group_hooked(block) for block in transformer.blocks)
        else:
            assert type(transformer._hf_hook).__name__ == "CpuOffload"
    assert type(model.pipe.vae._hf_hook).__name__ == "CpuOffload"
    np.testing.assert_array_equal(_video(model, first_frame, tmp_path / "offloaded.mp4"), plain_video)


def test_inference_fp8_through_the_app_after_the_adapter(image_file, tmp_path, monkeypatch):
    """``python -m svi_infer memory.weights_dtype=fp8 memory.offload=group`` with a LoRA file holding a ``diff``
    delta: the weights are rounded to float8 after the delta is added, the LoRA keeps model.dtype, the blocks are
    group-offloaded, and the sidecar records the dtype (a resume must match it)."""
    import svi_infer.longvideo.plan as app
    import svi_infer.memory

    g = torch.Generator().manual_seed(2)
    lora = {
        "blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 24, generator=g) * 0.1,
        "blocks.0.attn1.to_q.lora_B.weight": torch.randn(24, 4, generator=g) * 0.1,
        "blocks.0.attn1.to_k.diff": torch.randn(24, 24, generator=g) * 0.1,
    }
    save_file(lora, str(tmp_path / "lora.safetensors"))
    before = build_model(get_spec(TINY21)).transformers[0].blocks[0].attn1.to_k.weight.detach().clone()
    arranged = []
    original = svi_infer.memory.arrange

    def recording(model, *args):
        original(model, *args)
        arranged.append(model)

    monkeypatch.setattr(svi_infer.memory, "arrange", recording)
    cfg = compose_infer(
        ["model=tiny_wan21_i2v", f"image={image_file}", "prompts=a boat", "num_clips=1", "variant.steps=2"]
        + [f"adapter.path={tmp_path / 'lora.safetensors'}", f"output={tmp_path / 'v.mp4'}"]
        + ["memory.weights_dtype=fp8", "memory.offload=group"]
    )
    result = app.run(cfg)
    (model,) = arranged
    transformer = model.transformers[0]
    assert {layer.weight.dtype for layer in base_linears(transformer)} == {FP8}
    assert torch.equal(transformer.blocks[0].attn1.to_k.weight, (before + lora["blocks.0.attn1.to_k.diff"]).to(FP8))
    assert {p.dtype for n, p in transformer.named_parameters() if "lora_" in n} == {torch.float32}
    assert all(_group_hooked(block) for block in transformer.blocks)
    assert json.loads(result.sidecar.read_text())["weights_dtype"] == "fp8"
    frames = read_video(result.video)
    assert frames.shape[0] == result.frames and frames.std() > 1.0


def test_bf16_base_keeps_a_shared_lora_tied_and_float32():
    """experts.shared_lora on a bf16 base: the upcast changes the weights in place, so both experts still hold the
    very same (float32) LoRA parameters."""
    from svi_train.config import ExpertSettings, LoraSettings, MemorySettings, OptimSettings
    from svi_train.module import SVILitModule
    from svi_train.recycling import RecyclingConfig

    module = SVILitModule(
        get_spec("tiny-wan2.2-i2v-a14b"),
        None,
        LoraSettings(rank=4, alpha=4.0),
        RecyclingConfig(),
        OptimSettings(),
        experts=ExpertSettings(shared_lora=True),
        memory=MemorySettings(base_dtype="bf16"),
    )
    high, low = (dict(t.named_parameters()) for t in (module.transformer, module.transformer_2))
    lora = [n for n in high if "lora_" in n]
    assert lora and all(high[n] is low[n] and high[n].dtype == torch.float32 for n in lora)
    assert module.transformer.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16
