"""Callbacks: progress lines, export inference-ready adapter directories, and render rollout previews (with their
drift metrics) while training."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from svi_infer.adapters import save_adapter
from svi_infer.atomic import write_with
from svi_infer.evaluate.reading import evaluate_video
from svi_infer.evaluate.report import output_paths, write_report
from svi_infer.longvideo.generator import LongVideoGenerator
from svi_infer.settings import GenerationSettings
from svi_infer.video_io import tensor_to_frames
from svi_train.strategies import lora_state_dict


class StepProgress(L.Callback):
    """Progress on stdout, from rank 0: ``step 40/300  loss 0.0923  1.52 s/step  eta 0:06:35``.

    A line every ``every_n_steps`` optimizer steps and at the last one, whatever stdout is (a terminal, a log file,
    nohup, SLURM); with ``live`` (a terminal) the line is also redrawn in place at every step between them. The loss
    is the mean over the steps since the last line, s/step the wall time per step (data, step, callbacks), the eta
    what that leaves to ``max_steps``. Lightning's bars count epochs, which mean nothing on a stream of shards.
    """

    def __init__(self, every_n_steps: int, live: bool = False) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.live = live
        self.step = -1
        self._open_line = False

    def on_train_start(self, trainer, module) -> None:
        self.step = trainer.global_step
        self._window(trainer.global_step)

    def _window(self, step: int) -> None:
        self.start_step, self.start_time, self.losses = step, time.perf_counter(), []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses.append(float(loss))
        if trainer.global_step == self.step or not trainer.is_global_zero:
            return  # accumulating gradients: not an optimizer step yet
        self.step = step = trainer.global_step
        end_of_window = step % self.every_n_steps == 0 or step == trainer.max_steps
        if end_of_window or self.live:
            self._write(self._line(step, trainer.max_steps), end_of_window)
        if end_of_window:
            self._window(step)

    def _line(self, step: int, max_steps: int) -> str:
        seconds = (time.perf_counter() - self.start_time) / max(1, step - self.start_step)
        loss = f"{sum(self.losses) / len(self.losses):.4f}" if self.losses else "-"
        if max_steps <= 0:  # no end set
            return f"step {step}  loss {loss}  {seconds:.2f} s/step"
        left = round(seconds * (max_steps - step))
        eta = f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
        return f"step {step}/{max_steps}  loss {loss}  {seconds:.2f} s/step  eta {eta}"

    def _write(self, line: str, newline: bool) -> None:
        prefix = "\r\x1b[K" if self.live else ""  # back to the line's start and clear it
        sys.stdout.write(prefix + line + ("\n" if newline else ""))
        sys.stdout.flush()
        self._open_line = not newline

    def on_train_end(self, trainer, module) -> None:
        if self._open_line:  # a live line the run ended on
            sys.stdout.write("\n")
            self._open_line = False

    def on_exception(self, trainer, module, exception) -> None:
        self.on_train_end(trainer, module)  # the error message then starts on a line of its own


class AdapterExport(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end, write ``<dirpath>/step_XXXXXX`` and
    ``<dirpath>/final``: adapter directories svi_infer loads as they are. A Wan 2.2 A14B run training a LoRA per
    expert writes one per expert inside them, ``high_noise/`` and ``low_noise/`` (svi.json names the expert). A
    Dance run's pose encoder goes beside the LoRA, ``pose_encoder.safetensors`` (``save_adapter`` splits it off)."""

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
