"""data_tools facing bad input: each case gives one line (what, which file, what to do), a non-zero exit and no
half-written files; the CLI answers mistakes before torch loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import decord
import imageio_ffmpeg
import numpy as np
import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

import data_tools.app as app
import data_tools.decoder as decoder
import data_tools.stages as stages
from data_tools.__main__ import main as cli_main
from data_tools.contact_sheet import LABEL_LINES, LINE_HEIGHT, MISSING_GREY, PANEL_HEIGHT, source_frame
from data_tools.report import Report
from data_tools.scan import scan
from data_tools.synthetic import write_clip
from data_tools.windows import crop_resize, read_frames
from tests.helpers import HEAVY, REPO, compose_data, run_cli

SMALL = ["frames_per_clip=9", "buckets=[[48,80]]", "progress=false"]


def cli(overrides: list[str], capsys) -> tuple[int, str, str]:
    """``python -m data_tools <overrides>`` in this process, after Hydra's parsing: (exit code, stdout, stderr)."""
    try:
        cli_main.__wrapped__(compose_data(overrides))
        code = 0
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _ffmpeg(*args) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True)


def _clip(root: Path, name: str, caption: str | None = None, seconds: float = 0.6, **kwargs) -> Path:
    path = write_clip(root / f"{name}.mp4", seconds=seconds, fps=16, size=(96, 64), **kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Path:
    """Two one-window clips prepared into two one-sample shards."""
    root = tmp_path_factory.mktemp("errors")
    _clip(root / "clips", "alpha", "a colourful test card")
    _clip(root / "clips", "beta", "a fractal zoom " * 20, source="mandelbrot")  # a long caption, cut on the tile
    app.run(compose_data([f"input={root / 'clips'}", f"output={root / 'ds'}", *SMALL, "shard_max_bytes=1000"]))
    return root


def _copy(two_shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(two_shards, tmp_path / "copy")
    out = tmp_path / "copy" / "ds"
    manifest = json.loads((out / "work" / "manifest.json").read_text())
    manifest["root"] = str(tmp_path / "copy" / "clips")
    (out / "work" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "copy" / "clips", out


# -- 1. a truncated shard --------------------------------------------------------------------------------------
def test_verify_names_a_truncated_shard_and_reads_the_others(two_shards, tmp_path, capsys, monkeypatch):
    clips, out = _copy(two_shards, tmp_path)
    broken = out / "shards" / "shard-000000.tar"
    intact = broken.read_bytes()
    broken.write_bytes(intact[:10000])
    before = files(out)
    code, stdout, stderr = cli(["command=verify", f"output={out}"], capsys)
    assert code == 1
    assert "verified 1 samples in 2 shards; 1 problems" in stdout  # the other shard was still read
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"data_tools: error: {broken} is truncated or corrupt (")
    assert line.endswith(stages.rebuild_hint(out))
    assert files(out) == before  # verify writes nothing

    code, stdout, stderr = cli(["command=inspect", f"output={out}", "shard=0"], capsys)
    assert code == 1 and "no readable samples" in stdout
    [line] = stderr.strip().splitlines()
    assert str(broken) in line and "truncated or corrupt" in line and line.endswith(stages.rebuild_hint(out))
    assert files(out) == before  # no contact sheet of nothing

    monkeypatch.setattr(app, "_model", lambda *args: pytest.fail("the hint's rerun must not encode again"))
    assert cli([f"input={clips}", f"output={out}", *SMALL, "shard_max_bytes=1000"], capsys)[0] == 0  # the hint
    assert broken.read_bytes() == intact and cli(["command=verify", f"output={out}"], capsys)[0] == 0


def test_verify_names_a_missing_shard(two_shards, tmp_path, capsys):
    _, out = _copy(two_shards, tmp_path)
    (out / "shards" / "shard-000001.tar").unlink()
    code, stdout, stderr = cli(["command=verify", f"output={out}"], capsys)
    assert code == 1 and "verified 1 samples in 2 shards" in stdout
    assert stderr.strip().splitlines() == [
        f"data_tools: error: {out / 'shards' / 'shard-000001.tar'} is missing: {stages.rebuild_hint(out)}"
    ]


def test_inspect_names_a_shard_it_does_not_have(two_shards, capsys):
    out = two_shards / "ds"
    code, _, stderr = cli(["command=inspect", f"output={out}", "shard=7"], capsys)
    assert (code, stderr) == (
        2,
        f"data_tools: error: shard=7 is out of range: {out / 'index.json'} lists 2 shards; give shard=0..1 or a file "
        "name\n",
    )
    code, _, stderr = cli(["command=inspect", f"output={out}", "shard=nope.tar"], capsys)
    assert code == 2 and stderr.startswith(f"data_tools: error: shard {out / 'shards' / 'nope.tar'} does not exist")
    assert not list(out.glob("inspect_*"))


def test_a_stage_run_with_other_settings_names_them(two_shards, capsys):
    out = two_shards / "ds"
    before = files(out)
    code, _, stderr = cli(["command=pack", f"output={out}", "progress=false"], capsys)
    assert code == 2
    [line] = stderr.strip().splitlines()
    changed = "frames_per_clip=9 there, 81 now; stride=9 there, 81 now"
    assert line.startswith(f"data_tools: error: {out} was prepared with other settings ({changed}): give the settings")
    assert line.endswith(f"(deleting {out / 'work'} encodes everything again)")
    assert files(out) == before


# -- 2. decoder messages go into the report, one skip per file, reasons name the file ------------------------------
def test_decoder_messages_land_in_the_report_not_on_the_console(tmp_path, capfd):
    root = tmp_path / "in"
    _clip(root, "good", "good clip")
    (root / "garbage.mp4").write_bytes(bytes(range(256)) * 40)
    (root / "garbage.txt").write_text("caption", encoding="utf-8")
    _clip(root, "badjson")
    (root / "badjson.json").write_text("{not json", encoding="utf-8")
    _ffmpeg("-i", _clip(tmp_path, "long", seconds=3.0), "-c", "copy", "-movflags", "+faststart", tmp_path / "fs.mp4")
    data = (tmp_path / "fs.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "truncated.txt").write_text("caption", encoding="utf-8")
    capfd.readouterr()
    app.run(compose_data(["command=scan", f"input={root}", f"output={tmp_path / 'out'}", *SMALL]))
    out, err = capfd.readouterr()
    assert err == ""  # nothing of the decoder on the real (C-level) stderr
    assert "skipped 3 (bad_caption_file=1, truncated=1, unreadable=1)" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = {s["reason"]: s for s in report["skipped"]}
    assert skipped["unreadable"]["item"] == "garbage.mp4"
    assert skipped["unreadable"]["detail"].startswith("cannot decode garbage.mp4: moov atom not found")
    assert skipped["bad_caption_file"]["item"] == "badjson.mp4"
    assert skipped["bad_caption_file"]["detail"].startswith("badjson.json is not valid JSON (")
    assert skipped["truncated"]["detail"].startswith("truncated.mp4: ")
    assert "(decoder: " in skipped["truncated"]["detail"]
    assert files(tmp_path / "out") == ["report.json", "work", "work/manifest.json"]


def test_caption_problems_name_the_caption_file(tmp_path):
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"{name}.mp4").write_bytes(b"\0")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")  # latin-1, not UTF-8
    (tmp_path / "b.json").write_text('{"caption": "x",}', encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.csv").write_bytes(b"Filename,Video Description\nc.mp4,\xff\n")
    (tmp_path / "captions.jsonl").write_text('{"video": "d.mp4", "caption": "fine"}\n[1, 2]\n', encoding="utf-8")
    report = Report()
    assert [e.source for e in scan(tmp_path, report)] == ["d.mp4"]
    utf8 = "save it as UTF-8"
    assert {s["item"]: (s["reason"], s["detail"]) for s in report.skipped} == {
        "sub/list.csv": ("bad_caption_file", f"sub/list.csv is not UTF-8 text (invalid start byte at byte 33): {utf8}"),
        "captions.jsonl:2": ("bad_caption_line", "captions.jsonl:2 is not a JSON object with video and caption"),
        "a.mp4": ("bad_caption_file", f"a.txt is not UTF-8 text (unexpected end of data at byte 3): {utf8}"),
        "b.mp4": (
            "bad_caption_file",
            "b.json is not valid JSON (Expecting property name enclosed in double quotes at line 1, column 17): fix "
            "or delete it",
        ),
        "c.mp4": ("no_caption", "c.mp4: no sidecar, CSV or JSONL caption and no fallback_caption"),
    }


def test_decoder_log_keeps_the_messages_without_their_prefixes():
    log = decoder.DecoderLog(
        "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0] moov atom not found\n"
        "[00:51:58] /project/src/video/video_reader.cc:86: ERROR opening: x.mp4, Invalid data\n"
        "[h264 @ 0x1] Invalid NAL unit size (257 > 59).\n[h264 @ 0x2] Invalid NAL unit size (257 > 59).\n"
    )
    assert log.message() == "moov atom not found; ERROR opening: x.mp4, Invalid data; Invalid NAL unit size (257 > 59)"
    assert decoder.DecoderLog("").message(RuntimeError("first\nsecond")) == "first"


def test_no_audio_is_one_skip_per_file(tmp_path, capsys):
    root = tmp_path / "in"
    _clip(root, "talk", "speaking", seconds=1.2)  # two 9-frame windows, no audio track, no audio file
    _clip(root, "tiny_audio", "speaking", seconds=1.2)  # two windows; its audio is 10 ms: too short for wav2vec2
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=0.01", root / "tiny_audio.wav")
    _clip(root, "voiced", "speaking", seconds=1.2, audio=True)
    out = tmp_path / "out"
    code, stdout, stderr = cli([f"input={root}", f"output={out}", *SMALL, "audio=true"], capsys)
    assert (code, stderr) == (0, "")  # 2 skipped of 4 inputs: not over max_skip_ratio=0.5
    assert stdout.splitlines()[0].endswith("skipped 1 (no_audio=1)")  # found at scan, in the scan's summary
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_by_reason"] == {"no_audio": 2}
    talk, tiny = report["skipped"]
    assert talk["item"] == "talk.mp4" and talk["detail"].startswith(f"{root / 'talk.mp4'} has no audio track; give")
    assert tiny["item"] == "tiny_audio.mp4" and tiny["detail"].startswith("tiny_audio.wav: the audio is 10 ms long")
    assert report["counts"] == {"samples": 2, "videos_scanned": 3, "windows_planned": 4}


# -- 3. skips over max_skip_ratio: the shards are usable, and how to accept them -------------------------------------
def test_too_many_skips_say_the_shards_are_usable_and_how_to_accept(tmp_path, capsys, monkeypatch):
    root = tmp_path / "in"
    _clip(root, "good", "good clip")
    for name in ("empty", "garbage"):
        (root / f"{name}.txt").write_text("caption", encoding="utf-8")
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "out"
    code, _, stderr = cli([f"input={root}", f"output={out}", *SMALL], capsys)
    assert code == 1
    [line] = stderr.strip().splitlines()
    assert line == (
        f"data_tools: error: 2 of 3 inputs were skipped (67%, more than max_skip_ratio=0.5), but the 1 samples in "
        f"{out / 'shards'} (index.json) are complete and usable; why each input was skipped: {out / 'report.json'}; "
        "to accept the skips, rerun the same command with max_skip_ratio=0.67 (nothing is encoded again)"
    )
    shards = files(out / "shards")
    assert shards == ["shard-000000.tar"] and json.loads((out / "index.json").read_text())["samples"] == 1
    assert not [f for f in files(out) if f.endswith(".tmp") or "shards.tmp" in f]
    before = (out / "shards" / "shard-000000.tar").read_bytes()

    def no_model(*args, **kwargs):
        raise AssertionError("accepting the skips must not load the model or encode again")

    monkeypatch.setattr(app, "_model", no_model)
    code, stdout, stderr = cli([f"input={root}", f"output={out}", *SMALL, "max_skip_ratio=0.67"], capsys)
    assert (code, stderr) == (0, "") and "samples=1" in stdout
    assert (out / "shards" / "shard-000000.tar").read_bytes() == before


def test_accepting_ratio_accepts():
    for skipped, landed in ((2, 1), (1, 1), (5, 1), (29, 71), (57, 43), (1, 0), (1, 999)):
        accept = app.accepting_ratio(skipped, landed)
        assert float(f"{accept:.2f}") >= skipped / (skipped + landed) and accept <= 1.0


# -- 4. a typed schema: wrong types and unknown keys fail at compose time -------------------------------------------
@pytest.mark.parametrize("override", ["fps=abc", "max_skip_ratio=abc", "seed=abc", "frames_per_clip=x", "bogus=1"])
def test_wrong_types_and_unknown_keys_fail_at_compose_time(override):
    key = override.split("=")[0]
    with pytest.raises((HydraException, OmegaConfBaseException), match=key):
        compose_data(["input=x", "output=y", override])


def test_the_schema_keeps_the_yaml_values():
    cfg = compose_data(["input=x", "output=y", "shard=shard-000001.tar", "augment.strength=0.5"])
    assert (cfg.max_skip_ratio, cfg.seed, cfg.shard, cfg.augment.strength) == (0.5, 0, "shard-000001.tar", 0.5)
    assert cfg.model.spec == "tiny-wan2.1-i2v" and compose_data(["input=x", "output=y"]).shard == "0"


# -- 5 and 7. --help shows data_tools' own keys; mistakes are answered before torch loads ----------------------------
@pytest.mark.parametrize(
    ("args", "code", "expect"),
    [
        (["data_tools", "--help"], 0, "Commands (default: prepare):"),
        (["data_tools", "--cfg", "job"], 0, "command: prepare"),
        (
            ["data_tools", "fps=abc"],
            2,
            "fps=abc: Value 'abc' of type 'str' could not be converted to Float; fix the value of fps "
            "(conf/data_tools.yaml says what each key takes)",
        ),
        (
            ["data_tools", "prepare", "input=/does/not/exist", "output=/tmp/x"],
            2,
            "input folder /does/not/exist does not exist: give input=<the folder that holds your videos>",
        ),
        (
            ["data_tools", "prepare", "input=.", "output=/tmp/x", "frames_per_clip=10"],
            2,
            "frames_per_clip must be 4k+1 (e.g. 81, 49, 17), got 10",
        ),
        (["data_tools.dwpose", "--help"], 0, "--detector DETECTOR"),
    ],
)
def test_cli_answers_before_heavy_imports(args, code, expect):
    run = run_cli(args[0], *args[1:], cwd=REPO)
    stderr = run.stderr
    assert run.code == code, stderr[-20:]
    assert expect in run.stdout + "\n".join(stderr)
    assert not run.imported & HEAVY, sorted(run.imported & HEAVY)
    assert not [line for line in stderr if "Traceback" in line]
    if args[-1] == "--help" and args[0] == "data_tools":
        assert not re.search(r"^(lora|recycling|trainer|optim|logger|callbacks|experiment|data):", run.stdout, re.M)
        assert "tiny_wan21_i2v" in run.stdout and "max_skip_ratio" in run.stdout
    if code == 2:  # one line, the whole message
        assert len(stderr) == 1 and stderr[0].startswith("data_tools: error: ") and stderr[0].endswith(expect), stderr


CHEAP_MISTAKES = {  # overrides and the start of the message, for folders IN (holding clip.mp4) and OUT
    "output under a file": (
        ["input=IN", "output=IN/clip.mp4/ds"],
        "output IN/clip.mp4/ds cannot be a folder: IN/clip.mp4",
    ),
    "input is a file": (["input=IN/clip.mp4", "output=OUT"], "input folder IN/clip.mp4 is a file, not a folder"),
    "verify before pack": (["command=verify", "output=OUT"], "OUT/index.json does not exist: give the output= folder"),
    "encode before scan": (["command=encode", "output=OUT"], "OUT/work/manifest.json does not exist: run `python -m"),
    "unknown command": (["command=nope", "output=OUT"], "unknown command 'nope': give one of prepare, scan"),
}


@pytest.mark.parametrize("case", CHEAP_MISTAKES)
def test_cheap_mistakes_name_the_path(tmp_path, capsys, case):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "clip.mp4").write_bytes(b"")

    def paths(text: str) -> str:
        return text.replace("IN", str(tmp_path / "in")).replace("OUT", str(tmp_path / "out"))

    overrides, expect = CHEAP_MISTAKES[case]
    code, _, stderr = cli([paths(o) for o in overrides], capsys)
    assert code == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("data_tools: error: " + paths(expect))
    assert files(tmp_path) == ["in", "in/clip.mp4"]


# -- 6. the contact sheet: labelled tiles, the source frame beside the decoded one -------------------------------
def test_inspect_sheet_shows_source_beside_decoded_with_labels(two_shards, tmp_path, capsys):
    clips, out = _copy(two_shards, tmp_path)
    code, stdout, _ = cli(["command=inspect", f"output={out}", "shard=1"], capsys)
    assert code == 0 and "contact sheet:" in stdout
    sheet = np.asarray(Image.open(out / "inspect_shard-000001.png"))
    panel_w = round(80 * PANEL_HEIGHT / 48)
    assert sheet.shape == (PANEL_HEIGHT + LABEL_LINES * LINE_HEIGHT, 2 * panel_w, 3)
    [sample] = list(stages.ShardReader(str(out / "shards" / "shard-000001.tar")))
    assert source_frame(sample.meta, clips)[1] == "beta.mp4 #0"
    frames = imageio_ffmpeg.read_frames(str(clips / "beta.mp4"))  # decoded independently of decord
    next(frames)
    first = np.frombuffer(next(frames), np.uint8).reshape(1, 64, 96, 3).copy()
    frames.close()
    frame = crop_resize(first, tuple(sample.meta["crop"]), 48, 80)[0]
    expected = np.asarray(Image.fromarray(frame).resize((panel_w, PANEL_HEIGHT), Image.BILINEAR)).astype(float)
    source_panel = sheet[LINE_HEIGHT + 1 : PANEL_HEIGHT, panel_w // 2 : panel_w].astype(float)  # clear of the label
    assert np.abs(source_panel - expected[LINE_HEIGHT + 1 :, panel_w // 2 :]).mean() < 2.0
    decoded_panel = sheet[LINE_HEIGHT + 1 : PANEL_HEIGHT, panel_w + panel_w // 2 :].astype(float)
    assert np.abs(decoded_panel - source_panel).mean() > 5.0  # the tiny model's decode is not the source
    labels = sheet[PANEL_HEIGHT:]
    for i in range(LABEL_LINES):  # key, caption and source note are written
        assert (labels[i * LINE_HEIGHT : (i + 1) * LINE_HEIGHT] > 128).any()

    (clips / "beta.mp4").unlink()
    assert source_frame(sample.meta, clips) == (None, f"source missing: {clips / 'beta.mp4'}")
    code, _, _ = cli(["command=inspect", f"output={out}", "shard=1"], capsys)
    missing = np.asarray(Image.open(out / "inspect_shard-000001.png"))
    assert code == 0 and np.median(missing[LINE_HEIGHT + 1 : PANEL_HEIGHT, :panel_w]) == MISSING_GREY
    assert files(out).count("inspect_shard-000001.png") == 1 and not [f for f in files(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("width", [96, 48, 80])  # decord2 misshapes 96 and 48 as [H, W, 4]; 80 it gets right
def test_read_frames_gives_the_picture_ffmpeg_decodes(tmp_path, width):
    path = write_clip(tmp_path / "clip.mp4", seconds=0.25, fps=16, size=(width, 64))
    frames = imageio_ffmpeg.read_frames(str(path))
    next(frames)
    expected = np.stack([np.frombuffer(raw, np.uint8).reshape(64, width, 3) for raw in frames])
    got = read_frames(decord.VideoReader(str(path)), (2, 0, 2))
    assert got.shape == (3, 64, width, 3)
    assert np.abs(got.astype(int) - expected[[2, 0, 2]]).mean() < 1.0  # the same decoder underneath: near equal
