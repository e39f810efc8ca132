"""The one contract every Remote backend passes (litestream's TestReplicaClient_* idea).

A backend's test module subclasses RemoteContract and provides a `remote` fixture (a
ready Remote on a real server, binary or folder) and, optionally, `broken_remote` (one
that cannot work: wrong credentials, a path that is a file...).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest

from cloudmanagerd.remotes.base import MISSING, Cancelled, RemoteError, Transfer


def make_object(data: bytes) -> tuple[str, int]:
    """(hash, readable fd) for `data`; the caller closes the fd."""
    f = tempfile.TemporaryFile()
    f.write(data)
    f.flush()
    fd = os.dup(f.fileno())
    f.close()
    return hashlib.sha256(data).hexdigest(), fd


def fetch(remote, h: str, url: str) -> bytes:
    with tempfile.TemporaryFile() as out:
        remote.get(h, url, out.fileno())
        os.lseek(out.fileno(), 0, os.SEEK_SET)
        return out.read()


class RemoteContract:
    def put(self, remote, data: bytes) -> tuple[str, str]:
        h, fd = make_object(data)
        try:
            url = remote.put(h, fd, len(data))
        finally:
            os.close(fd)
        return h, url

    def test_put_then_get_returns_the_same_bytes(self, remote) -> None:
        data = os.urandom(300_000)
        h, url = self.put(remote, data)
        assert fetch(remote, h, url) == data

    def test_empty_object(self, remote) -> None:
        h, url = self.put(remote, b"")
        assert remote.exists(h, url) == 0
        assert fetch(remote, h, url) == b""

    def test_exists_after_put_and_not_after_delete(self, remote) -> None:
        data = b"exists" * 1000
        h, url = self.put(remote, data)
        assert remote.exists(h, url) == len(data)
        remote.delete(h, url)
        assert remote.exists(h, url) is None

    def test_missing_object_is_a_clear_not_found(self, remote) -> None:
        h = hashlib.sha256(b"never stored " + os.urandom(8)).hexdigest()
        assert remote.exists(h, "") is None
        with pytest.raises(RemoteError) as info:
            fetch(remote, h, "")
        assert info.value.kind == MISSING

    def test_deleting_a_missing_object_is_harmless(self, remote) -> None:
        remote.delete(hashlib.sha256(os.urandom(8)).hexdigest(), "")

    def test_reputting_the_same_hash_is_harmless(self, remote) -> None:
        data = b"twice" * 5000
        h, url1 = self.put(remote, data)
        h, url2 = self.put(remote, data)
        assert fetch(remote, h, url2) == data

    def test_an_interrupted_put_leaves_no_complete_looking_object(self, remote) -> None:
        data = os.urandom(4 << 20)
        h, fd = make_object(data)
        transfer = Transfer(len(data))
        transfer.cancel("test interrupts the put")
        try:
            with pytest.raises(RemoteError):
                remote.put(h, fd, len(data), transfer)
        finally:
            os.close(fd)
        assert remote.exists(h, "") is None

    def test_probe_of_a_working_remote_passes(self, remote) -> None:
        remote.probe()

    def test_a_broken_remote_says_what_is_wrong(self, broken_remote) -> None:
        data = b"broken"
        h, fd = make_object(data)
        try:
            with pytest.raises(RemoteError) as info:
                broken_remote.put(h, fd, len(data))
        finally:
            os.close(fd)
        assert str(info.value)
        assert "\n" not in str(info.value)
        with pytest.raises(RemoteError):
            broken_remote.probe()


__all__ = ["Cancelled", "RemoteContract", "fetch", "make_object"]
