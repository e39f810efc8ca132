"""A catalog that fails between a batch's move into the cache and its registration (a PostgreSQL
server going away at that moment, a disk filling): the files are in the cache, not in the inbox
and not yet registered. They must not wait for the next start: the ingest worker finishes them as
soon as the catalog answers again. Run on both backends."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cloudmanagerd import fsutil
from cloudmanagerd.cache import Cache
from cloudmanagerd.catalog import Catalog
from cloudmanagerd.ingest import Ingestor, IngestWorker
from cloudmanagerd.inbox import PendingQueue, stat_in
from cloudmanagerd.rejects import Rejector
from conftest import wait_for


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Catalog]:
    url = (f"sqlite:///{workdir / 'state' / 'catalog.sqlite3'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    c = Catalog.open(url, "node1")
    yield c
    c.close()


def test_a_batch_moved_but_not_registered_is_finished_when_the_catalog_is_back(workdir: Path,
                                                                              catalog: Catalog) -> None:
    inbox = workdir / "inbox"
    inbox.mkdir()
    cache = Cache(str(workdir / "cache"), 64 << 20)
    rejector = Rejector(str(workdir / "rejected"))
    inbox_fd = fsutil.open_root(str(inbox))
    ingestor = Ingestor(inbox_fd, cache, catalog, rejector, remotes=lambda: ["r0"], ignore=[])
    real_finish = catalog.finish_ingest
    failures = [psycopg.OperationalError("server closed the connection unexpectedly")]

    def finish_once_failing(*args, **kwargs):
        if failures:
            raise failures.pop()  # the server went away after the batch's files moved into the cache
        return real_finish(*args, **kwargs)
    catalog.finish_ingest = finish_once_failing  # type: ignore[method-assign]
    queue = PendingQueue(0.0, lambda rel: stat_in(inbox_fd, rel))
    registered: list[str] = []
    worker = IngestWorker(ingestor, queue, scan=lambda rel: None, on_registered=registered.extend)
    data = {b"a.bin": os.urandom(5000), b"b.bin": os.urandom(7000)}
    for name, content in data.items():
        (inbox / name.decode()).write_bytes(content)
        queue.put_ready(name)
    worker.start()
    try:
        hashes = {hashlib.sha256(c).hexdigest() for c in data.values()}
        wait_for(lambda: {f["hash"] for f in catalog.list_files()} == hashes, timeout=30,
                 message="both files registered without a restart")
        assert not failures and not any(inbox.iterdir())
        assert catalog.pending_ingests() == []
        assert all(catalog.file_info(h)["cached"] and catalog.file_info(h)["pending"] == ["r0"] for h in hashes)
    finally:
        worker.stop()
        worker.join(30)
        os.close(inbox_fd)
        rejector.close()
        cache.close()
