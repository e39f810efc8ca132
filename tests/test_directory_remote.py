"""The directory remote on real folders.

`RemoteBehaviour` uses nothing but the Remote protocol and a `remote` fixture, so that every
backend can run it (the shared suite in remote_contract.py is the other half); the
`TestDirectoryRemote` class adds what only a folder can show: the object layout, the temp
names a killed writer leaves, and the errors of a remote path that is not a folder.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cloudmanagerd.remotes import directory
from cloudmanagerd.remotes.base import MISSING, REMOTE, RemoteError, Transfer
from cloudmanagerd.remotes.directory import DirectoryRemote

REPO = Path(__file__).resolve().parent.parent


def source(data: bytes) -> int:
    """A readable fd holding `data` (anonymous temp file); the caller closes it."""
    fd = os.open(tempfile.gettempdir(), os.O_RDWR | os.O_TMPFILE, 0o600)
    os.write(fd, data)
    return fd


def put(remote, data: bytes) -> tuple[str, str]:
    h = hashlib.sha256(data).hexdigest()
    fd = source(data)
    try:
        return h, remote.put(h, fd, len(data))
    finally:
        os.close(fd)


def fetch(remote, h: str, url: str) -> bytes:
    with tempfile.TemporaryFile() as out:
        remote.get(h, url, out.fileno())
        out.seek(0)
        return out.read()


def unknown_hash() -> str:
    return hashlib.sha256(os.urandom(16)).hexdigest()


class RemoteBehaviour:
    """Backend-independent checks; a subclass provides the `remote` fixture."""

    @pytest.mark.parametrize("size", [0, 1, 65_536, (1 << 20) + 7])
    def test_put_then_get_returns_the_same_bytes(self, remote, size: int) -> None:
        data = os.urandom(size)
        h, url = put(remote, data)
        assert fetch(remote, h, url) == data
        assert remote.exists(h, url) == size

    def test_put_reads_the_source_from_its_start(self, remote) -> None:
        data = b"0123456789" * 1000
        h = hashlib.sha256(data).hexdigest()
        fd = source(data)  # its offset is at the end after writing
        try:
            url = remote.put(h, fd, len(data))
        finally:
            os.close(fd)
        assert fetch(remote, h, url) == data

    def test_exists_gives_the_size_after_put_and_none_after_delete(self, remote) -> None:
        data = b"exists" * 999
        h, url = put(remote, data)
        assert remote.exists(h, url) == len(data)
        remote.delete(h, url)
        assert remote.exists(h, url) is None
        with pytest.raises(RemoteError) as info:
            fetch(remote, h, url)
        assert info.value.kind == MISSING

    def test_objects_are_independent(self, remote) -> None:
        a, b = os.urandom(1000), os.urandom(2000)
        ha, ua = put(remote, a)
        hb, ub = put(remote, b)
        remote.delete(ha, ua)
        assert remote.exists(ha, ua) is None
        assert fetch(remote, hb, ub) == b

    def test_get_of_a_missing_object_is_kind_missing(self, remote) -> None:
        h = unknown_hash()
        with pytest.raises(RemoteError) as info:
            fetch(remote, h, "")
        assert info.value.kind == MISSING
        assert h[:12] in str(info.value)

    def test_get_of_a_missing_object_beside_others_is_kind_missing(self, remote) -> None:
        stored, url = put(remote, b"neighbour")
        # same two-digit prefix as the stored one, so its folder exists
        h = stored[:2] + unknown_hash()[2:]
        with pytest.raises(RemoteError) as info:
            fetch(remote, h, "")
        assert info.value.kind == MISSING
        assert remote.exists(h, "") is None

    def test_reputting_the_same_hash_is_harmless(self, remote) -> None:
        data = os.urandom(50_000)
        h, url1 = put(remote, data)
        h, url2 = put(remote, data)
        assert url1 == url2
        assert remote.exists(h, url2) == len(data)
        assert fetch(remote, h, url2) == data

    def test_a_short_source_stores_nothing(self, remote) -> None:
        # the source shrank while being sent: the size promised is not the size read
        data = os.urandom(10_000)
        h = hashlib.sha256(data + b"rest").hexdigest()
        fd = source(data)
        try:
            with pytest.raises(RemoteError) as info:
                remote.put(h, fd, len(data) + 4)
        finally:
            os.close(fd)
        assert "\n" not in str(info.value)
        assert remote.exists(h, "") is None
        with pytest.raises(RemoteError) as info:
            fetch(remote, h, "")
        assert info.value.kind == MISSING

    def test_an_unreadable_source_stores_nothing(self, remote, tmp_path: Path) -> None:
        path = tmp_path / "write-only"
        path.write_bytes(b"x" * 5000)
        h = hashlib.sha256(b"x" * 5000).hexdigest()
        fd = os.open(path, os.O_WRONLY)
        try:
            with pytest.raises(RemoteError):
                remote.put(h, fd, 5000)
        finally:
            os.close(fd)
        assert remote.exists(h, "") is None

    def test_deleting_a_missing_object_is_fine(self, remote) -> None:
        remote.delete(unknown_hash(), "")
        h, url = put(remote, b"twice")
        remote.delete(h, url)
        remote.delete(h, url)
        assert remote.exists(h, url) is None

    def test_probe_of_a_working_remote_passes_and_leaves_nothing(self, remote) -> None:
        remote.probe()
        remote.probe()


class TestDirectoryRemote(RemoteBehaviour):
    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        path = tmp_path / "remote"
        path.mkdir()
        return path

    @pytest.fixture
    def remote(self, root: Path) -> DirectoryRemote:
        return DirectoryRemote("nas", str(root))

    @staticmethod
    def names(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def test_objects_live_at_prefix_slash_hash_and_the_url_says_where(self, remote, root: Path) -> None:
        data = b"layout" * 100
        h, url = put(remote, data)
        assert url == str(root / h[:2] / h)
        assert (root / h[:2] / h).read_bytes() == data
        assert self.names(root) == [f"{h[:2]}/{h}"]  # and no temp file, no probe file

    # a small object is read whole and written in one call; a bigger one is copied in the kernel
    @pytest.mark.parametrize("size", [200_000, directory.SMALL + 200_000])
    def test_a_put_killed_mid_copy_leaves_no_complete_looking_object(self, remote, root: Path,
                                                                    tmp_path: Path, size: int) -> None:
        # a real SIGKILL in the middle of the copy, in a child process using the real code
        data = os.urandom(size)
        h = hashlib.sha256(data).hexdigest()
        src = tmp_path / "src"
        src.write_bytes(data)
        script = (
            "import os, signal, sys\n"
            "from cloudmanagerd import fsutil\n"
            "from cloudmanagerd.remotes.directory import DirectoryRemote\n"
            "def half(src, dst, progress=None, **options):\n"
            "    die(dst, os.pread(src, 50_000, 0))\n"
            "def die(dst, data, *args):\n"
            "    os.write(dst, data[:50_000])\n"
            "    os.fsync(dst)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "fsutil.copy_fd = half\n"
            "fsutil.write_all = die\n"
            "fd = os.open(sys.argv[2], os.O_RDONLY)\n"
            "DirectoryRemote('nas', sys.argv[1]).put(sys.argv[3], fd, int(sys.argv[4]))\n"
        )
        proc = subprocess.run([sys.executable, "-c", script, str(root), str(src), h, str(len(data))],
                              cwd=REPO, capture_output=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        left = self.names(root)
        assert left, "the killed writer left nothing to look at"
        assert all(os.path.basename(name).startswith(".") for name in left), left
        assert remote.exists(h, "") is None
        with pytest.raises(RemoteError) as info:
            fetch(remote, h, "")
        assert info.value.kind == MISSING
        # the next attempt stores it whole, beside the leftover
        _, url = put(remote, data)
        assert fetch(remote, h, url) == data
        assert [n for n in self.names(root) if not os.path.basename(n).startswith(".")] == [f"{h[:2]}/{h}"]

    def test_a_failed_put_leaves_no_temp_file(self, remote, root: Path) -> None:
        data = os.urandom(10_000)
        h = hashlib.sha256(data).hexdigest()
        fd = source(data)
        try:
            with pytest.raises(RemoteError):
                remote.put(h, fd, len(data) + 1)
        finally:
            os.close(fd)
        assert self.names(root) == []

    @pytest.mark.parametrize("operation", ["put", "get", "exists", "delete", "probe"])
    def test_a_remote_path_that_is_a_regular_file_is_a_remote_error(self, tmp_path: Path, operation: str) -> None:
        path = tmp_path / "not-a-folder"
        path.write_text("oops")
        remote = DirectoryRemote("nas", str(path))
        h = unknown_hash()
        calls = {
            "put": lambda: put(remote, b"data"),
            "get": lambda: fetch(remote, h, ""),
            "exists": lambda: remote.exists(h, ""),
            "delete": lambda: remote.delete(h, ""),
            "probe": remote.probe,
        }
        with pytest.raises(RemoteError) as info:
            calls[operation]()
        # a broken remote is the remote's fault, never a missing copy
        assert info.value.kind == REMOTE
        message = str(info.value)
        assert str(path) in message and "not a folder" in message
        assert "\n" not in message and "Errno" not in message
        assert path.read_text() == "oops"

    def test_a_remote_path_that_does_not_exist_is_a_remote_error(self, tmp_path: Path) -> None:
        path = tmp_path / "unmounted" / "nas"
        remote = DirectoryRemote("nas", str(path))
        for call in (lambda: put(remote, b"x"), remote.probe):
            with pytest.raises(RemoteError) as info:
                call()
            assert info.value.kind == REMOTE
            assert str(path) in str(info.value) and "does not exist" in str(info.value)
        assert not path.exists()  # an unmounted share is never created over

    def test_a_prefix_folder_that_is_a_file_or_a_symlink_is_a_remote_error(self, remote, root: Path,
                                                                            tmp_path: Path) -> None:
        data_a, data_b = b"a" * 10, b"b" * 10
        ha, hb = hashlib.sha256(data_a).hexdigest(), hashlib.sha256(data_b).hexdigest()
        (root / ha[:2]).write_text("in the way")
        outside = tmp_path / "outside"
        outside.mkdir()
        if hb[:2] != ha[:2]:
            os.symlink(outside, root / hb[:2])
        for h, data in ((ha, data_a), (hb, data_b)):
            with pytest.raises(RemoteError) as info:
                put(remote, data)
            assert info.value.kind == REMOTE
        assert list(outside.iterdir()) == []  # never written through the link


# -- put_many: copies made durable in batches ------------------------------------------------------

def batch_items(datas: list[bytes], transfers: bool = False):
    """(hash, fd, size, transfer) items for put_many; the caller closes the fds."""
    return [(hashlib.sha256(d).hexdigest(), source(d), len(d), Transfer(len(d), pending=True) if transfers else None)
            for d in datas]


def remote_names(root: Path) -> set[str]:
    return {p.name for sub in root.iterdir() if sub.is_dir() for p in sub.iterdir()}


@pytest.mark.parametrize("count", [3, 40])  # an fsync each, or one syncfs (SYNCFS_BATCH = 16)
def test_put_many_stores_every_object_under_its_final_name_and_leaves_no_temp_file(tmp_path: Path,
                                                                                    count: int) -> None:
    remote = DirectoryRemote("nas", str(tmp_path))
    datas = [f"object {i}".encode() * (i + 1) for i in range(count)]
    items = batch_items(datas, transfers=True)
    try:
        results = remote.put_many(items)
    finally:
        for _, fd, _, _ in items:
            os.close(fd)
    assert results == [os.path.join(str(tmp_path), h[:2], h) for h, *_ in items]
    assert remote_names(tmp_path) == {h for h, *_ in items}
    for (h, _, _, transfer), data in zip(items, datas):
        assert (tmp_path / h[:2] / h).read_bytes() == data
        assert not transfer.pending and transfer.done == len(data)


# the source holds fewer bytes than the file's size, or more (it grew): that object fails alone
@pytest.mark.parametrize("delta, message", [(5, "read 100 bytes of 105"), (-1, "read 100 bytes of 99")])
def test_put_many_fails_one_object_alone_and_keeps_no_temp_file_of_it(tmp_path: Path, delta: int,
                                                                      message: str) -> None:
    remote = DirectoryRemote("nas", str(tmp_path))
    items = batch_items([b"a" * 100, b"b" * 100, b"c" * 100] * 1)
    h, fd, size, t = items[1]
    items[1] = (h, fd, size + delta, t)
    try:
        results = remote.put_many(items)
    finally:
        for _, fd, _, _ in items:
            os.close(fd)
    assert isinstance(results[1], RemoteError) and message in str(results[1])
    assert isinstance(results[0], str) and isinstance(results[2], str)
    assert remote_names(tmp_path) == {items[0][0], items[2][0]}


class Recorder:
    """A source check that keeps what the backend says it sent, and refuses it (a copy never made final)."""

    def __init__(self) -> None:
        self.sent: list[bytes | None] = []

    def advance(self, done: int) -> None:
        pass

    def confirm(self, data: bytes | None = None) -> None:
        self.sent.append(data)
        raise RemoteError("refused by the test")


@pytest.mark.parametrize("size", [4096, directory.SMALL + 1])
def test_the_check_of_a_small_object_gets_the_very_bytes_written(tmp_path: Path, size: int) -> None:
    """A small object is read into memory once and written from it: the check hashes those bytes (what
    the copy holds), not the source read again; a big one is copied in the kernel, its source checked."""
    remote = DirectoryRemote("nas", str(tmp_path))
    data = os.urandom(size)
    check = Recorder()
    fd = source(data)
    try:
        with pytest.raises(RemoteError, match="refused by the test"):
            remote.put(hashlib.sha256(data).hexdigest(), fd, size, Transfer(size, source=check))
    finally:
        os.close(fd)
    assert check.sent == [data if size <= directory.SMALL else None]
    assert remote_names(tmp_path) == set()  # refused: no final name, and no temp file left


def test_put_many_on_a_missing_folder_fails_the_whole_batch(tmp_path: Path) -> None:
    remote = DirectoryRemote("nas", str(tmp_path / "gone"))
    items = batch_items([b"x"])
    try:
        with pytest.raises(RemoteError) as info:
            remote.put_many(items)
    finally:
        os.close(items[0][1])
    assert info.value.kind == REMOTE
