"""The contact sheet ``inspect`` writes, to see at a glance what a shard holds and whether it decodes right: per
sample, the source video's frame (cropped as it was encoded) beside the first frame decoded from the sample's
latents, labelled with the sample's key, its caption and where the source frame came from."""

from __future__ import annotations

from pathlib import Path

import decord
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_tools.decoder import decoding
from data_tools.windows import crop_resize, read_frames, source_index
from svi_infer.model import WanModel
from svi_infer.schema import Sample
from svi_infer.video_io import tensor_to_frames

PANEL_HEIGHT = 192  # both frames are shown at this height, so tiny and 720p samples give sheets of one size
LINE_HEIGHT = 16
LABEL_LINES = 3  # key, caption, source
MISSING_GREY = 64


def source_frame(meta: dict, root: Path | None) -> tuple[np.ndarray | None, str]:
    """The source frame the sample starts at, cropped and resized as it was encoded, and the tile's note on it;
    ``None`` when it cannot be shown, the note saying why (no manifest, file missing, not decodable)."""
    if root is None:
        return None, f"source {meta['source']} not shown: no work/manifest.json says where the videos are"
    path = root / meta["source"]
    if not path.is_file():
        return None, f"source missing: {path}"
    index = source_index(meta["start_frame"], meta["source_fps"], meta["fps"])
    try:
        with decoding(str(path)):
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
            index = min(index, len(reader) - 1)
            frame = read_frames(reader, (index,))
    except ValueError as err:
        return None, str(err)
    return crop_resize(frame, tuple(meta["crop"]), meta["height"], meta["width"])[0], f"{meta['source']} #{index}"


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _panel(frame: np.ndarray, width: int) -> Image.Image:
    return Image.fromarray(frame).resize((width, PANEL_HEIGHT), Image.BILINEAR)


def tile(decoded: np.ndarray, source: np.ndarray | None, key: str, caption: str, note: str) -> Image.Image:
    """One sample: ``[source | decoded]`` over three lines of label (key, caption, source note); a source that
    cannot be shown is a grey panel that says so."""
    font = ImageFont.load_default(size=12)
    h, w = decoded.shape[:2]
    panel_w = max(1, round(w * PANEL_HEIGHT / h))
    image = Image.new("RGB", (2 * panel_w, PANEL_HEIGHT + LABEL_LINES * LINE_HEIGHT))
    draw = ImageDraw.Draw(image)
    if source is not None:
        image.paste(_panel(source, panel_w), (0, 0))
    else:
        draw.rectangle([0, 0, panel_w - 1, PANEL_HEIGHT - 1], fill=(MISSING_GREY,) * 3)
        draw.text((4, PANEL_HEIGHT // 2 - LINE_HEIGHT), "source not shown", fill="white", font=font)
    image.paste(_panel(decoded, panel_w), (panel_w, 0))
    for x, name in ((0, "source"), (panel_w, "decoded")):
        draw.rectangle([x, 0, x + font.getlength(name) + 6, LINE_HEIGHT], fill="black")
        draw.text((x + 3, 1), name, fill="white", font=font)
    for i, line in enumerate((key, caption, note)):
        draw.text((3, PANEL_HEIGHT + i * LINE_HEIGHT + 1), _fit(line, font, 2 * panel_w - 6), fill="white", font=font)
    return image


def contact_sheet(model: WanModel, samples: list[Sample], root: Path | None, columns: int = 4) -> Image.Image:
    """Tiles of up to 16 samples in a grid (``root``: the folder the manifest's sources are relative to)."""
    tiles = []
    for s in samples[:16]:
        latents = s.tensors["latents"][None, :, :1].float().to(model.device)
        decoded = tensor_to_frames(model.decode_latents(latents)[0])[0]
        source, note = source_frame(s.meta, root)
        tiles.append(tile(decoded, source, s.key, s.meta["caption"], note))
    tw, th = max(t.width for t in tiles), tiles[0].height
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (min(columns, len(tiles)) * tw, rows * th))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * tw, (i // columns) * th))
    return sheet
