"""DWPose extraction against tiny ONNX models with DWPose's input/output signatures (needs onnx + onnxruntime)."""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from data_tools.dwpose import (  # noqa: E402
    POSE_MEAN,
    POSE_STD,
    DWPose,
    DWPoseError,
    detector_input,
    extract_pose_video,
    main,
    nms,
    pose_input,
    render_pose,
    to_openpose,
)
from svi_infer.pose import read_pose_video  # noqa: E402
from svi_infer.video_io import write_mp4  # noqa: E402

H, W = 96, 128  # frames; the tiny detector takes 64x64 (ratio 0.5), the tiny pose model 32x24 (SimCC x2)
DET_HW, POSE_HW = (64, 64), (32, 24)
ANCHORS = 8 * 8 + 4 * 4 + 2 * 2


def _constant_model(path, input_name: str, input_shape, outputs: dict[str, np.ndarray]) -> None:
    """An ONNX model whose outputs are constants (plus 0 x the input's mean, so the input is really consumed)."""
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", "nothing"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        graph_outputs, initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _detector_output(empty: bool = False) -> np.ndarray:
    """YOLOX raw output for a 64x64 input: person A (0.81), its duplicate (0.5), person B (0.56), noise."""
    out = np.zeros((ANCHORS, 85))
    if empty:
        return out[None]

    def put(index, dx, dy, w, h, obj, cls0, cls1=0.0):
        out[index, :7] = [dx, dy, math.log(w / 8), math.log(h / 8), obj, cls0, cls1]

    put(3 * 8 + 4, 0, 0, 20, 40, 0.9, 0.9)  # A: centre (32, 24) in the input = (64, 48) in the frame, 40x80
    put(3 * 8 + 5, -0.875, 0, 20, 40, 1.0, 0.5)  # A again, 1 px right: suppressed by NMS
    put(1 * 8 + 7, 0, 0.5, 8, 16, 0.8, 0.7)  # B: centre (56, 12) -> (112, 24), 16x32
    put(0, 0.5, 0.5, 8, 8, 0.5, 0.4)  # a person at 0.2: past NMS's 0.1, under the 0.3 person score
    put(40, 0, 0, 16, 16, 0.9, 0.05, 0.9)  # something that is not a person
    return out[None]


# COCO-WholeBody keypoints of person A as (SimCC x bin, SimCC y bin, score); frame x = 1.5625 bx + 26.5,
# y = 1.5625 by - 2 for A's box (44, 8, 84, 88): padded 1.25 and fitted to 3:4 it is 75x100 around (64, 48)
BODY = {
    0: (24, 8, 0.9), 1: (28, 4, 0.9), 2: (20, 4, 0.9), 3: (36, 8, 0.2), 4: (16, 4, 0.9),
    5: (32, 16, 0.9), 6: (16, 16, 0.9), 7: (36, 24, 0.9), 8: (12, 24, 0.9), 9: (38, 32, 0.9), 10: (10, 32, 0.9),
    11: (28, 36, 0.9), 12: (20, 36, 0.9), 13: (28, 46, 0.9), 14: (20, 46, 0.9), 15: (28, 56, 0.9), 16: (20, 56, 0.9),
    17: (30, 60, 0.9), 18: (32, 60, 0.9), 19: (31, 58, 0.1), 20: (18, 60, 0.9), 21: (16, 60, 0.1), 22: (17, 58, 0.1),
}  # fmt: skip


def _frame_xy(bx: float, by: float) -> tuple[float, float]:
    return bx / 2 / 24 * 75 + 26.5, by / 2 / 32 * 100 - 2


