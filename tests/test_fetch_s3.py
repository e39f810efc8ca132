"""`get` of an evicted file from a real S3 server (SeaweedFS) when the server misbehaves: a copy with other
bytes, a truncated copy, the server stalled (SIGSTOP) or killed (SIGKILL) in the middle of the download.

The fetch writes the output while the bytes arrive (hasher and output writer threads behind the parallel
ranged GETs): whatever goes wrong, the output gets the file's bytes or is left as it was, the cache gets
nothing unverified, and no thread is left behind.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from seaweed import SeaweedFS, seaweed  # noqa: F401  (the session fixture)

import cloudmanagerd.fetch as fetch_module
from cloudmanagerd.cache import Cache
from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.errors import CloudManagerError
from cloudmanagerd.eviction import Evictor
from cloudmanagerd.fetch import Fetcher
from cloudmanagerd.remotes.s3 import S3Remote

MiB = 1 << 20
NOW = 1_700_000_000.0


class S3World:
    """A catalog, a cache and S3 remotes (one prefix each in one bucket) holding copies of files."""

    def __init__(self, root: Path, server: SeaweedFS, names: tuple[str, ...], read_timeout: float = 60) -> None:
        self.server = server
        self.bucket = server.make_bucket()
        self.catalog = Catalog.open(f"sqlite:///{root / 'catalog.sqlite3'}", "n1")
        self.cache = Cache(str(root / "cache"), 64 * MiB)
        opts = server.remote_options(self.bucket)
        self.remotes = {n: S3Remote(n, self.bucket, prefix=f"{n}/", endpoint=opts["endpoint"],
                                    access_key_id=opts["access_key_id"], secret_access_key=opts["secret_access_key"],
                                    connect_timeout=2, read_timeout=read_timeout) for n in names}
        self.evictor = Evictor(self.cache, self.catalog, lambda: 1)
        self.fetcher = Fetcher(self.cache, self.catalog, self.remotes, self.evictor, now=lambda: NOW)
        self.root = root

    def close(self) -> None:
        for r in self.remotes.values():
            r.close()
        self.cache.close()
        self.catalog.close()

    def add_evicted(self, data: bytes) -> str:
        """A file with a copy on every remote and none in the cache."""
        h = hashlib.sha256(data).hexdigest()
        assert self.evictor.reserve(len(data))
        fd = os.open(h, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=self.cache.subdir_fd(h))
        try:
            os.write(fd, data)
            self.catalog.finish_ingest([IngestRecord(h, b"f", len(data))], list(self.remotes), NOW)
            self.cache.commit(len(data))
            for name, r in self.remotes.items():
                self.catalog.upload_done(h, name, r.put(h, fd, len(data)), len(data), 1, NOW)
        finally:
            os.close(fd)
        self.evictor.evict([(h, len(data))])
        return h

    def replace_object(self, remote: str, h: str, body: bytes) -> None:
        with self.server.client() as s3:
            s3.put_object(Bucket=self.bucket, Key=f"{remote}/{h}", Body=body)

    def order(self, h: str) -> list[str]:
        return [r for r, _ in self.catalog.good_copies(h)]

    def cached(self, h: str) -> bool:
        return bool(self.catalog.cached_here([h])) and self.cache.has_object(h)

    def tmp_files(self) -> list[str]:
        return os.listdir(self.root / "cache" / "tmp")


@pytest.fixture
def small_parts(monkeypatch) -> None:
    """Many ranged GETs and many pieces for the hasher and the output writer, on a few MiB."""
    monkeypatch.setattr("cloudmanagerd.remotes.s3.GET_PART", 256 * 1024)
    monkeypatch.setattr("cloudmanagerd.remotes.s3.READ_CHUNK", 64 * 1024)
    monkeypatch.setattr(fetch_module, "FETCH_PIECE", 64 * 1024)


@pytest.fixture
def world(tmp_path: Path, seaweed: SeaweedFS, small_parts) -> Iterator[S3World]:  # noqa: F811
    w = S3World(tmp_path, seaweed, ("s3a", "s3b"))
    yield w
    w.close()


def test_a_get_from_s3_whose_first_copy_holds_other_bytes_writes_only_the_good_copy(world: S3World,
                                                                                  tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 12345)
    h = world.add_evicted(data)
    first, second = world.order(h)
    world.replace_object(first, h, os.urandom(len(data)))  # same size, other bytes
    before = threading.active_count()
    out = tmp_path / "out"
    with open(out, "wb") as f:
        assert world.fetcher.send(h, f.fileno()) == len(data)
    assert out.read_bytes() == data
    assert world.order(h) == [second], "the copy with other bytes is marked bad"
    assert world.cached(h) and world.tmp_files() == []
    assert threading.active_count() == before


def test_a_get_from_s3_with_a_truncated_and_a_wrong_copy_leaves_the_output_as_it_was(world: S3World,
                                                                                   tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 12345)
    h = world.add_evicted(data)
    first, second = world.order(h)
    world.replace_object(first, h, data[: 2 * MiB])  # truncated: the right bytes, too few of them
    world.replace_object(second, h, data[:-1] + bytes([data[-1] ^ 1]))  # one bit off, in the held-back piece
    before = threading.active_count()
    out = tmp_path / "out"
    out.write_bytes(b"before\n")
    with open(out, "ab") as f:
        with pytest.raises(CloudManagerError, match="could not fetch it from any remote"):
            world.fetcher.send(h, f.fileno())
    assert out.read_bytes() == b"before\n", "no byte of a bad copy is left in the output"
    assert world.order(h) == []
    assert not world.cached(h) and world.tmp_files() == []
    assert world.cache.reserved == 0
    assert threading.active_count() == before


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A server of these tests' own, started before any test's leak check: the stalled test stops and
    resumes it, the killed one (last) kills it."""
    with SeaweedFS.start(tmp_path_factory.mktemp("weed")) as server:
        gc.collect()  # a failed readiness probe of the start can hold a socket in a reference cycle
        yield server


