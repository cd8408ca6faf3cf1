"""DWPose skeleton videos for SVI-Dance, from the user's own DWPose ONNX files (optional; needs ``onnxruntime``).

SVI-Dance, like UniAnimate-DiT, is trained on DWPose renderings: the most confident person's body, feet and
hands (no face) drawn in OpenPose colours on black. This module makes such pose videos from ordinary videos
with the two DWPose ONNX models the user supplies (nothing is downloaded):

- a YOLOX person detector (``yolox_l.onnx``: ``[1, 3, 640, 640]`` BGR in, ``[1, anchors, 85]`` out), and
- the DWPose whole-body model (``dw-ll_ucoco_384.onnx``: ``[1, 3, 384, 288]`` in, SimCC ``x`` / ``y`` out).

Pre- and post-processing follow DWPose as UniAnimate-DiT and SVI run it (letterbox padded with 114, NMS 0.45,
person score 0.3, box padding 1.25, SimCC arg-max, keypoint score 0.3), with the model input sizes read from
the files. Drawing uses PIL instead of OpenCV: the same skeleton, colours, stick and dot sizes, with slightly
different anti-aliasing of the edges. Pose alignment to a reference image (UniAnimate's ``run_align_pose``) is
not done here.

Command line: ``python -m data_tools.dwpose --detector yolox_l.onnx --pose dw-ll_ucoco_384.onnx clip.mp4 ...``
writes ``clip.pose.mp4`` beside each clip (the name the data pipeline looks for).
"""

from __future__ import annotations

import argparse
import colorsys
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DETECT_SCORE = 0.1  # candidates kept for NMS
NMS_IOU = 0.45
PERSON_SCORE = 0.3
KEYPOINT_SCORE = 0.3
BOX_PADDING = 1.25
DETECT_PAD_VALUE = 114
STRIDES = (8, 16, 32)
POSE_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # applied to the BGR channels, as DWPose does
POSE_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
NUM_KEYPOINTS = 133  # COCO-WholeBody: 17 body, 6 feet, 68 face, 2 x 21 hands

