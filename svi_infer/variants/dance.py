"""SVI-Dance: a person following a pose video, through UniAnimate's pose encoder trained beside the LoRA
(reference/svi.md §3.5).

Generation reads the pose video once at the generation size and loops it; clip ``k`` gets the poses of its output
frames, present in every guidance pass (text guidance only). ``side_by_side`` also writes ``<output stem>.sbs.mp4``
(reference | pose | generated), clip by clip like the video itself. The encoder comes with the Dance adapter
(``dwpose_embedding.*`` weights). Training attaches a trainable encoder and drops, per sample, the pose alone or the
pose with y and the CLIP tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svi_infer.atomic import file_sha256
from svi_infer.spec import WAN21_I2V
from svi_infer.variants.base import ClipContext, Conditioning, Dropped, RunInputs

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    import torch
    from PIL import Image
    from torch import Tensor, nn

    from svi_infer.model import WanModel
    from svi_infer.pose import PoseEncoder
    from svi_infer.settings import GenerationSettings
    from svi_infer.spec import ModelSpec

POSE_INIT_SEED = 7_877  # offset from the run seed for a freshly initialised pose encoder


class DanceConditioning(Conditioning):
    """The pose video on the DiT's patch embedding (in every pass); text guidance.

    Args:
        pose_dropout, pose_extra_dropout: training: two independent draws, each zeroing the sample's pose.
        image_dropout: training: a third, independent draw zeroing y and the CLIP tokens (no y error then).
        pose_encoder: training: initial ``dwpose_embedding`` weights (SVI starts from UniAnimate-DiT's); None:
            PyTorch's default init drawn from the run seed.
    """

    name = "pose"
    label = "Dance"
    prepare_flags = ("pose=true",)
    inputs = ("pose", "side_by_side")

    def __init__(
        self,
        pose_dropout: float = 0.0,
        pose_extra_dropout: float = 0.0,
        image_dropout: float = 0.0,
        pose_encoder: str | Path | None = None,
        **_other: Any,
    ) -> None:
        self.pose_dropout, self.pose_extra_dropout, self.image_dropout = pose_dropout, pose_extra_dropout, image_dropout
        self.pose_encoder = pose_encoder
        self.poses: np.ndarray | None = None  # the run's [pose frames, H, W, 3] uint8 at the generation size
        self.settings: GenerationSettings | None = None
        self.side_by_side = False  # generation: also write <output stem>.sbs.mp4
        self.keep: PoseKeep | None = None  # training: zeroes the dropped samples' encoded pose

    # -- checks ----------------------------------------------------------------------------------------------
    def check_base(self, spec: ModelSpec, training: bool) -> None:
        if training and spec.family != WAN21_I2V:
            raise ValueError(f"variant.conditioning=pose (SVI-Dance) trains on Wan 2.1 I2V only, not {spec.id}")

    def plan_inputs(self, given: dict[str, Any], settings: GenerationSettings, spec: ModelSpec) -> RunInputs:
        """The pose video must exist and have video frames; its size and length may be anything (fitted, looped)."""
        from svi_infer.video_io import probe_streams

        super().plan_inputs(given, settings, spec)
        if given.get("pose") is None:
            raise ValueError("conditioning=pose (Dance) needs pose=<pose video, e.g. a rendered DWPose skeleton mp4>")
        path = Path(given["pose"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pose video {path} does not exist")
        try:
            streams = probe_streams(path)
        except ValueError as err:
            raise ValueError(f"cannot read pose video {path}: {err}") from None
        if not streams["frames"]:
            raise ValueError(f"pose video {path} has no video frames; give a video of the poses (e.g. dwpose.mp4)")
        return RunInputs(files={"pose": path, "side_by_side": bool(given.get("side_by_side"))})

    def check_adapters(self, adapters: list) -> None:
        if not adapters:
            raise ValueError(
                "conditioning=pose (Dance) needs the Dance adapter, which carries the pose encoder "
                "(dwpose_embedding.*): adapter.path=svi-dance.safetensors"
            )

    def check_training(self, spec: ModelSpec, fps: float | None, shard_fps: float, preview: bool) -> None:
        self.check_frame_rate(fps, shard_fps, preview)
        if self.pose_encoder and not Path(self.pose_encoder).expanduser().exists():
            raise FileNotFoundError(f"conditioning.pose_encoder {self.pose_encoder} does not exist")

    # -- generation ------------------------------------------------------------------------------------------
    def check_model(self, model: WanModel) -> None:
        from svi_infer.pose import find_pose_encoder

        if any(find_pose_encoder(t) is None for t in model.transformers):
            raise ValueError(
                "conditioning=pose (SVI-Dance) needs the pose encoder (dwpose_embedding.* weights) on the model; "
                "it comes with the Dance adapter: load one that has it, e.g. adapter.path=svi-dance.safetensors"
            )

    def prepare(self, inputs: RunInputs, settings: GenerationSettings) -> None:
        """Read the pose video at the run's resolved size, fitted by the image's own rule (aligned with it)."""
        from svi_infer.pose import read_pose_video

        if settings.height is None or settings.width is None:
            raise ValueError("the pose video is fitted to a resolved size: call settings.resolve(spec, image.size)")
        pose = inputs.files["pose"]
        self.poses, self.settings = read_pose_video(pose, settings.height, settings.width), settings
        inputs.record["pose"] = {"path": str(pose), "sha256": file_sha256(pose), "frames": len(self.poses)}
        inputs.identity["pose"] = inputs.record["pose"]["sha256"]
        self.side_by_side = inputs.files["side_by_side"]
        if self.side_by_side:
            inputs.identity["side_by_side"] = True

    def clip_poses(self, clip: ClipContext) -> np.ndarray:
        """``[F, H, W, 3]``: the poses of the output frames the clip covers (the pose video looped)."""
        from svi_infer.pose import pose_frames_for_clip

        frames = pose_frames_for_clip(len(self.poses), clip.index, clip.frames_per_clip, clip.overlap_frames)
        return self.poses[frames]

    @contextmanager
    def during_clip(self, model: WanModel, clip: ClipContext) -> Iterator[None]:
        """The pose is the same in every pass (text-only guidance)."""
        from svi_infer.pose import set_pose

        for transformer in model.transformers:
            set_pose(transformer, self.clip_poses(clip))
        try:
            yield
        finally:
            for transformer in model.transformers:
                set_pose(transformer, None)

    def clip_extras(self, anchor: Image.Image, clip: ClipContext, kept: np.ndarray, parts: Path) -> dict[str, str]:
        if not self.side_by_side:
            return {}
        from svi_infer.pose import side_by_side
        from svi_infer.video_io import write_mp4

        name = f"sbs_{clip.index:05d}.mp4"
        poses = self.clip_poses(clip)[clip.frames_per_clip - len(kept) :]
        write_mp4(parts / name, side_by_side(anchor, poses, kept), self.settings.fps)
        return {"side_by_side": name}

    def finish(self, output: Path, parts: Path, inputs: RunInputs, clips: list[dict]) -> dict[str, str]:
        if not self.side_by_side:
            return {}
        from svi_infer.video_io import concat_mp4

        concat_mp4([parts / c["extra_segments"]["side_by_side"] for c in clips], side_by_side_path(output))
        return {"side_by_side": str(side_by_side_path(output))}

    # -- training --------------------------------------------------------------------------------------------
    def attach_training(self, model: WanModel, transformer: torch.nn.Module, seed: int) -> None:
        """A trainable pose encoder (float32, like the reference); call after ``add_adapter``, which freezes every
        parameter that is not a LoRA's. The encoder is reachable as ``transformer.dwpose_embedding`` only."""
        self.keep = PoseKeep(build_pose(transformer, self.pose_encoder, seed))

    def draw_dropout(self, generator: torch.Generator) -> Dropped:
        """Three independent draws, as SVI's ``train_svi_dance.py``: the pose is zeroed below ``pose_dropout`` or
        below ``pose_extra_dropout``; y and the CLIP tokens below ``image_dropout``. All three are drawn whatever
        the probabilities (0 included), so changing them never shifts later draws."""
        import torch

        u_pose, u_extra, u_image = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        pose = u_pose < self.pose_dropout or u_extra < self.pose_extra_dropout
        return Dropped(pose=pose, image=u_image < self.image_dropout)

    def set_batch(self, transformer: torch.nn.Module, batch: dict, dropped: list[Dropped]) -> None:
        from svi_infer.pose import set_pose

        if batch.get("pose") is None:
            raise ValueError(
                f"variant.conditioning=pose (Dance) but the batch of samples {batch['key']} holds no pose "
                "video: prepare the shards with `python -m data_tools prepare pose=true fps=25 ...` "
                "(<name>.pose.mp4 beside each video)"
            )
        self.keep.set(dropped)  # dropped samples: the encoded pose times 0 (exactly the plain tokens)
        set_pose(transformer, batch["pose"].to(transformer.device))


def build_pose(transformer: nn.Module, init: str | Path | None, seed: int) -> PoseEncoder:
    """Attach a trainable pose encoder, from ``init`` weights or PyTorch's default init drawn from ``seed`` (in a
    forked RNG, so the global random stream is left as it was)."""
    import torch

    from svi_infer.pose import PoseEncoder, attach_pose, load_pose_encoder

    dim = transformer.patch_embedding.out_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + POSE_INIT_SEED)
        encoder = PoseEncoder(dim)
    if init is not None:
        load_pose_encoder(encoder, init)
    attach_pose(transformer, encoder.requires_grad_(True))
    return encoder


class PoseKeep:
    """Zeroes the encoded pose of the dropped samples of a batch (a forward hook on the encoder), as SVI's pose
    dropout multiplies the pose embedding by 0. The encoder runs even when every sample drops its pose, so its
    parameters take part in every step (DDP requires that of every trainable parameter); their gradient is then 0.
    """

    def __init__(self, encoder: PoseEncoder) -> None:
        self.keep: Tensor | None = None  # [B] of 0/1, None: keep every sample
        self.handle = encoder.register_forward_hook(self._apply)

    def _apply(self, _module: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        if self.keep is None:
            return None
        return out * self.keep.to(device=out.device, dtype=out.dtype).view(-1, *([1] * (out.ndim - 1)))

    def set(self, dropped: list[Dropped]) -> None:
        """Mask this batch's dropped samples (None when every sample keeps its pose)."""
        import torch

        kept = [not d.pose for d in dropped]
        self.keep = None if all(kept) else torch.tensor(kept, dtype=torch.float32)


def side_by_side_path(output: Path) -> Path:
    """``<output stem>.sbs.mp4``: Dance's reference | pose | generated video."""
    return output.with_name(output.stem + ".sbs.mp4")
