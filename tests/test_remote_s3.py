"""The s3 backend against a real SeaweedFS S3 server: the shared contract, multipart, cancel,
misconfiguration and outage, the config path, and the daemon end to end."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import wait_for
from remote_contract import RemoteContract, fetch, make_object
from seaweed import SeaweedFS, free_ports, seaweed  # noqa: F401  (the session fixture)

from cloudmanagerd.config import parse_remotes
from cloudmanagerd.remotes import build_remote
from cloudmanagerd.remotes.base import MISSING, REMOTE, TRANSIENT, Cancelled, RemoteError, Transfer
from cloudmanagerd.remotes.s3 import S3Remote

MiB = 1 << 20


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedFS) -> str:  # noqa: F811
    return seaweed.make_bucket()


def make_remote(seaweed: SeaweedFS, bucket: str, **kwargs) -> S3Remote:  # noqa: F811
    options = {"prefix": f"t-{uuid.uuid4().hex[:8]}/", "endpoint": seaweed.endpoint,
               "access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key,
               "connect_timeout": 2, "read_timeout": 30, **kwargs}
    return S3Remote("s3", bucket, **options)


@pytest.fixture
def remote(seaweed: SeaweedFS, bucket: str) -> Iterator[S3Remote]:  # noqa: F811
    r = make_remote(seaweed, bucket)
    yield r
    r.close()


@pytest.fixture
def broken_remote(seaweed: SeaweedFS, bucket: str) -> Iterator[S3Remote]:  # noqa: F811
    r = make_remote(seaweed, bucket, secret_access_key="wrong" + seaweed.secret_key[5:])
    yield r
    r.close()


class TestS3Remote(RemoteContract):
    pass


# -- helpers --------------------------------------------------------------------------------

def random_file(path: Path, size: int) -> str:
    """Write `size` bytes to `path`, every MiB different (one random MiB, each copy stamped
    with its number: fast, and no two parts alike); their SHA-256."""
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for number, start in enumerate(range(0, size, MiB)):
            piece = (number.to_bytes(8, "big") + block[8:])[: size - start]
            digest.update(piece)
            f.write(piece)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            digest.update(piece)
    return digest.hexdigest()


def incomplete_uploads(seaweed: SeaweedFS, bucket: str, prefix: str) -> list[dict]:  # noqa: F811
    with seaweed.client() as s3:
        return s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])


class CancelAfter(Transfer):
    """The uploader's view of a transfer that it cancels (as for a stall) once `limit` bytes moved."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size)
        self.limit = limit

    def update(self, done: int) -> None:
        if done >= self.limit and not self.cancelled:
            self.cancel("test cancels the transfer mid-way")
        super().update(done)


# -- big files --------------------------------------------------------------------------------

def test_a_large_file_goes_up_in_parts_and_comes_back_identical(seaweed, bucket, tmp_path) -> None:  # noqa: F811
    src = tmp_path / "big"
    size = 150 * MiB
    h = random_file(src, size)
    r = make_remote(seaweed, bucket, multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)
    try:
        transfer = Transfer(size)
        fd = os.open(src, os.O_RDONLY)
        try:
            url = r.put(h, fd, size, transfer)
        finally:
            os.close(fd)
        assert url == f"s3://{bucket}/{r.prefix}{h}"
        assert transfer.done == size, "progress was reported up to the whole size"
        with seaweed.client() as s3:
            head = s3.head_object(Bucket=bucket, Key=r.prefix + h)
        assert head["ContentLength"] == size
        assert head["ETag"].strip('"').endswith("-19"), f"150 MiB in 8 MiB parts is 19 parts: {head['ETag']}"
        assert incomplete_uploads(seaweed, bucket, r.prefix) == []

        back = tmp_path / "back"
        back_transfer = Transfer(size)
        fd = os.open(back, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            r.get(h, url, fd, back_transfer)
        finally:
            os.close(fd)
        assert back.stat().st_size == size
        assert file_sha256(back) == h
        assert back_transfer.done == size
    finally:
        r.close()
        for path in (src, tmp_path / "back"):  # pytest keeps the last runs' tmp_path
            path.unlink(missing_ok=True)


@pytest.mark.parametrize("threshold", [4 * MiB, 64 * MiB], ids=["multipart", "single-put"])
def test_a_transfer_cancelled_mid_upload_leaves_nothing(seaweed, bucket, tmp_path, threshold) -> None:  # noqa: F811
    src = tmp_path / "src"
    size = 24 * MiB
    h = random_file(src, size)
    r = make_remote(seaweed, bucket, multipart_threshold=threshold, multipart_chunksize=4 * MiB)
    try:
        transfer = CancelAfter(size, 10 * MiB)
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(Cancelled, match="test cancels"):
                r.put(h, fd, size, transfer)
            assert os.lseek(fd, 0, os.SEEK_CUR) >= 0, "the caller's fd is still open"
        finally:
            os.close(fd)
        assert transfer.done < size
        assert r.exists(h, "") is None
        # s3transfer's failure clean-up aborted the multipart upload: no parts left behind
        assert incomplete_uploads(seaweed, bucket, r.prefix) == []
    finally:
        r.close()


def test_leftovers_of_a_killed_multipart_upload_are_cleaned_up(seaweed, bucket, remote) -> None:  # noqa: F811
    key = remote.prefix + "0" * 64
    with seaweed.client() as s3:  # what a SIGKILL in the middle of a multipart upload leaves
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * MiB)
    assert len(incomplete_uploads(seaweed, bucket, remote.prefix)) == 1
    assert remote.cleanup_incomplete() == 0, "a recent upload may be another node's, in progress"
    assert remote.cleanup_incomplete(older_than=0) == 1
    assert incomplete_uploads(seaweed, bucket, remote.prefix) == []
    assert remote.exists("0" * 64, "") is None