# OpenPose order after :func:`to_openpose` (134 points): 0 nose, 1 neck, 2-4 right arm, 5-7 left arm,
# 8-10 right leg, 11-13 left leg, 14/15 eyes, 16/17 ears, 18-23 feet, 24-91 face, 92-112 left hand, 113-133 right
_COCO_TO_OPENPOSE_BODY = {1: 17, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16}
_COCO_TO_OPENPOSE_BODY |= {11: 11, 12: 13, 13: 15, 14: 2, 15: 1, 16: 4, 17: 3}
_LEFT_HAND, _RIGHT_HAND = slice(92, 113), slice(113, 134)
# body + the two feet (20 points): limb i joins these points and takes colour i
_LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13)]
_LIMBS += [(1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (10, 19)]
_FINGERS = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12)]
_FINGERS += [(0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
_STICK_WIDTH, _DOT_RADIUS, _LIMB_DIM = 4, 4, 0.6


def _rgb_from_bgr(color: Sequence[float]) -> tuple[int, int, int]:
    # DWPose draws these colours into OpenCV (BGR) frames; the videos it writes show them channel-reversed
    b, g, r = (round(c) for c in color)
    return r, g, b


# OpenPose's 18 body colours: a hue wheel in 20 degree steps; then the two foot colours DWPose adds
_BODY_COLORS = [_rgb_from_bgr(np.array(colorsys.hsv_to_rgb(i / 18, 1.0, 1.0)) * 255) for i in range(18)]
_BODY_COLORS += [_rgb_from_bgr((170, 255, 255)), _rgb_from_bgr((255, 255, 0))]
_FINGER_COLORS = [_rgb_from_bgr(np.array(colorsys.hsv_to_rgb(i / len(_FINGERS), 1.0, 1.0)) * 255) for i in range(20)]
_HAND_DOT = _rgb_from_bgr((0, 0, 255))


class DWPoseError(ValueError):
    """An ONNX file that is not the model it should be, or a video that cannot be processed."""


def _session(path: str | Path, providers: Sequence[str] | None):
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DWPose model {path} does not exist: give the path of your ONNX file")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("DWPose extraction needs onnxruntime: pip install onnxruntime") from None
    try:
        return ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:  # onnxruntime raises its own exception types for invalid files
        raise DWPoseError(f"cannot load ONNX model {path}: {err}") from None


def _input_hw(session, default: tuple[int, int]) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    if len(shape) != 4:
        raise DWPoseError(f"expected an image model with a [N, 3, H, W] input, got {shape}")
    h, w = shape[2:]
    return (h, w) if isinstance(h, int) and isinstance(w, int) else default


# -- detection ---------------------------------------------------------------------------------------------------


def detector_input(frame_bgr: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Scale the frame to fit ``size`` (aspect kept) at the top left of a 114-grey canvas; ``[3, H, W]`` float32."""
    h, w = frame_bgr.shape[:2]
    ratio = min(size[0] / h, size[1] / w)
    nh, nw = int(h * ratio), int(w * ratio)
    canvas = np.full((*size, 3), DETECT_PAD_VALUE, dtype=np.uint8)
    canvas[:nh, :nw] = np.asarray(Image.fromarray(frame_bgr).resize((nw, nh), Image.BILINEAR))
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), ratio


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression (inclusive pixel areas, as YOLOX's demo); indices by falling score."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i, rest = order[0], np.array(order[1:], dtype=int)
        keep.append(int(i))
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = list(rest[overlap <= iou])
    return keep


def decode_detections(raw: np.ndarray, size: tuple[int, int], ratio: float) -> np.ndarray:
    """People's boxes ``[N, 4]`` (x1, y1, x2, y2 in frame pixels) from YOLOX's raw ``[anchors, 5 + classes]``."""
    grids, strides = [], []
    for stride in STRIDES:
        hs, ws = size[0] // stride, size[1] // stride
        ys, xs = np.mgrid[0:hs, 0:ws]
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((hs * ws, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    if raw.ndim != 2 or raw.shape[0] != len(grid) or raw.shape[1] < 6:
        raise DWPoseError(f"detector output {raw.shape} is not YOLOX's [{len(grid)}, 5 + classes] for input {size}")
    centre = (raw[:, :2] + grid) * stride
    extent = np.exp(raw[:, 2:4]) * stride
    boxes = np.concatenate([centre - extent / 2, centre + extent / 2], axis=1) / ratio
    person = raw[:, 4] * raw[:, 5]  # objectness x class 0 ("person"); NMS is per class, so others don't matter
    candidates = np.flatnonzero(person > DETECT_SCORE)
    keep = candidates[nms(boxes[candidates], person[candidates], NMS_IOU)]
    return boxes[keep[person[keep] > PERSON_SCORE]]


# -- keypoints ---------------------------------------------------------------------------------------------------


def pose_input(frame_bgr: np.ndarray, box: np.ndarray, size: tuple[int, int]):
    """Crop the padded box (aspect fitted to ``size``), normalised; returns ``[3, h, w]``, centre, box size."""
    h, w = size
    x1, y1, x2, y2 = (float(v) for v in box)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    bw, bh = (x2 - x1) * BOX_PADDING, (y2 - y1) * BOX_PADDING
    bw, bh = (bw, bw * h / w) if bw > bh * w / h else (bh * w / h, bh)
    k = w / bw  # model pixels per frame pixel
    # OpenCV's warpAffine samples at integer pixel centres, PIL at +0.5: shift so both agree
    cx, cy = centre + 0.5 - (np.array([w, h]) / 2 + 0.5) / k
    crop = Image.fromarray(frame_bgr).transform((w, h), Image.AFFINE, (1 / k, 0, cx, 0, 1 / k, cy), Image.BILINEAR)
    normalised = (np.asarray(crop, dtype=np.float32) - POSE_MEAN) / POSE_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)), centre, np.array([bw, bh])


def decode_simcc(
    simcc_x: np.ndarray, simcc_y: np.ndarray, size: tuple[int, int], centre: np.ndarray, box_size: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints ``[K, 2]`` in frame pixels and scores ``[K]`` from SimCC ``[K, W * s]`` / ``[K, H * s]``."""
    h, w = size
    split = simcc_x.shape[-1] / w
    xy = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], axis=-1).astype(np.float64) / split
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    return xy / np.array([w, h]) * box_size + centre - box_size / 2, scores


def to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody 133 points to OpenPose order with a neck (134): DWPose's drawing layout."""
    neck = keypoints[[5, 6]].mean(0)
    neck_score = float(scores[5] > KEYPOINT_SCORE and scores[6] > KEYPOINT_SCORE)
    points = np.insert(keypoints, 17, neck, axis=0)
    conf = np.insert(scores, 17, neck_score)
    order = np.arange(len(points))
    for openpose, coco in _COCO_TO_OPENPOSE_BODY.items():
        order[openpose] = coco
    return points[order], conf[order]


# -- drawing -----------------------------------------------------------------------------------------------------


def _stick(draw: ImageDraw.ImageDraw, a: np.ndarray, b: np.ndarray, color: tuple[int, int, int]) -> None:
    """An ellipse from ``a`` to ``b``, ``_STICK_WIDTH`` thick: OpenPose's limb shape (1 degree polygon)."""
    (mx, my), length = (a + b) / 2, float(np.hypot(*(a - b)))
    angle = math.radians(int(math.degrees(math.atan2(a[1] - b[1], a[0] - b[0]))))
    ca, sa, half = math.cos(angle), math.sin(angle), int(length / 2)
    cx, cy = int(mx), int(my)
    points = []
    for t in range(0, 361):
        u, v = half * math.cos(math.radians(t)), _STICK_WIDTH * math.sin(math.radians(t))
        points.append((round(cx + u * ca - v * sa), round(cy + u * sa + v * ca)))
    draw.polygon(points, fill=color)


def _dot(draw: ImageDraw.ImageDraw, point: np.ndarray, radius: int, color: tuple[int, int, int]) -> None:
    x, y = int(point[0]), int(point[1])
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)