def _pose_outputs() -> dict[str, np.ndarray]:
    sx, sy = np.zeros((1, 133, 48)), np.zeros((1, 133, 64))
    points = dict(BODY)
    points |= {23 + i: (4, 4, 0.9) for i in range(68)}  # the face: never drawn
    points |= {91 + i: (40 + i % 4, 34 + i // 4, 0.9) for i in range(21)}  # left hand, seen
    points |= {112 + i: (4, 60, 0.1) for i in range(21)}  # right hand, not seen
    for k, (bx, by, score) in points.items():
        sx[0, k, bx] = score
        sy[0, k, by] = score
    return {"simcc_x": sx, "simcc_y": sy}


@pytest.fixture
def models(tmp_path):
    det, pose = tmp_path / "yolox_tiny.onnx", tmp_path / "dw_tiny.onnx"
    _constant_model(det, "images", (1, 3, *DET_HW), {"output": _detector_output()})
    _constant_model(pose, "input", (1, 3, *POSE_HW), _pose_outputs())
    return det, pose


def _frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def test_detects_people_with_nms_and_scores(models):
    boxes = DWPose(*models).people(_frame())
    np.testing.assert_allclose(boxes, [[44, 8, 84, 88], [104, 8, 120, 40]], atol=1e-6)


def test_keypoints_map_back_to_the_frame_in_openpose_order(models):
    points, scores = DWPose(*models).keypoints(_frame())
    assert points.shape == (134, 2) and scores.shape == (134,)
    np.testing.assert_allclose(points[0], _frame_xy(24, 8), atol=1e-4)  # nose
    np.testing.assert_allclose(points[1], (np.add(_frame_xy(32, 16), _frame_xy(16, 16))) / 2, atol=1e-4)  # neck
    np.testing.assert_allclose(points[2], _frame_xy(16, 16), atol=1e-4)  # right shoulder (COCO 6)
    np.testing.assert_allclose(points[5], _frame_xy(32, 16), atol=1e-4)  # left shoulder (COCO 5)
    np.testing.assert_allclose(points[17], _frame_xy(36, 8), atol=1e-4)  # left ear (COCO 3)
    assert scores[1] == 1.0 and scores[17] == pytest.approx(0.2)
    np.testing.assert_allclose(points[18], _frame_xy(30, 60), atol=1e-4)  # feet follow the body (COCO 17 -> 18)


def test_render_draws_body_feet_and_hands_in_dwpose_colours(models):
    points, scores = DWPose(*models).keypoints(_frame())
    canvas = render_pose(points, scores, H, W)
    assert canvas.shape == (H, W, 3) and canvas.dtype == np.uint8

    def at(bx, by):
        x, y = _frame_xy(bx, by)
        return tuple(canvas[int(y), int(x)])

    assert at(24, 8) == (0, 0, 255)  # nose dot: OpenPose colour 0 (255, 0, 0) as DWPose's BGR frames show it
    assert tuple(canvas[23, 64]) == (0, 85, 255)  # neck dot, colour 1
    assert tuple(canvas[29, 48]) == (0, 102, 153)  # right upper arm stick, colour 2 dimmed to 0.6
    assert at(31, 60) == (255, 255, 170)  # left foot dot, between the two toes seen
    assert at(18, 60) == (0, 0, 0)  # right foot: only one toe seen, not drawn
    assert at(40, 34) == (255, 0, 0)  # left hand dot
    assert at(4, 60) == (0, 0, 0) and at(4, 4) == (0, 0, 0)  # right hand unseen; the face never drawn
    assert at(36, 8) == (0, 0, 0)  # left ear scored 0.2
    assert canvas[:, 100:].max() == 0  # person B is not drawn: one person, the most confident


def test_no_person_uses_the_whole_frame(tmp_path, models):
    det = tmp_path / "nobody.onnx"
    _constant_model(det, "images", (1, 3, *DET_HW), {"output": _detector_output(empty=True)})
    points, _ = DWPose(det, models[1]).keypoints(_frame())
    # whole frame 128x96 padded 1.25 -> 160x120, fitted to 3:4 -> 160x213.3 around (64, 48)
    bw = 160.0
    bh = bw * 32 / 24
    np.testing.assert_allclose(points[0], (12 / 24 * bw + 64 - bw / 2, 4 / 32 * bh + 48 - bh / 2), atol=1e-4)


def test_detector_input_letterboxes_bgr_on_grey():
    frame = np.zeros((H, W, 3), np.uint8)
    frame[..., 0] = 200  # the first channel stays first: the caller passes BGR
    image, ratio = detector_input(frame, DET_HW)
    assert ratio == 0.5 and image.shape == (3, 64, 64) and image.dtype == np.float32
    assert (image[0, :48] == 200).all() and (image[1:, :48] == 0).all()
    assert (image[:, 48:] == 114).all()


def test_pose_input_crops_the_padded_box():
    frame = np.zeros((H, W, 3), np.uint8)
    frame[8:88, 44:84] = 255  # the box itself, white
    image, centre, size = pose_input(frame, np.array([44, 8, 84, 88]), POSE_HW)
    np.testing.assert_allclose(centre, (64, 48))
    np.testing.assert_allclose(size, (75, 100))
    white = (255 - POSE_MEAN) / POSE_STD
    black = -POSE_MEAN / POSE_STD
    np.testing.assert_allclose(image[:, 16, 12], white, rtol=1e-5)  # the middle of the crop is in the box
    np.testing.assert_allclose(image[:, 1, 1], black, rtol=1e-5)  # the padding around it is not


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], float)
    assert nms(boxes, np.array([0.5, 0.9, 0.7, 0.1]), 0.45) == [1, 2]


