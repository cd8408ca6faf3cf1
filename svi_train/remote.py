"""Shard folders that are not on this machine: any fsspec URL (``https://``, ``s3://``, ``gs://`` ...) or a
``pipe:`` command whose standard output is the file, ``{name}`` in it standing for ``index.json`` or
``shards/<shard>``.

Connections drop: every read goes through :class:`RetryingReader`, which reopens the file a few times with a
growing pause and carries on at the byte where it stopped (seeking where the file can, else reading the head again
and dropping it), so a shard that recovers gives exactly the samples it would have given. One that does not raises
:class:`Unreadable` with a one-line reason. Torch-free, and fsspec loads only when a URL is opened: ``plan`` reads
``index.json`` through here before the heavy modules load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PIPE = "pipe:"
NAME = "{name}"  # in a pipe: command, the file's path inside the shard folder
RETRIES = 3  # reopenings after a failed read, each after a pause twice the last
BACKOFF_S = 0.5  # the first pause
READ_TIMEOUT_S = 60.0  # http(s): a connection silent this long counts as dropped
# errors no retry mends: the file is not there, or not for us
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_SECRETS = (
    (re.compile(r"(?<=://)[^/@\s]+@"), "***@"),  # user:password@host
    (re.compile(r"\b(\w*(?:SECRET|TOKEN|PASSWORD|KEY)\w*=)\S+", re.IGNORECASE), r"\1***"),  # VAR=... in a command
)


class Unreadable(OSError):
    """A file that kept failing after every retry. ``reason`` is its one-line story (``args`` grow as webdataset
    passes the error on); ``reported`` is set by whoever reported it, so a shard is counted once."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{shown(location)}: {reason}")
        self.location, self.reason, self.reported = location, reason, False


def is_remote(location: str) -> bool:
    """A URL or a ``pipe:`` command rather than a local path."""
    return location.startswith(PIPE) or "://" in location


def member(location: str, name: str) -> str:
    """Where ``name`` (``index.json``, ``shards/shard-000000.tar``) of the shard folder at ``location`` is."""
    if location.startswith(PIPE):
        if NAME not in location:
            raise ValueError(
                f"data.path={shown(location)} has no {NAME}: a pipe: command names the file it writes to its "
                f"standard output with {NAME} (e.g. pipe:aws s3 cp s3://bucket/prefix/{NAME} -)"
            )
        return location.replace(NAME, name)
    if "://" in location:
        return f"{location.rstrip('/')}/{name}"
    return str(Path(location).expanduser() / name)


def name_in(location: str, file: str) -> str:
    """``file``'s path inside the shard folder at ``location`` (:func:`member` undone), for messages."""
    head, tail = location.split(NAME, 1) if location.startswith(PIPE) and NAME in location else (location, "")
    if not location.startswith(PIPE):
        head = f"{location.rstrip('/')}/" if "://" in location else f"{Path(location).expanduser()}/"
    if file.startswith(head) and file.endswith(tail):
        return file[len(head) : len(file) - len(tail)]
    return file.rsplit("/", 1)[-1]