def render_pose(points: np.ndarray, scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """Draw one person (OpenPose order, :func:`to_openpose`) as DWPose does for SVI-Dance: ``[H, W, 3]`` uint8.

    Body and feet as dimmed sticks with dots, hands as thin coloured lines with red dots; points scoring
    ``<= KEYPOINT_SCORE`` are left out, and a foot is drawn only where both its toes are seen.
    """
    seen = scores > KEYPOINT_SCORE
    body = [(points[i], bool(seen[i])) for i in range(18)]
    for big, small in ((18, 19), (21, 22)):  # each foot: the middle of its big and small toe
        body.append(((points[big] + points[small]) / 2, bool(seen[big] and seen[small])))

    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for (i, j), color in zip(_LIMBS, _BODY_COLORS, strict=False):
        if body[i][1] and body[j][1]:
            _stick(draw, body[i][0], body[j][0], color)
    canvas = Image.fromarray((np.asarray(canvas) * _LIMB_DIM).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for (point, visible), color in zip(body, _BODY_COLORS, strict=True):
        if visible:
            _dot(draw, point, _DOT_RADIUS, color)

    for hand in (_LEFT_HAND, _RIGHT_HAND):
        pts = np.where(seen[hand, None], points[hand], -1.0).astype(np.float64)
        on_canvas = (pts.astype(int) >= 1).all(axis=1)  # DWPose skips points within a pixel of the border
        for (i, j), color in zip(_FINGERS, _FINGER_COLORS, strict=True):
            if on_canvas[i] and on_canvas[j]:
                draw.line([tuple(pts[i].astype(int)), tuple(pts[j].astype(int))], fill=color, width=2)
        for point, ok in zip(pts, on_canvas, strict=True):
            if ok:
                _dot(draw, point, _DOT_RADIUS, _HAND_DOT)
    return np.asarray(canvas)


# -- the models together -----------------------------------------------------------------------------------------


class DWPose:
    """The two DWPose ONNX models; ``dwpose(frame)`` renders an RGB frame's pose as SVI-Dance expects it."""

    def __init__(self, detector: str | Path, pose_model: str | Path, providers: Sequence[str] | None = None) -> None:
        self.detector = _session(detector, providers)
        self.pose_model = _session(pose_model, providers)
        self.detector_size = _input_hw(self.detector, (640, 640))
        self.pose_size = _input_hw(self.pose_model, (384, 288))
        if len(self.pose_model.get_outputs()) != 2:
            raise DWPoseError(f"{pose_model} is not a SimCC pose model: it has not two outputs (x and y)")

    def people(self, frame_rgb: np.ndarray) -> np.ndarray:
        """Boxes ``[N, 4]`` of the people in the frame, most confident first."""
        image, ratio = detector_input(np.ascontiguousarray(frame_rgb[..., ::-1]), self.detector_size)
        raw = self.detector.run(None, {self.detector.get_inputs()[0].name: image[None]})[0]
        return decode_detections(np.asarray(raw)[0].astype(np.float64), self.detector_size, ratio)

    def keypoints(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The most confident person's 134 OpenPose-order points (frame pixels) and scores.

        With no person found, the whole frame is the box (as DWPose does).
        """
        h, w = frame_rgb.shape[:2]
        boxes = self.people(frame_rgb)
        box = boxes[0] if len(boxes) else np.array([0.0, 0.0, w, h])
        image, centre, box_size = pose_input(np.ascontiguousarray(frame_rgb[..., ::-1]), box, self.pose_size)
        simcc_x, simcc_y = self.pose_model.run(None, {self.pose_model.get_inputs()[0].name: image[None]})
        if simcc_x.shape[1] != NUM_KEYPOINTS or simcc_y.shape[1] != NUM_KEYPOINTS:
            raise DWPoseError(f"pose model gives {simcc_x.shape[1]} keypoints, not COCO-WholeBody's {NUM_KEYPOINTS}")
        points, scores = decode_simcc(simcc_x[0], simcc_y[0], self.pose_size, centre, box_size)
        return to_openpose(points, scores)

    def __call__(self, frame_rgb: np.ndarray) -> np.ndarray:
        points, scores = self.keypoints(frame_rgb)
        return render_pose(points, scores, *frame_rgb.shape[:2])


def extract_pose_video(video: str | Path, output: str | Path, dwpose: DWPose) -> Path:
    """Render every frame's pose into ``output`` (mp4, same size and fps), streaming, atomically."""
    import imageio_ffmpeg

    from svi_infer.video_io import write_mp4  # here: it loads torch, which --help and argument errors do not need

    video, output = Path(video).expanduser(), Path(output).expanduser()
    if not video.is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    reader = imageio_ffmpeg.read_frames(str(video), pix_fmt="rgb24")
    try:
        (w, h), fps = (meta := next(reader))["size"], meta.get("fps") or 16
        first = next(reader, None)
        if first is None:
            raise DWPoseError(f"video {video} has no frames")
        frames = (np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3) for raw in itertools.chain([first], reader))
        write_mp4(output, (dwpose(frame) for frame in frames), fps)
    except (OSError, RuntimeError, StopIteration) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise DWPoseError(f"cannot make {output} from {video}: {lines[-1] if lines else type(err).__name__}") from None
    finally:
        reader.close()
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_tools.dwpose --detector D --pose P video ...``: write ``<video>.pose.mp4`` files."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.dwpose", description=main.__doc__)
    parser.add_argument("videos", nargs="+", type=Path)
    parser.add_argument("--detector", required=True, type=Path, help="YOLOX person detector (yolox_l.onnx)")
    parser.add_argument("--pose", required=True, type=Path, help="DWPose whole-body model (dw-ll_ucoco_384.onnx)")
    parser.add_argument("--output-dir", type=Path, help="where to write (default: beside each video)")
    parser.add_argument("--providers", nargs="*", help="onnxruntime execution providers (default: CPU)")
    args = parser.parse_args(argv)
    try:
        for path in (*args.videos, args.detector, args.pose):  # before any model loads
            if not path.expanduser().is_file():
                raise FileNotFoundError(f"{path} does not exist: check the path")
        dwpose = DWPose(args.detector, args.pose, args.providers)
        for video in args.videos:
            out = (args.output_dir or video.parent) / f"{video.stem}.pose.mp4"
            print(extract_pose_video(video, out, dwpose))
    except (ImportError, OSError, ValueError) as err:
        print(f"dwpose: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