def test_a_source_that_does_not_match_its_size_leaves_no_object(remote) -> None:
    data = os.urandom(100_000)
    h, fd = make_object(data)
    try:
        with pytest.raises(RemoteError, match="expected 100001") as info:
            remote.put(h, fd, len(data) + 1)
    finally:
        os.close(fd)
    assert info.value.kind == TRANSIENT
    assert remote.exists(h, "") is None


class PrefixWatch(Transfer):
    """Checks at each report that the first `done` bytes of the destination are the source's."""

    def __init__(self, size: int, fd: int, source: bytes) -> None:
        super().__init__(size)
        self.fd, self.expected, self.reports = fd, source, []

    def update(self, done: int) -> None:
        assert os.pread(self.fd, done, 0) == self.expected[:done], f"the prefix of {done} bytes is not on disk"
        self.reports.append(done)
        super().update(done)


def test_a_get_in_parallel_parts_reports_the_prefix_on_disk_and_hashes_behind_it(remote, tmp_path,
                                                                                 monkeypatch) -> None:
    from cloudmanagerd.fetch import ReportingTransfer, TrailingHasher
    monkeypatch.setattr("cloudmanagerd.remotes.s3.GET_PART", 256 * 1024)
    monkeypatch.setattr("cloudmanagerd.remotes.s3.READ_CHUNK", 64 * 1024)
    data = os.urandom(3 * MiB + 12345)
    h, url = RemoteContract().put(remote, data)
    assert remote.sequential_get
    fd = os.open(tmp_path / "back", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        watch = PrefixWatch(len(data), fd, data)
        remote.get(h, url, fd, watch)
        assert watch.reports == sorted(watch.reports) and watch.reports[-1] == len(data)
        os.ftruncate(fd, 0)
        hasher = TrailingHasher(fd)
        remote.get(h, url, fd, ReportingTransfer(len(data), None, hasher))
        assert hasher.finish(len(data)) == h
    finally:
        os.close(fd)


def test_a_get_cancelled_midway_stops_every_stream(remote, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("cloudmanagerd.remotes.s3.GET_PART", 256 * 1024)
    monkeypatch.setattr("cloudmanagerd.remotes.s3.READ_CHUNK", 64 * 1024)
    data = os.urandom(4 * MiB)
    h, url = RemoteContract().put(remote, data)
    fd = os.open(tmp_path / "back", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        transfer = CancelAfter(len(data), MiB)
        before = threading.active_count()
        with pytest.raises(Cancelled, match="test cancels"):
            remote.get(h, url, fd, transfer)
        assert threading.active_count() == before, "no download stream left running"
        assert transfer.done < len(data)
    finally:
        os.close(fd)


def test_a_get_of_an_object_gone_since_its_head_is_missing(remote, tmp_path, monkeypatch) -> None:
    data = os.urandom(1000)
    h, url = RemoteContract().put(remote, data)
    real_head = remote._head
    monkeypatch.setattr(remote, "_head", lambda key: (real_head(key), remote.delete(h, url))[0])
    fd = os.open(tmp_path / "back", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(RemoteError) as info:
            remote.get(h, url, fd, Transfer(len(data)))
        assert info.value.kind == MISSING
    finally:
        os.close(fd)


def test_get_into_a_pipe(remote) -> None:
    data = os.urandom(20_000)  # below the pipe's buffer: no reader thread needed
    h, url = RemoteContract().put(remote, data)
    rd, wr = os.pipe()
    try:
        remote.get(h, url, wr)
        os.close(wr)
        wr = -1
        assert os.read(rd, 1 << 20) == data
    finally:
        os.close(rd)
        if wr >= 0:
            os.close(wr)


# -- what the user misconfigured, and outages ---------------------------------------------------

def test_a_missing_bucket_says_create_it(seaweed, tmp_path) -> None:  # noqa: F811
    r = make_remote(seaweed, f"cmtest-absent-{uuid.uuid4().hex[:8]}")
    try:
        h, fd = make_object(b"no bucket")
        try:
            with pytest.raises(RemoteError) as info:
                r.put(h, fd, 9)
        finally:
            os.close(fd)
        assert info.value.kind == REMOTE
        assert "does not exist" in str(info.value) and r.bucket in str(info.value)
        for call in (r.probe, lambda: r.exists(h, ""), lambda: fetch(r, h, "")):
            with pytest.raises(RemoteError, match="does not exist") as info:
                call()
            assert info.value.kind == REMOTE, "a missing bucket is not a missing copy"
    finally:
        r.close()


@pytest.mark.parametrize("which", ["secret", "key id"])
def test_wrong_credentials_are_access_denied(seaweed, bucket, which) -> None:  # noqa: F811
    if which == "secret":
        r = make_remote(seaweed, bucket, secret_access_key="not-the-secret")
    else:
        r = make_remote(seaweed, bucket, access_key_id="AKIDNOTKNOWN")
    try:
        h, fd = make_object(b"denied")
        try:
            with pytest.raises(RemoteError) as info:
                r.put(h, fd, 6)
        finally:
            os.close(fd)
        for call in (r.probe, lambda: r.exists(h, ""), lambda: fetch(r, h, "")):
            with pytest.raises(RemoteError) as other:
                call()
            assert other.value.kind == REMOTE
        assert info.value.kind == REMOTE
        assert "access denied" in str(info.value) and "credentials" in str(info.value)
    finally:
        r.close()


def test_a_server_that_is_down_is_transient_and_fast(bucket) -> None:
    [port] = free_ports(1)  # nothing listens there
    r = S3Remote("s3", bucket, endpoint=f"http://127.0.0.1:{port}", access_key_id="k",
                 secret_access_key="s", connect_timeout=1, read_timeout=5)
    try:
        started = time.monotonic()
        h, fd = make_object(b"down")
        try:
            with pytest.raises(RemoteError) as info:
                r.put(h, fd, 4)
        finally:
            os.close(fd)
        with pytest.raises(RemoteError) as probed:
            r.probe()
        assert info.value.kind == TRANSIENT and probed.value.kind == TRANSIENT
        assert f"127.0.0.1:{port}" in str(info.value)
        assert time.monotonic() - started < 10
    finally:
        r.close()


def test_a_hung_server_cannot_hold_a_cancelled_upload_beyond_the_read_timeout(bucket) -> None:
    """A server that accepts the connection and then says nothing (the kernel completes the
    handshake of a listening socket nobody accepts on): the uploader's cancel takes effect at
    the latest when the socket's read_timeout expires."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        port = hung.getsockname()[1]
        r = S3Remote("s3", bucket, endpoint=f"http://127.0.0.1:{port}", access_key_id="k",
                     secret_access_key="s", connect_timeout=1, read_timeout=2)
        transfer = Transfer(8 * MiB)
        timer = threading.Timer(0.5, transfer.cancel, ["stalled: no progress (upload.stall)"])
        h, fd = make_object(os.urandom(8 * MiB))
        try:
            started = time.monotonic()
            timer.start()
            with pytest.raises(Cancelled, match="stalled"):
                r.put(h, fd, 8 * MiB, transfer)
            assert time.monotonic() - started < 8
        finally:
            timer.cancel()
            timer.join()
            os.close(fd)
            r.close()


def test_request_checksum_when_required_works(seaweed, bucket, tmp_path) -> None:  # noqa: F811
    r = make_remote(seaweed, bucket, request_checksum="when_required", multipart_threshold=8 * MiB,
                    multipart_chunksize=8 * MiB)
    try:
        small = os.urandom(300_000)
        h, url = RemoteContract().put(r, small)
        assert fetch(r, h, url) == small
        src = tmp_path / "parts"
        big_h = random_file(src, 12 * MiB)
        fd = os.open(src, os.O_RDONLY)
        try:
            url = r.put(big_h, fd, 12 * MiB)  # in two parts
        finally:
            os.close(fd)
        assert r.exists(big_h, url) == 12 * MiB
        assert hashlib.sha256(fetch(r, big_h, url)).hexdigest() == big_h
    finally:
        r.close()


# -- the config path -----------------------------------------------------------------------------

def remote_config(tmp_path: Path, **options):
    [rc] = parse_remotes([{"name": "sw", **options}], base_dir=str(tmp_path))
    return rc


def test_from_config_reads_the_secret_file(seaweed, bucket, tmp_path) -> None:  # noqa: F811
    secret = tmp_path / "secret"
    secret.write_text(seaweed.secret_key + "\n")
    options = seaweed.remote_options(bucket, prefix="cfg/")
    del options["secret_access_key"]
    r = build_remote(remote_config(tmp_path, **options, secret_access_key_file=str(secret)))
    try:
        assert isinstance(r, S3Remote) and r.kind == "s3" and r.reports_progress
        data = b"from the config" * 100
        h, url = RemoteContract().put(r, data)
        assert url == f"s3://{bucket}/cfg/{h}"
        assert fetch(r, h, url) == data
        r.delete(h, url)
    finally:
        r.close()


def test_from_config_names_a_missing_secret_file(seaweed, bucket, tmp_path) -> None:  # noqa: F811
    options = seaweed.remote_options(bucket)
    del options["secret_access_key"]
    missing = tmp_path / "nope" / "secret"
    with pytest.raises(RemoteError) as info:
        build_remote(remote_config(tmp_path, **options, secret_access_key_file=str(missing)))
    assert info.value.kind == REMOTE
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_object_is_missing_not_an_error(remote) -> None:
    with pytest.raises(RemoteError) as info:
        fetch(remote, "f" * 64, "")
    assert info.value.kind == MISSING and "missing" in str(info.value)


# -- the daemon end to end ------------------------------------------------------------------------

def test_daemon_copies_a_dropped_file_to_s3(daemon_factory, seaweed, bucket, workdir) -> None:  # noqa: F811
    d = daemon_factory(remotes=1, start=False, upload={"redundancy": 2})
    d.config["remotes"].append({"name": "sw", **seaweed.remote_options(bucket, prefix="e2e/")})
    d.config_path.write_text(yaml.safe_dump(d.config))
    d.start()
    data = os.urandom(200_000)
    h = hashlib.sha256(data).hexdigest()
    (d.inbox / "payload.bin").write_bytes(data)

    def copies():
        return {r["name"]: r for r in d.status()["remotes"]}

    remotes = wait_for(lambda: (c := copies()) and c["sw"]["copies"] == 1 and c["r0"]["copies"] == 1 and c,
                       message="a copy on the directory remote and on S3")
    assert remotes["sw"]["healthy"] and remotes["sw"]["type"] == "s3"
    with seaweed.client() as s3:
        head = s3.head_object(Bucket=bucket, Key=f"e2e/{h}")
        assert head["ContentLength"] == len(data)
        assert s3.get_object(Bucket=bucket, Key=f"e2e/{h}")["Body"].read() == data
    [f] = [f for f in d.files() if f["hash"] == h]
    assert len(f["copies"]) == 2
    assert d.stop() == 0


def test_a_small_put_whose_bytes_do_not_match_their_hash_is_refused_by_the_server(remote) -> None:
    """Small objects go up in one PUT carrying their SHA-256: the server checks what arrived."""
    data = os.urandom(50_000)
    _, fd = make_object(data)
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    try:
        with pytest.raises(RemoteError):
            remote.put(wrong, fd, len(data))
    finally:
        os.close(fd)
    assert remote.exists(wrong, "") is None


# -- put_many: the uploader's batches ---------------------------------------------------------

def batch_items(tmp_path: Path, blobs: list[bytes], names: list[str] | None = None) -> list[tuple]:
    """(hash, fd, size, pending transfer) items for put_many; each hash is that of the blob unless
    `names` says otherwise. The caller closes the fds."""
    items = []
    for i, data in enumerate(blobs):
        path = tmp_path / f"obj{i}"
        path.write_bytes(data)
        h = names[i] if names else hashlib.sha256(data).hexdigest()
        items.append((h, os.open(path, os.O_RDONLY), len(data), Transfer(len(data), pending=True)))
    return items


def close_items(items: list[tuple]) -> None:
    for _, fd, _, _ in items:
        os.close(fd)


def test_put_many_stores_every_object_checked_and_reports_its_progress(remote, tmp_path) -> None:
    blobs = [os.urandom(1000 + 4099 * i) for i in range(40)] + [b""]
    items = batch_items(tmp_path, blobs)
    try:
        results = remote.put_many(items)
    finally:
        close_items(items)
    assert results == [remote.url(h) for h, *_ in items]
    for (h, _, size, transfer), data in zip(items, blobs):
        assert not transfer.pending and transfer.done == size
        assert fetch(remote, h, remote.url(h)) == data


def test_put_many_fails_a_mismatching_or_short_object_alone(remote, tmp_path) -> None:
    blobs = [os.urandom(5000) for _ in range(6)]
    names = [hashlib.sha256(b).hexdigest() for b in blobs]
    names[2] = hashlib.sha256(b"other bytes").hexdigest()  # the server checks the SHA-256: refused
    items = batch_items(tmp_path, blobs, names)
    short = items[4]
    items[4] = (short[0], short[1], short[2] + 10, short[3])  # the source holds fewer bytes than said
    try:
        results = remote.put_many(items)
    finally:
        close_items(items)
    for i, (h, *_) in enumerate(items):
        if i in (2, 4):
            assert isinstance(results[i], RemoteError) and results[i].kind == TRANSIENT, results[i]
            assert remote.exists(h, remote.url(h)) is None
        else:
            assert results[i] == remote.url(h)
            assert remote.exists(h, remote.url(h)) == 5000
    assert "BadDigest" in str(results[2]) or "checksum" in str(results[2]).lower()


def test_put_many_cancelled_items_are_cancelled_and_leave_nothing(remote, tmp_path) -> None:
    blobs = [os.urandom(200_000) for _ in range(4)]
    items = batch_items(tmp_path, blobs)
    items[1][3].cancel("stalled")  # cancelled before the batch reached it

    class CancelMidway(Transfer):
        def update(self, done: int) -> None:
            if done:
                self.cancel("the daemon is stopping")
            super().update(done)
    h, fd, size, _ = items[3]
    items[3] = (h, fd, size, CancelMidway(size, pending=True))  # cancelled while its bytes are sent
    try:
        results = remote.put_many(items)
    finally:
        close_items(items)
    assert results[0] == remote.url(items[0][0]) and results[2] == remote.url(items[2][0])
    assert isinstance(results[1], Cancelled) and "stalled" in str(results[1])
    assert isinstance(results[3], Cancelled) and "stopping" in str(results[3])
    assert remote.exists(items[1][0], "") is None and remote.exists(items[3][0], "") is None


def test_put_many_with_wrong_credentials_is_a_remote_error_for_each(broken_remote, tmp_path) -> None:
    items = batch_items(tmp_path, [b"one", b"two"])
    try:
        results = broken_remote.put_many(items)
    finally:
        close_items(items)
    assert all(isinstance(r, RemoteError) and r.kind == REMOTE and "access denied" in str(r) for r in results)


def test_put_many_when_required_checksums_goes_through_put(seaweed, bucket, tmp_path) -> None:  # noqa: F811
    r = make_remote(seaweed, bucket, request_checksum="when_required")
    items = batch_items(tmp_path, [b"alpha", b"beta"])
    try:
        assert r.put_many(items) == [r.url(h) for h, *_ in items]
        assert fetch(r, items[0][0], r.url(items[0][0])) == b"alpha"
    finally:
        close_items(items)
        r.close()


def test_the_uploader_sends_s3_batches_and_never_records_a_mismatching_object(seaweed, bucket,  # noqa: F811
                                                                                tmp_path) -> None:
    from test_uploads import World, step

    world = World(tmp_path)
    s3 = make_remote(seaweed, bucket)
    up, calls, bad = world.batch_uploader(s3)
    try:
        hashes = [world.add_file(f"s3 object {i:02d}".encode() * 50, ["s3"]) for i in range(20)]
        rotten = hashes[7]
        with open(world.cache.object_path(rotten), "r+b") as f:
            f.write(b"X")  # the same size, other bytes: the server refuses them, nothing is recorded
        step(up)
        assert calls == [20]
        assert bad == [rotten] and world.copies(rotten) == []
        assert world.pairs(rotten)["s3"]["state"] == "retrying"
        assert s3.exists(rotten, "") is None
        assert all(world.copies(h) == ["s3"] for h in hashes if h != rotten)
        assert world.catalog.remote_stats()["s3"]["errors"] == 0  # the local copy was at fault
    finally:
        world.close()
        s3.close()


# -- the batch PUTs' own connections --------------------------------------------------------

def test_put_many_under_a_prefix_that_needs_encoding_lands_under_each_key(seaweed, bucket,  # noqa: F811
                                                                            tmp_path) -> None:
    r = make_remote(seaweed, bucket, prefix=f"with space/ü+x={uuid.uuid4().hex[:6]}/")
    blobs = [os.urandom(3000) for _ in range(5)]
    items = batch_items(tmp_path, blobs)
    try:
        assert r.put_many(items) == [r.url(h) for h, *_ in items]
        assert sorted(name for name, _ in r.list_objects()) == sorted(h for h, *_ in items)
        assert fetch(r, items[0][0], r.url(items[0][0])) == blobs[0]
    finally:
        close_items(items)
        r.close()


def test_put_many_sends_again_over_a_connection_closed_while_idle(remote, tmp_path) -> None:
    """Kept-alive connections the server dropped between two batches cost nothing but a resend."""
    first = batch_items(tmp_path, [os.urandom(2000) for _ in range(4)])
    try:
        assert remote.put_many(first) == [remote.url(h) for h, *_ in first]
    finally:
        close_items(first)
    assert remote._direct is not None and remote._direct._idle
    for conn in remote._direct._idle:
        conn.sock.shutdown(socket.SHUT_RDWR)  # as a server closing them: the next send fails
    second = batch_items(tmp_path, [os.urandom(2000) for _ in range(4)])  # the first batch's files, rewritten
    try:
        assert remote.put_many(second) == [remote.url(h) for h, *_ in second]
    finally:
        close_items(second)


def put_many_at(port: int, bucket: str, tmp_path: Path, blobs: list[bytes], read_timeout: float) -> list:
    """put_many of `blobs` to whatever listens on 127.0.0.1:`port` (if anything): its results."""
    r = S3Remote("s3", bucket, endpoint=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s",
                 connect_timeout=2, read_timeout=read_timeout)
    items = batch_items(tmp_path, blobs)
    try:
        return r.put_many(items)
    finally:
        close_items(items)
        r.close()


def test_put_many_to_a_server_that_is_down_is_a_transient_error_for_each(bucket, tmp_path) -> None:
    [port] = free_ports(1)  # nothing listens there
    results = put_many_at(port, bucket, tmp_path, [b"one", b"two", b"three"], read_timeout=5)
    for result in results:
        assert isinstance(result, RemoteError) and result.kind == TRANSIENT, result
        assert f"cannot connect to http://127.0.0.1:{port} (is the server up? check endpoint)" in str(result)


def test_put_many_to_a_server_that_never_answers_fails_at_the_read_timeout(bucket, tmp_path) -> None:
    """A server that takes the bytes and says nothing: each PUT ends as a transient error once
    read_timeout has passed, and no connection is left open."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        results = put_many_at(hung.getsockname()[1], bucket, tmp_path, [os.urandom(10_000), os.urandom(20_000)],
                              read_timeout=1)
    for result in results:
        assert isinstance(result, RemoteError) and result.kind == TRANSIENT, result
        assert "did not answer in time" in str(result)


def test_put_many_through_botocores_session_when_not_sent_directly(seaweed, bucket, tmp_path,  # noqa: F811
                                                                    monkeypatch) -> None:
    """https or a proxy on the way: the batch PUTs go through botocore's session (its TLS and proxy
    settings), signed and checked the same way."""
    import cloudmanagerd.remotes.s3 as s3
    monkeypatch.setattr(s3, "_direct_connections", lambda *args: None)
    r = make_remote(seaweed, bucket)
    blobs = [os.urandom(4000) for _ in range(3)]
    names = [hashlib.sha256(b).hexdigest() for b in blobs]
    names[1] = hashlib.sha256(b"other bytes").hexdigest()  # refused by the server's check
    items = batch_items(tmp_path, blobs, names)
    try:
        results = r.put_many(items)
    finally:
        close_items(items)
        r.close()
    assert results[0] == r.url(names[0]) and results[2] == r.url(names[2])
    assert isinstance(results[1], RemoteError) and results[1].kind == TRANSIENT


def test_put_many_reads_the_answer_of_a_server_that_refuses_before_the_body(bucket, tmp_path) -> None:
    """A server that answers "access denied" as soon as it has read the headers, and closes the
    connection on the body it did not read: the object fails for that reason (the remote is
    misconfigured), not as a connection reset taken for a passing outage."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def refuse() -> None:
            conn, _ = server.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                answer = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(answer), answer))
        thread = threading.Thread(target=refuse)
        thread.start()
        try:
            [result] = put_many_at(server.getsockname()[1], bucket, tmp_path, [os.urandom(4 * MiB)], read_timeout=5)
        finally:
            thread.join()
    assert isinstance(result, RemoteError) and result.kind == REMOTE, result
    assert "access denied" in str(result)


# -- the batch PUTs against servers that misbehave on demand (a hostile review) ----------------

class FakeS3:
    """A server on loopback that runs `handle(conn, request_head)` for each connection it accepts, one
    thread each; everything is closed and joined on exit."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(32)
        self.port = self.server.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.acceptor = threading.Thread(target=self._accept)

    def __enter__(self) -> FakeS3:
        self.acceptor.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,))
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.handle(conn, head)

    def __exit__(self, *exc) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.acceptor.join()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join()
        for conn in self.conns:
            conn.close()


def answer(status: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_put_many_never_takes_a_success_answered_before_the_body_was_sent_for_stored(bucket, tmp_path) -> None:
    """A server (or a middlebox) that says 200 as soon as it has the headers and drops the connection
    on the body: the object cannot have been checked, so it is no copy (a transient error)."""
    def early_ok(conn: socket.socket, head: bytes) -> None:
        conn.sendall(answer("200 OK", extra="Connection: close\r\n"))
        conn.close()  # the unread body makes it a reset

    with FakeS3(early_ok) as fake:
        [result] = put_many_at(fake.port, bucket, tmp_path, [os.urandom(4 * MiB)], read_timeout=5)
    assert isinstance(result, RemoteError) and result.kind == TRANSIENT, result


def slow_loris(conn: socket.socket, head: bytes) -> None:
    """Takes the whole body, then answers one byte of its status line every 0.2 s: no read times out."""
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    got = len(head.split(b"\r\n\r\n", 1)[1])
    while got < length:
        data = conn.recv(65536)
        if not data:
            return
        got += len(data)
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 60000:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_cancel_or_a_stop_ends_a_batch_put_held_by_a_slow_loris(bucket, tmp_path, how) -> None:
    """A server that dribbles its answer, a byte at a time, never lets the read time out: the uploader's
    cancel (upload.stall, the daemon stopping) and closing the remote still end the PUT, with no
    connection left open."""
    fds = len(os.listdir("/proc/self/fd"))
    results: list = []
    items = batch_items(tmp_path, [os.urandom(100_000)])
    transfer = items[0][3]
    try:
        with FakeS3(slow_loris) as fake:  # on the way out, whatever happened, it drops every connection
            r = S3Remote("s3", bucket, endpoint=f"http://127.0.0.1:{fake.port}", access_key_id="k",
                         secret_access_key="s", connect_timeout=2, read_timeout=30)
            batch = threading.Thread(target=lambda: results.extend(r.put_many(items)))
            batch.start()
            wait_for(lambda: transfer.done == 100_000, message="the body sent")
            if how == "cancel":
                transfer.cancel("stalled: no progress (upload.stall)")
                wait_for(lambda: not batch.is_alive(), timeout=10, message="the batch ended")
            else:
                closing = threading.Thread(target=r.close)
                closing.start()
                wait_for(lambda: not batch.is_alive() and not closing.is_alive(), timeout=10,
                         message="the batch ended and the remote closed")
                closing.join()
    finally:
        batch.join()
        r.close()
        close_items(items)
    assert isinstance(results[0], RemoteError), results
    if how == "cancel":
        assert isinstance(results[0], Cancelled) and "stalled" in str(results[0])
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.parametrize("path", ["direct", "botocore's session"])
def test_put_many_to_an_endpoint_spelled_in_capitals_is_signed_for_the_host_it_names(seaweed, bucket,  # noqa: F811
                                                                                     tmp_path, path,
                                                                                     monkeypatch) -> None:
    """Host names are case-blind: the PUT's Host header is the one its signature was made for."""
    if path != "direct":
        import cloudmanagerd.remotes.s3 as s3
        monkeypatch.setattr(s3, "_direct_connections", lambda *args: None)
    r = make_remote(seaweed, bucket, endpoint=seaweed.endpoint.replace("127.0.0.1", "LocalHost"))
    items = batch_items(tmp_path, [os.urandom(3000) for _ in range(3)])
    try:
        assert r.put_many(items) == [r.url(h) for h, *_ in items]
    finally:
        close_items(items)
        r.close()


def drain_and_answer(reply: bytes, requests: int = 1 << 30):
    """A handler that reads each request's body whole and gives `reply`, on a connection kept alive
    for that many `requests` (then closed without a word, as a server whose idle timeout passed)."""
    def handle(conn: socket.socket, head: bytes) -> None:
        for number in range(requests):
            top, _, rest = head.partition(b"\r\n\r\n")
            length = int(next((line.split(b":")[1] for line in top.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0))  # 0: a GET
            while len(rest) < length:
                data = conn.recv(65536)
                if not data:
                    return
                rest += data
            conn.sendall(reply)
            head = rest[length:]
            if number == requests - 1:
                conn.shutdown(socket.SHUT_RDWR)
                return
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
    return handle


SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


@pytest.mark.parametrize("reply, kind, says", [
    (answer("503 Slow Down", SLOW_DOWN), TRANSIENT, "SlowDown"),
    (answer("500 Internal Server Error"), TRANSIENT, "500"),
    (answer("403 Forbidden"), REMOTE, "access denied"),
    (answer("301 Moved Permanently", b"<Error><Code>PermanentRedirect</Code></Error>"), REMOTE, "another region"),
    (answer("307 Temporary Redirect", extra="Location: http://127.0.0.1:1/\r\n"), TRANSIENT, "307"),
    (answer("503 Slow Down", SLOW_DOWN + b" " * (64 * MiB)), TRANSIENT, "SlowDown"),
    (b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SLOW_DOWN), SLOW_DOWN),
     TRANSIENT, "SlowDown"),
    (b"garbage\r\n\r\n", TRANSIENT, "closed the connection"),
], ids=["503 SlowDown", "500 bare", "403", "301", "307", "huge error body", "chunked", "garbage"])
def test_put_many_names_each_answer_of_a_server_as_the_client_would(bucket, tmp_path, reply, kind, says) -> None:
    with FakeS3(drain_and_answer(reply)) as fake:
        results = put_many_at(fake.port, bucket, tmp_path, [os.urandom(5000), os.urandom(300_000)], read_timeout=5)
    for result in results:
        assert isinstance(result, RemoteError) and result.kind == kind, result
        assert says in str(result) and "\n" not in str(result) and len(str(result)) < 400, result


def test_put_many_succeeds_through_answers_that_close_come_chunked_or_continue(bucket, tmp_path) -> None:
    for reply in (answer("200 OK", extra="Connection: close\r\n"),
                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                  b"HTTP/1.1 100 Continue\r\n\r\n" + answer("200 OK")):  # a 100 nobody asked for
        with FakeS3(drain_and_answer(reply)) as fake:
            blobs = [os.urandom(1000 * i) for i in range(20)]
            results = put_many_at(fake.port, bucket, tmp_path, blobs, read_timeout=5)
        assert all(isinstance(result, str) for result in results), results


def test_put_many_reads_no_more_of_an_error_answer_than_it_names(bucket, tmp_path) -> None:
    """An error answer that announces 10 GiB (a hostile or broken server): its first bytes name the
    error, and the rest is never read into memory (here it never comes: the error is still named)."""
    reply = b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\n\r\n%s" % (10 << 30, SLOW_DOWN + b" " * MiB)
    with FakeS3(drain_and_answer(reply)) as fake:
        [result] = put_many_at(fake.port, bucket, tmp_path, [os.urandom(5000)], read_timeout=5)
    assert isinstance(result, RemoteError) and result.kind == TRANSIENT and "SlowDown" in str(result), result


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
def test_put_many_goes_through_the_http_proxy_of_the_environment_unless_no_proxy_says_not(
        bucket, tmp_path, monkeypatch, no_proxy) -> None:
    """HTTP_PROXY and NO_PROXY mean for the batch PUTs what they mean for every other request."""
    heads: list[bytes] = []

    def proxy(conn: socket.socket, head: bytes) -> None:
        heads.append(head)
        drain_and_answer(answer("503 Slow Down", SLOW_DOWN))(conn, head)

    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    [port] = free_ports(1)  # the endpoint: nothing listens there
    with FakeS3(proxy) as fake:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{fake.port}")
        monkeypatch.setenv("NO_PROXY", no_proxy)
        [result] = put_many_at(port, bucket, tmp_path, [os.urandom(3000)], read_timeout=5)
    assert isinstance(result, RemoteError) and result.kind == TRANSIENT, result
    if no_proxy:
        assert "cannot connect" in str(result) and not heads
    else:
        assert "SlowDown" in str(result)
        assert heads[0].startswith(f"PUT http://127.0.0.1:{port}/{bucket}/".encode())


def test_put_many_over_5000_puts_leaves_no_descriptor_behind(seaweed, bucket, tmp_path) -> None:  # noqa: F811
    """Kept-alive connections are reused, not piled up: as many descriptors open after 5,000 PUTs as
    after the first batch, and after close as before the remote."""
    fds = len(os.listdir("/proc/self/fd"))
    r = make_remote(seaweed, bucket)
    try:
        warm = None
        for _ in range(20):
            items = batch_items(tmp_path, [os.urandom(1000) for _ in range(250)])
            try:
                assert all(isinstance(result, str) for result in r.put_many(items))
            finally:
                close_items(items)
            warm = warm or len(os.listdir("/proc/self/fd"))
            assert len(os.listdir("/proc/self/fd")) <= warm
    finally:
        r.close()
    assert len(os.listdir("/proc/self/fd")) <= fds  # (fewer: a socket of an earlier test collected meanwhile)


def test_put_many_signs_with_temporary_credentials_and_the_remotes_region(bucket, tmp_path, monkeypatch) -> None:
    """Credentials of the standard chain (here the environment) with a session token, and a region other
    than us-east-1: each batch PUT carries the token and is signed for that region."""
    heads: list[bytes] = []

    def server(conn: socket.socket, head: bytes) -> None:
        heads.append(head)
        drain_and_answer(answer("200 OK"))(conn, head)

    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATEMP")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "the-session-token")
    with FakeS3(server) as fake:
        r = S3Remote("s3", bucket, endpoint=f"http://127.0.0.1:{fake.port}", region="eu-west-3",
                     connect_timeout=2, read_timeout=5)
        items = batch_items(tmp_path, [os.urandom(3000)])
        try:
            assert r.put_many(items) == [r.url(items[0][0])]
        finally:
            close_items(items)
            r.close()
    put = next(head for head in heads if head.startswith(b"PUT "))
    assert b"x-amz-security-token: the-session-token\r\n" in put.lower()
    assert b"/eu-west-3/s3/aws4_request" in put


def test_a_cancel_ends_a_lone_small_put_held_by_a_slow_loris(bucket, tmp_path) -> None:
    """The uploader sends a lone small file by put, over the same connections as a batch: its cancel
    (upload.stall, the daemon stopping) ends it as well."""
    [(h, fd, size, _)] = items = batch_items(tmp_path, [os.urandom(100_000)])
    transfer = Transfer(size)
    errors: list = []

    def put() -> None:
        try:
            r.put(h, fd, size, transfer)
        except RemoteError as error:
            errors.append(error)
    try:
        with FakeS3(slow_loris) as fake:  # on the way out, whatever happened, it drops every connection
            r = S3Remote("s3", bucket, endpoint=f"http://127.0.0.1:{fake.port}", access_key_id="k",
                         secret_access_key="s", connect_timeout=2, read_timeout=30)
            lone = threading.Thread(target=put)
            lone.start()
            wait_for(lambda: transfer.done == size, message="the body sent")
            transfer.cancel("stalled: no progress (upload.stall)")
            wait_for(lambda: not lone.is_alive(), timeout=10, message="the put ended")
    finally:
        lone.join()
        r.close()
        close_items(items)
    assert isinstance(errors[0], Cancelled) and "stalled" in str(errors[0]), errors


def test_put_many_sends_again_when_the_server_dropped_its_idle_connections(bucket, tmp_path) -> None:
    """A server that closes each connection after one answer without saying "close" (as one whose idle
    timeout passed between two batches): each PUT that meets a dead kept-alive connection goes again."""
    with FakeS3(drain_and_answer(answer("200 OK"), requests=1)) as fake:
        r = S3Remote("s3", bucket, endpoint=f"http://127.0.0.1:{fake.port}", access_key_id="k",
                     secret_access_key="s", connect_timeout=2, read_timeout=5)
        try:
            for _ in range(3):
                items = batch_items(tmp_path, [os.urandom(2000 + i) for i in range(8)])
                try:
                    assert r.put_many(items) == [r.url(h) for h, *_ in items]
                finally:
                    close_items(items)
        finally:
            r.close()