def test_to_openpose_inserts_the_neck_and_reorders_the_body():
    kp = np.stack([np.arange(133.0), np.zeros(133)], axis=1)
    scores = np.full(133, 0.9)
    scores[6] = 0.1
    points, conf = to_openpose(kp, scores)
    assert list(points[:18, 0]) == [0, 5.5, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
    assert conf[1] == 0.0  # neck seen only with both shoulders
    assert list(points[18:24, 0]) == list(range(17, 23)) and points[92, 0] == 91 and points[133, 0] == 132


def test_extract_pose_video_and_cli(tmp_path, models):
    video = tmp_path / "clip.mp4"
    write_mp4(video, np.stack([_frame()] * 3), fps=16)
    out = extract_pose_video(video, tmp_path / "out" / "clip.pose.mp4", DWPose(*models))
    frames = read_pose_video(out, H, W)
    assert frames.shape == (3, H, W, 3)
    x, y = (int(v) for v in _frame_xy(24, 8))
    assert frames[:, y, x, 2].min() > 180 and frames[:, y, x, 0].max() < 80  # the blue nose, through the codec
    assert main([str(video), "--detector", str(models[0]), "--pose", str(models[1])]) == 0
    assert (tmp_path / "clip.pose.mp4").is_file()
    assert main([str(video), "--detector", str(tmp_path / "missing.onnx"), "--pose", str(models[1])]) == 2


def test_errors(tmp_path, models):
    with pytest.raises(FileNotFoundError):
        DWPose(tmp_path / "missing.onnx", models[1])
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(DWPoseError, match="cannot load"):
        DWPose(tmp_path / "junk.onnx", models[1])
    one = tmp_path / "one_output.onnx"
    _constant_model(one, "input", (1, 3, *POSE_HW), {"simcc_x": np.zeros((1, 133, 48))})
    with pytest.raises(DWPoseError, match="SimCC"):
        DWPose(models[0], one)
    wrong = tmp_path / "wrong_det.onnx"
    _constant_model(wrong, "images", (1, 3, *DET_HW), {"output": np.zeros((1, 10, 85))})
    with pytest.raises(DWPoseError, match="not YOLOX"):
        DWPose(wrong, models[1]).people(_frame())
    (tmp_path / "bad.mp4").write_bytes(b"junk" * 10)
    with pytest.raises(DWPoseError, match="cannot make"):
        extract_pose_video(tmp_path / "bad.mp4", tmp_path / "bad.pose.mp4", DWPose(*models))
    assert not (tmp_path / "bad.pose.mp4").exists()