def shown(text: str) -> str:
    """``text`` (a URL, a command, an error) fit for a log: passwords and keys written into it replaced by ``***``,
    on one line."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return " ".join(text.split())


def describe(err: BaseException) -> str:
    """An error in one line: its type and message (for fsspec's http FileNotFoundError, what caused it)."""
    if isinstance(err, PERMANENT) and not _permanent(err):
        err = err.__cause__
    text = str(err) or repr(err)
    return shown(f"{type(err).__name__}: {text}")


class _Command(io.RawIOBase):
    """A ``pipe:`` command's standard output; a non-zero exit is an OSError at the end, naming its last error line
    (its standard error is kept in a temporary file, not shown)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the command)
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._err)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._proc.stdout.read(size if size is not None and size >= 0 else -1)
        if not data and size != 0:
            status = self._proc.wait()
            if status:
                self._err.seek(0)
                lines = self._err.read().decode(errors="replace").strip().splitlines()
                said = f": {lines[-1]}" if lines else ""
                raise OSError(f"`{shown(self.command)}` exited with status {status}{said}")
        return data

    def close(self) -> None:
        if not self.closed:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.stdout.close()
            self._proc.wait()
            self._err.close()
        super().close()


def _permanent(err: BaseException) -> bool:
    """An error no retry mends (a missing file, a missing package). fsspec's http ``info`` calls every failure
    FileNotFoundError: one caused by a refused connection or a server error is not a missing file, and is retried."""
    if isinstance(err, (ImportError, ValueError)):  # gs:// without gcsfs, an unknown protocol, a bad URL
        return True
    if not isinstance(err, PERMANENT):
        return False
    cause = err.__cause__
    return cause is None or isinstance(cause, PERMANENT) or getattr(cause, "status", None) in (401, 403, 404, 410)


def _open_once(location: str) -> IO[bytes]:
    """``location`` opened for reading, no retry: http(s) streamed (plain servers serve no byte ranges)."""
    if location.startswith(PIPE):
        return _Command(location.removeprefix(PIPE))
    if not is_remote(location):
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    from fsspec.core import url_to_fs

    options: dict = {}
    opening: dict = {}
    if location.startswith(("http://", "https://")):
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=READ_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        options["client_kwargs"] = {"timeout": timeout}
        opening["block_size"] = 0
    fs, path = url_to_fs(location, **options)
    return fs.open(path, "rb", **opening)


def _skip(file: IO[bytes], count: int) -> None:
    """Read ``count`` bytes of ``file`` and drop them: where a stream cannot seek, it starts again from its head."""
    while count:
        data = file.read(min(count, 1 << 20))
        if not data:
            raise OSError(f"ended {count} bytes earlier than on the previous try")
        count -= len(data)


class RetryingReader(io.RawIOBase):
    """``location`` read from start to end, whatever drops on the way: a failed open or read is tried again
    ``retries`` times (pauses ``backoff_s``, twice that, ...; counted anew after each good read), reopening the file
    at the byte where it stopped. Then :class:`Unreadable`, raised again on every later read, the same object."""

    def __init__(
        self,
        location: str,
        retries: int | None = None,
        backoff_s: float | None = None,
        opener: Callable[[str], IO[bytes]] = _open_once,
    ) -> None:
        self.location = location
        self.retries = RETRIES if retries is None else retries
        self.backoff_s = BACKOFF_S if backoff_s is None else backoff_s
        self.opener = opener
        self.position = 0
        self._file: IO[bytes] | None = None
        self._failed: Unreadable | None = None
        self._attempt(lambda: None)  # open now: a file that is not there raises here, not on the first read

    def readable(self) -> bool:
        return True

    def __repr__(self) -> str:  # webdataset puts the stream into its errors' texts
        return f"<RetryingReader {shown(self.location)}>"

    def read(self, size: int | None = -1) -> bytes:
        data = self._attempt(lambda: self._file.read(-1 if size is None else size))
        self.position += len(data)
        return data

    def _reopen(self) -> IO[bytes]:
        file = self.opener(self.location)
        if self.position:
            try:
                try:
                    file.seek(self.position)
                except (OSError, ValueError, io.UnsupportedOperation):
                    _skip(file, self.position)
            except BaseException:
                with contextlib.suppress(Exception):
                    file.close()
                raise
        return file

    def _attempt(self, action: Callable[[], bytes | None]) -> bytes | None:
        if self._failed is not None:
            raise self._failed
        tries = 0
        while True:
            tries += 1
            try:
                if self._file is None:
                    self._file = self._reopen()
                return action()
            except Exception as err:  # noqa: BLE001 (each library has its own errors for a dropped connection)
                self._drop()
                if _permanent(err):
                    raise
                if tries > self.retries:
                    tried = f"{tries} tries" if tries > 1 else "1 try"
                    self._failed = Unreadable(self.location, f"gave up after {tried} ({describe(err)})")
                    raise self._failed from None
                pause = self.backoff_s * 2 ** (tries - 1)
                where = f"{shown(self.location)} failed at byte {self.position}"
                log.info("%s (%s); again in %.1f s", where, describe(err), pause)
                time.sleep(pause)

    def _drop(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close too: it is let go
                self._file.close()
            self._file = None

    def close(self) -> None:
        self._drop()
        super().close()


def read_bytes(location: str, retries: int | None = None, backoff_s: float | None = None) -> bytes:
    """The whole file at ``location``, read with retries (:class:`RetryingReader`)."""
    with RetryingReader(location, retries, backoff_s) as file:
        return file.read()


def listed_names(location: str) -> set[str] | None:
    """The names of the files in the folder at URL ``location``, or None where listing is not to be trusted
    (http(s): a server's index page, if any, is not a listing; pipe: commands) or fails."""
    if location.startswith((PIPE, "http://", "https://")) or not is_remote(location):
        return None
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(location)
        return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
    except Exception as err:  # noqa: BLE001 (listing may be refused where reading is allowed: the stream will tell)
        log.info("could not list %s (%s): shards are checked as they are read", shown(location), describe(err))
        return None