@pytest.mark.parametrize("how", ["stalled", "killed"])
def test_a_server_stalled_or_killed_mid_get_fails_the_get_with_the_reason_and_leaves_nothing(
        tmp_path: Path, small_parts, own_server: SeaweedFS, how: str) -> None:
    """SIGSTOP once the first bytes arrived holds every stream until the read timeout; SIGKILL drops the
    connections. The get fails with a one-line reason within the timeout, the output is as it was, the
    cache has nothing, and no stream is left."""
    server = own_server
    w = S3World(tmp_path, server, ("s3",), read_timeout=2)
    try:
        data = os.urandom(32 * MiB)  # 128 ranged GETs: most of them still to come at the first bytes
        h = w.add_evicted(data)
        sent = []

        def progress(done: int, total: int) -> None:
            if not sent and done > 0:
                sent.append(done)
                assert server.proc is not None
                os.kill(server.proc.pid, signal.SIGSTOP if how == "stalled" else signal.SIGKILL)

        before = threading.active_count()
        out = tmp_path / "out"
        started = time.monotonic()
        try:
            with open(out, "wb") as f:
                with pytest.raises(CloudManagerError) as info:
                    w.fetcher.send(h, f.fileno(), progress)
        finally:
            if how == "stalled" and server.proc is not None:
                os.kill(server.proc.pid, signal.SIGCONT)
        message = str(info.value)
        assert sent, "the server was never stopped: the get did not start"
        assert "\n" not in message and "could not fetch it from any remote (s3: " in message, message
        assert time.monotonic() - started < 30
        assert out.read_bytes() == b""
        assert not w.cached(h) and w.tmp_files() == [] and w.cache.reserved == 0
        assert w.order(h) == ["s3"], "a server that failed is not a bad copy"
        assert threading.active_count() == before, "a download stream or fetch thread was left"
    finally:
        w.close()
