"""Keeping the video decoders quiet: decord and the ffmpeg libraries inside it write their complaints ("moov atom
not found", "video_reader.cc:86: ERROR opening ...") straight to the process's stderr (file descriptor 2), past
Python. Around each decode call that descriptor points at a temporary file instead, and what was captured becomes
the reason a file is skipped in ``report.json``, not noise on the console.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# "[h264 @ 0x55d...] ", "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x...] ", "[00:51:58] /project/src/video/video_reader.cc:86: "
_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+(\S+\.(cc|cpp|h):\d+:\s*)?")
MAX_DETAIL = 300


@dataclass
class DecoderLog:
    """What the decoder wrote to stderr inside :func:`quiet_decoder` (filled in when the block ends)."""

    text: str = ""

    def message(self, err: BaseException | None = None) -> str:
        """One line: the decoder's distinct messages without their source prefixes, else ``err``'s first line."""
        lines = [_PREFIX.sub("", line).strip().rstrip(".") for line in self.text.splitlines()]
        distinct = list(dict.fromkeys(line for line in lines if line))
        if not distinct and err is not None:
            distinct = (str(err).strip().splitlines() or [type(err).__name__])[:1]
        detail = "; ".join(distinct)
        return detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 3] + "..."


@contextmanager
def quiet_decoder() -> Iterator[DecoderLog]:
    """Point fd 2 at a temporary file for the block; the captured text lands in the yielded log, error or not."""
    log = DecoderLog()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            log.text = capture.read().decode("utf-8", "replace")


@contextmanager
def decoding(what: str) -> Iterator[DecoderLog]:
    """:func:`quiet_decoder`, and a failure inside becomes ``ValueError("cannot decode <what>: <decoder's words>")``."""
    try:
        with quiet_decoder() as log:
            yield log
    except Exception as err:  # decord raises its own error types for broken files
        raise ValueError(f"cannot decode {what}: {log.message(err)}") from None
