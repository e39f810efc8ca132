"""Start-up reconciliation and the ingest step, on the parts themselves (no daemon process).

Each test fabricates a state that a crash or power cut can leave between two steps of
the durable order (row committed, rename/copy, fsync, row says cached) and checks that
`Ingestor.reconcile()` finishes or undoes it: nothing lost, nothing half-done left.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudmanagerd import fsutil
from cloudmanagerd import ingest as ingest_module
from cloudmanagerd.cache import Cache
from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.errors import NotFound
from cloudmanagerd.ingest import Ingestor
from cloudmanagerd.rejects import Rejector

IGNORE = [".*", "*.part", "*.tmp", "*~"]


@dataclass
class Parts:
    root: Path
    inbox: Path
    cache_path: Path
    db_path: Path
    catalog: Catalog
    cache: Cache
    rejector: Rejector
    ingestor: Ingestor

    def object_path(self, h: str) -> Path:
        return self.cache_path / h[:2] / h

    def objects(self) -> dict[str, bytes]:
        """Every object file in the cache (outside tmp/), by name."""
        found = {}
        for folder in self.cache_path.iterdir():
            if folder.name == "tmp" or not folder.is_dir():
                continue
            for obj in folder.iterdir():
                found[obj.name] = obj.read_bytes()
        return found

    def ingest_rows(self) -> list[tuple]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT node, hash, name, size FROM ingests").fetchall()

    def registered(self, h: str) -> dict | None:
        try:
            return self.catalog.file_info(h)
        except NotFound:
            return None


@pytest.fixture
def parts(workdir: Path) -> Iterator[Parts]:
    inbox = workdir / "inbox"
    inbox.mkdir()
    cache_path = workdir / "cache"
    db_path = workdir / "state" / "catalog.sqlite3"
    catalog = Catalog.open("sqlite:///" + str(db_path), "node1")
    cache = Cache(str(cache_path), 64 << 20)
    rejector = Rejector(str(workdir / "rejected"))
    inbox_fd = fsutil.open_root(str(inbox))
    ingestor = Ingestor(inbox_fd, cache, catalog, rejector, remotes=lambda: ["r0"], ignore=IGNORE)
    try:
        yield Parts(workdir, inbox, cache_path, db_path, catalog, cache, rejector, ingestor)
    finally:
        os.close(inbox_fd)
        rejector.close()
        cache.close()
        catalog.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def begin(parts: Parts, name: str, data: bytes) -> IngestRecord:
    """Step 1 of the durable order: the committed "ingesting" row."""
    record = IngestRecord(digest(data), name.encode(), len(data))
    parts.catalog.begin_ingest([record], 1_700_000_000.0)
    return record


def put_object(parts: Parts, h: str, data: bytes) -> Path:
    path = parts.object_path(h)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- reconcile: each half-done state a crash can leave ------------------------------------------

def test_row_with_file_still_in_inbox_is_undone_and_the_file_taken_again(parts: Parts) -> None:
    data = os.urandom(10_000)
    (parts.inbox / "a.bin").write_bytes(data)
    record = begin(parts, "a.bin", data)  # crash right after the commit, before the rename

    parts.ingestor.reconcile()

    assert parts.ingest_rows() == []
    assert (parts.inbox / "a.bin").read_bytes() == data
    assert parts.registered(record.hash) is None
    assert parts.objects() == {}
    # and the file is still takeable: the next ingest registers it
    result = parts.ingestor.ingest([b"a.bin"])
    assert result.registered == [record.hash]
    assert parts.objects() == {record.hash: data}
    assert not (parts.inbox / "a.bin").exists()


def test_row_with_file_already_renamed_into_cache_is_finished(parts: Parts) -> None:
    data = os.urandom(20_000)
    record = begin(parts, "sub/b.bin", data)
    put_object(parts, record.hash, data)  # crash after the rename, before the "cached" commit

    parts.ingestor.reconcile()

    info = parts.registered(record.hash)
    assert info is not None, "the renamed file must be registered, not lost"
    assert info["cached"] is True
    assert info["name"] == b"sub/b.bin"
    assert info["size"] == len(data)
    assert info["pending"] == ["r0"], "the recovered file must be queued for upload"
    assert parts.ingest_rows() == []
    assert parts.objects() == {record.hash: data}


def test_row_with_torn_cache_object_is_dropped_and_the_inbox_file_kept(parts: Parts) -> None:
    data = os.urandom(30_000)
    (parts.inbox / "c.bin").write_bytes(data)
    record = begin(parts, "c.bin", data)
    put_object(parts, record.hash, data[:12_345])  # a torn object: the wrong bytes under the hash

    parts.ingestor.reconcile()

    assert not parts.object_path(record.hash).exists(), "the torn object must be removed"
    assert parts.ingest_rows() == []
    assert parts.registered(record.hash) is None
    assert (parts.inbox / "c.bin").read_bytes() == data
    result = parts.ingestor.ingest([b"c.bin"])
    assert result.registered == [record.hash]
    assert parts.objects() == {record.hash: data}


def test_row_with_complete_object_and_inbox_copy_is_registered_and_the_copy_removed(parts: Parts) -> None:
    """A cross-mount copy interrupted after the object was complete but before the unlink."""
    data = os.urandom(40_000)
    (parts.inbox / "d.bin").write_bytes(data)
    record = begin(parts, "d.bin", data)
    put_object(parts, record.hash, data)

    parts.ingestor.reconcile()

    info = parts.registered(record.hash)
    assert info is not None and info["cached"] is True
    assert not (parts.inbox / "d.bin").exists(), "the inbox copy of a registered file must go"
    assert parts.ingest_rows() == []
    assert parts.objects() == {record.hash: data}


def test_row_with_complete_object_keeps_a_different_file_now_at_the_inbox_name(parts: Parts) -> None:
    """Someone dropped new content under the same name after the crash: it is not deleted."""
    data = os.urandom(5_000)
    newer = os.urandom(5_000)
    (parts.inbox / "e.bin").write_bytes(newer)
    record = begin(parts, "e.bin", data)
    put_object(parts, record.hash, data)

    parts.ingestor.reconcile()

    assert parts.registered(record.hash)["cached"] is True
    assert (parts.inbox / "e.bin").read_bytes() == newer
    assert parts.ingest_rows() == []


def test_temp_files_in_the_cache_are_removed(parts: Parts) -> None:
    tmp = parts.cache_path / "tmp"
    (tmp / "0123abcd.999.tmp").write_bytes(b"half a copy")
    (tmp / "another.tmp").write_bytes(b"")

    parts.ingestor.reconcile()

    assert list(tmp.iterdir()) == []
    assert parts.objects() == {}


def test_reconcile_of_several_rows_at_once(parts: Parts) -> None:
    """Rows of one batch may have reached different steps when the crash came."""
    undone = os.urandom(1000)
    moved = os.urandom(1000)
    (parts.inbox / "undone").write_bytes(undone)
    r_undone = begin(parts, "undone", undone)
    r_moved = begin(parts, "moved", moved)
    put_object(parts, r_moved.hash, moved)
    (parts.cache_path / "tmp" / "x.tmp").write_bytes(b"junk")

    parts.ingestor.reconcile()

    assert parts.ingest_rows() == []
    assert parts.registered(r_undone.hash) is None
    assert parts.registered(r_moved.hash)["cached"] is True
    assert (parts.inbox / "undone").read_bytes() == undone
    assert parts.objects() == {r_moved.hash: moved}
    assert list((parts.cache_path / "tmp").iterdir()) == []


# -- Ingestor.ingest ------------------------------------------------------------------------------

def test_ingest_registers_with_the_true_hash_and_empties_the_inbox(parts: Parts) -> None:
    data = os.urandom(3 << 20)
    (parts.inbox / "deep" / "er").mkdir(parents=True)
    (parts.inbox / "deep" / "er" / "f.bin").write_bytes(data)

    result = parts.ingestor.ingest([b"deep/er/f.bin"])

    h = digest(data)
    assert result.registered == [h]
    assert parts.registered(h)["name"] == b"deep/er/f.bin"
    assert parts.objects() == {h: data}
    assert not (parts.inbox / "deep" / "er" / "f.bin").exists()
    assert parts.ingest_rows() == []
    assert parts.cache.used == len(data) and parts.cache.reserved == 0


def test_file_changed_while_hashed_is_put_back_not_registered(parts: Parts, monkeypatch) -> None:
    original = os.urandom(100_000)
    path = parts.inbox / "g.bin"
    path.write_bytes(original)
    real_sha = ingest_module.sha256_fd

    def hash_then_writer_appends(fd: int, *args, **kwargs) -> str:
        h = real_sha(fd, *args, **kwargs)
        with open(path, "ab") as writer:  # a writer still holding the file appends mid-ingest
            writer.write(b"more")
        return h

    monkeypatch.setattr(ingest_module, "sha256_fd", hash_then_writer_appends)
    result = parts.ingestor.ingest([b"g.bin"])
    monkeypatch.undo()

    assert result.registered == []
    assert result.requeue == [b"g.bin"]
    assert parts.registered(digest(original)) is None
    assert parts.objects() == {}
    assert path.read_bytes() == original + b"more"
    assert parts.cache.reserved == 0

    again = parts.ingestor.ingest([b"g.bin"])
    assert again.registered == [digest(original + b"more")]
    assert parts.objects() == {digest(original + b"more"): original + b"more"}


def test_file_changed_between_hash_and_rename_is_put_back_not_registered(parts: Parts, monkeypatch) -> None:
    original = os.urandom(100_000)
    path = parts.inbox / "h.bin"
    path.write_bytes(original)
    real_begin = parts.catalog.begin_ingest

    def begin_then_writer_appends(records, now):
        real_begin(records, now)
        with open(path, "ab") as writer:  # written after the hash, before the rename
            writer.write(b"late bytes")

    monkeypatch.setattr(parts.catalog, "begin_ingest", begin_then_writer_appends)
    result = parts.ingestor.ingest([b"h.bin"])
    monkeypatch.undo()

    changed = original + b"late bytes"
    assert result.registered == []
    assert b"h.bin" in result.requeue
    assert parts.registered(digest(original)) is None, "registered under a hash its bytes do not have"
    assert parts.objects() == {}, "no object may hold bytes that do not match its name"
    assert path.read_bytes() == changed, "the file must be back in the inbox, whole"
    assert parts.ingest_rows() == []
    assert parts.cache.reserved == 0 and parts.cache.used == 0

    again = parts.ingestor.ingest([b"h.bin"])
    assert again.registered == [digest(changed)]
    assert parts.objects() == {digest(changed): changed}


def test_file_swapped_between_hash_and_rename_is_not_registered_under_the_old_hash(parts: Parts,
                                                                                   monkeypatch) -> None:
    original = os.urandom(50_000)
    replacement = os.urandom(50_000)
    path = parts.inbox / "i.bin"
    path.write_bytes(original)
    real_begin = parts.catalog.begin_ingest

    def begin_then_swap(records, now):
        real_begin(records, now)
        staged = parts.root / "staged"
        staged.write_bytes(replacement)
        os.rename(staged, path)  # another file renamed over the name

    monkeypatch.setattr(parts.catalog, "begin_ingest", begin_then_swap)
    result = parts.ingestor.ingest([b"i.bin"])
    monkeypatch.undo()

    assert result.registered == []
    assert parts.registered(digest(original)) is None
    assert parts.objects() == {}
    assert path.read_bytes() == replacement
    assert parts.ingest_rows() == []


def test_duplicate_of_a_cached_file_is_removed_without_a_second_object(parts: Parts) -> None:
    data = os.urandom(70_000)
    (parts.inbox / "first.bin").write_bytes(data)
    assert parts.ingestor.ingest([b"first.bin"]).registered == [digest(data)]
    used = parts.cache.used

    (parts.inbox / "again.bin").write_bytes(data)
    result = parts.ingestor.ingest([b"again.bin"])

    assert result.registered == []
    assert result.duplicates == 1
    assert not (parts.inbox / "again.bin").exists()
    assert parts.objects() == {digest(data): data}
    assert parts.cache.used == used
    assert parts.registered(digest(data))["name"] == b"first.bin"
    assert parts.ingest_rows() == []


def test_two_identical_files_in_one_batch_give_one_object(parts: Parts) -> None:
    data = os.urandom(8_000)
    (parts.inbox / "x1").write_bytes(data)
    (parts.inbox / "x2").write_bytes(data)

    result = parts.ingestor.ingest([b"x1", b"x2"])

    assert result.registered == [digest(data)]
    assert result.duplicates == 1
    assert list(parts.inbox.iterdir()) == []
    assert parts.objects() == {digest(data): data}


def test_cache_objects_without_rows_are_adopted_or_rejected(tmp_path: Path) -> None:
    """A hand-copied object (or one from a restored catalog backup) is registered when its bytes
    match its name, and moved to the rejected folder when they do not: never silently kept."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cache = Cache(str(tmp_path / "cache"), 1 << 20)
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.sqlite3'}", "n1")
    rejector = Rejector(str(tmp_path / "rejected"))
    inbox_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ingestor = Ingestor(inbox_fd, cache, catalog, rejector, lambda: ["r0"], [])
        good = b"adopt me"
        h = hashlib.sha256(good).hexdigest()
        (tmp_path / "cache" / h[:2]).mkdir(exist_ok=True)
        (tmp_path / "cache" / h[:2] / h).write_bytes(good)
        liar = hashlib.sha256(b"something else").hexdigest()
        (tmp_path / "cache" / liar[:2]).mkdir(exist_ok=True)
        (tmp_path / "cache" / liar[:2] / liar).write_bytes(b"not what the name says")

        assert ingestor.adopt_orphans() == 1
        info = catalog.file_info(h)
        assert info["cached"] and info["name"] == b"recovered/" + h.encode() and info["pending"] == ["r0"]
        assert cache.used == len(good)
        assert not (tmp_path / "cache" / liar[:2] / liar).exists()
        assert (tmp_path / "rejected" / "cache" / liar).read_bytes() == b"not what the name says"
        assert ingestor.adopt_orphans() == 0  # nothing left to adopt
    finally:
        os.close(inbox_fd)
        rejector.close()
        cache.close()
        catalog.close()


def test_a_batch_larger_than_the_room_left_takes_the_files_that_fit_and_leaves_the_rest(parts: Parts) -> None:
    # room is reserved for a whole batch at once; when the batch does not fit, file by file
    parts.cache.set_capacity(25_000)
    datas = {f"f{i}.bin": os.urandom(10_000) for i in range(3)}
    for name, data in datas.items():
        (parts.inbox / name).write_bytes(data)
    result = parts.ingestor.ingest([name.encode() for name in datas])
    assert len(result.registered) == 2 and [reason for _, reason in result.waiting] == ["cache-full"]
    (left, _), = result.waiting
    assert (parts.inbox / os.fsdecode(left)).read_bytes() == datas[os.fsdecode(left)]
    assert parts.cache.used == 20_000 and parts.cache.reserved == 0
    assert sorted(parts.objects().values()) == sorted(d for n, d in datas.items() if n.encode() != left)
