"""data.path as a remote folder: shards and index.json read over http (``python -m http.server``), from an S3
endpoint (moto's server) and through a ``pipe:`` command, each started on 127.0.0.1 by the test. The same samples
arrive as from the local folder; a connection that drops is reopened where it stopped; one that keeps dropping is
skipped, counted and reported in one line; an index.json out of reach is a one-line error."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from svi_infer.errors import UserError
from svi_train import remote
from svi_train.data import DataConfig, DataSkipError, WdsDataModule
from svi_train.shards import read_index, shard_files
from tests.helpers import compose_train, free_port

BUCKET = "svi-shards"


def _wait_for(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def http_url(shards) -> Iterator[str]:
    """The prepared folder served by ``python -m http.server`` (its parent served: the URL names the folder)."""
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(shards.parent), str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port)
        yield f"http://127.0.0.1:{port}/{shards.name}"
    finally:
        server.terminate()
        server.wait()


@pytest.fixture(scope="module")
def s3_url(shards) -> Iterator[str]:
    """The prepared folder uploaded to moto's S3 server; the endpoint and keys are in the environment, as a user's
    would be (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(key, raising=False)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for file in sorted(p for p in shards.rglob("*") if p.is_file() and p.parts[len(shards.parts)] != "work"):
            client.upload_file(str(file), BUCKET, f"prefix/ds/{file.relative_to(shards).as_posix()}")
        try:
            yield f"s3://{BUCKET}/prefix/ds"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()  # its instances hold the endpoint they were made with
            server.stop()


def _pipe_url(shards: Path) -> str:
    return f"pipe:cat {shards}/{{name}}"


def _samples(path: str, shards: list[str], **config) -> tuple[list[dict], object]:
    """Every batch (of one sample) a pass over ``shards`` gives, and the pass's skip counts."""
    data = WdsDataModule(DataConfig(path=path, shuffle_buffer=0, **config), shards)
    return list(data.train_dataloader()), data.validated


def _assert_equal(got, want) -> None:
    """Equal batches: the same keys, every tensor bit for bit."""
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _assert_equal(got[key], want[key])
    else:
        assert got == want


def _assert_same(samples: list[dict], expected: list[dict]) -> None:
    assert [s["key"] for s in samples] == [s["key"] for s in expected]
    for got, want in zip(samples, expected, strict=True):
        _assert_equal(got, want)


@pytest.fixture(scope="module")
def local_samples(shards) -> list[dict]:
    samples = _samples(str(shards), shard_files(shards, read_index(shards)))[0]
    assert len(samples) == 8 and samples[0]["cond"] and samples[0]["image"] is not None
    return samples


@pytest.fixture(params=["http", "s3", "pipe"])
def url(request, shards) -> str:
    return _pipe_url(shards) if request.param == "pipe" else request.getfixturevalue(f"{request.param}_url")


# --- the same folder, wherever it is -----------------------------------------------------------------------------


def test_index_and_shard_list_are_the_local_ones(url, shards):
    index = read_index(url)
    assert index == read_index(shards)
    files = shard_files(url, index)
    assert [remote.name_in(url, f) for f in files] == [f"shards/{s['name']}" for s in index["shards"]]
    assert files[0] == remote.member(url, f"shards/{index['shards'][0]['name']}")


def test_the_same_samples_stream(url, local_samples):
    samples, validated = _samples(url, shard_files(url, read_index(url)))
    _assert_same(samples, local_samples)
    assert validated.skipped == 0


def test_a_shard_missing_from_the_bucket_is_named_at_start(s3_url, shards):
    index = read_index(s3_url)
    index["shards"].append({"name": "gone.tar", "samples": 1, "bytes": 1})
    missing = rf"^1 of the 2 shards index.json lists are missing from {s3_url}/shards: gone.tar; copy them back"
    with pytest.raises(UserError, match=missing):
        shard_files(s3_url, index)


# --- connections that drop ---------------------------------------------------------------------------------------


class _Dropping(http.server.SimpleHTTPRequestHandler):
    """Serves the folder, but a GET of a file in ``drops`` (path -> how many more times) sends half the body and
    hangs up; -1: every time."""

    drops: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        with self.lock:
            left = self.drops.get(self.path, 0)
            if left > 0:
                self.drops[self.path] = left - 1
        if not left:
            return super().copyfile(source, outputfile)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def dropping(shards, tmp_path) -> Iterator[tuple[str, dict[str, int]]]:
    """A copy of the folder whose index.json also lists ``broken.tar`` (a copy of the first shard), served by
    :class:`_Dropping`: (its URL, the drops to set)."""
    root = tmp_path / "served"
    shutil.copytree(shards, root / "ds", ignore=shutil.ignore_patterns("work"))
    index = json.loads((root / "ds" / "index.json").read_text())
    first = index["shards"][0]
    shutil.copy(root / "ds" / "shards" / first["name"], root / "ds" / "shards" / "broken.tar")
    index["shards"].append({**first, "name": "broken.tar"})
    (root / "ds" / "index.json").write_text(json.dumps(index))

    class Handler(_Dropping):
        drops: dict[str, int] = {}

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ds", Handler.drops
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def test_a_dropped_connection_is_reopened_where_it_stopped(dropping, local_samples, caplog):
    url, drops = dropping
    drops.update({"/ds/index.json": 2, "/ds/shards/shard-000000.tar": 2, "/ds/shards/broken.tar": 3})
    caplog.set_level(logging.INFO, logger=remote.__name__)
    files = shard_files(url, read_index(url))
    samples, validated = _samples(url, files)
    _assert_same(samples, local_samples + local_samples)  # broken.tar is shard-000000.tar's copy
    assert validated.skipped == 0 and not any(drops.values())
    retried = [r.getMessage() for r in caplog.records if r.name == remote.__name__]
    assert len(retried) == 7 and all(" failed at byte " in line for line in retried)


def test_a_connection_that_keeps_dropping_is_skipped_counted_and_reported_once(dropping, local_samples, caplog):
    url, drops = dropping
    drops["/ds/shards/broken.tar"] = -1
    files = shard_files(url, read_index(url))
    samples, validated = _samples(url, files, max_skip_ratio=0.9)
    _assert_same(samples[: len(local_samples)], local_samples)  # the good shard whole, then broken.tar's head
    assert validated.skipped == 1 and validated.bad_shards == {"broken.tar": None}
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert re.fullmatch(
        rf"data: skipped shard {url}/shards/broken.tar: gave up after 4 tries \(ClientPayloadError: [^\n]+\)", line
    ), line

    with pytest.raises(DataSkipError) as failed:
        _samples(url, files[1:])  # broken.tar alone, max_skip_ratio=0.1
    message = str(failed.value)
    assert re.fullmatch(
        rf"1 of \d+ samples read could not be used \(more than data.max_skip_ratio=0.1\), from broken.tar in "
        rf"{url}/shards; the first: shard {url}/shards/broken.tar: gave up after 4 tries \(ClientPayloadError: .+\); "
        r"check the shards with `python -m data_tools verify output=<a local copy>` and prepare them again",
        message,
    ), message


def test_an_index_out_of_reach_is_one_line(shards, dropping, capsys):
    from svi_train.__main__ import train_or_exit

    port = free_port()  # nothing listens there
    with pytest.raises(SystemExit) as exited:
        train_or_exit(compose_train(["+experiment=tiny", f"data.path=http://me:secret@127.0.0.1:{port}/ds"]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    [line] = err.splitlines()
    assert line.startswith(
        f"svi_train: error: cannot read http://***@127.0.0.1:{port}/ds/index.json: gave up after 4 tries "
        "(ClientConnectorError: Cannot connect to host 127.0.0.1:"
    ), line
    assert line.endswith("); check data.path and the connection (and, for s3:// or gs://, the credentials)"), line

    url, drops = dropping
    drops["/ds/index.json"] = -1
    with pytest.raises(UserError, match=rf"^cannot read {url}/index.json: gave up after 4 tries \(ClientPayloadError"):
        read_index(url)
    with pytest.raises(FileNotFoundError, match=rf"^{url}/nope/index.json does not exist: check data.path, or "):
        read_index(f"{url}/nope")
    with pytest.raises(UserError, match=r"^cannot read pipe:false index.json: gave up after 4 tries \(OSError: "):
        read_index("pipe:false {name}")
    with pytest.raises(UserError, match=r"^cannot read nope://x/index.json: ValueError: Protocol not known: nope;"):
        read_index("nope://x")  # not retried
    with pytest.raises(ValueError, match=r"^data.path=pipe:cat index.json has no \{name\}"):
        read_index("pipe:cat index.json")


# --- a run ---------------------------------------------------------------------------------------------------------


def test_a_run_trains_from_http(http_url, tmp_path):
    """In a DataLoader worker too: fsspec's connections are made anew in the forked process."""
    from svi_train.run import run

    out = tmp_path / "run"
    overrides = [f"data.path={http_url}", f"output_dir={out}", "trainer.max_steps=2", "data.num_workers=1"]
    final = run(compose_train(["+experiment=tiny", *overrides]))
    assert (final / "svi.json").is_file()
