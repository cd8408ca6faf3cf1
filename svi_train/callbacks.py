"""Callbacks: export inference-ready adapter directories, and render rollout previews (with their drift metrics)
while training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from svi_infer.adapters import save_adapter
from svi_infer.atomic import write_with
from svi_infer.evaluate import evaluate_video, output_paths, write_report
from svi_infer.generate import GenerationSettings, LongVideoGenerator
from svi_infer.video_io import tensor_to_frames
from svi_train.strategies import lora_state_dict


class AdapterExport(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end, write ``<dirpath>/step_XXXXXX`` and
    ``<dirpath>/final``: adapter directories svi_infer loads as they are. A Wan 2.2 A14B run training a LoRA per
    expert writes one per expert inside them, ``high_noise/`` and ``low_noise/`` (svi.json names the expert)."""

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.last: Path | None = None

    def _export(self, trainer, module, name: str) -> None:
        for expert, attribute in module.adapter_targets():
            transformer = getattr(module, attribute)
            # every rank: ZeRO-3 and FSDP hold shards of the LoRA, gathered here (a collective); rank 0 writes
            weights = lora_state_dict(trainer.strategy, transformer, module.ADAPTER, rank0_only=True)
            if trainer.is_global_zero:
                target = self.dirpath / name / (expert or "")
                save_adapter(transformer, target, module.adapter_meta(expert), module.ADAPTER, weights=weights)
        self.last = self.dirpath / name

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self._export(trainer, module, f"step_{step:06d}")

    def on_train_end(self, trainer, module) -> None:
        self._export(trainer, module, "final")


class RolloutPreview(L.Callback):
    """Every ``every_n_steps``: generate K chained clips with the current adapter on a fixed image and prompt
    stream (the same loop as svi_infer), save the mp4 under the run folder and log it to wandb, with its drift
    metrics (:mod:`svi_infer.evaluate`, the image as reference) as ``preview/<metric>`` curves, so a drifting
    adapter shows as a rising ``preview/color_drift_last`` or a falling ``preview/ssim_ref_last``; the report and
    its plot go beside the video (``step_XXXXXX.eval.json`` / ``.png``)."""

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int,
        settings: GenerationSettings,
        prompts: list[str],
        image: str | None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.settings = settings
        self.prompts = prompts
        self.image_path = image
        self.image: Image.Image | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.image is None:
            self.image = (
                Image.open(self.image_path).convert("RGB") if self.image_path else self._first_frame(module, batch)
            )
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self._preview(trainer, module, step)

    @staticmethod
    def _first_frame(module, batch) -> Image.Image:
        frame = module.model.decode_latents(batch["latents"][:1, :, :1].float())[0]
        return Image.fromarray(tensor_to_frames(frame)[0])

    @rank_zero_only
    def _preview(self, trainer, module, step: int) -> None:
        experts = list(module.expert_modules().values())
        was_training = experts[0].training
        for transformer in experts:
            transformer.eval()
        if module.model.device != module.device:
            module.model.to(module.device)  # the encoders join the DiT on the training device
        try:
            generator = LongVideoGenerator(module.model, self.settings, {"preview_step": step})
            result = generator.generate(
                self.image, self.prompts, self.dirpath / f"step_{step:06d}.mp4", resume=False, progress=False
            )
        finally:
            for transformer in experts:
                transformer.train(was_training)
        scalars, plot = self._evaluate(result)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "log") and type(logger).__name__ == "WandbLogger":
                import wandb

                media = {"preview/rollout": wandb.Video(str(result.video), format="mp4")}
                experiment.log({**media, "preview/drift_plot": wandb.Image(str(plot))}, step=step)
        module.log("preview/frames", float(result.frames), rank_zero_only=True)
        for name, value in scalars.items():
            module.log(f"preview/{name}", value, rank_zero_only=True)

    def _evaluate(self, result) -> tuple[dict[str, float], Path]:
        """Drift metrics of the preview (its clips as the sidecar records them, the preview image as reference),
        written beside it; returns the summary scalars and the plot's path."""
        reference = self.dirpath / "reference.png"
        if not reference.is_file():
            write_with(reference, lambda tmp: self.image.save(tmp, format="PNG"))
        report = evaluate_video(result.video, reference)  # its clips from the preview's sidecar
        json_path, png_path = output_paths(result.video)
        write_report(report, json_path, png_path)
        return report["summary"], png_path
